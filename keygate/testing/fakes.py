"""In-memory test doubles of keygate's ports: a software key wrapper, a static registry, a clock.

These are *fakes of ports*, not of PKCS#11 or of the database: :class:`SoftwareKeyWrapper`
implements :class:`keygate.core.ports.KeyWrapper` with AES-256-GCM in process memory, and
:class:`StaticRegistry` offers the two calls :class:`keygate.keys.manager.KeyManager` makes on the
registry (``snapshot()`` and ``generation()``), built from the real record types of
:mod:`keygate.keys.registry`.  They let unit, property and vector tests run with no HSM, no
database and no network.  The real HSM adapter is tested against SoftHSM in ``tests/hsm/`` and
the real registry against SQLite/PostgreSQL in ``tests/registry/``.

Nothing here is fit for production: the KEKs live in ordinary Python memory.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

from keygate.core.aead import AESGCM, DEK_LEN, NONCE_LEN, TAG_LEN, InvalidTag
from keygate.core.errors import DecryptionFailed
from keygate.core.model import KeyState, WrapMechanism
from keygate.keys.registry import (
    KeyRecord,
    KeyVersionRecord,
    RegistrySnapshot,
    TenantRecord,
)

__all__ = ["ManualClock", "SoftwareKeyWrapper", "StaticRegistry"]

#: Length of one wrapped DEK: 12-byte IV || 32-byte ciphertext || 16-byte tag, as the HSM adapter.
WRAPPED_LEN: Final = NONCE_LEN + DEK_LEN + TAG_LEN
_KEK_LEN: Final = 32


class SoftwareKeyWrapper:
    """A :class:`~keygate.core.ports.KeyWrapper` with one random AES-256 KEK per label, in memory.

    The output has the same shape as the PKCS#11 adapter's ``HSM_AES_GCM``:
    ``iv || ciphertext || tag`` with the caller's ``aad`` bound.  Any failure to unwrap (unknown
    label, other mechanism, wrong length, bad tag) raises :class:`DecryptionFailed`.

    ``keys`` fixes the KEK of some labels (golden vectors); any other label gets a random KEK the
    first time it wraps.  ``wrap_calls`` / ``unwrap_calls`` count calls (total and per label) so
    tests can check that the HSM is called once per DEK, not once per record.
    """

    def __init__(self, keys: Mapping[str, bytes] | None = None) -> None:
        self._keys: dict[str, bytes] = {}
        for label, kek in (keys or {}).items():
            if len(kek) != _KEK_LEN:
                raise ValueError("a KEK is 32 bytes")
            self._keys[label] = bytes(kek)
        self._lock = threading.Lock()
        self.wrap_calls = 0
        self.unwrap_calls = 0
        self.wraps_by_label: Counter[str] = Counter()
        self.unwraps_by_label: Counter[str] = Counter()

    def _kek_for_wrap(self, label: str) -> bytes:
        with self._lock:
            kek = self._keys.get(label)
            if kek is None:
                kek = self._keys[label] = os.urandom(_KEK_LEN)
            self.wrap_calls += 1
            self.wraps_by_label[label] += 1
            return kek

    def _kek_for_unwrap(self, label: str) -> bytes | None:
        with self._lock:
            self.unwrap_calls += 1
            self.unwraps_by_label[label] += 1
            return self._keys.get(label)

    def wrap_dek(self, label: str, dek: bytes, *, aad: bytes) -> tuple[WrapMechanism, bytes]:
        if len(dek) != DEK_LEN:
            raise ValueError("a DEK is 32 bytes")
        kek = self._kek_for_wrap(label)
        iv = os.urandom(NONCE_LEN)
        return WrapMechanism.HSM_AES_GCM, iv + AESGCM(kek).encrypt(iv, bytes(dek), bytes(aad))

    def unwrap_dek(
        self, label: str, mechanism: WrapMechanism, wrapped: bytes, *, aad: bytes
    ) -> bytes:
        kek = self._kek_for_unwrap(label)
        if kek is None or mechanism != WrapMechanism.HSM_AES_GCM or len(wrapped) != WRAPPED_LEN:
            raise DecryptionFailed()
        try:
            return AESGCM(kek).decrypt(wrapped[:NONCE_LEN], wrapped[NONCE_LEN:], bytes(aad))
        except InvalidTag:
            raise DecryptionFailed() from None


class ManualClock:
    """A monotonic clock that moves only when a test calls :meth:`advance`."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


_EPOCH: Final = datetime(2026, 1, 1, tzinfo=UTC)


class StaticRegistry:
    """An in-memory registry with the ``snapshot()`` / ``generation()`` calls of the real one.

    Every change bumps the generation, so ``KeyManager.refresh()`` notices it.  ``snapshot()``
    returns new dictionaries each time: changing the registry never changes a snapshot that a
    key manager already holds (as with the database-backed registry).  State transitions are not
    policed here (the real registry's rules are tested in ``tests/registry/``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 1
        self._tenants: dict[str, TenantRecord] = {}
        self._keys: dict[tuple[str, str], KeyRecord] = {}
        self._versions: dict[tuple[str, str], list[KeyVersionRecord]] = {}

    # -- the two calls KeyManager makes ---------------------------------------------------------
    def generation(self) -> int:
        return self._generation

    def snapshot(self) -> RegistrySnapshot:
        with self._lock:
            return RegistrySnapshot(
                generation=self._generation,
                tenants=dict(self._tenants),
                keys=dict(self._keys),
                versions={k: tuple(v) for k, v in self._versions.items()},
                identities_by_hash={},
            )

    # -- set-up and changes --------------------------------------------------------------------
    def add_tenant(self, tenant: str, *, enabled: bool = True) -> StaticRegistry:
        kind = "lgcode" if tenant.isdigit() else "slug"
        with self._lock:
            self._tenants[tenant] = TenantRecord(tenant, kind, tenant, enabled, _EPOCH)
            self._generation += 1
        return self

    def add_key(
        self,
        tenant: str,
        purpose: str,
        *,
        hsm_label: str | None = None,
        dek_max_records: int = 1 << 20,
        dek_max_age_s: float = 86_400.0,
    ) -> KeyVersionRecord:
        """Create tenant × purpose with version 1 active (the tenant is added if missing)."""
        if tenant not in self._tenants:
            self.add_tenant(tenant)
        label = hsm_label or f"{tenant}/{purpose}/v1"
        record = KeyVersionRecord(tenant, purpose, 1, KeyState.ACTIVE, label, _EPOCH, _EPOCH)
        with self._lock:
            self._keys[(tenant, purpose)] = KeyRecord(
                tenant, purpose, dek_max_records, dek_max_age_s, _EPOCH
            )
            self._versions[(tenant, purpose)] = [record]
            self._generation += 1
        return record

    def rotate(self, tenant: str, purpose: str, *, hsm_label: str | None = None) -> int:
        """Add a new active version; the previous active one becomes decrypt-only."""
        with self._lock:
            versions = self._versions[(tenant, purpose)]
            new = versions[-1].version + 1
            versions[:] = [
                _with_state(v, KeyState.DECRYPT_ONLY) if v.state is KeyState.ACTIVE else v
                for v in versions
            ]
            label = hsm_label or f"{tenant}/{purpose}/v{new}"
            versions.append(
                KeyVersionRecord(tenant, purpose, new, KeyState.ACTIVE, label, _EPOCH, _EPOCH)
            )
            self._generation += 1
        return new

    def set_state(self, tenant: str, purpose: str, version: int, state: KeyState) -> None:
        with self._lock:
            versions = self._versions[(tenant, purpose)]
            versions[:] = [_with_state(v, state) if v.version == version else v for v in versions]
            self._generation += 1

    def set_tenant_enabled(self, tenant: str, enabled: bool) -> None:
        with self._lock:
            t = self._tenants[tenant]
            self._tenants[tenant] = TenantRecord(t.id, t.kind, t.name, enabled, t.created_at)
            self._generation += 1

    def set_limits(
        self,
        tenant: str,
        purpose: str,
        *,
        dek_max_records: int | None = None,
        dek_max_age_s: float | None = None,
    ) -> None:
        with self._lock:
            k = self._keys[(tenant, purpose)]
            self._keys[(tenant, purpose)] = KeyRecord(
                tenant,
                purpose,
                k.dek_max_records if dek_max_records is None else dek_max_records,
                k.dek_max_age_s if dek_max_age_s is None else dek_max_age_s,
                k.created_at,
            )
            self._generation += 1


def _with_state(v: KeyVersionRecord, state: KeyState) -> KeyVersionRecord:
    return KeyVersionRecord(
        v.tenant, v.purpose, v.version, state, v.hsm_label, v.created_at, v.updated_at
    )
