"""The audit trail's own keys in the HSM: the checkpoint signing key and the pseudonym key.

``kg/audit-signing``
    ECDSA P-256 key pair; the private key is sensitive and never leaves the token.  It signs
    checkpoints (:mod:`keygate.audit.chain`); ``keygate audit public-key`` prints its public half
    for reviewers.
``kg/audit-pseudonym``
    256-bit generic secret used with ``CKM_SHA256_HMAC`` (``C_Sign``) to pseudonymise record ids
    (:meth:`AuditKeys.record_ref`); it never leaves the token either.

Both are created by ``keygate init`` or, failing that, on first use.  Creation runs under the
audit store's append lock so that several processes starting at once create each key only once.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterable
from typing import Any, Final, Protocol

from keygate.audit.chain import checkpoint_message, key_id
from keygate.audit.pseudonym import (
    PSEUDONYM_KEY_LABEL,
    record_ref_from_tenant_key,
    record_refs_from_tenant_key,
    tenant_key_input,
)
from keygate.core.errors import Unavailable

__all__ = ["SIGNING_KEY_LABEL", "AuditKeys"]

SIGNING_KEY_LABEL: Final = "kg/audit-signing"


class _Hsm(Protocol):
    def create_signing_key(self, label: str) -> None: ...
    def signing_key_exists(self, label: str) -> bool: ...
    def sign(self, label: str, data: bytes) -> bytes: ...
    def public_key_pem(self, label: str) -> bytes: ...
    def create_hmac_key(self, label: str) -> None: ...
    def hmac_key_exists(self, label: str) -> bool: ...
    def hmac_sha256(self, label: str, data: bytes) -> bytes: ...


class AuditKeys:
    """Signs checkpoints and computes record-id pseudonyms with keys held in the HSM."""

    def __init__(
        self,
        hsm: _Hsm,
        store: Any,
        *,
        signing_label: str = SIGNING_KEY_LABEL,
        pseudonym_label: str = PSEUDONYM_KEY_LABEL,
    ) -> None:
        self._hsm = hsm
        self._store = store
        self.signing_label = signing_label
        self.pseudonym_label = pseudonym_label
        self._tenant_keys: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._ready = False
        self._pem: bytes | None = None
        self._key_id: str | None = None

    def ensure(self) -> None:
        """Create whichever audit key is missing (idempotent; safe across processes)."""
        with self._lock:
            if self._ready:
                return
            hsm = self._hsm
            if not (
                hsm.signing_key_exists(self.signing_label)
                and hsm.hmac_key_exists(self.pseudonym_label)
            ):
                with self._store.locked():
                    if not hsm.signing_key_exists(self.signing_label):
                        hsm.create_signing_key(self.signing_label)
                    if not hsm.hmac_key_exists(self.pseudonym_label):
                        hsm.create_hmac_key(self.pseudonym_label)
            self._ready = True

    def public_key_pem(self) -> bytes:
        if self._pem is None:
            self.ensure()
            self._pem = self._hsm.public_key_pem(self.signing_label)
            self._key_id = key_id(self._pem)
        return self._pem

    @property
    def key_id(self) -> str:
        """SHA-256 (hex) of the signing key's SubjectPublicKeyInfo."""
        self.public_key_pem()
        assert self._key_id is not None  # noqa: S101 - set together with the PEM
        return self._key_id

    def prepare(self) -> None:
        """Create the keys if needed and load the public key.  Call it *outside* the store's
        append lock: creating keys takes that lock (across processes)."""
        self.public_key_pem()

    def sign_checkpoint(self, seq: int, head_hash: str, prev_seq: int, ts: str) -> tuple[str, str]:
        """``(base64 DER signature, key id)`` over :func:`checkpoint_message` (a store signer).

        Runs under the append lock, so it never creates keys (that would take the lock again):
        call :meth:`prepare` first.
        """
        if self._key_id is None:
            raise Unavailable("the audit signing key is not loaded (call prepare() first)")
        kid = self._key_id
        message = checkpoint_message(seq=seq, hash=head_hash, prev_seq=prev_seq, ts=ts)
        der = self._hsm.sign(self.signing_label, message)
        return base64.b64encode(der).decode("ascii"), kid

    def record_ref(self, tenant: str, record_id: str) -> str:
        """The pseudonym of a record id in the trail (64 hex digits).

        The tenant's pseudonym key is derived in the HSM once per process and kept in memory,
        so this costs one HSM call per tenant, not one per record.
        """
        return record_ref_from_tenant_key(self._tenant_key(tenant), record_id)

    def record_refs(self, tenant: str, record_ids: Iterable[str]) -> list[str]:
        """:meth:`record_ref` of many record ids of one tenant, in order (software HMACs)."""
        return record_refs_from_tenant_key(self._tenant_key(tenant), record_ids)

    def _tenant_key(self, tenant: str) -> bytes:
        key = self._tenant_keys.get(tenant)
        if key is None:
            self.ensure()
            key = self._hsm.hmac_sha256(self.pseudonym_label, tenant_key_input(tenant))
            if len(self._tenant_keys) >= 10_000:
                self._tenant_keys.clear()  # bounded
            self._tenant_keys[tenant] = key
        return key
