"""Fixtures for the dual-control suite: a real gateway (SQLite + its own SoftHSM token), a
:class:`~keygate.custody.Custody` on an injectable clock, and custodians with in-memory keys."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from custody_support import ACTOR, CHIYODA, OSAKA, PURPOSES, Env, FakeClock, make_settings

from keygate.bootstrap import build_gateway
from keygate.custody import Custody
from keygate.hsm.softhsm import SoftHsmToken
from keygate.service import Gateway


def _registry_fixtures() -> Any:
    """The registry suite's conftest (its PostgreSQL server), as tests/audit imports it."""
    name = "kg_tests_registry_fixtures"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "registry" / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


pg_server = _registry_fixtures().pg_server


@pytest.fixture
def make_env(
    make_token: Callable[[str], SoftHsmToken], tmp_path: Path
) -> Iterator[Callable[..., Env]]:
    """Build a fresh gateway with tenants 131016 and 271004 (resident and tax keys) and an
    application identity, and a Custody over it (quorum 2 unless told)."""
    made: list[Gateway] = []

    def make(**custody_options: Any) -> Env:
        token = make_token("kg-custody")
        settings = make_settings(token, tmp_path / token.label)
        gw = build_gateway(settings, start_refresher=False)
        made.append(gw)
        for tenant, name in ((CHIYODA, "千代田区"), (OSAKA, "大阪市")):
            gw.add_tenant(ACTOR, tenant, name=name)
            for purpose in PURPOSES:
                gw.create_key(ACTOR, tenant, purpose)
        _, app_token = gw.add_identity(
            ACTOR, "juki-app", tenants=[CHIYODA], purposes=["*"], record_types=["*"],
            operations=["*"],
        )  # fmt: skip
        assert app_token is not None
        clock = FakeClock()
        custody = Custody.from_settings(gw, settings, clock=clock, **custody_options)
        return Env(gw, settings, token, clock, custody, {}, app_token)

    yield make
    for gw in made:
        gw.close()


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    """A gateway with alice and bob enrolled directly (the bootstrap) and carol by an approved
    request: dual control on, quorum 2 of 3."""
    e = make_env()
    e.enrol("alice", "bob")
    e.enrol_by_request("carol")
    return e
