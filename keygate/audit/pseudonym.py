"""Record ids never enter the audit trail; their keyed pseudonyms (``record_ref``) do.

Two levels, so that the hot path does not call the HSM per record:

    tenant_key = HMAC-SHA256(K, "keygate-audit-pseudonym-v1" || 0x00 || tenant)   in the HSM
    record_ref = hex(HMAC-SHA256(tenant_key, record_id))                          in software

``K`` is the generic secret ``kg/audit-pseudonym`` in the HSM, used through ``C_Sign`` with
``CKM_SHA256_HMAC``; it never leaves the token.  A gateway derives each tenant's key once and keeps
it in memory (like an unwrapped DEK), so pseudonyms cost one HSM call per tenant per process, not
one per record.  A leaked export cannot be turned back into record ids, not even by trying every
plausible id (My Number-style ids are only 10^11 or 10^12 guesses, which a plain hash would not
survive), without ``K`` or a tenant key from a gateway's memory.  A reviewer asks "who touched
record R" with ``keygate audit who-touched TENANT R``, which computes the same pseudonym.

The tenant is part of the derivation, so the same record id under two tenants gives unrelated
pseudonyms.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final, Protocol

__all__ = [
    "MAX_BATCH_REFS",
    "PSEUDONYM_KEY_LABEL",
    "record_ref",
    "record_ref_from_tenant_key",
    "record_ref_input",
    "tenant_key_input",
]

PSEUDONYM_KEY_LABEL: Final = "kg/audit-pseudonym"
#: a batch event lists the pseudonyms of at most this many records (detail values are bounded to
#: 1024 characters: 15 x 64 hex digits + commas); larger batches record only their count
MAX_BATCH_REFS: Final = 15


class _HmacHsm(Protocol):
    def hmac_sha256(self, label: str, data: bytes) -> bytes: ...


def tenant_key_input(tenant: str) -> bytes:
    """The bytes the HSM's HMAC covers to derive a tenant's pseudonym key."""
    if "\x00" in tenant:
        raise ValueError("tenant must not contain NUL")
    return b"keygate-audit-pseudonym-v1\x00" + tenant.encode("utf-8")


def record_ref_input(tenant: str, record_id: str) -> bytes:
    """``tenant || 0x00 || record_id`` (UTF-8): the unambiguous pair a pseudonym stands for.

    Kept for callers that need the pair's encoding; the pseudonym itself is
    :func:`record_ref_from_tenant_key` over the record id under the tenant's key.
    """
    if "\x00" in tenant or "\x00" in record_id:
        raise ValueError("tenant and record id must not contain NUL")
    return tenant.encode("utf-8") + b"\x00" + record_id.encode("utf-8")


def record_ref_from_tenant_key(tenant_key: bytes, record_id: str) -> str:
    """The pseudonym of ``record_id`` under a tenant key: 64 lower-case hex digits."""
    if "\x00" in record_id:
        raise ValueError("record id must not contain NUL")
    return hmac.new(tenant_key, record_id.encode("utf-8"), hashlib.sha256).hexdigest()


def record_ref(
    hsm: _HmacHsm, tenant: str, record_id: str, *, label: str = PSEUDONYM_KEY_LABEL
) -> str:
    """The pseudonym of ``record_id`` of ``tenant`` (derives the tenant key: one HSM call)."""
    return record_ref_from_tenant_key(hsm.hmac_sha256(label, tenant_key_input(tenant)), record_id)
