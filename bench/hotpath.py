"""Where the time goes: ``python -m bench.hotpath [--quick]``.

Ablations on the same kind of bulk input as the bench (pre-built chunks of 1000, outputs
streamed): the real KeyManager batch loops, then *copies* of their per-record bodies with one
piece taken out at a time (the context encoding, the header lookup), and the primitives on their
own.  Prints nanoseconds per record (median of the rounds).  keygate itself is not modified.

The copies follow ``KeyManager.encrypt_many`` / ``decrypt_many`` as of this file's writing; each
table prints the real method next to its copy, so a copy that has gone stale shows as a gap
between those two lines.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import loops
from bench.stack import PURPOSE, TENANT, open_stack
from keygate.core.context import aad_prefix, encode_context
from keygate.core.model import AlgorithmSuite
from keygate.keys.manager import KeyManager
from keygate.keys.randomness import SystemRandom

T, P = TENANT, PURPOSE
SUITE = AlgorithmSuite.AES256_GCM_HKDF_SHA256_COMMIT


def _drop(_out: list[Any]) -> None:
    pass


def _ns(fn: Callable[[], object], n: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / n * 1e9


def _chunks(values: Sequence[Any], size: int = 1000) -> list[Sequence[Any]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


# Copies of the per-record bodies of KeyManager.encrypt_many / decrypt_many on the fast path
# (DEK cached, within limits), with switches that take one piece out.


def _encrypt_copy(km: KeyManager, chunks: Sequence[Any], aads: Sequence[Any] | None) -> None:
    a = km._active[(T, P)]
    nonce = km._rng.nonce
    for ci, chunk in enumerate(chunks):
        out = []
        append = out.append
        base = ci * len(chunks[0])
        for i, (context, plaintext) in enumerate(chunk):
            if len(plaintext) > 65536:
                raise ValueError
            if next(a.counter) >= a.max_records:
                a = km._new_active(T, P, a)
            n = nonce()
            if aads is None:
                aad = encode_context(a.prefix, context) if context else a.aad0
            else:
                aad = aads[base + i]
            append(a.header + n + a.cipher.encrypt(n, plaintext, aad))
        _drop(out)


def _decrypt_copy(
    km: KeyManager, chunks: Sequence[Any], aads: Sequence[Any] | None, lookup: bool
) -> None:
    """``decrypt_many``'s body; ``lookup``: slice the header and look it up for every record
    (what it did before it remembered the previous item's DEK) instead of a prefix check."""
    opened = km._opened
    now = km._clock()
    for ci, chunk in enumerate(chunks):
        out = []
        append = out.append
        base = ci * len(chunks[0])
        header = None
        h = min_n = 0
        for i, (context, envelope) in enumerate(chunk):
            n = len(envelope)
            if n < 100 or n > 1 << 21:
                raise ValueError
            if lookup or header is None or n < min_n or not envelope.startswith(header):
                hn = envelope[2] << 8 | envelope[3]
                if hn + 28 > n:
                    raise ValueError
                o = opened.get(envelope[:hn])
                if o is None or o.tenant != T or o.purpose != P or o.expires < now:
                    o = km._open_slow(T, P, envelope)
                    opened = km._opened
                header, h, prefix, aad0 = o.key.header, o.h, o.prefix, o.aad0
                min_n, decrypt = o.h + 28, o.cipher.decrypt
            if aads is None:
                aad = encode_context(prefix, context) if context else aad0
            else:
                aad = aads[base + i]
            append(decrypt(envelope[h : h + 12], envelope[h + 12 :], aad))
        _drop(out)


def _table(title: str, rows: list[tuple[str, Callable[[], object]]], n: int, rounds: int) -> None:
    print(f"\n{title}\n")
    print("| step | ns/record |\n|---|--:|")
    for label, fn in rows:
        print(f"| {label} | {_ns(fn, n, rounds):,.0f} |", flush=True)


def _crypt_tables(st: Any, size: int, n: int, rounds: int) -> list[bytes]:
    """Encrypt and decrypt tables for one record size; returns envelopes for the rewrap table."""
    prefix = aad_prefix(SUITE, T, P)
    km = st.keys
    records = [os.urandom(size) for _ in range(n)]
    contexts = [{"record_id": f"R-{i:06d}", "field": "氏名"} for i in range(n)]
    empty: Mapping[str, str] = {}
    items_ctx = _chunks(list(zip(contexts, records, strict=True)))
    items_none = _chunks([(empty, r) for r in records])
    rec_chunks = _chunks(records)
    aads = [encode_context(prefix, c) for c in contexts]
    aead = AESGCM(os.urandom(32))
    rng = SystemRandom()
    urandom = os.urandom
    nonce = b"n" * 12
    km.encrypt(T, P, empty, b"x")
    enc_rows: list[tuple[str, Callable[[], object]]] = [
        (
            "plain encrypt loop (os.urandom nonce, no AAD)",
            lambda: loops.plain_encrypt(aead, rec_chunks, _drop),
        ),
        (
            "keygate encrypt_many, no context",
            lambda: loops.kg_encrypt_batch(km, T, P, items_none, _drop),
        ),
        (
            "keygate encrypt_many, per-record context",
            lambda: loops.kg_encrypt_batch(km, T, P, items_ctx, _drop),
        ),
        (
            "copy of encrypt_many body, per-record context",
            lambda: _encrypt_copy(km, items_ctx, None),
        ),
        ("  same, AAD pre-built (no encode_context)", lambda: _encrypt_copy(km, items_ctx, aads)),
        (
            "encode_context(prefix, ctx) alone",
            lambda: [encode_context(prefix, c) for c in contexts],
        ),
        ("os.urandom(12) alone", lambda: [urandom(12) for _ in records]),
        ("SystemRandom().nonce() alone (buffered)", lambda: [rng.nonce() for _ in records]),
        ("AESGCM.encrypt, AAD None", lambda: [aead.encrypt(nonce, r, None) for r in records]),
        (
            "AESGCM.encrypt, AAD 57 B (per-record context)",
            lambda: [aead.encrypt(nonce, r, a) for r, a in zip(records, aads, strict=True)],
        ),
    ]
    _table(f"## encrypt, {size} B records, {n:,} per round", enc_rows, n, rounds)

    # a fresh DEK, so that the envelopes below share one (as a batch of new records would)
    km._new_active(T, P, km._active.get((T, P)))
    envs_ctx: list[Any] = []
    loops.kg_encrypt_batch(km, T, P, items_ctx, envs_ctx.extend)
    envs_none: list[Any] = []
    loops.kg_encrypt_batch(km, T, P, items_none, envs_none.extend)
    blobs: list[bytes] = []
    loops.plain_encrypt(aead, rec_chunks, blobs.extend)
    blob_chunks = _chunks(blobs)
    dec_ctx = _chunks(list(zip(contexts, envs_ctx, strict=True)))
    dec_none = _chunks([(empty, e) for e in envs_none])
    reader = st.fresh_key_manager()
    loops.kg_decrypt_batch(reader, T, P, dec_ctx[:1], _drop)
    dec_rows: list[tuple[str, Callable[[], object]]] = [
        ("plain decrypt loop (no AAD)", lambda: loops.plain_decrypt(aead, blob_chunks, _drop)),
        (
            "keygate decrypt_many, no context",
            lambda: loops.kg_decrypt_batch(reader, T, P, dec_none, _drop),
        ),
        (
            "keygate decrypt_many, per-record context",
            lambda: loops.kg_decrypt_batch(reader, T, P, dec_ctx, _drop),
        ),
        (
            "copy of decrypt_many body, per-record context",
            lambda: _decrypt_copy(reader, dec_ctx, None, False),
        ),
        (
            "  same, AAD pre-built (no encode_context)",
            lambda: _decrypt_copy(reader, dec_ctx, aads, False),
        ),
        (
            "  same, but header slice + cache lookup per record",
            lambda: _decrypt_copy(reader, dec_ctx, aads, True),
        ),
    ]
    _table(f"## decrypt, {size} B records, {n:,} per round", dec_rows, n, rounds)
    return envs_none


def _rewrap_table(st: Any, size: int, envs: list[bytes], rounds: int) -> None:
    n = len(envs)
    km = st.fresh_key_manager()
    chunks = _chunks(envs)
    loops.kg_rewrap_batch(km, T, P, chunks[:1], _drop)
    h = envs[0][2] << 8 | envs[0][3]
    new = km.rewrap(T, P, envs[0])[:h]
    d = {envs[0][:h]: new}
    rows: list[tuple[str, Callable[[], object]]] = [
        ("keygate rewrap_many", lambda: loops.kg_rewrap_batch(km, T, P, chunks, _drop)),
        ("keygate rewrap (single)", lambda: loops.kg_rewrap_single(km, T, P, chunks, _drop)),
        ("floor: new + env[H:]", lambda: loops.splice_floor(new, chunks, _drop)),
        ("loop reading H only (no output bytes)", lambda: [e[2] << 8 | e[3] for e in envs]),
        ("env[:H] slice + dict.get alone", lambda: [d.get(e[:h]) for e in envs]),
    ]
    _table(f"## rewrap, {size} B records, {n:,} per round", rows, n, rounds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    p.add_argument("--quick", action="store_true", help="few records, 2 rounds")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    sizes = {64: 5_000, 1024: 2_000} if args.quick else {64: 200_000, 1024: 100_000}
    with open_stack() as st:
        envelopes = {size: _crypt_tables(st, size, n, rounds) for size, n in sizes.items()}
        print(f"\n(rotated to key version {st.rotate()})")
        for size, envs in envelopes.items():
            _rewrap_table(st, size, envs, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
