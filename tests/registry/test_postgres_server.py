"""The throwaway PostgreSQL server used by these suites."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from keygate.testing.postgres import PostgresServer, find_bindir

pytestmark = pytest.mark.postgres


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_server_answers_on_loopback_only(pg_server: PostgresServer) -> None:
    """The server listens on 127.0.0.1 only, with its socket inside its own directory."""
    assert pg_server.url.startswith("postgresql+psycopg://keygate@127.0.0.1:")
    assert pg_server.execute("SHOW listen_addresses").strip() == "127.0.0.1"
    socket_dir = pg_server.execute("SHOW unix_socket_directories").strip()
    assert Path(socket_dir) == pg_server.data_dir.parent
    assert pg_server.execute("SHOW fsync").strip() == "off"
    hba = (pg_server.data_dir / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line and not line.startswith("#")]
    assert rules == [
        ["local", "all", "all", "trust"],
        ["host", "all", "all", "127.0.0.1/32", "trust"],
    ]


def test_server_runs_as_non_root(pg_server: PostgresServer) -> None:
    """When the suite runs as root, the postmaster runs as another user; otherwise as us."""
    assert pg_server.pid is not None
    uid = _uid_of(pg_server.pid)
    if os.geteuid() == 0:
        assert uid != 0
        assert pg_server.run_as in ("postgres", "nobody")
    else:
        assert uid == os.geteuid()


def test_create_database_and_schema(pg_server: PostgresServer) -> None:
    """create_database and create_schema return URLs for new, empty places to work."""
    url = pg_server.create_database("kg_extra_db")
    assert url.endswith("/kg_extra_db")
    assert "kg_extra_db" in pg_server.execute("SELECT datname FROM pg_database").split()
    schema_url = pg_server.create_schema("kg_extra_schema")
    assert schema_url.endswith("?options=-csearch_path%3Dkg_extra_schema")
    with pytest.raises(ValueError, match="must match"):
        pg_server.create_schema("Robert'); DROP TABLE x;--")


def test_start_and_stop_cleans_up() -> None:
    """A server run as nobody works, and stopping it ends its process and removes its directory."""
    if find_bindir() is None:
        pytest.skip("no PostgreSQL binaries")
    server = PostgresServer(database="kg_cleanup", run_as="nobody")
    with server:
        pid = server.pid
        directory = server.data_dir.parent
        assert pid is not None
        assert directory.is_dir()
        assert server.execute("SELECT current_database()").strip() == "kg_cleanup"
        if os.geteuid() == 0:
            assert server.run_as == "nobody"
            assert _uid_of(pid) == pwd.getpwnam("nobody").pw_uid
    assert server.pid is None
    assert not directory.exists()
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url
    server.stop()  # stopping twice is harmless


def test_missing_binaries_are_reported(tmp_path: Path) -> None:
    """A bindir without PostgreSQL binaries is refused with a clear message."""
    with pytest.raises(RuntimeError, match="no PostgreSQL binaries"):
        PostgresServer(bindir=tmp_path)
