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

Every record an event touches, at any batch size
    The pseudonyms of all the records of an event (its *record refs*: distinct, sorted) go to the
    side table ``kg_audit_record_refs`` (one row per ref, indexed by ref), written in the same
    transaction as the event.  The chained event commits to that set in its ``detail``::

        record_refs_count  = number of distinct refs
        record_refs_digest = hex(SHA-256( "keygate-audit-record-refs-v1" 0x00
                                          || ref_1 || ref_2 || ... ))   refs raw (32 bytes), sorted

    so the chain, hence the signed checkpoints, covers the set: a ref added, removed or changed
    in the side table or in an export no longer matches the digest.  Events of at most
    :data:`MAX_BATCH_REFS` records also list their refs inline for readability (``record_ref``
    for one record, ``record_refs`` comma-separated in request order for a batch), as before.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Final, Protocol

__all__ = [
    "MAX_BATCH_REFS",
    "PSEUDONYM_KEY_LABEL",
    "RECORD_REFS_DOMAIN",
    "is_record_ref",
    "record_ref",
    "record_ref_from_tenant_key",
    "record_ref_input",
    "record_refs_detail",
    "record_refs_digest",
    "record_refs_from_tenant_key",
    "record_refs_problem",
    "tenant_key_input",
]

PSEUDONYM_KEY_LABEL: Final = "kg/audit-pseudonym"
#: a batch event lists the pseudonyms of at most this many records inline (detail values are
#: bounded to 1024 characters: 15 x 64 hex digits + commas); every batch, whatever its size,
#: commits to all its refs through ``record_refs_count`` / ``record_refs_digest``
MAX_BATCH_REFS: Final = 15
#: domain separation of :func:`record_refs_digest`
RECORD_REFS_DOMAIN: Final = b"keygate-audit-record-refs-v1\x00"
_HEX: Final = frozenset("0123456789abcdef")


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


def record_refs_from_tenant_key(tenant_key: bytes, record_ids: Iterable[str]) -> list[str]:
    """:func:`record_ref_from_tenant_key` of many record ids (the key schedule done once)."""
    base = hmac.new(tenant_key, digestmod=hashlib.sha256)
    out = []
    for record_id in record_ids:
        if "\x00" in record_id:
            raise ValueError("record id must not contain NUL")
        mac = base.copy()
        mac.update(record_id.encode("utf-8"))
        out.append(mac.hexdigest())
    return out


def is_record_ref(value: object) -> bool:
    """Whether ``value`` is a pseudonym as stored: 64 lower-case hex digits."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def record_refs_digest(refs: Iterable[str]) -> str:
    """SHA-256 (hex) over the domain tag and the refs as raw 32-byte values, sorted.

    ``refs`` must be distinct pseudonyms (:func:`is_record_ref`); their order does not matter.
    """
    given = list(refs)
    checked: list[object] = list(given)  # callers may hand in anything: check at run time
    if not all(isinstance(r, str) and len(r) == 64 for r in checked):
        raise ValueError("a record ref must be 64 lower-case hex digits")
    joined = "".join(sorted(given))
    try:
        raw = bytes.fromhex(joined)
    except ValueError:
        raw = b""
    # fromhex skips whitespace and accepts upper case: check the length and the case too
    if len(raw) != 32 * len(given) or joined != joined.lower():
        raise ValueError("a record ref must be 64 lower-case hex digits")
    if len(set(given)) != len(given):
        raise ValueError("record refs must be distinct")
    return hashlib.sha256(RECORD_REFS_DOMAIN + raw).hexdigest()


def record_refs_detail(refs: Iterable[str]) -> dict[str, str | int]:
    """The ``detail`` entries that commit an event to the set of record refs ``refs``:
    ``record_refs_count`` (distinct refs) and ``record_refs_digest``."""
    distinct = set(refs)
    return {"record_refs_count": len(distinct), "record_refs_digest": record_refs_digest(distinct)}


def _inline_refs(detail: Mapping[str, object]) -> set[str]:
    refs: set[str] = set()
    one = detail.get("record_ref")
    if isinstance(one, str):
        refs.add(one)
    many = detail.get("record_refs")
    if isinstance(many, str):
        refs.update(r for r in many.split(",") if r)
    return refs


def record_refs_problem(detail: Mapping[str, object], refs: Iterable[str]) -> str | None:
    """Why ``refs`` (an event's stored or exported record refs) do not match what the chained
    ``detail`` commits to; None when they match.

    With ``record_refs_digest`` the refs must be exactly the committed set (count and digest).
    An event written before the digest existed commits only to its inline refs
    (``record_ref`` / ``record_refs``): the refs must be exactly those.
    """
    got = list(refs)
    distinct = set(got)
    if len(distinct) != len(got):
        return "a record ref is listed twice"
    if "record_refs_digest" not in detail:
        if not all(is_record_ref(r) for r in got):
            return "a record ref is not 64 lower-case hex digits"
        inline = _inline_refs(detail)
        if distinct == inline:
            return None
        if not inline:
            return "the event commits to no record refs, but refs are stored for it"
        return "the stored record refs differ from the refs listed in the event"
    count = detail.get("record_refs_count")
    if isinstance(count, bool) or not isinstance(count, int):
        return "the event's record_refs_count is not an integer"
    if len(got) < count:
        return (
            f"{count - len(got)} record ref(s) removed: the event commits to {count}, "
            f"{len(got)} found"
        )
    if len(got) > count:
        return (
            f"{len(got) - count} record ref(s) added: the event commits to {count}, "
            f"{len(got)} found"
        )
    try:
        digest = record_refs_digest(got)
    except ValueError:
        return "a record ref is not 64 lower-case hex digits"
    if digest != detail.get("record_refs_digest"):
        return "a record ref was modified: the refs do not match the event's record_refs_digest"
    return None
