"""Fixtures for the audit-trail suite: SQLite and PostgreSQL stores, and a wired gateway.

The PostgreSQL fixtures are the registry suite's (``tests/registry/conftest.py``), imported so
that this directory can run on its own.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keygate.audit.store import AuditStore
from keygate.hsm.softhsm import SoftHsmToken


def _registry_fixtures() -> Any:
    name = "kg_tests_registry_fixtures"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "registry" / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_fixtures = _registry_fixtures()
BACKENDS = _fixtures.BACKENDS
REPO_ROOT: Path = _fixtures.REPO_ROOT
RunPython = _fixtures.RunPython
fresh_database = _fixtures.fresh_database
pg_server = _fixtures.pg_server
spawn_python = _fixtures.spawn_python


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
def audit_store(db_url: str) -> Iterator[AuditStore]:
    """An audit store with its schema created."""
    store = AuditStore(db_url)
    store.create_schema()
    yield store
    store.close()


@pytest.fixture(scope="module")
def audit_token(make_token: Callable[[str], SoftHsmToken]) -> SoftHsmToken:
    """A SoftHSM token for this module's audit keys."""
    return make_token("kg-audit")
