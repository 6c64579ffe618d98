"""A real keygate HTTP gateway for the API tests: one per session, on its own SoftHSM token.

The session gateway has tenants 131016 (千代田区), 271004 (大阪市) and ``digital-agency``, each
with resident/tax/mynumber keys, and service identities with different grants.  It is served by a
real uvicorn server on a loopback port; every test talks to it over HTTP with httpx.  Tests that
change key state create a purpose of their own (``api.fresh_purpose``) so they disturb no other
test; tests that take the HSM or the audit trail away build a gateway of their own
(``make_gateway``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import (
    ACTOR,
    AGENCY,
    CHIYODA,
    IDENTITIES,
    MAX_BATCH,
    MAX_BODY,
    MAX_PLAINTEXT,
    OSAKA,
    PURPOSES,
    TYPED_POLICY,
    ApiEnv,
    OwnGateway,
    serve,
)
from prometheus_client import CollectorRegistry

import keygate.api.app as app_module
from keygate.api.app import create_app
from keygate.api.metrics import InstrumentedHsm, Metrics
from keygate.bootstrap import build_gateway
from keygate.config import Settings, load_settings
from keygate.hsm.softhsm import SoftHsmToken
from keygate.policy.records import load_policy_file
from keygate.service import Gateway


def make_settings(token: SoftHsmToken, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "hsm_token_label": token.label,
        "hsm_pin": token.user_pin,
        "hsm_pin_file": None,
        "refresh_interval_s": 0.2,
        "max_plaintext_bytes": MAX_PLAINTEXT,
        "max_batch_items": MAX_BATCH,
        "max_body_bytes": MAX_BODY,
    }
    values.update(overrides)
    return load_settings(**values)


def app_metrics(app: Any) -> Metrics:
    """The Metrics object create_app handed to its middleware."""
    for mw in app.user_middleware:
        if "metrics" in mw.kwargs:
            return mw.kwargs["metrics"]  # type: ignore[no-any-return]
    raise AssertionError("create_app registered no metrics middleware")


def populate(gw: Gateway, tenants: list[tuple[str, str]]) -> dict[str, str]:
    for tenant, name in tenants:
        gw.add_tenant(ACTOR, tenant, name=name)
        for purpose in PURPOSES:
            gw.create_key(ACTOR, tenant, purpose)
    tokens: dict[str, str] = {}
    for name, grants in IDENTITIES.items():
        _, token = gw.add_identity(
            ACTOR,
            name,
            tenants=grants["tenants"],
            purposes=grants["purposes"],
            record_types=grants["record_types"],
            operations=grants["operations"],
        )
        assert token is not None
        tokens[name] = token
    return tokens


@pytest.fixture(scope="session")
def api(
    make_token: Callable[[str], SoftHsmToken], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiEnv]:
    """The session's gateway, served over real HTTP, with clients per identity."""
    hsm_token = make_token("kg-api")
    data_dir = tmp_path_factory.mktemp("api-data")
    settings = make_settings(hsm_token, data_dir)
    gw = build_gateway(settings)
    try:
        tokens = populate(gw, [(CHIYODA, "千代田区"), (OSAKA, "大阪市"), (AGENCY, "デジタル庁")])
        typed = data_dir / "typed.toml"
        typed.write_text(TYPED_POLICY, encoding="utf-8")
        gw.policies["typed"] = load_policy_file(typed)
        app = create_app(settings, gateway=gw)
        metrics = app_metrics(app)
        # create_app instruments the HSM only for a gateway it builds itself: do the same here.
        gw.keys._hsm = InstrumentedHsm(gw.keys._hsm, metrics)
        with serve(app) as url:
            clients = {
                name: httpx.Client(
                    base_url=url, headers={"Authorization": f"Bearer {tok}"}, timeout=30
                )
                for name, tok in tokens.items()
            }
            clients["anon"] = httpx.Client(base_url=url, timeout=30)
            env = ApiEnv(gw, settings, url, hsm_token, tokens, clients, metrics)
            try:
                yield env
            finally:
                for c in [*clients.values(), *env.extra_clients]:
                    c.close()
    finally:
        gw.close()


@pytest.fixture
def full(api: ApiEnv) -> httpx.Client:
    """All operations on 131016 only."""
    return api.clients["full"]


@pytest.fixture
def osaka(api: ApiEnv) -> httpx.Client:
    """All operations on 271004 only."""
    return api.clients["osaka"]


@pytest.fixture
def reader(api: ApiEnv) -> httpx.Client:
    """Decrypt only, 131016, purposes and record types resident + tax."""
    return api.clients["reader"]


@pytest.fixture
def encryptor(api: ApiEnv) -> httpx.Client:
    return api.clients["encryptor"]


@pytest.fixture
def rewrapper(api: ApiEnv) -> httpx.Client:
    return api.clients["rewrapper"]


@pytest.fixture
def star(api: ApiEnv) -> httpx.Client:
    """Every tenant, purpose, record type and operation."""
    return api.clients["star"]


@pytest.fixture
def anon(api: ApiEnv) -> httpx.Client:
    return api.clients["anon"]


@pytest.fixture
def make_gateway(
    make_token: Callable[[str], SoftHsmToken],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[], OwnGateway]]:
    """Build gateways that a test may break (HSM token taken away, audit trail failing)."""
    # Metrics register in prometheus' default registry, once per process: give each extra app
    # a registry of its own.
    monkeypatch.setattr(app_module, "Metrics", lambda: Metrics(registry=CollectorRegistry()))
    stack: list[Any] = []

    def make() -> OwnGateway:
        hsm_token = make_token("kg-api-own")
        settings = make_settings(hsm_token, tmp_path / hsm_token.label)
        gw = build_gateway(settings)
        stack.append(gw.close)
        gw.add_tenant(ACTOR, CHIYODA, name="千代田区")
        for purpose in PURPOSES:
            gw.create_key(ACTOR, CHIYODA, purpose)
        _, token = gw.add_identity(
            ACTOR, "own-full", tenants=[CHIYODA], purposes=["*"], record_types=["*"],
            operations=["*"],
        )  # fmt: skip
        cm = serve(create_app(settings, gateway=gw))
        url = cm.__enter__()
        stack.append(lambda: cm.__exit__(None, None, None))
        client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        anon = httpx.Client(base_url=url, timeout=30)
        stack.append(client.close)
        stack.append(anon.close)
        return OwnGateway(gw, hsm_token, url, client, anon)

    yield make
    for close in reversed(stack):
        close()
