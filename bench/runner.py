"""Scenario runner: interleaved rounds (plain, keygate, plain, keygate …), HSM accounting and
result checks.  Only the loop call itself is timed (see bench/loops.py); building inputs,
collecting garbage, reading counters and checking outputs all happen outside the clock.

After the timed rounds of a scenario, one untimed pass runs both loops again with a sink that
keeps every output, and every output is checked (its HSM calls are not counted).  The encrypt
scenarios' checked outputs are the inputs of the later decrypt, rewrap and re-encrypt scenarios.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import loops
from bench.stack import PURPOSE, TENANT, Stack
from keygate.core.errors import GatewayError
from keygate.keys.manager import KeyManager
from keygate.service import key_version_of

__all__ = ["Config", "Scenario", "run_all"]

OPS = ("encrypt", "decrypt", "rewrap", "reencrypt")
APIS = ("single", "batch")
CONTEXTS = ("none", "per-record")
#: check this many records of each rewrap / re-encrypt round by decrypting them again
_SAMPLE = 256

_PER_CHUNK = "; per chunk the output list goes to the sink"
TIMED = {
    ("encrypt", "plain"): "for each record of a chunk: n = os.urandom(12); "
    "append(n + aesgcm.encrypt(n, rec, None))" + _PER_CHUNK,
    ("decrypt", "plain"): "for each blob of a chunk: append(aesgcm.decrypt(blob[:12], blob[12:], "
    "None))" + _PER_CHUNK,
    ("reencrypt", "plain"): "for each blob of a chunk: decrypt under key 1, new os.urandom(12) "
    "nonce, encrypt under key 2; append" + _PER_CHUNK,
    ("rewrap", "plain"): "floor only: for each envelope of a chunk read H from bytes 2..3 and "
    "append(new_header + env[H:])" + _PER_CHUNK,
    ("encrypt", "single"): "for each (context, record) of a chunk: append(KeyManager.encrypt("
    "tenant, purpose, context, record))" + _PER_CHUNK,
    ("encrypt", "batch"): "for each chunk: KeyManager.encrypt_many(tenant, purpose, chunk) to "
    "the sink",
    ("decrypt", "single"): "for each (context, envelope) of a chunk: append(KeyManager.decrypt("
    "tenant, purpose, context, envelope))" + _PER_CHUNK,
    ("decrypt", "batch"): "for each chunk: KeyManager.decrypt_many(tenant, purpose, chunk) to "
    "the sink",
    ("rewrap", "single"): "for each envelope of a chunk: append(KeyManager.rewrap(tenant, "
    "purpose, envelope))" + _PER_CHUNK,
    ("rewrap", "batch"): "for each chunk: KeyManager.rewrap_many(tenant, purpose, chunk) to the "
    "sink",
    ("reencrypt", "single"): "for each (context, envelope) of a chunk: append(KeyManager.encrypt("
    "..., context, KeyManager.decrypt(..., context, envelope)))" + _PER_CHUNK,
    ("reencrypt", "batch"): "for each chunk: decrypt_many, re-pair plaintexts with their "
    "contexts (list comprehension), encrypt_many; to the sink",
    "sink": "streaming (default): a no-op function call, so each chunk's outputs are freed "
    "before the next chunk; for keygate encrypt and re-encrypt the sink also records the key "
    "headers of the chunk's first and last envelope (to count distinct DEKs); --retain: the "
    "sink also keeps every chunk's list (freed after the clock stops)",
}


@dataclass(frozen=True)
class Config:
    #: record size in bytes -> records per round
    records: Mapping[int, int]
    rounds: int
    batch: int
    quick: bool
    #: keep every output of a round (the caller holds all results) instead of streaming
    retain: bool = False


@dataclass
class Scenario:
    op: str
    size: int
    api: str
    context: str
    n: int
    key_manager: str
    plain_label: str
    plain_s: list[float] = field(default_factory=list)
    keygate_s: list[float] = field(default_factory=list)
    #: CPU time of the benchmark thread in the same timed regions (robust to descheduling)
    plain_cpu_s: list[float] = field(default_factory=list)
    keygate_cpu_s: list[float] = field(default_factory=list)
    hsm_calls: int = 0
    hsm_wraps: int = 0
    hsm_unwraps: int = 0
    distinct_deks: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.op}/{size_label(self.size)}/{self.api}/{self.context}"

    @property
    def records_total(self) -> int:
        return self.n * len(self.keygate_s)

    def rate(self, side: str) -> float:
        times = self.plain_s if side == "plain" else self.keygate_s
        return self.n / statistics.median(times)

    def mb_s(self, side: str) -> float:
        return self.rate(side) * self.size / 1e6

    @property
    def ratio(self) -> float:
        return self.rate("keygate") / self.rate("plain")

    def cpu_rate(self, side: str) -> float:
        times = self.plain_cpu_s if side == "plain" else self.keygate_cpu_s
        return self.n / statistics.median(times)

    @property
    def cpu_ratio(self) -> float:
        return self.cpu_rate("keygate") / self.cpu_rate("plain")

    @property
    def hsm_per_million(self) -> float:
        return self.hsm_calls / self.records_total * 1e6

    def spread(self, side: str) -> float:
        """(slowest − fastest round) / median, for a feel of the noise."""
        times = self.plain_s if side == "plain" else self.keygate_s
        return (max(times) - min(times)) / statistics.median(times)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "op": self.op,
            "record_bytes": self.size,
            "api": self.api,
            "context": self.context,
            "records_per_round": self.n,
            "rounds": len(self.keygate_s),
            "key_manager": self.key_manager,
            "plain": {
                "label": self.plain_label,
                "timed_region": f"{TIMED[(self.op, 'plain')]}",
                "round_seconds": self.plain_s,
                "median_seconds": statistics.median(self.plain_s),
                "records_per_s": self.rate("plain"),
                "mb_per_s": self.mb_s("plain"),
                "spread": self.spread("plain"),
                "round_cpu_seconds": self.plain_cpu_s,
                "records_per_cpu_s": self.cpu_rate("plain"),
            },
            "keygate": {
                "timed_region": TIMED[(self.op, self.api)],
                "round_seconds": self.keygate_s,
                "median_seconds": statistics.median(self.keygate_s),
                "records_per_s": self.rate("keygate"),
                "mb_per_s": self.mb_s("keygate"),
                "spread": self.spread("keygate"),
                "round_cpu_seconds": self.keygate_cpu_s,
                "records_per_cpu_s": self.cpu_rate("keygate"),
            },
            "ratio_keygate_to_plain": self.ratio,
            "ratio_keygate_to_plain_cpu_time": self.cpu_ratio,
            "hsm": {
                "records_total": self.records_total,
                "adapter_calls": self.hsm_calls,
                "key_manager_wraps": self.hsm_wraps,
                "key_manager_unwraps": self.hsm_unwraps,
                "calls_per_million_records": self.hsm_per_million,
                "distinct_deks": self.distinct_deks,
                "calls_le_distinct_deks": self.hsm_calls <= self.distinct_deks,
            },
            "notes": self.notes,
        }


def size_label(size: int) -> str:
    return f"{size // 1024}KiB" if size % 1024 == 0 else f"{size}B"


def _headers(envelopes: Sequence[object]) -> set[bytes]:
    out: set[bytes] = set()
    for env in envelopes:
        assert isinstance(env, bytes), f"expected an envelope, got {env!r}"
        out.add(env[: env[2] << 8 | env[3]])
    return out


def _all_bytes(outputs: Sequence[object], what: str) -> None:
    for i, item in enumerate(outputs):
        if item.__class__ is not bytes:
            code = item.code if isinstance(item, GatewayError) else type(item).__name__
            raise AssertionError(f"{what}: item {i} is not bytes but {code}")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _drop(_out: list[Any]) -> None:
    """The streaming sink: the chunk's outputs are freed when the loop moves on."""


def _header(env: object) -> bytes:
    # Raises TypeError for a GatewayError in place of an envelope: the run stops loudly.
    return env[: env[2] << 8 | env[3]]  # type: ignore[index, no-any-return]


class _Collector:
    """A sink that keeps every chunk (``--retain`` rounds and the untimed checking pass)."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[list[Any]] = []

    def __call__(self, out: list[Any]) -> None:
        self.chunks.append(out)

    def flat(self) -> list[Any]:
        return [x for chunk in self.chunks for x in chunk]


Loop = Callable[[Callable[[list[Any]], None]], None]


class _Runner:
    def __init__(self, stack: Stack, config: Config) -> None:
        self.stack = stack
        self.config = config
        self.key1 = AESGCM(os.urandom(32))
        self.key2 = AESGCM(os.urandom(32))
        self.scenarios: list[Scenario] = []
        self.total = len(OPS) * len(config.records) * len(APIS) * len(CONTEXTS)
        self.records: dict[int, list[bytes]] = {}
        self.contexts: dict[tuple[int, str], list[Mapping[str, str]]] = {}
        # per (size, context, api): the checked outputs of the encrypt scenario
        self.kg_v1: dict[tuple[int, str, str], list[bytes]] = {}
        self.plain_v1: dict[tuple[int, str, str], list[bytes]] = {}
        self.new_version = 0

    # ------------------------------------------------------------------ inputs
    def build_inputs(self, size: int, n: int) -> None:
        self.records[size] = [os.urandom(size) for _ in range(n)]
        empty: Mapping[str, str] = {}
        self.contexts[(size, "none")] = [empty] * n
        self.contexts[(size, "per-record")] = [
            {"record_id": f"R-{i:06d}", "field": "氏名"} for i in range(n)
        ]

    def chunks(self, values: Sequence[Any]) -> list[Sequence[Any]]:
        b = self.config.batch
        return [values[i : i + b] for i in range(0, len(values), b)]

    def item_chunks(self, size: int, context: str, values: Sequence[bytes]) -> list[Any]:
        return self.chunks(list(zip(self.contexts[(size, context)], values, strict=True)))

    # ------------------------------------------------------------------ the interleaved rounds
    def measure(
        self,
        sc: Scenario,
        km: KeyManager,
        plain: Loop,
        keygate: Loop,
        kg_sink: Callable[[list[Any]], None] = _drop,
    ) -> tuple[list[Any], list[Any]]:
        """Timed rounds, then one untimed pass that keeps every output; returns its outputs
        (plain, keygate) for the caller to check."""
        hsm = self.stack.hsm
        clock = time.perf_counter
        cpu = time.thread_time
        retain = self.config.retain
        for _ in range(self.config.rounds):
            keep = _Collector() if retain else None
            sink = keep if keep is not None else _drop
            gc.collect()
            c0 = cpu()
            t0 = clock()
            plain(sink)
            t1 = clock()
            c1 = cpu()
            sc.plain_s.append(t1 - t0)
            sc.plain_cpu_s.append(c1 - c0)
            del keep, sink

            keep = _Collector() if retain else None
            if keep is None:
                sink = kg_sink
            elif kg_sink is _drop:
                sink = keep
            else:

                def sink(out: list[Any], keep: _Collector = keep) -> None:
                    kg_sink(out)
                    keep(out)

            gc.collect()
            calls0, wraps0, unwraps0 = hsm.calls, km.stats.hsm_wraps, km.stats.hsm_unwraps
            c0 = cpu()
            t0 = clock()
            keygate(sink)
            t1 = clock()
            c1 = cpu()
            sc.keygate_s.append(t1 - t0)
            sc.keygate_cpu_s.append(c1 - c0)
            sc.hsm_calls += hsm.calls - calls0
            sc.hsm_wraps += km.stats.hsm_wraps - wraps0
            sc.hsm_unwraps += km.stats.hsm_unwraps - unwraps0
            del keep, sink

        plain_out, kg_out = _Collector(), _Collector()
        plain(plain_out)
        keygate(kg_out)
        return plain_out.flat(), kg_out.flat()

    def done(self, sc: Scenario) -> None:
        self.scenarios.append(sc)
        _progress(
            f"[{len(self.scenarios):2d}/{self.total}] {sc.id:32s}"
            f" plain {sc.rate('plain'):>12,.0f}/s  keygate {sc.rate('keygate'):>12,.0f}/s"
            f"  ratio {sc.ratio:5.2f} (CPU time {sc.cpu_ratio:4.2f})"
            f"  HSM calls {sc.hsm_calls} (distinct DEKs {sc.distinct_deks})"
        )

    def scenario(self, op: str, size: int, api: str, context: str, km_kind: str) -> Scenario:
        plain = {
            "encrypt": "plain AES-GCM encrypt",
            "decrypt": "plain AES-GCM decrypt",
            "reencrypt": "plain decrypt + encrypt (2nd key)",
            "rewrap": "header-splice floor",
        }[op]
        n = len(self.records[size])
        return Scenario(op, size, api, context, n, km_kind, plain)

    def verify_sample(self, size: int, context: str, outputs: Sequence[bytes]) -> None:
        """Decrypt the first records of ``outputs`` with a fresh key manager (HSM not counted)."""
        km = self.stack.fresh_key_manager()
        k = min(_SAMPLE, len(outputs))
        items = list(zip(self.contexts[(size, context)][:k], outputs[:k], strict=True))
        if km.decrypt_many(TENANT, PURPOSE, items) != self.records[size][:k]:
            raise AssertionError("a rewrapped or re-encrypted record did not decrypt to itself")

    # ------------------------------------------------------------------ operations
    def encrypt(self, size: int, api: str, context: str) -> None:
        km = self.stack.keys
        sc = self.scenario("encrypt", size, api, context, "gateway (the writing process)")
        records = self.records[size]
        rec_chunks = self.chunks(records)
        chunks = self.item_chunks(size, context, records)
        seen: set[bytes] = set()

        def sample(out: list[Any]) -> None:
            seen.add(_header(out[0]))
            seen.add(_header(out[-1]))

        aead = self.key1
        fn = loops.kg_encrypt_single if api == "single" else loops.kg_encrypt_batch
        plain_out, kg_out = self.measure(
            sc,
            km,
            lambda sink: loops.plain_encrypt(aead, rec_chunks, sink),
            lambda sink: fn(km, TENANT, PURPOSE, chunks, sink),
            sample,
        )
        sc.distinct_deks = len(seen)
        assert len(plain_out) == len(records) and len(plain_out[0]) == size + 28
        _all_bytes(kg_out, sc.id)
        assert all(key_version_of(e) == 1 for e in kg_out[:: max(1, len(kg_out) // 1000)])
        key = (size, context, api)
        self.plain_v1[key] = plain_out
        self.kg_v1[key] = kg_out
        self.done(sc)

    def decrypt(self, size: int, api: str, context: str) -> None:
        km = self.stack.fresh_key_manager()
        sc = self.scenario("decrypt", size, api, context, "fresh (a reader process, cold cache)")
        key = (size, context, api)
        records = self.records[size]
        envs = self.kg_v1[key]
        blob_chunks = self.chunks(self.plain_v1[key])
        chunks = self.item_chunks(size, context, envs)
        sc.distinct_deks = len(_headers(envs))
        aead = self.key1
        fn = loops.kg_decrypt_single if api == "single" else loops.kg_decrypt_batch
        plain_out, kg_out = self.measure(
            sc,
            km,
            lambda sink: loops.plain_decrypt(aead, blob_chunks, sink),
            lambda sink: fn(km, TENANT, PURPOSE, chunks, sink),
        )
        assert plain_out == records, "plain decrypt mismatch"
        _all_bytes(kg_out, sc.id)
        assert kg_out == records, f"{sc.id}: decrypted records differ"
        self.done(sc)

    def rewrap(self, size: int, api: str, context: str) -> None:
        # A bulk rewrap job runs in its own process: empty DEK cache, so every distinct DEK
        # costs an unwrap (old KEK) and a wrap (new KEK).  The cache then serves later rounds.
        km = self.stack.fresh_key_manager()
        sc = self.scenario("rewrap", size, api, context, "fresh (a bulk-job process, cold cache)")
        envs = self.kg_v1[(size, context, api)]
        chunks = self.chunks(envs)
        sc.distinct_deks = len(_headers(envs))
        new_header = _header(envs[0])
        fn = loops.kg_rewrap_single if api == "single" else loops.kg_rewrap_batch
        plain_out, kg_out = self.measure(
            sc,
            km,
            lambda sink: loops.splice_floor(new_header, chunks, sink),
            lambda sink: fn(km, TENANT, PURPOSE, chunks, sink),
        )
        assert len(plain_out) == len(envs)
        _all_bytes(kg_out, sc.id)
        for old, new in zip(envs, kg_out, strict=True):
            if new[len(_header(new)) :] != old[len(_header(old)) :]:
                raise AssertionError(f"{sc.id}: rewrap changed the data part")
        version = self.new_version
        assert all(key_version_of(e) == version for e in kg_out[:: max(1, len(kg_out) // 1000)])
        self.verify_sample(size, context, kg_out)
        self.done(sc)

    def reencrypt(self, size: int, api: str, context: str) -> None:
        km = self.stack.fresh_key_manager()
        sc = self.scenario(
            "reencrypt", size, api, context, "fresh (a bulk-job process, cold cache)"
        )
        key = (size, context, api)
        records = self.records[size]
        envs = self.kg_v1[key]
        blob_chunks = self.chunks(self.plain_v1[key])
        chunks = self.item_chunks(size, context, envs)
        old_headers = _headers(envs)
        seen: set[bytes] = set()

        def sample(out: list[Any]) -> None:
            seen.add(_header(out[0]))
            seen.add(_header(out[-1]))

        k1, k2 = self.key1, self.key2
        fn = loops.kg_reencrypt_single if api == "single" else loops.kg_reencrypt_batch
        plain_out, kg_out = self.measure(
            sc,
            km,
            lambda sink: loops.plain_reencrypt(k1, k2, blob_chunks, sink),
            lambda sink: fn(km, TENANT, PURPOSE, chunks, sink),
            sample,
        )
        sc.distinct_deks = len(old_headers) + len(seen)
        dec = k2.decrypt
        assert [dec(b[:12], b[12:], None) for b in plain_out] == records, "plain re-encrypt"
        _all_bytes(kg_out, sc.id)
        new_headers = _headers(kg_out)
        assert not new_headers & old_headers, "re-encryption reused an old DEK"
        version = self.new_version
        assert all(key_version_of(e) == version for e in kg_out[:: max(1, len(kg_out) // 1000)])
        self.verify_sample(size, context, kg_out)
        self.done(sc)


def run_all(
    stack: Stack, config: Config, keep_records: dict[int, list[bytes]] | None = None
) -> tuple[list[Scenario], dict[str, Any]]:
    """Every scenario, in this order: encrypt and decrypt at each size under key version 1,
    then a rotation through the service, then rewrap and full re-encryption at each size.

    Returns the scenarios and a few facts about the envelopes made.  ``keep_records``, when
    given, receives the records of each size (the peers and the HTTP scenarios reuse them).
    """
    r = _Runner(stack, config)
    for size, n in config.records.items():
        _progress(f"building {n:,} records of {size} B and their contexts (not timed)")
        r.build_inputs(size, n)
        for context in CONTEXTS:
            for api in APIS:
                r.encrypt(size, api, context)
        for context in CONTEXTS:
            for api in APIS:
                r.decrypt(size, api, context)
    r.new_version = stack.rotate()
    _progress(f"rotated {TENANT}/{PURPOSE} to key version {r.new_version}")
    for op in (r.rewrap, r.reencrypt):
        for size in config.records:
            for context in CONTEXTS:
                for api in APIS:
                    op(size, api, context)
    if keep_records is not None:
        keep_records.update(r.records)
    sample = next(iter(r.kg_v1.values()))[0]
    first_size = next(iter(r.records))
    facts = {
        "header_bytes": len(_header(sample)),
        "envelope_overhead_bytes": len(sample) - first_size,
        "rotated_to_version": r.new_version,
    }
    return r.scenarios, facts
