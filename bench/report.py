"""Goals from DESIGN.md ("Performance goals"), the Markdown report and the JSON results."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.runner import TIMED, Config, Scenario, size_label

if TYPE_CHECKING:
    from bench.http import HttpResults
    from bench.peers import PeerRow

__all__ = ["Extras", "Goal", "evaluate_goals", "evaluate_http_goals", "markdown", "write_json"]

RATIO_TARGET = 0.60
REWRAP_TARGET = 1_000_000.0
HTTP_TARGET = 2.0
#: the server configuration the HTTP goal binds (``keygate serve``'s default worker count)
HTTP_GOAL_TARGET = "keygate-2w"
#: "Performance goals (1 KiB records unless stated …)"
GOAL_SIZE = 1024

_RATIO_GOALS = {
    "encrypt": "encrypt ≥ 60% of the plain AES-GCM encrypt loop",
    "decrypt": "decrypt ≥ 60% of the plain AES-GCM decrypt loop",
    "reencrypt": "full re-encryption ≥ 60% of a plain decrypt+encrypt loop",
}


@dataclass
class Extras:
    """The peers and HTTP results of a run (either may be absent), and why something was skipped."""

    peers: list[PeerRow] | None = None
    http: HttpResults | None = None
    skipped: list[str] | None = None
    chart: str | None = None


@dataclass(frozen=True)
class Goal:
    goal: str
    scenario: str
    target: str
    measured: str
    margin: str
    met: bool
    #: False for rows outside the goal's stated scope (64 B records): shown for information
    binding: bool

    @property
    def status(self) -> str:
        word = "met" if self.met else "NOT met"
        return word if self.binding else f"({word}, info)"

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "status": self.status}


def evaluate_goals(scenarios: Sequence[Scenario]) -> list[Goal]:
    goals: list[Goal] = []
    for op, text in _RATIO_GOALS.items():
        for sc in scenarios:
            if sc.op != op:
                continue
            r = sc.ratio
            goals.append(
                Goal(
                    goal=text,
                    scenario=sc.id,
                    target=f"≥ {RATIO_TARGET:.2f}",
                    measured=f"{r:.3f}",
                    margin=f"{r - RATIO_TARGET:+.3f} ({r / RATIO_TARGET - 1:+.0%} of target)",
                    met=r >= RATIO_TARGET,
                    binding=sc.size == GOAL_SIZE,
                )
            )
    for sc in scenarios:
        if sc.op != "rewrap":
            continue
        rate = sc.rate("keygate")
        goals.append(
            Goal(
                goal="rewrap ≥ 1,000,000 records/s per core",
                scenario=sc.id,
                target="≥ 1,000,000/s",
                measured=f"{rate:,.0f}/s",
                margin=f"{rate - REWRAP_TARGET:+,.0f}/s ({rate / REWRAP_TARGET - 1:+.0%})",
                met=rate >= REWRAP_TARGET,
                binding=sc.size == GOAL_SIZE,
            )
        )
    for sc in scenarios:
        goals.append(
            Goal(
                goal="HSM calls ≤ distinct DEKs",
                scenario=sc.id,
                target=f"≤ {sc.distinct_deks}",
                measured=str(sc.hsm_calls),
                margin=f"{sc.distinct_deks - sc.hsm_calls:+d} calls",
                met=sc.hsm_calls <= sc.distinct_deks,
                binding=True,
            )
        )
    return goals


def evaluate_http_goals(http: HttpResults) -> list[Goal]:
    """HTTP batch API ≥ 2× OpenBao transit batch, per operation, same client and machine."""
    goals: list[Goal] = []
    for row in http.batch:
        if row.target == "openbao":
            continue
        bao = http.batch_rate("openbao", row.op)
        if bao is None:
            continue
        r = row.rate / bao
        goals.append(
            Goal(
                goal="HTTP batch ≥ 2× OpenBao transit batch",
                scenario=row.id,
                target=f"≥ {HTTP_TARGET:.1f}×",
                measured=f"{r:.2f}× ({row.rate:,.0f}/s vs {bao:,.0f}/s)",
                margin=f"{r - HTTP_TARGET:+.2f}× ({r / HTTP_TARGET - 1:+.0%} of target)",
                met=r >= HTTP_TARGET,
                binding=row.target == HTTP_GOAL_TARGET,
            )
        )
    return goals


def _extras_markdown(extras: Extras) -> list[str]:
    lines: list[str] = []
    if extras.peers is not None:
        lines += [
            "",
            "## Peers (in-process, one thread, the same records; measured after keygate's rounds)",
            "",
            "| scenario | records/round | peer rec/s | peer MB/s | keygate single / peer "
            "| keygate batch / peer | plain loop / peer |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for row in extras.peers:
            r = row.ratios()
            cells = [
                f"{r[k]:,.2f}" if k in r else "-"
                for k in ("keygate single", "keygate batch", "plain loop")
            ]
            lines.append(
                f"| {row.id} | {row.n:,} | {_f(row.rate)} | {row.mb_s:.1f} | "
                + " | ".join(cells)
                + " |"
            )
        lines += ["", "Peers measured:", ""]
        seen: set[str] = set()
        for row in extras.peers:
            if row.peer not in seen:
                seen.add(row.peer)
                lines.append(f"- **{row.peer}**: {row.label}")
        lines.append(
            "- keygate single / batch = keygate's `encrypt`/`decrypt` or `*_many` rate of the same "
            "operation and size with no caller context (tenant and purpose still bound as AAD) "
            "from the throughput table above; plain loop = the plain AES-GCM loop of that row."
        )
    http = extras.http
    if http is not None:
        f = http.facts
        lines += [
            "",
            "## HTTP batch (1 KiB records, batches of "
            f"{f.get('batch')}, {f.get('client_threads_batch')} client threads)",
            "",
            "| scenario | records/round | rec/s | MB/s | / OpenBao | spread | client CPU / wall |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for row in http.batch:
            bao = http.batch_rate("openbao", row.op)
            ratio = f"{row.rate / bao:.2f}×" if bao and row.target != "openbao" else "-"
            med = statistics.median(row.round_s)
            spread = (max(row.round_s) - min(row.round_s)) / med
            cpu = statistics.median(row.client_cpu_s) / med
            lines.append(
                f"| {row.id} | {row.n:,} | {_f(row.rate)} | {row.rate * row.size / 1e6:.1f} "
                f"| {ratio} | {spread:.0%} | {cpu:.0%} |"
            )
        lines += [
            "",
            "## HTTP single record (1 KiB; one request = one record)",
            "",
            "| scenario | requests | failed | req/s | p50 ms | p99 ms | max ms |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for s in http.single:
            lines.append(
                f"| {s.id} | {len(s.latencies_s):,} | {s.errors or ''} | {_f(s.rate)} "
                f"| {s.pct(0.5) * 1e3:.2f} "
                f"| {s.pct(0.99) * 1e3:.2f} | {max(s.latencies_s) * 1e3:.2f} |"
            )
        lines += [
            "",
            f"The client runs in the bench process on the same {f.get('cores')}-core machine as "
            "the servers, so it takes CPU from them (the 'client CPU / wall' column: the bench "
            "process's CPU time over the round's wall time; 100% = one core); it is the same "
            "client for keygate and OpenBao.  keygate: `keygate serve` subprocess, log level "
            "warning, audit trail on (SQLite), HSM = SoftHSM; OpenBao: `bao server -dev` "
            "(in-memory storage, no audit device), transit key aes256-gcm96, plus a listener "
            "with max_request_json_strings = 100000 (the default 1000 refuses a batch of 1000). "
            "Batch rounds interleave the servers; requests are pre-serialised, responses are "
            "parsed and checked after the clock stops.  Rewrap follows a key rotation on each "
            "server (keygate: header rewrite to the new KEK version; OpenBao: decrypt and "
            "re-encrypt under v2).  Single-record rows: up to "
            f"{f.get('single_requests_max')} requests or {f.get('single_time_limit_s')} s, "
            "one httpx client per thread.",
        ]
        failed = [s for s in http.single if s.errors]
        if failed:
            lines += [
                "",
                f"**{len(failed)} single-record cells had failed requests** (latencies include "
                f"them); first error of {failed[0].id}: `{failed[0].first_error}`",
            ]
    if extras.skipped:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in extras.skipped]
    if extras.chart:
        lines += ["", f"Chart: `{extras.chart}`"]
    return lines


def _f(x: float) -> str:
    return f"{x:,.0f}"


def markdown(
    scenarios: Sequence[Scenario],
    goals: Sequence[Goal],
    meta: dict[str, Any],
    extras: Extras | None = None,
) -> str:
    m = meta["machine"]
    kg = meta["keygate"]
    cfg = meta["config"]
    title = "# keygate bench"
    if cfg["quick"]:
        title += " (--quick: smoke run, numbers not meaningful)"
    lines = [
        title,
        "",
        f"- machine: {m.get('cpu_model')}, {m.get('cores_usable')} usable cores "
        f"(AES-NI {m.get('aes_ni')}, VAES {m.get('vaes')}), {m.get('platform')}",
        f"- software: Python {m['python']}, cryptography {m['cryptography']} "
        f"({m['openssl']}), python-pkcs11 {m['python_pkcs11']}, SoftHSM {m['softhsm']}, "
        f"keygate {str(m.get('keygate_commit') or '?')[:12]}"
        + (
            f" + uncommitted changes in {', '.join(m['keygate_uncommitted_files'])}"
            if m.get("keygate_uncommitted_files")
            else ""
        )
        + f" (sources sha256 {str(m.get('keygate_source_sha256'))[:12]})",
        f"- keygate: tenant {kg['tenant']} purpose {kg['purpose']}, HSM wrap mechanism "
        f"{kg['mechanism']}, envelope header {kg['header_bytes']} B (+12 B nonce +16 B tag); "
        f"DEK limits {kg['dek_max_records']:,} records / {kg['dek_max_age_s']:.0f} s; "
        f"batch size {cfg['batch']}",
        f"- rounds: {cfg['rounds']} interleaved (plain, keygate, plain, keygate …); "
        f"rates are records per median round; MB/s counts plaintext bytes (10^6 B); "
        f"one process, one thread; outputs "
        + (
            "kept for the whole round (--retain)"
            if cfg["retain"]
            else "streamed: each chunk's outputs are freed before the next chunk"
        ),
        f"- run took {meta['duration_s']:.0f} s; load average before/after: "
        f"{m.get('load_average_at_start')} / {meta.get('load_average_at_end')}",
        "",
        "## Throughput",
        "",
        "| scenario | records/round | plain rec/s | keygate rec/s | keygate/plain "
        "| plain MB/s | keygate MB/s | spread plain / kg | keygate/plain (CPU time) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for sc in scenarios:
        lines.append(
            f"| {sc.id} | {sc.n:,} | {_f(sc.rate('plain'))} | {_f(sc.rate('keygate'))} "
            f"| {sc.ratio:.3f} | {sc.mb_s('plain'):.1f} | {sc.mb_s('keygate'):.1f} "
            f"| {sc.spread('plain'):.0%} / {sc.spread('keygate'):.0%} | {sc.cpu_ratio:.3f} |"
        )
    lines += [
        "",
        "Plain peer: encrypt/decrypt = the plain `cryptography` AES-GCM loop; reencrypt = plain "
        "decrypt + encrypt under a second key; rewrap = header-splice floor (not a goal peer: the "
        "rewrap goal is absolute).  Spread = (slowest − fastest round) / median.  The last "
        "column is the same ratio from the thread's CPU time in the same timed regions (medians): "
        "it ignores time the process spent descheduled, so on a busy machine it is the steadier "
        "of the two; the goals below use wall-clock rates.",
        "",
        "## HSM calls",
        "",
        "| scenario | key manager | records (all rounds) | HSM calls | wraps | unwraps "
        "| calls / 1M records | distinct DEKs | calls ≤ DEKs |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for sc in scenarios:
        lines.append(
            f"| {sc.id} | {sc.key_manager} | {sc.records_total:,} | {sc.hsm_calls} "
            f"| {sc.hsm_wraps} | {sc.hsm_unwraps} | {sc.hsm_per_million:.2f} "
            f"| {sc.distinct_deks} | {'yes' if sc.hsm_calls <= sc.distinct_deks else 'NO'} |"
        )
    if extras is not None:
        lines += _extras_markdown(extras)
    binding = [g for g in goals if g.binding]
    met = sum(g.met for g in binding)
    lines += [
        "",
        f"## Goals (DESIGN.md; 1 KiB rows bind, 64 B rows are information): "
        f"{met} of {len(binding)} met",
        "",
        "| goal | scenario | target | measured | margin | status |",
        "|---|---|---|---|---|---|",
    ]
    for g in goals:
        lines.append(
            f"| {g.goal} | {g.scenario} | {g.target} | {g.measured} | {g.margin} | {g.status} |"
        )
    lines += ["", "## What is timed", ""]
    for key, text in TIMED.items():
        name = key if isinstance(key, str) else f"{key[0]} / {key[1]}"
        lines.append(f"- **{name}**: {text}")
    lines.append(
        "- Not timed: building records, contexts, (context, value) items and chunks; "
        "gc.collect() before each timed call (the GC stays on inside); reading HSM counters; "
        "one extra pass per scenario that keeps and checks every output (and decrypts a sample "
        "of rewrapped and re-encrypted records with another key manager)."
    )
    return "\n".join(lines) + "\n"


def write_json(
    path: Path,
    scenarios: Sequence[Scenario],
    goals: Sequence[Goal],
    meta: dict[str, Any],
    config: Config,
    extras: Extras | None = None,
) -> None:
    binding = [g for g in goals if g.binding]
    doc = {
        "schema": 1,
        **meta,
        "record_sizes": {size_label(s): n for s, n in config.records.items()},
        "sink": TIMED["sink"],
        "scenarios": [sc.to_json() for sc in scenarios],
        "goals": [g.to_json() for g in goals],
        "goals_summary": {"binding": len(binding), "met": sum(g.met for g in binding)},
        "peers": [r.to_json() for r in extras.peers]
        if extras and extras.peers is not None
        else None,
        "http": extras.http.to_json() if extras and extras.http is not None else None,
        "skipped": extras.skipped if extras else [],
        "chart": extras.chart if extras else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
