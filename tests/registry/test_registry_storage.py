"""Engine set-up, schema creation and how database failures surface (Unavailable, no secrets)."""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from keygate.audit import AuditStore
from keygate.core.errors import ConfigurationError, Unavailable
from keygate.keys import Registry
from keygate.keys.registry import make_engine

SECRET = "s3cr3t-Passw0rd-9f1c"


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        orig = getattr(seen, "orig", None)
        if isinstance(orig, BaseException):
            yield orig
        seen = seen.__cause__ or seen.__context__


def _assert_no_secret(exc: BaseException) -> None:
    for link in _chain(exc):
        assert SECRET not in str(link)
        assert SECRET not in repr(link)


def test_create_schema_is_idempotent(db_url: str) -> None:
    """create_schema can run repeatedly, also alongside the audit schema, without losing data."""
    registry = Registry(db_url)
    audit = AuditStore(db_url)
    try:
        registry.create_schema()
        registry.add_tenant("131016", kind="lgcode", name="千代田区")
        registry.create_schema()
        audit.create_schema()
        registry.create_schema()
        audit.create_schema()
        assert [t.id for t in registry.list_tenants()] == ["131016"]
        assert registry.generation() == 1
        assert audit.count() == 0
    finally:
        registry.close()
        audit.close()


def test_missing_schema_is_unavailable(db_url: str) -> None:
    """Using a registry whose schema was never created raises Unavailable, not a driver error."""
    registry = Registry(db_url)
    try:
        with pytest.raises(Unavailable):
            registry.generation()
        with pytest.raises(Unavailable):
            registry.add_tenant("131016", kind="lgcode", name="千代田区")
    finally:
        registry.close()


def test_ping(registry: Registry) -> None:
    """ping succeeds against a reachable database."""
    registry.ping()


@pytest.mark.parametrize("store", ["registry", "audit"])
def test_server_down_is_unavailable_without_password(store: str) -> None:
    """A PostgreSQL server that is down gives Unavailable, and no message contains the password."""
    url = f"postgresql+psycopg://keygate:{SECRET}@127.0.0.1:{_closed_port()}/kg?connect_timeout=3"
    target: Registry | AuditStore = Registry(url) if store == "registry" else AuditStore(url)
    try:
        assert SECRET not in repr(target)
        with pytest.raises(Unavailable) as info:
            target.ping()
        assert info.value.code == "UNAVAILABLE"
        assert info.value.__cause__ is not None
        assert "***" in str(info.value)
        assert "127.0.0.1" in str(info.value)
        _assert_no_secret(info.value)
        if isinstance(target, Registry):
            with pytest.raises(Unavailable) as info:
                target.snapshot()
        else:
            with pytest.raises(Unavailable) as info:
                target.count()
        _assert_no_secret(info.value)
    finally:
        target.close()


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+nosuchdriver://keygate:{SECRET}@127.0.0.1/kg",
        f"nosuchdb://keygate:{SECRET}@127.0.0.1/kg",
        f"not a url {SECRET}",
    ],
    ids=["unknown-driver", "unknown-dialect", "unparsable"],
)
@pytest.mark.parametrize("store", [Registry, AuditStore], ids=["registry", "audit"])
def test_bad_url_is_a_configuration_error(url: str, store: type[Registry | AuditStore]) -> None:
    """An unusable database URL raises ConfigurationError without echoing its password."""
    with pytest.raises(ConfigurationError) as info:
        store(url)
    assert info.value.code == "CONFIGURATION"
    _assert_no_secret(info.value)


def test_sqlite_locked_too_long_is_unavailable(tmp_path: Path) -> None:
    """A write blocked beyond busy_timeout by another process's lock raises Unavailable."""
    path = tmp_path / "kg.db"
    setup = Registry(f"sqlite:///{path}")
    setup.create_schema()
    setup.close()
    registry = Registry(f"sqlite:///{path}?timeout=0.2")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(Unavailable, match="locked") as info:
            registry.add_tenant("131016", kind="lgcode", name="千代田区")
        assert isinstance(info.value.__cause__, sa.exc.OperationalError)
        # Readers are not blocked by a writer in WAL mode.
        assert registry.generation() == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    registry.add_tenant("131016", kind="lgcode", name="千代田区")
    assert registry.generation() == 1
    registry.close()


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    """SQLite connections use WAL, a busy timeout, foreign keys and synchronous=FULL."""
    engine = make_engine(f"sqlite:///{tmp_path / 'kg.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    finally:
        engine.dispose()


def test_foreign_keys_are_enforced(registry: Registry, db_url: str) -> None:
    """A key version cannot reference a key that does not exist (foreign keys are on)."""
    engine = make_engine(db_url)
    try:
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO kg_key_versions "
                    "(tenant, purpose, version, state, hsm_label, created_at, updated_at) "
                    "VALUES ('131016', 'none', 1, 'active', 'x', CURRENT_TIMESTAMP, "
                    "CURRENT_TIMESTAMP)"
                )
            )
    finally:
        engine.dispose()


def test_in_memory_registry_works_across_threads() -> None:
    """An in-memory SQLite registry (for unit tests elsewhere) is one database for all threads."""
    registry = Registry("sqlite://")
    registry.create_schema()
    registry.add_tenant("131016", kind="lgcode", name="千代田区")
    registry.create_key("131016", "tax", hsm_label="a", dek_max_records=1, dek_max_age_s=1)

    def rotate(n: int) -> None:
        for i in range(5):
            registry.add_version("131016", "tax", hsm_label=f"{n}-{i}")

    threads = [threading.Thread(target=rotate, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [v.version for v in registry.list_versions("131016", "tax")] == list(range(1, 17))
    registry.close()
