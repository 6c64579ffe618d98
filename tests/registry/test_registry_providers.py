"""Provider keys (the cloud KMS outer wrap) in the registry, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from keygate.core.errors import InvalidRequest, NotFound
from keygate.keys.registry import ProviderKeyState, Registry

A = "aws-kms://arn:aws:kms:ap-northeast-1:111122223333:key/aaaa"
B = "hcvault://vault.city.lg.jp:8200/transit/keys/resident"


@pytest.fixture
def reg(registry: Registry) -> Registry:
    registry.add_tenant("131016", kind="lgcode", name="千代田区")
    registry.create_key(
        "131016", "resident", hsm_label="kg/r/1", dek_max_records=10, dek_max_age_s=60
    )
    registry.create_key("131016", "tax", hsm_label="kg/t/1", dek_max_records=10, dek_max_age_s=60)
    return registry


def states(reg: Registry, purpose: str = "resident") -> dict[str, str]:
    return {r.uri: r.state.value for r in reg.list_provider_keys("131016", purpose)}


def test_set_then_migrate_then_finish(reg: Registry) -> None:
    gen = reg.generation()
    reg.switch_provider_key(
        "131016", "resident", A, scheme="aws-kms", region="ap-northeast-1", first=True
    )
    assert reg.generation() == gen + 1
    assert states(reg) == {A: "active"}
    snap = reg.snapshot()
    active = snap.active_provider("131016", "resident")
    assert active is not None
    assert active.uri == A
    assert active.region == "ap-northeast-1"
    assert snap.active_provider("131016", "tax") is None

    reg.switch_provider_key("131016", "resident", B, scheme="hcvault", region="vault:8200")
    assert states(reg) == {A: "decrypt-only", B: "active"}
    retired = reg.finish_provider_migration("131016", "resident")
    assert [r.uri for r in retired] == [A]
    assert retired[0].state is ProviderKeyState.RETIRED
    assert states(reg) == {A: "retired", B: "active"}
    snap = reg.snapshot()
    rec = snap.provider_key("131016", "resident", A)
    assert rec is not None
    assert rec.state is ProviderKeyState.RETIRED


def test_set_refuses_when_a_key_is_active(reg: Registry) -> None:
    reg.switch_provider_key("131016", "resident", A, scheme="aws-kms", region="r", first=True)
    gen = reg.generation()
    with pytest.raises(InvalidRequest, match="migrat"):
        reg.switch_provider_key("131016", "resident", B, scheme="hcvault", region="r", first=True)
    assert reg.generation() == gen
    assert states(reg) == {A: "active"}


def test_migrating_to_the_active_key_is_refused(reg: Registry) -> None:
    reg.switch_provider_key("131016", "resident", A, scheme="aws-kms", region="r", first=True)
    with pytest.raises(InvalidRequest, match="already the active"):
        reg.switch_provider_key("131016", "resident", A, scheme="aws-kms", region="r")


def test_migrating_to_hsm_only_and_back(reg: Registry) -> None:
    reg.switch_provider_key("131016", "resident", A, scheme="aws-kms", region="r", first=True)
    reg.switch_provider_key("131016", "resident", None)
    assert states(reg) == {A: "decrypt-only"}
    assert reg.snapshot().active_provider("131016", "resident") is None
    with pytest.raises(InvalidRequest, match="no active provider key"):
        reg.switch_provider_key("131016", "resident", None)
    # back to A: the known key becomes active again
    reg.switch_provider_key("131016", "resident", A, scheme="aws-kms", region="r")
    assert states(reg) == {A: "active"}


def test_finish_without_a_migration_is_refused(reg: Registry) -> None:
    with pytest.raises(InvalidRequest, match="no provider migration"):
        reg.finish_provider_migration("131016", "resident")


def test_unknown_key_and_bad_uris_are_refused(reg: Registry) -> None:
    with pytest.raises(NotFound):
        reg.switch_provider_key("131016", "nope", A, scheme="aws-kms", region="r")
    for bad in ("", "x" * 513, "aws-kms://a\nb", " aws-kms://a"):
        with pytest.raises(InvalidRequest):
            reg.switch_provider_key("131016", "resident", bad, scheme="aws-kms", region="r")
    assert states(reg) == {}


def test_purposes_are_independent(reg: Registry) -> None:
    reg.switch_provider_key("131016", "resident", A, scheme="aws-kms", region="r", first=True)
    reg.switch_provider_key("131016", "tax", A, scheme="aws-kms", region="r", first=True)
    reg.switch_provider_key("131016", "tax", B, scheme="hcvault", region="r")
    assert states(reg, "resident") == {A: "active"}
    assert states(reg, "tax") == {A: "decrypt-only", B: "active"}
