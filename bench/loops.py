"""The timed loops.  Each call is the whole timed region of one round.

Every loop walks the same pre-built chunks (``--batch`` items each, 1000 by default), builds one
output list per chunk and hands it to ``sink``.  The default sink drops it (the chunk's outputs
are freed before the next chunk, as in a server that answers requests or a bulk job that writes
each batch out: memory stays flat); ``--retain`` keeps every chunk.  The single-record loops
have exactly the shape of the plain loops, so the comparison is method for method; the batch
loops make one ``*_many`` call per chunk.  Nothing here checks results: the runner does that in
an untimed pass afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keygate.keys.manager import KeyManager

Items = Sequence[tuple[Mapping[str, str], bytes]]
Chunks = Sequence[Items]
Sink = Callable[[list], None]

# ---------------------------------------------------------------------------- plain baselines
# A minimal self-contained ciphertext: a real system must store the nonce.  One os.urandom call
# per record, one AESGCM call, no AAD.


def plain_encrypt(aead: AESGCM, chunks: Sequence[Sequence[bytes]], sink: Sink) -> None:
    enc = aead.encrypt
    urandom = os.urandom
    for chunk in chunks:
        out: list[bytes] = []
        append = out.append
        for rec in chunk:
            n = urandom(12)
            append(n + enc(n, rec, None))
        sink(out)


def plain_decrypt(aead: AESGCM, chunks: Sequence[Sequence[bytes]], sink: Sink) -> None:
    dec = aead.decrypt
    for chunk in chunks:
        out: list[bytes] = []
        append = out.append
        for blob in chunk:
            append(dec(blob[:12], blob[12:], None))
        sink(out)


def plain_reencrypt(
    old: AESGCM, new: AESGCM, chunks: Sequence[Sequence[bytes]], sink: Sink
) -> None:
    """Plain decrypt under the first key, then plain encrypt (new nonce) under a second key."""
    dec = old.decrypt
    enc = new.encrypt
    urandom = os.urandom
    for chunk in chunks:
        out: list[bytes] = []
        append = out.append
        for blob in chunk:
            pt = dec(blob[:12], blob[12:], None)
            n = urandom(12)
            append(n + enc(n, pt, None))
        sink(out)


def splice_floor(new_header: bytes, chunks: Sequence[Sequence[bytes]], sink: Sink) -> None:
    """The least a rewrap can do in Python: read H from the envelope, replace bytes 0..H-1.

    A reference point for rewrap (there is no plain-AES-GCM equivalent); the rewrap goal is an
    absolute rate, not a ratio to this.
    """
    for chunk in chunks:
        out: list[bytes] = []
        append = out.append
        for env in chunk:
            append(new_header + env[env[2] << 8 | env[3] :])
        sink(out)


# ---------------------------------------------------------------------------- keygate, single
def kg_encrypt_single(
    km: KeyManager, tenant: str, purpose: str, chunks: Chunks, sink: Sink
) -> None:
    encrypt = km.encrypt
    for chunk in chunks:
        out: list[bytes] = []
        append = out.append
        for context, rec in chunk:
            append(encrypt(tenant, purpose, context, rec))
        sink(out)


def kg_decrypt_single(
    km: KeyManager, tenant: str, purpose: str, chunks: Chunks, sink: Sink
) -> None:
    decrypt = km.decrypt
    for chunk in chunks:
        out: list[bytes] = []
        append = out.append
        for context, env in chunk:
            append(decrypt(tenant, purpose, context, env))
        sink(out)


def kg_rewrap_single(
    km: KeyManager, tenant: str, purpose: str, chunks: Sequence[Sequence[bytes]], sink: Sink
) -> None:
    rewrap = km.rewrap
    for chunk in chunks:
        out: list[bytes] = []
        append = out.append
        for env in chunk:
            append(rewrap(tenant, purpose, env))
        sink(out)


def kg_reencrypt_single(
    km: KeyManager, tenant: str, purpose: str, chunks: Chunks, sink: Sink
) -> None:
    decrypt = km.decrypt
    encrypt = km.encrypt
    for chunk in chunks:
        out: list[bytes] = []
        append = out.append
        for context, env in chunk:
            append(encrypt(tenant, purpose, context, decrypt(tenant, purpose, context, env)))
        sink(out)


# ---------------------------------------------------------------------------- keygate, batch
# One *_many call per chunk; its result list (bytes or a GatewayError per item) goes to the sink.


def kg_encrypt_batch(km: KeyManager, tenant: str, purpose: str, chunks: Chunks, sink: Sink) -> None:
    encrypt_many = km.encrypt_many
    for chunk in chunks:
        sink(encrypt_many(tenant, purpose, chunk))


def kg_decrypt_batch(km: KeyManager, tenant: str, purpose: str, chunks: Chunks, sink: Sink) -> None:
    decrypt_many = km.decrypt_many
    for chunk in chunks:
        sink(decrypt_many(tenant, purpose, chunk))


def kg_rewrap_batch(
    km: KeyManager, tenant: str, purpose: str, chunks: Sequence[Sequence[bytes]], sink: Sink
) -> None:
    rewrap_many = km.rewrap_many
    for chunk in chunks:
        sink(rewrap_many(tenant, purpose, chunk))


def kg_reencrypt_batch(
    km: KeyManager, tenant: str, purpose: str, chunks: Chunks, sink: Sink
) -> None:
    """decrypt_many, pair each plaintext with its context again, encrypt_many.

    A caller that checks for per-item errors would also scan the decrypt results; that scan is
    not in here (the runner checks every output in its untimed pass).
    """
    decrypt_many = km.decrypt_many
    encrypt_many = km.encrypt_many
    for chunk in chunks:
        plain = decrypt_many(tenant, purpose, chunk)
        sink(
            encrypt_many(
                tenant,
                purpose,
                [(ctx, pt) for (ctx, _), pt in zip(chunk, plain, strict=True)],  # type: ignore[misc]
            )
        )
