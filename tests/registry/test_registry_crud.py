"""Tenants, keys, versions and limits: create, read, update, and the errors for bad input."""

from __future__ import annotations

import dataclasses
import pickle
from datetime import UTC, datetime

import pytest

import keygate.keys
from keygate.core.errors import InvalidRequest, NotFound
from keygate.core.model import KeyState
from keygate.keys import KeyRecord, KeyVersionRecord, Registry, TenantRecord

T = "131016"
P = "resident"


def _key(registry: Registry, tenant: str = T, purpose: str = P, label: str = "kg-1") -> None:
    registry.add_tenant(tenant, kind="lgcode", name="千代田区")
    registry.create_key(
        tenant, purpose, hsm_label=label, dek_max_records=100_000, dek_max_age_s=3600
    )


def test_exported_members() -> None:
    """keygate.keys re-exports a sorted __all__ whose names all exist."""
    assert keygate.keys.__all__ == sorted(keygate.keys.__all__)
    for name in keygate.keys.__all__:
        assert hasattr(keygate.keys, name)


def test_records_are_frozen_slotted_dataclasses(registry: Registry) -> None:
    """Every record returned is a frozen, slotted dataclass, not an ORM object."""
    tenant = registry.add_tenant(T, kind="lgcode", name="千代田区")
    version = registry.create_key(T, P, hsm_label="kg-1", dek_max_records=10, dek_max_age_s=1.5)
    for record in (tenant, version, registry.list_keys()[0]):
        assert dataclasses.is_dataclass(record)
        assert not hasattr(record, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.created_at = datetime.now(UTC)  # type: ignore[misc]


def test_records_pickle(registry: Registry) -> None:
    """Registry records and snapshots survive pickling (they cross process boundaries)."""
    registry.add_tenant(T, kind="lgcode", name="千代田区")
    registry.create_key(T, P, hsm_label="kg-1", dek_max_records=10, dek_max_age_s=1.5)
    snap = registry.snapshot()
    assert pickle.loads(pickle.dumps(snap)) == snap  # noqa: S301 - our own bytes


def test_add_and_get_tenant(registry: Registry) -> None:
    """An added tenant reads back identically, enabled, with an aware UTC creation time."""
    added = registry.add_tenant(T, kind="lgcode", name="東京都千代田区")
    assert added == TenantRecord(T, "lgcode", "東京都千代田区", True, added.created_at)
    assert added.created_at.tzinfo is UTC
    assert registry.get_tenant(T) == added
    assert registry.get_tenant("999999") is None


def test_list_tenants_is_sorted(registry: Registry) -> None:
    """list_tenants returns every tenant ordered by id."""
    registry.add_tenant("281000", kind="lgcode", name="兵庫県")
    registry.add_tenant("digital-agency", kind="slug", name="デジタル庁")
    registry.add_tenant("131016", kind="lgcode", name="千代田区")
    assert [t.id for t in registry.list_tenants()] == ["131016", "281000", "digital-agency"]


def test_duplicate_tenant_is_refused_clearly(registry: Registry) -> None:
    """Adding an existing tenant raises InvalidRequest naming the tenant."""
    registry.add_tenant(T, kind="lgcode", name="千代田区")
    with pytest.raises(InvalidRequest, match=f"tenant '{T}' already exists"):
        registry.add_tenant(T, kind="lgcode", name="again")


@pytest.mark.parametrize(
    ("tenant_id", "kind", "name"),
    [
        ("", "lgcode", "x"),
        ("x" * 65, "slug", "x"),
        ("131016", "city", "x"),
        ("131016", "lgcode", ""),
        ("131016", "lgcode", "n" * 257),
        (" 131016", "lgcode", "x"),
        ("13\x001016", "lgcode", "x"),
        (131016, "lgcode", "x"),
    ],
    ids=["empty", "too-long", "bad-kind", "empty-name", "long-name", "space", "nul", "not-str"],
)
def test_tenant_storage_invariants(
    sqlite_registry: Registry, tenant_id: object, kind: str, name: str
) -> None:
    """Empty, over-long, non-string or control-character values and unknown kinds are refused."""
    with pytest.raises(InvalidRequest):
        sqlite_registry.add_tenant(tenant_id, kind=kind, name=name)  # type: ignore[arg-type]
    assert sqlite_registry.list_tenants() == []


def test_set_tenant_enabled(registry: Registry) -> None:
    """A tenant can be disabled and re-enabled; an unknown tenant is NotFound."""
    registry.add_tenant(T, kind="lgcode", name="千代田区")
    assert registry.set_tenant_enabled(T, False).enabled is False
    assert registry.get_tenant(T) is not None
    assert registry.get_tenant(T).enabled is False  # type: ignore[union-attr]
    assert registry.set_tenant_enabled(T, True).enabled is True
    with pytest.raises(NotFound):
        registry.set_tenant_enabled("999999", False)


def test_create_key_starts_at_version_one_active(registry: Registry) -> None:
    """create_key registers the key and its version 1 in the active state."""
    registry.add_tenant(T, kind="lgcode", name="千代田区")
    v1 = registry.create_key(T, P, hsm_label="kg-1", dek_max_records=500, dek_max_age_s=60.5)
    assert (v1.version, v1.state, v1.hsm_label) == (1, KeyState.ACTIVE, "kg-1")
    assert v1.created_at == v1.updated_at
    assert registry.get_version(T, P, 1) == v1
    assert registry.active_version(T, P) == v1
    assert registry.list_keys() == [KeyRecord(T, P, 500, 60.5, v1.created_at)]
    assert registry.get_key(T, P) == registry.list_keys()[0]


def test_create_key_for_unknown_tenant_is_not_found(registry: Registry) -> None:
    """create_key for a tenant that does not exist raises NotFound."""
    with pytest.raises(NotFound, match="999999"):
        registry.create_key("999999", P, hsm_label="l", dek_max_records=1, dek_max_age_s=1)


def test_create_existing_key_is_refused(registry: Registry) -> None:
    """create_key for an existing tenant × purpose raises InvalidRequest."""
    _key(registry)
    with pytest.raises(InvalidRequest, match="already exists"):
        registry.create_key(T, P, hsm_label="kg-2", dek_max_records=1, dek_max_age_s=1)


def test_hsm_label_must_be_unique(registry: Registry) -> None:
    """An HSM label already used by any key version is refused, naming its owner."""
    _key(registry)
    registry.add_tenant("281000", kind="lgcode", name="兵庫県")
    with pytest.raises(InvalidRequest, match=f"already used by {T}/{P}/v1"):
        registry.create_key("281000", P, hsm_label="kg-1", dek_max_records=1, dek_max_age_s=1)
    with pytest.raises(InvalidRequest, match="already used"):
        registry.add_version(T, P, hsm_label="kg-1")
    assert registry.list_keys("281000") == []


@pytest.mark.parametrize(
    ("records", "age"),
    [(0, 1.0), (-1, 1.0), (True, 1.0), (1.5, 1.0), (1, 0), (1, -3.0), (1, float("inf")), (1, "9")],
    ids=["zero", "negative", "bool", "float-records", "zero-age", "neg-age", "inf-age", "str-age"],
)
def test_key_limits_must_be_positive(
    sqlite_registry: Registry, records: object, age: object
) -> None:
    """DEK limits must be a positive integer count and a positive finite number of seconds."""
    sqlite_registry.add_tenant(T, kind="lgcode", name="千代田区")
    with pytest.raises(InvalidRequest):
        sqlite_registry.create_key(
            T,
            P,
            hsm_label="l",
            dek_max_records=records,  # type: ignore[arg-type]
            dek_max_age_s=age,  # type: ignore[arg-type]
        )


def test_rotation_adds_active_version_and_demotes_previous(registry: Registry) -> None:
    """add_version makes max+1 active and turns the previous active version decrypt-only."""
    _key(registry)
    v2 = registry.add_version(T, P, hsm_label="kg-2")
    v3 = registry.add_version(T, P, hsm_label="kg-3")
    assert (v2.version, v3.version) == (2, 3)
    states = [(v.version, v.state) for v in registry.list_versions(T, P)]
    assert states == [
        (1, KeyState.DECRYPT_ONLY),
        (2, KeyState.DECRYPT_ONLY),
        (3, KeyState.ACTIVE),
    ]
    assert registry.active_version(T, P) == v3
    assert registry.get_version(T, P, 2).updated_at >= v3.created_at  # type: ignore[union-attr]


def test_rotation_keeps_disabled_versions_disabled(registry: Registry) -> None:
    """Rotating while the active version is disabled adds a new active and leaves the rest."""
    _key(registry)
    registry.set_version_state(T, P, 1, KeyState.DISABLED)
    assert registry.active_version(T, P) is None
    registry.add_version(T, P, hsm_label="kg-2")
    assert [v.state for v in registry.list_versions(T, P)] == [KeyState.DISABLED, KeyState.ACTIVE]


def test_rotation_never_reuses_destroyed_version_numbers(registry: Registry) -> None:
    """Version numbers keep counting past destroyed versions."""
    _key(registry)
    registry.add_version(T, P, hsm_label="kg-2")
    registry.set_version_state(T, P, 2, KeyState.DESTROYED)
    assert registry.add_version(T, P, hsm_label="kg-3").version == 3


def test_rotation_of_unknown_key_is_not_found(registry: Registry) -> None:
    """add_version for a key that does not exist raises NotFound."""
    registry.add_tenant(T, kind="lgcode", name="千代田区")
    with pytest.raises(NotFound):
        registry.add_version(T, P, hsm_label="kg-9")


def test_version_lookups_for_unknown_things(registry: Registry) -> None:
    """Lookups of unknown keys or versions return None or an empty list."""
    _key(registry)
    assert registry.get_version(T, P, 7) is None
    assert registry.get_version(T, "tax", 1) is None
    assert registry.active_version(T, "tax") is None
    assert registry.list_versions(T, "tax") == []
    assert registry.get_key(T, "tax") is None


def test_list_keys_by_tenant(registry: Registry) -> None:
    """list_keys filters by tenant and orders by tenant then purpose."""
    _key(registry, T, "tax", "a")
    registry.create_key(T, "mynumber", hsm_label="b", dek_max_records=1, dek_max_age_s=1)
    _key(registry, "281000", "resident", "c")
    assert [(k.tenant, k.purpose) for k in registry.list_keys()] == [
        (T, "mynumber"),
        (T, "tax"),
        ("281000", "resident"),
    ]
    assert [k.purpose for k in registry.list_keys(T)] == ["mynumber", "tax"]
    assert registry.list_keys("000000") == []


def test_update_key_limits(registry: Registry) -> None:
    """update_key_limits changes only the limits given and refuses invalid ones."""
    _key(registry)
    updated = registry.update_key_limits(T, P, dek_max_records=42)
    assert (updated.dek_max_records, updated.dek_max_age_s) == (42, 3600.0)
    updated = registry.update_key_limits(T, P, dek_max_age_s=0.25)
    assert (updated.dek_max_records, updated.dek_max_age_s) == (42, 0.25)
    assert registry.update_key_limits(T, P) == updated
    with pytest.raises(InvalidRequest):
        registry.update_key_limits(T, P, dek_max_records=0)
    with pytest.raises(NotFound):
        registry.update_key_limits(T, "tax", dek_max_records=5)
    with pytest.raises(NotFound):
        registry.update_key_limits(T, "tax")


def test_version_record_fields(registry: Registry) -> None:
    """A version record carries tenant, purpose, version, state, label and aware timestamps."""
    _key(registry)
    v = registry.get_version(T, P, 1)
    assert isinstance(v, KeyVersionRecord)
    assert (v.tenant, v.purpose, v.version, v.hsm_label) == (T, P, 1, "kg-1")
    assert isinstance(v.state, KeyState)
    assert v.created_at.tzinfo is UTC
    assert v.updated_at.tzinfo is UTC
