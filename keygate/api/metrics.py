"""Prometheus metrics.  With several worker processes, ``PROMETHEUS_MULTIPROC_DIR`` is set by
``keygate serve`` and every worker's counters are summed when /metrics is scraped."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = ["Metrics", "render_metrics"]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The gateway's metrics; one instance per process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.requests = Counter(
            "keygate_http_requests",
            "HTTP requests by endpoint and outcome code",
            ["endpoint", "code"],
            **kw,
        )
        self.latency = Histogram(
            "keygate_http_request_duration_seconds",
            "HTTP request latency by endpoint",
            ["endpoint"],
            buckets=_BUCKETS,
            **kw,
        )
        self.records = Counter(
            "keygate_records", "records processed by operation", ["operation"], **kw
        )
        self.hsm_calls = Counter("keygate_hsm_calls", "HSM operations by kind", ["operation"], **kw)
        self.hsm_latency = Histogram(
            "keygate_hsm_call_duration_seconds",
            "HSM operation latency",
            ["operation"],
            buckets=_BUCKETS,
            **kw,
        )
        self.cache_hits = Counter("keygate_dek_cache_hits", "decrypt/rewrap DEK cache hits", **kw)
        self.cache_misses = Counter(
            "keygate_dek_cache_misses", "decrypt/rewrap DEK cache misses", **kw
        )
        self.deks_created = Counter("keygate_deks_created", "new DEKs made for encryption", **kw)
        self._last: dict[str, int] = {}

    def sync_key_stats(self, stats: Any) -> None:
        """Push the key manager's plain counters (kept cheap on the hot path) as deltas."""
        now = {
            "enc": stats.records_encrypted,
            "dec": stats.records_decrypted,
            "rew": stats.records_rewrapped,
            "miss": stats.cache_misses,
            "new": stats.deks_created,
        }
        d = {k: v - self._last.get(k, 0) for k, v in now.items()}
        self._last = now
        if d["enc"] > 0:
            self.records.labels("encrypt").inc(d["enc"])
        if d["dec"] > 0:
            self.records.labels("decrypt").inc(d["dec"])
        if d["rew"] > 0:
            self.records.labels("rewrap").inc(d["rew"])
        if d["miss"] > 0:
            self.cache_misses.inc(d["miss"])
        hits = d["dec"] + d["rew"] - d["miss"]
        if hits > 0:
            self.cache_hits.inc(hits)
        if d["new"] > 0:
            self.deks_created.inc(d["new"])


def render_metrics() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class InstrumentedHsm:
    """Wraps the HSM adapter to time and count its calls (once per DEK, never per record)."""

    def __init__(self, hsm: Any, metrics: Metrics) -> None:
        self._hsm = hsm
        self._m = metrics

    def wrap_dek(self, label: str, dek: bytes, *, aad: bytes) -> Any:
        with self._m.hsm_latency.labels("wrap").time():
            result = self._hsm.wrap_dek(label, dek, aad=aad)
        self._m.hsm_calls.labels("wrap").inc()
        return result

    def unwrap_dek(self, label: str, mechanism: Any, wrapped: bytes, *, aad: bytes) -> bytes:
        with self._m.hsm_latency.labels("unwrap").time():
            result: bytes = self._hsm.unwrap_dek(label, mechanism, wrapped, aad=aad)
        self._m.hsm_calls.labels("unwrap").inc()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hsm, name)
