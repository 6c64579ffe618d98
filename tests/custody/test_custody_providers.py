"""Provider keys under dual control: once it is on, setting or migrating a tenant's provider key
(the residency-bearing configuration) needs M approvals like any other sensitive change."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from custody_support import CHIYODA, Env  # type: ignore[import-not-found]

from keygate.core.errors import Forbidden, InvalidRequest
from keygate.policy.residency import ResidencyViolation
from keygate.testing.kms.sakura import FakeSakuraKmsServer


@pytest.fixture(scope="module")
def sakura() -> Iterator[FakeSakuraKmsServer]:
    with FakeSakuraKmsServer() as server:
        yield server


@pytest.fixture
def provider_env(env: Env, sakura: FakeSakuraKmsServer, monkeypatch: pytest.MonkeyPatch) -> Env:
    for name, value in sakura.env().items():
        monkeypatch.setenv(name, value)  # the adapter reads its settings on first use
    return env


def test_direct_provider_changes_are_refused_once_dual_control_is_on(
    provider_env: Env, sakura: FakeSakuraKmsServer
) -> None:
    uri = sakura.create_key("direct")
    with pytest.raises(Forbidden, match="provider-set") as info:
        provider_env.gw.provider_set("custodian:mallory", CHIYODA, "resident", uri)
    assert "2 custodian approvals" in info.value.detail
    assert provider_env.gw.registry.list_provider_keys(CHIYODA) == []


def test_provider_set_and_migrate_by_approved_request(
    provider_env: Env, sakura: FakeSakuraKmsServer
) -> None:
    first, second = sakura.create_key("first"), sakura.create_key("second")
    req, outcome = provider_env.request(
        "provider-set", {"tenant": CHIYODA, "purpose": "resident", "uri": first}, by="alice"
    )
    assert not outcome.executed
    assert provider_env.gw.registry.list_provider_keys(CHIYODA) == []
    assert provider_env.approve(req, "bob").executed
    (rec,) = provider_env.gw.registry.list_provider_keys(CHIYODA, "resident")
    assert (rec.uri, rec.state.value) == (first, "active")
    set_events = [e for e in provider_env.events("provider.set") if e.outcome == "ok"]
    assert [e.actor for e in set_events] == [f"custody:{req.id}"]

    req, _ = provider_env.request(
        "provider-migrate", {"tenant": CHIYODA, "purpose": "resident", "uri": second}, by="bob"
    )
    assert provider_env.approve(req, "carol").executed
    states = {r.uri: r.state.value for r in provider_env.gw.registry.list_provider_keys(CHIYODA)}
    assert states == {first: "decrypt-only", second: "active"}

    req, _ = provider_env.request(
        "provider-finish", {"tenant": CHIYODA, "purpose": "resident"}, by="carol"
    )
    assert provider_env.approve(req, "alice").executed
    states = {r.uri: r.state.value for r in provider_env.gw.registry.list_provider_keys(CHIYODA)}
    assert states == {first: "retired", second: "active"}


def test_a_request_for_a_key_outside_japan_is_refused_before_anyone_signs(
    provider_env: Env, sakura: FakeSakuraKmsServer
) -> None:
    abroad = sakura.create_key("abroad", region="us1a")
    with pytest.raises(ResidencyViolation):
        provider_env.request(
            "provider-set", {"tenant": CHIYODA, "purpose": "resident", "uri": abroad}, by="alice"
        )
    with pytest.raises(InvalidRequest, match="unknown parameters"):
        provider_env.request(
            "provider-finish",
            {"tenant": CHIYODA, "purpose": "resident", "uri": abroad},
            by="alice",
        )
