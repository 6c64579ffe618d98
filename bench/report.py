"""Goals from DESIGN.md ("Performance goals"), the Markdown report and the JSON results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.runner import TIMED, Config, Scenario, size_label

__all__ = ["Goal", "evaluate_goals", "markdown", "write_json"]

RATIO_TARGET = 0.60
REWRAP_TARGET = 1_000_000.0
#: "Performance goals (1 KiB records unless stated …)"
GOAL_SIZE = 1024

_RATIO_GOALS = {
    "encrypt": "encrypt ≥ 60% of the plain AES-GCM encrypt loop",
    "decrypt": "decrypt ≥ 60% of the plain AES-GCM decrypt loop",
    "reencrypt": "full re-encryption ≥ 60% of a plain decrypt+encrypt loop",
}


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


def _f(x: float) -> str:
    return f"{x:,.0f}"


def markdown(
    scenarios: Sequence[Scenario],
    goals: Sequence[Goal],
    meta: dict[str, Any],
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
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
