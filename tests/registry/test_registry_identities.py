"""Service identities, the generation counter and snapshots."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from keygate.core.errors import InvalidRequest, NotFound
from keygate.core.model import KeyState
from keygate.keys import IdentityRecord, Registry, RegistrySnapshot

T = "131016"
P = "resident"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _add_app(
    registry: Registry,
    name: str = "juki-app",
    token: str = "t-1",  # noqa: S107 - a test token
) -> IdentityRecord:
    return registry.add_identity(
        name,
        token_hash=_hash(token),
        tenants=[T, T, "281000"],
        purposes={"resident", "mynumber"},
        record_types=("resident",),
        operations=["encrypt", "decrypt"],
    )


def test_add_identity_and_find_by_token_hash(registry: Registry) -> None:
    """An identity is stored with frozenset scopes and is found by its token hash."""
    added = _add_app(registry)
    assert added.tenants == frozenset({T, "281000"})
    assert added.purposes == frozenset({"resident", "mynumber"})
    assert added.record_types == frozenset({"resident"})
    assert added.operations == frozenset({"encrypt", "decrypt"})
    assert added.revoked_at is None
    assert not added.is_revoked
    assert registry.get_identity_by_token_hash(_hash("t-1")) == added
    assert registry.get_identity_by_token_hash(_hash("other")) is None
    assert registry.list_identities() == [added]


def test_wildcard_scopes_are_stored_verbatim(registry: Registry) -> None:
    """'*' is kept as a scope entry meaning any value."""
    admin = registry.add_identity(
        "ops", token_hash=_hash("x"), tenants=["*"], purposes=["*"], record_types=["*"],
        operations=["*"],
    )  # fmt: skip
    assert admin.tenants == frozenset({"*"})
    assert registry.get_identity_by_token_hash(_hash("x")) == admin


def test_duplicate_identity_name_or_token_is_refused(registry: Registry) -> None:
    """A second identity with the same name, or the same token hash, is InvalidRequest."""
    _add_app(registry)
    with pytest.raises(InvalidRequest, match="'juki-app' already exists"):
        _add_app(registry, token="t-2")
    with pytest.raises(InvalidRequest, match="already registered"):
        _add_app(registry, name="zei-app", token="t-1")
    assert len(registry.list_identities()) == 1


@pytest.mark.parametrize(
    "scopes",
    [
        {"tenants": "131016"},
        {"purposes": [""]},
        {"operations": ["x" * 65]},
        {"record_types": None},
    ],
    ids=["bare-string", "empty-entry", "long-entry", "none"],
)
def test_identity_scope_invariants(sqlite_registry: Registry, scopes: dict[str, object]) -> None:
    """Scopes must be collections of non-empty strings of at most 64 characters."""
    arguments: dict[str, object] = {
        "tenants": [T],
        "purposes": [P],
        "record_types": [P],
        "operations": ["encrypt"],
        **scopes,
    }
    with pytest.raises(InvalidRequest):
        sqlite_registry.add_identity("app", token_hash=_hash("t"), **arguments)  # type: ignore[arg-type]


def test_revoked_identity_is_not_found_by_hash(registry: Registry) -> None:
    """After revocation the token hash finds nothing, but the identity stays listed as revoked."""
    _add_app(registry)
    revoked = registry.revoke_identity("juki-app")
    assert revoked.is_revoked
    assert revoked.revoked_at is not None
    assert registry.get_identity_by_token_hash(_hash("t-1")) is None
    assert registry.list_identities() == [revoked]
    assert _hash("t-1") not in registry.snapshot().identities_by_hash


def test_revoke_unknown_or_revoked_identity(registry: Registry) -> None:
    """Revoking an unknown identity is NotFound; revoking twice is InvalidRequest."""
    with pytest.raises(NotFound):
        registry.revoke_identity("ghost")
    _add_app(registry)
    registry.revoke_identity("juki-app")
    with pytest.raises(InvalidRequest, match="already revoked"):
        registry.revoke_identity("juki-app")


def test_every_write_bumps_generation_by_one(registry: Registry) -> None:
    """Each successful write to tenants, keys, versions or identities bumps generation by one."""
    assert registry.generation() == 0
    writes: list[Callable[[], object]] = [
        lambda: registry.add_tenant(T, kind="lgcode", name="千代田区"),
        lambda: registry.set_tenant_enabled(T, False),
        lambda: registry.create_key(T, P, hsm_label="a", dek_max_records=1, dek_max_age_s=1),
        lambda: registry.add_version(T, P, hsm_label="b"),
        lambda: registry.set_version_state(T, P, 1, KeyState.DISABLED),
        lambda: registry.update_key_limits(T, P, dek_max_records=7),
        lambda: _add_app(registry),
        lambda: registry.revoke_identity("juki-app"),
    ]
    for expected, write in enumerate(writes, start=1):
        write()
        assert registry.generation() == expected


def test_reads_and_refused_writes_leave_generation_alone(registry: Registry) -> None:
    """Reads and refused writes do not change the generation."""
    registry.add_tenant(T, kind="lgcode", name="千代田区")
    generation = registry.generation()
    registry.snapshot()
    registry.list_tenants()
    registry.get_identity_by_token_hash("nope")
    registry.list_keys()
    with pytest.raises(InvalidRequest):
        registry.add_tenant(T, kind="lgcode", name="again")
    with pytest.raises(NotFound):
        registry.add_version(T, P, hsm_label="x")
    with pytest.raises(NotFound):
        registry.set_tenant_enabled("999999", True)
    assert registry.generation() == generation


def test_snapshot_contents(registry: Registry) -> None:
    """A snapshot holds the generation, tenants, keys, ascending versions and active identities."""
    registry.add_tenant(T, kind="lgcode", name="千代田区")
    registry.add_tenant("digital-agency", kind="slug", name="デジタル庁")
    registry.create_key(T, P, hsm_label="a", dek_max_records=9, dek_max_age_s=5)
    registry.create_key(T, "tax", hsm_label="b", dek_max_records=9, dek_max_age_s=5)
    registry.add_version(T, P, hsm_label="c")
    kept = _add_app(registry)
    _add_app(registry, name="old", token="t-old")
    registry.revoke_identity("old")

    snap = registry.snapshot()
    assert isinstance(snap, RegistrySnapshot)
    assert snap.generation == registry.generation()
    assert set(snap.tenants) == {T, "digital-agency"}
    assert snap.tenants[T] == registry.get_tenant(T)
    assert set(snap.keys) == {(T, P), (T, "tax")}
    assert [v.version for v in snap.versions[(T, P)]] == [1, 2]
    assert snap.versions[(T, P)] == tuple(registry.list_versions(T, P))
    assert [v.state for v in snap.versions[(T, "tax")]] == [KeyState.ACTIVE]
    assert snap.identities_by_hash == {kept.token_hash: kept}


def test_second_registry_sees_writes(db_url: str, registry: Registry) -> None:
    """Another Registry on the same database (another gateway process) sees each write."""
    other = Registry(db_url)
    try:
        assert other.generation() == registry.generation()
        registry.add_tenant(T, kind="lgcode", name="千代田区")
        assert other.generation() == registry.generation()
        assert other.snapshot().tenants[T] == registry.get_tenant(T)
    finally:
        other.close()
