"""Bulk scenarios of ``python -m bench``: ``keygate bulk rewrap|reencrypt`` over a JSON Lines file
and over a PostgreSQL table, run as the real CLI in a child process (one worker, one core), with
the child's peak RSS; and a flat-memory check running the same job at two sizes.

What is measured
    records/s and MB/s from the job's own summary (the time of the job itself, excluding the
    process start-up and the gateway's set-up, which the "wall" column includes); MB/s counts the
    bytes of the input file (or of the table's envelope column).  Peak RSS is the job process's
    own ``VmHWM``, which the job reports in its summary (the whole ``keygate`` process:
    interpreter, SQLAlchemy, PKCS#11 module, the job's bounded batches); not ``wait4``'s
    ``ru_maxrss``, which on Linux carries the parent's peak over exec.  The flat-memory check
    runs the same rewrap over N and 10·N records: memory is flat when the two peaks are close.

The data is made in the bench process through the gateway (1 KiB random plaintexts for the
throughput scenarios, 64 B for the flat-memory check), then the key is rotated, so rewrap has
every record to move.  Nothing here asserts a speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stack import PURPOSE, TENANT, Stack
from keygate.core.wire import to_text

__all__ = ["add_bulk_json", "bulk_markdown", "run_bulk"]

REPO = Path(__file__).resolve().parents[1]

FULL = {"file": 100_000, "table": 100_000, "flat": (100_000, 1_000_000)}
QUICK = {"file": 2_000, "table": 2_000, "flat": (2_000, 20_000)}


def _env(stack: Stack) -> dict[str, str]:
    s = stack.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.update(stack.token.env)
    env.update(
        {
            "KEYGATE_DATA_DIR": str(s.data_dir),
            "KEYGATE_HSM_MODULE": s.hsm_module,
            "KEYGATE_HSM_TOKEN_LABEL": s.hsm_token_label,
            "KEYGATE_HSM_PIN": s.hsm_pin.get_secret_value() if s.hsm_pin else "",
            "KEYGATE_ACTOR": "bench",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        }
    )
    return env


def _run_cli(env: dict[str, str], args: list[str], workdir: Path) -> dict[str, Any]:
    """Run ``keygate bulk ARGS --json``; returns its summary plus wall time and peak RSS."""
    out_path = workdir / "summary.json"
    err_path = workdir / "stderr.txt"
    t0 = time.perf_counter()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keygate.cli.main",
                "bulk",
                *args,
                "--json",
                "--progress",
                "none",
            ],
            env=env,
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"keygate bulk {' '.join(args[:1])} failed ({proc.returncode}): "
            f"{err_path.read_text(errors='replace')[-2000:]}"
        )
    summary = json.loads(out_path.read_text().strip().splitlines()[-1])
    summary["wall_s"] = wall
    # The job's own VmHWM when it reports one: wait4's ru_maxrss carries the parent's peak over
    # exec on Linux, so it would report the bench process's size (it did: 1.8 GB for every job).
    if summary.get("peak_rss_mib") is None:
        summary["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return summary


def _envelopes(stack: Stack, n: int, size: int) -> Any:
    keys = stack.keys
    for start in range(0, n, 10_000):
        count = min(10_000, n - start)
        items = [({}, os.urandom(size)) for _ in range(count)]
        for env in keys.encrypt_many(TENANT, PURPOSE, items):
            assert isinstance(env, bytes)
            yield to_text(env)


def _write_jsonl(stack: Stack, path: Path, n: int, size: int) -> int:
    with path.open("w", encoding="ascii") as f:
        for i, text in enumerate(_envelopes(stack, n, size)):
            f.write(f'{{"id":{i},"v":"{text}"}}\n')
    return path.stat().st_size


def _row(scenario: str, op: str, n: int, nbytes: int, s: dict[str, Any]) -> dict[str, Any]:
    seconds = max(float(s["seconds"]), 1e-9)
    return {
        "scenario": scenario,
        "operation": op,
        "records": n,
        "changed": s["changed"],
        "failed": s["failed"],
        "hsm_calls": s["hsm_calls"],
        "deks_opened": s["deks_opened"],
        "deks_created": s["deks_created"],
        "job_s": round(seconds, 3),
        "wall_s": round(s["wall_s"], 3),
        "records_per_s": round(n / seconds, 1),
        "mb_per_s": round(nbytes / seconds / 1e6, 2),
        "peak_rss_mib": round(s["peak_rss_mib"], 1),
    }


def _file_scenarios(
    stack: Stack, env: dict[str, str], n: int, work: Path, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    src = work / "bulk-1k.jsonl"
    nbytes = _write_jsonl(stack, src, n, 1024)
    stack.rotate()
    progress(f"  bulk rewrap: JSON Lines, {n:,} × 1 KiB")
    common = ["-t", TENANT, "-p", PURPOSE, "--fields", "v", "--batch-size", "5000"]
    rows = []
    out1 = work / "bulk-1k.rewrapped.jsonl"
    s = _run_cli(env, ["rewrap", "-i", str(src), "-o", str(out1), *common], work)
    rows.append(_row("JSON Lines file, 1 KiB records", "rewrap", n, nbytes, s))
    progress(f"  bulk reencrypt: JSON Lines, {n:,} × 1 KiB")
    out2 = work / "bulk-1k.reencrypted.jsonl"
    s = _run_cli(env, ["reencrypt", "-i", str(out1), "-o", str(out2), *common], work)
    rows.append(_row("JSON Lines file, 1 KiB records", "reencrypt", n, out1.stat().st_size, s))
    for p in (src, out1, out2):
        p.unlink(missing_ok=True)
    return rows


def _table_scenarios(
    stack: Stack, env: dict[str, str], n: int, work: Path, progress: Callable[[str], None]
) -> tuple[list[dict[str, Any]], str | None]:
    try:
        import psycopg

        from keygate.testing.postgres import PostgresServer, find_bindir
    except ImportError as exc:
        return [], f"bulk over a PostgreSQL table: {exc.name} is not installed"
    bindir = find_bindir()
    if bindir is None:
        return [], "bulk over a PostgreSQL table: no PostgreSQL binaries (install postgresql)"
    rows: list[dict[str, Any]] = []
    with PostgresServer(bindir=bindir) as pg:
        dsn = pg.url.replace("postgresql+psycopg://", "postgresql://")
        nbytes = 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench (id bigint PRIMARY KEY, v text NOT NULL)")
            with conn.cursor() as cur, cur.copy("COPY bench (id, v) FROM STDIN") as copy:
                for i, text in enumerate(_envelopes(stack, n, 1024)):
                    nbytes += len(text)
                    copy.write_row((i, text))
            conn.execute("VACUUM ANALYZE bench")
        stack.rotate()
        common = ["--dsn", dsn, "--table", "bench", "--key-column", "id", "-t", TENANT,
                  "-p", PURPOSE, "--columns", "v", "--batch-size", "2000"]  # fmt: skip
        for op in ("rewrap", "reencrypt"):
            progress(f"  bulk {op}: PostgreSQL table, {n:,} × 1 KiB")
            s = _run_cli(env, [op, *common], work)
            rows.append(_row("PostgreSQL table, 1 KiB records", op, n, nbytes, s))
    return rows, None


def _flat_memory(
    stack: Stack, env: dict[str, str], sizes: tuple[int, int], work: Path,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for n in sizes:
        src = work / f"flat-{n}.jsonl"
        nbytes = _write_jsonl(stack, src, n, 64)
        stack.rotate()
        progress(f"  flat memory: rewrap JSON Lines, {n:,} × 64 B")
        out = work / f"flat-{n}.out.jsonl"
        s = _run_cli(
            env,
            [
                *("rewrap", "-i", str(src), "-o", str(out), "-t", TENANT, "-p", PURPOSE),
                *("--fields", "v", "--batch-size", "5000"),
            ],
            work,
        )
        rows.append(_row(f"flat memory, {n:,} × 64 B", "rewrap", n, nbytes, s))
        src.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    return rows


def run_bulk(
    stack: Stack,
    *,
    quick: bool,
    progress: Callable[[str], None],
    flat_sizes: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Every bulk scenario; returns the rows, the flat-memory verdict and what was skipped.

    ``flat_sizes`` replaces the two record counts of the flat-memory check (e.g. 1M and 10M)."""
    sizes = dict(QUICK if quick else FULL)
    if flat_sizes is not None:
        sizes["flat"] = flat_sizes
    env = _env(stack)
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="keygate-bench-bulk-", dir=stack.directory) as tmp:
        work = Path(tmp)
        rows = _file_scenarios(stack, env, int(sizes["file"]), work, progress)  # type: ignore[arg-type]
        table_rows, why = _table_scenarios(stack, env, int(sizes["table"]), work, progress)  # type: ignore[arg-type]
        rows += table_rows
        if why:
            skipped.append(why)
        flat = _flat_memory(stack, env, sizes["flat"], work, progress)  # type: ignore[arg-type]
    small, large = flat
    growth = large["peak_rss_mib"] / small["peak_rss_mib"] if small["peak_rss_mib"] else None
    return {
        "rows": rows,
        "flat_memory": {
            "rows": flat,
            "records": [small["records"], large["records"]],
            "peak_rss_mib": [small["peak_rss_mib"], large["peak_rss_mib"]],
            "rss_ratio": round(growth, 3) if growth else None,
            "flat": bool(growth is not None and growth < 1.25),
        },
        "workers": 1,
        "skipped": skipped,
    }


def bulk_markdown(result: dict[str, Any]) -> str:
    lines = [
        "",
        "## Bulk jobs (`keygate bulk`, one worker process, real CLI)",
        "",
        "| scenario | operation | records | records/s | MB/s | job s | wall s | HSM calls "
        "| peak RSS MiB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in [*result["rows"], *result["flat_memory"]["rows"]]:
        lines.append(
            f"| {r['scenario']} | {r['operation']} | {r['records']:,} | "
            f"{r['records_per_s']:,.0f} | {r['mb_per_s']:,.1f} | {r['job_s']:.2f} | "
            f"{r['wall_s']:.2f} | {r['hsm_calls']} | {r['peak_rss_mib']:.0f} |"
        )
    fm = result["flat_memory"]
    a, b = fm["records"]
    ra, rb = fm["peak_rss_mib"]
    lines += [
        "",
        f"Flat memory: peak RSS {ra:.0f} MiB at {a:,} records, {rb:.0f} MiB at {b:,} records "
        f"(×{fm['rss_ratio']}): {'flat' if fm['flat'] else 'NOT flat'} "
        "(goal: memory stays flat however large the input).",
        "records/s and MB/s use the job's own time; wall includes process start-up and the "
        "gateway's set-up. MB/s counts the input bytes (file) or envelope bytes (table).",
    ]
    for why in result["skipped"]:
        lines.append(f"- skipped: {why}")
    return "\n".join(lines) + "\n"


def add_bulk_json(path: Path, result: dict[str, Any]) -> None:
    """Add the bulk results to the bench's JSON document (key ``bulk``)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["bulk"] = result
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
