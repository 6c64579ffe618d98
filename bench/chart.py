"""PNG chart of records/s per scenario (1 KiB rows), written next to the JSON results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.report import Extras
from bench.runner import Scenario

__all__ = ["write_chart"]

_COLOURS = {
    "plain": "#9e9e9e",
    "keygate": "#1565c0",
    "peer": "#ef6c00",
    "keygate HTTP": "#2e7d32",
    "OpenBao HTTP": "#6a1b9a",
}


def write_chart(path: Path, scenarios: Sequence[Scenario], extras: Extras) -> Path | None:
    """Horizontal bars, log scale: in-process (no caller context), peers, HTTP batch and HTTP
    single-record throughput at concurrency 8.  Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars: list[tuple[str, float, str]] = []
    for sc in scenarios:
        if sc.size != 1024 or sc.context != "none":
            continue
        if sc.api == "batch":
            bars.append((sc.plain_label, sc.rate("plain"), "plain"))
        bars.append((f"keygate {sc.op} ({sc.api})", sc.rate("keygate"), "keygate"))
    for row in extras.peers or []:
        if row.size == 1024:
            bars.append((f"{row.peer} {row.op}", row.rate, "peer"))
    if extras.http is not None:
        for b in extras.http.batch:
            kind = "OpenBao HTTP" if b.target == "openbao" else "keygate HTTP"
            bars.append((f"HTTP batch {b.target} {b.op}", b.rate, kind))
        for s in extras.http.single:
            if s.concurrency == 8:
                kind = "OpenBao HTTP" if s.target == "openbao" else "keygate HTTP"
                bars.append((f"HTTP single c8 {s.target} {s.op}", s.rate, kind))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(10, max(4.0, 0.24 * len(bars) + 1)))
    ys = range(len(bars))
    ax.barh(
        list(ys),
        [b[1] for b in bars],
        color=[_COLOURS[b[2]] for b in bars],
    )
    ax.set_yticks(list(ys), [b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("records/s (1 KiB records; log scale)")
    ax.set_title("keygate bench: records/s per scenario (one run, same machine)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLOURS.values()]
    ax.legend(handles, list(_COLOURS), fontsize=7, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
