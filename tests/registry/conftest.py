"""Fixtures for the registry and audit suites: a real SQLite file and a real PostgreSQL server.

``db_url`` is parametrized over both backends; the PostgreSQL server is started once per session
(only if a PostgreSQL test is selected) and each test gets a fresh schema on it (first in the
connection's ``search_path``), which is far cheaper than a fresh database.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import keygate.keys
from keygate.audit import AuditStore
from keygate.keys import Registry
from keygate.testing.postgres import PostgresServer, find_bindir

_schema_numbers = itertools.count(1)

#: the repository root, so that child processes import this checkout of keygate
REPO_ROOT = Path(keygate.keys.__file__).resolve().parents[2]

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the whole session."""
    bindir = find_bindir()
    if bindir is None:
        reason = (
            "no PostgreSQL binaries found ($KEYGATE_PG_BINDIR, `pg_config --bindir`, "
            "/usr/lib/postgresql/*/bin); install postgresql to run these tests"
        )
        if os.environ.get("KEYGATE_REQUIRE_POSTGRES"):
            pytest.fail(reason)  # CI installs PostgreSQL: a missing server must not pass silently
        print(f"\nskipping PostgreSQL tests: {reason}")
        pytest.skip(reason)
    with PostgresServer(bindir=bindir) as server:
        yield server


def fresh_database(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """A URL of an empty database on ``backend``."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'keygate.db'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.create_schema(f"kg_test_{next(_schema_numbers)}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The storage backend under test: ``sqlite`` or ``postgresql``."""
    name: str = request.param
    return name


@pytest.fixture
def db_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """A fresh, empty database on the backend under test."""
    return fresh_database(request, backend, tmp_path)


@pytest.fixture
def registry(db_url: str) -> Iterator[Registry]:
    """A registry with its schema created."""
    reg = Registry(db_url)
    reg.create_schema()
    yield reg
    reg.close()


@pytest.fixture
def sqlite_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry on a SQLite file, for checks that never reach the database (input validation)."""
    reg = Registry(f"sqlite:///{tmp_path / 'keygate.db'}")
    reg.create_schema()
    yield reg
    reg.close()


@pytest.fixture
def audit_store(db_url: str) -> Iterator[AuditStore]:
    """An audit store with its schema created."""
    store = AuditStore(db_url)
    store.create_schema()
    yield store
    store.close()


RunPython = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def spawn_python() -> Iterator[RunPython]:
    """Start ``python -c CODE ARGS…`` importing this checkout of keygate; reaped at teardown."""
    started: list[subprocess.Popen[str]] = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))

    def spawn(code: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
