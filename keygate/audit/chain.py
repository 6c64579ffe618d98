"""The tamper-evident chain and its signed checkpoints: pure functions, no I/O.

Event hash (stored and exported as 64 lower-case hex digits)::

    hash(n) = SHA-256( b"keygate-audit-v1\\0" || prev_hash || canonical_bytes(event) || u64be(seq) )

where ``prev_hash`` is the raw 32-byte hash of event *n - 1* (32 zero bytes for seq 1) and
``canonical_bytes`` is :func:`keygate.audit.events.canonical_bytes`.

Checkpoint: every so often the chain head is signed with ECDSA P-256 / SHA-256 by a key held in
the HSM.  The signed bytes are :func:`checkpoint_message`::

    b"keygate-audit-checkpoint-v1\\0" || JSON {"hash", "prev_seq", "seq", "ts"}

(sorted keys, no spaces); ``prev_seq`` is the seq of the previous checkpoint (0 for the first), so
a deleted checkpoint is noticed.  Signatures are exported DER-encoded (``encode_dss_signature`` of
the token's raw ``r || s``), base64.

This module is imported by the offline verifier: it must stay free of the registry, SQLAlchemy
and PKCS#11.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Final

from keygate.audit.events import AuditEvent, canonical_bytes

__all__ = [
    "CHECKPOINT_DOMAIN",
    "GENESIS_HASH",
    "HASH_DOMAIN",
    "chain_hash",
    "chain_hash_bytes",
    "checkpoint_message",
    "is_hash",
    "key_id",
    "public_key_der",
]

HASH_DOMAIN: Final = b"keygate-audit-v1\x00"
CHECKPOINT_DOMAIN: Final = b"keygate-audit-checkpoint-v1\x00"
#: the prev_hash of seq 1
GENESIS_HASH: Final = "00" * 32
_HEX: Final = frozenset("0123456789abcdef")


def is_hash(value: object) -> bool:
    """Whether ``value`` is a chain hash as stored: 64 lower-case hex digits."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def chain_hash_bytes(prev_hash: str, canonical: bytes, seq: int) -> str:
    """The hash of the event whose canonical encoding is ``canonical`` at position ``seq``."""
    if not is_hash(prev_hash):
        raise ValueError("prev_hash must be 64 lower-case hex digits")
    checked: object = seq
    if isinstance(checked, bool) or not isinstance(checked, int) or not 1 <= checked < 1 << 63:
        raise ValueError("seq must be a positive 63-bit integer")
    digest = hashlib.sha256()
    digest.update(HASH_DOMAIN)
    digest.update(bytes.fromhex(prev_hash))
    digest.update(canonical)
    digest.update(seq.to_bytes(8, "big"))
    return digest.hexdigest()


def chain_hash(prev_hash: str, event: object, seq: int) -> str:
    """:func:`chain_hash_bytes` of an :class:`~keygate.audit.events.AuditEvent`."""
    if not isinstance(event, AuditEvent):
        raise TypeError("chain_hash() takes an AuditEvent")
    return chain_hash_bytes(prev_hash, canonical_bytes(event), seq)


def checkpoint_message(*, seq: int, hash: str, prev_seq: int, ts: str) -> bytes:
    """The bytes a checkpoint signature covers."""
    if not is_hash(hash):
        raise ValueError("checkpoint hash must be 64 lower-case hex digits")
    body = json.dumps(
        {"hash": hash, "prev_seq": prev_seq, "seq": seq, "ts": ts},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return CHECKPOINT_DOMAIN + body.encode("ascii")


def public_key_der(pem: bytes) -> bytes:
    """The DER body of a PEM ``PUBLIC KEY`` block."""
    text = pem.decode("ascii").strip()
    begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    if not text.startswith(begin) or not text.endswith(end):
        raise ValueError("not a PEM PUBLIC KEY block")
    return base64.b64decode("".join(text[len(begin) : -len(end)].split()), validate=True)


def key_id(pem: bytes) -> str:
    """The id of a checkpoint signing key: SHA-256 (hex) of its SubjectPublicKeyInfo DER."""
    return hashlib.sha256(public_key_der(pem)).hexdigest()
