"""Local provider servers (real wire protocols, real SDKs) and gateways that use them.

Every server binds 127.0.0.1 on a free port and is stopped by the fixture that started it.
The servers are session-scoped (moto and OpenBao take a moment to start); each test makes its
own keys and puts faults back in its teardown.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from provider_support import (  # type: ignore[import-not-found]
    ACTOR,
    OPTIONS,
    SERVERS,
    TENANT,
    residency,
)

from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.hsm.softhsm import SoftHsmToken
from keygate.providers.base import ProviderOptions
from keygate.providers.guard import ProviderSet
from keygate.service import Gateway


def start_server(name: str) -> Any:
    module, cls = SERVERS[name]
    server = getattr(importlib.import_module(module), cls)()
    server.start()
    return server


@pytest.fixture(scope="session")
def kms_servers() -> Iterator[dict[str, Any]]:
    """Started on first use, stopped at the end of the session."""
    started: dict[str, Any] = {}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def kms(request: pytest.FixtureRequest, kms_servers: dict[str, Any]) -> Callable[[str], Any]:
    """``kms(name)``: the session's server for a provider, faults cleared after the test."""
    used: list[Any] = []

    def get(name: str) -> Any:
        server = kms_servers.get(name)
        if server is None:
            server = kms_servers[name] = start_server(name)
        used.append(server)
        return server

    yield get  # type: ignore[misc]
    for server in used:
        server.fault(None)


@pytest.fixture
def make_gateway(
    make_token: Callable[[str], SoftHsmToken], tmp_path: Path
) -> Iterator[Callable[..., Gateway]]:
    """``make_gateway(settings={scheme: adapter settings}, ...)``: an in-process gateway on a new
    SoftHSM token and SQLite registry, whose provider adapters talk to the given servers."""
    made: list[Gateway] = []

    def make(
        adapter_settings: dict[str, Any],
        *,
        allow_vault: bool = True,
        options: ProviderOptions = OPTIONS,
        dek_max_records: int = 1000,
        **overrides: Any,
    ) -> Gateway:
        token = make_token("kg-prov")
        data_dir = tmp_path / f"data{len(made)}"
        settings = load_settings(
            data_dir=data_dir,
            hsm_token_label=token.label,
            hsm_pin=token.user_pin,
            hsm_pin_file=None,
            dek_max_records=dek_max_records,
            **overrides,
        )
        providers = ProviderSet(options, residency(allow_vault), settings=adapter_settings)
        gw = build_gateway(settings, start_refresher=False, providers=providers)
        made.append(gw)
        gw.add_tenant(ACTOR, TENANT, name="千代田区")
        for purpose in ("resident", "tax"):
            gw.create_key(ACTOR, TENANT, purpose)
        return gw

    yield make
    for gw in made:
        gw.close()
