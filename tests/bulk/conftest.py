"""Fixtures for the bulk suite: a custodian environment (SoftHSM token, SQLite registry), an
in-process Gateway on it that makes the test data, the real ``keygate bulk`` CLI in
subprocesses, and a throwaway PostgreSQL server for table jobs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from bulk_support import OTHER_TENANT, TENANT, BulkEnv, base_env

from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.hsm.softhsm import SoftHsmToken
from keygate.testing.postgres import PostgresServer, find_bindir


@pytest.fixture(scope="module")
def bulk(
    make_token: Callable[[str], SoftHsmToken], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BulkEnv]:
    """Tenants 131016 and 271004 with resident and mynumber keys, on a fresh token/registry."""
    token = make_token("kg-bulk")
    home = tmp_path_factory.mktemp("bulk")
    pin_file = home / "hsm-pin"
    pin_file.write_text(token.user_pin + "\n", encoding="utf-8")
    pin_file.chmod(0o600)
    env = {
        **base_env(),
        **token.env,
        "KEYGATE_DATA_DIR": str(home / "data"),
        "KEYGATE_HSM_TOKEN_LABEL": token.label,
        "KEYGATE_HSM_PIN_FILE": str(pin_file),
        "KEYGATE_ACTOR": "custodian:bulk-tests",
        "KEYGATE_REFRESH_INTERVAL_S": "0.2",
    }
    settings = load_settings(
        data_dir=home / "data",
        database_url="",
        audit_database_url="",
        hsm_token_label=token.label,
        hsm_pin_file=pin_file,
        refresh_interval_s=0.2,
    )
    gw = build_gateway(settings)
    actor = "custodian:bulk-tests"
    for tenant in (TENANT, OTHER_TENANT):
        gw.add_tenant(actor, tenant)
        for purpose in ("resident", "mynumber"):
            gw.create_key(actor, tenant, purpose)
    # Small DEK limits: the data spans several DEKs, as real data does.
    for purpose in ("resident", "mynumber"):
        gw.registry.update_key_limits(TENANT, purpose, dek_max_records=500)
    gw.keys.refresh(force=True)
    yield BulkEnv(home, env, token, gw, settings)
    gw.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("KEYGATE_REQUIRE_POSTGRES"):
            pytest.fail("no PostgreSQL binaries found")
        pytest.skip("no PostgreSQL binaries found; install postgresql to run table jobs")
    with PostgresServer(bindir=bindir) as server:
        yield server


_db_numbers = iter(range(1, 10_000))


@pytest.fixture
def pg_dsn(pg_server: PostgresServer) -> str:
    """A fresh database's libpq DSN."""
    url = pg_server.create_database(f"bulk_{next(_db_numbers)}")
    return url.replace("postgresql+psycopg://", "postgresql://")
