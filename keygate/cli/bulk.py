"""``keygate bulk``: rewrap, re-encrypt or migrate files and tables; resume; verify; retire.

Every job is kept in the registry database with its checkpoints: running the same command again
(or ``--resume JOB``) continues where the last run stopped, whatever stopped it.  See docs/bulk.md.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from keygate.core.errors import GatewayError

__all__ = ["bulk_app"]

bulk_app = typer.Typer(
    help="Bulk rewrap, re-encryption and provider migration of files and PostgreSQL tables "
    "(resumable after any crash), verification and retiring of old key versions.",
    no_args_is_help=True,
)

out = Console()
err = Console(stderr=True)

_EX_DATAERR = 65


def _root_params(ctx: typer.Context) -> dict[str, Any]:
    return dict(ctx.find_root().params)


def _actor(ctx: typer.Context) -> str:
    actor = _root_params(ctx).get("actor") or os.environ.get("KEYGATE_ACTOR")
    if actor:
        return str(actor)
    try:
        return "custodian:" + getpass.getuser()
    except (KeyError, OSError):
        return "custodian:unknown"


@contextmanager
def _errors(ctx: typer.Context) -> Iterator[None]:
    """One clear line and a stable exit code (as the rest of the CLI); traces with --verbose."""
    try:
        yield
    except (typer.Exit, typer.Abort, typer.BadParameter):
        raise
    except (GatewayError, OSError, ValueError) as exc:
        from keygate.cli.main import EXIT_CODES

        if isinstance(exc, GatewayError):
            err.print(f"[bold red]error[/] [{exc.code}] {exc.detail}", highlight=False)
            code = EXIT_CODES.get(exc.code, 1)
        else:
            err.print(f"[bold red]error[/] {type(exc).__name__}: {exc}", highlight=False)
            code = 1
        if _root_params(ctx).get("verbose"):
            err.print_exception()
        raise typer.Exit(code) from None


def _settings() -> Any:
    from keygate.config import load_settings

    return load_settings()


def _split(values: list[str] | None) -> tuple[str, ...]:
    out_: list[str] = []
    for v in values or ():
        out_.extend(p.strip() for p in v.split(",") if p.strip())
    return tuple(out_)


# ---------------------------------------------------------------------- the job commands
Input = Annotated[Path | None, typer.Option("--input", "-i", help="Input file (never modified).")]
Output = Annotated[
    Path | None,
    typer.Option(
        "--output", "-o", help="Output file: written as OUTPUT.kgpart-JOB, renamed at the end."
    ),
]
Fmt = Annotated[
    str | None,
    typer.Option("--format", help="jsonl, csv or parquet (default: from the extension)."),
]
Dsn = Annotated[
    str | None,
    typer.Option(
        "--dsn",
        help="PostgreSQL DSN of the table (the password is never stored; give --dsn again or "
        "use PGPASSWORD/.pgpass to resume).",
    ),
]
TableOpt = Annotated[str | None, typer.Option("--table", help="Table (schema.table).")]
KeyColumn = Annotated[
    str | None, typer.Option("--key-column", help="Unique, ordered key column (keyset pages).")
]
Tenant = Annotated[str | None, typer.Option("--tenant", "-t", help="Tenant of every value.")]
Purpose = Annotated[
    str | None, typer.Option("--purpose", "-p", help="Purpose of every value (opaque values).")
]
Fields = Annotated[
    list[str] | None,
    typer.Option(
        "--fields",
        "--columns",
        help="Fields (JSON Lines), columns (CSV, Parquet, table) holding text envelopes; "
        "comma-separated or repeated.",
    ),
]
RecordType = Annotated[
    str | None,
    typer.Option(
        "--record-type",
        "-r",
        help="Whole records per this record type's policy (each field under its own purpose).",
    ),
]
IdField = Annotated[
    str | None,
    typer.Option(
        "--id-field",
        "--id-column",
        help="Field/column holding the record id (records; default record_id, tables: the key).",
    ),
]
RecordField = Annotated[
    str | None,
    typer.Option(
        "--record-field",
        "--record-column",
        help="JSON Lines: the field holding the record (default: record; '.' = the line itself); "
        "tables: the JSON/JSONB column holding it.",
    ),
]
Context = Annotated[
    list[str] | None,
    typer.Option(
        "--context",
        help="reencrypt: KEY=COLUMN binds the value of another column of the row as context KEY "
        "(repeat).",
    ),
]
ContextField = Annotated[
    list[str] | None,
    typer.Option("--context-field", help="reencrypt: bind the envelope's own field name as KEY."),
]
ContextConst = Annotated[
    list[str] | None,
    typer.Option("--context-const", help="reencrypt: bind a fixed KEY=VALUE."),
]
To = Annotated[str | None, typer.Option("--to", help="migrate: the provider key URI to move to.")]
Resume = Annotated[
    str | None,
    typer.Option("--resume", help="Resume this job (the same command finds it on its own)."),
]
Workers = Annotated[
    int, typer.Option("--workers", "-w", help="Worker processes (1 = in this process).")
]
Engine = Annotated[str, typer.Option("--engine", help="local (process pool) or ray.")]
Address = Annotated[
    str | None, typer.Option("--address", help="Ray cluster address (default: a local one).")
]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Records per batch.")]
MaxErrors = Annotated[
    int,
    typer.Option(
        "--max-errors",
        help="Stop once more records than this have failed (failed records are left unchanged).",
    ),
]
CheckpointEvery = Annotated[
    float,
    typer.Option("--checkpoint-interval", help="Seconds between checkpoints (0: each batch)."),
]
MaxLine = Annotated[
    int, typer.Option("--max-line-bytes", help="Longest line/record processed (longer: copied).")
]
LockTimeout = Annotated[
    float, typer.Option("--lock-timeout", help="Tables: seconds to wait for a locked row.")
]
ProgressOpt = Annotated[
    str, typer.Option("--progress", help="auto, bar, lines or none (progress on stderr).")
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]


def _job(
    ctx: typer.Context,
    input: Input = None,
    output: Output = None,
    fmt: Fmt = None,
    dsn: Dsn = None,
    table: TableOpt = None,
    key_column: KeyColumn = None,
    tenant: Tenant = None,
    purpose: Purpose = None,
    fields: Fields = None,
    record_type: RecordType = None,
    id_field: IdField = None,
    record_field: RecordField = None,
    context: Context = None,
    context_field: ContextField = None,
    context_const: ContextConst = None,
    to: To = None,
    resume: Resume = None,
    workers: Workers = 1,
    engine: Engine = "local",
    address: Address = None,
    batch_size: BatchSize = 2000,
    max_errors: MaxErrors = 0,
    checkpoint_interval: CheckpointEvery = 1.0,
    max_line_bytes: MaxLine = 4 << 20,
    lock_timeout: LockTimeout = 10.0,
    progress: ProgressOpt = "auto",
    json_out: JsonOut = False,
) -> None:
    operation = ctx.info_name or ""
    with _errors(ctx):
        from keygate.bulk.spec import ContextRule, JobSpec, RunOptions, format_of
        from keygate.core.errors import InvalidRequest

        if to is not None and operation != "migrate":
            raise InvalidRequest("--to is for 'keygate bulk migrate'")
        rules = (
            *(ContextRule.parse("column", c) for c in context or ()),
            *(ContextRule.parse("field", c) for c in context_field or ()),
            *(ContextRule.parse("const", c) for c in context_const or ()),
        )
        options = RunOptions(
            workers=workers,
            engine=engine,
            address=address,
            batch_size=batch_size,
            max_errors=max_errors,
            checkpoint_interval_s=checkpoint_interval,
            max_line_bytes=max_line_bytes,
            lock_timeout_s=lock_timeout,
            progress=progress,
        )
        if resume is not None:
            spec = JobSpec(operation=operation, kind="resume", tenant="", dsn=dsn)
        else:
            if input is not None or output is not None:
                if dsn or table:
                    raise InvalidRequest("give either --input/--output or --dsn/--table")
                if input is None or output is None:
                    raise InvalidRequest("file jobs need --input and --output")
                kind = format_of(str(input), fmt)
            elif dsn or table:
                if not dsn:
                    raise InvalidRequest("table jobs need --dsn")
                kind = "postgresql"
            else:
                raise InvalidRequest(
                    "say what to process: --input/--output (file) or --dsn/--table (table)"
                )
            if not tenant:
                raise InvalidRequest("--tenant is required")
            if record_field == ".":
                record_field = ""
            elif record_field is None and record_type is not None and kind == "jsonl":
                record_field = "record"
            spec = JobSpec(
                operation=operation,
                kind=kind,
                tenant=tenant,
                purpose=purpose,
                fields=_split(fields),
                record_type=record_type,
                id_field=id_field,
                record_field=record_field,
                context=rules,
                input=str(input.resolve()) if input is not None else None,
                output=str(output.resolve()) if output is not None else None,
                dsn=dsn,
                table=table,
                key_column=key_column,
                to_uri=to,
            )
            spec.validate()
        summary = _run_job(ctx, spec, options, resume)
    _print_summary(summary, json_out)
    if summary.state != "done":
        raise typer.Exit(_EX_DATAERR)
    if summary.counters.get("failed", 0):
        raise typer.Exit(_EX_DATAERR)


def _run_job(ctx: typer.Context, spec: Any, options: Any, resume: str | None) -> Any:
    from keygate.bootstrap import build_gateway
    from keygate.bulk.engine import open_store, run_job

    settings = _settings()
    gw = build_gateway(settings, start_refresher=True)
    store = open_store(settings.registry_url)

    def started(job: Any, resumed: bool) -> None:
        if resumed:
            done = job.counters.get("read", 0)
            err.print(
                f"resuming bulk job {job.id} ({job.operation}) after {done} records",
                highlight=False,
            )
        else:
            err.print(f"bulk job {job.id} ({job.operation}) started", highlight=False)

    try:
        return run_job(
            gw,
            store,
            spec,
            options,
            actor=_actor(ctx),
            resume_id=resume,
            progress_stream=sys.stderr,
            on_start=started,
        )
    finally:
        store.close()
        gw.close()


def _print_summary(summary: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary.as_dict(), ensure_ascii=False) + "\n")
        return
    c = summary.counters
    table = Table(title=f"bulk job {summary.job_id}: {summary.operation}, {summary.state}")
    table.add_column("")
    table.add_column("", justify="right")
    rows = [
        ("records read", c.get("read", 0)),
        ("changed", c.get("changed", 0)),
        ("unchanged", c.get("unchanged", 0)),
        ("failed", c.get("failed", 0)),
        ("DEKs opened (HSM unwraps)", c.get("deks_opened", 0)),
        ("DEKs created", c.get("deks_created", 0)),
        ("HSM calls", c.get("hsm_calls", 0)),
        ("batches", c.get("batches", 0)),
    ]
    for name, value in rows:
        table.add_row(name, f"{value:,}")
    table.add_row("seconds (this run)", f"{summary.seconds:,.2f}")
    table.add_row("records/s (this run)", f"{summary.records_per_s:,.0f}")
    out.print(table)
    if summary.output and summary.state == "done":
        out.print(f"output: {summary.output}", highlight=False)
    for e in summary.errors:
        err.print(f"  {e.line()}", highlight=False, markup=False)
    if summary.stop_reason:
        err.print(
            f"[bold red]stopped[/] {summary.stop_reason}; fix the input or raise --max-errors, "
            f"then run the same command again (or --resume {summary.job_id})",
            highlight=False,
        )


_HELP = {
    "rewrap": "Move every ciphertext to the active key version (header rewrite only; the HSM "
    "is called per distinct DEK, never per record).",
    "reencrypt": "Decrypt and encrypt every value again under fresh DEKs, with the same "
    "context (records: record_type, record_id, field, as the record endpoints bind).",
    "migrate": "Switch tenant × purpose to another cloud-KMS provider key (--to URI), then "
    "rewrap every ciphertext to it.",
}
for _name in ("rewrap", "reencrypt", "migrate"):
    bulk_app.command(_name, help=_HELP[_name])(_job)


# ---------------------------------------------------------------------- verify / status / list
@bulk_app.command("verify")
def verify(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="The job id (keygate bulk list).")],
    decrypt: Annotated[
        bool, typer.Option("--decrypt", help="Also decrypt every value (with its context).")
    ] = False,
    retire: Annotated[
        bool,
        typer.Option(
            "--retire",
            help="Disable the decrypt-only key versions no ciphertext in scope uses "
            "(refused, naming the count, if any does).",
        ),
    ] = False,
    version: Annotated[
        int | None, typer.Option("--version", help="Retire only this version.")
    ] = None,
    dsn: Dsn = None,
    context: Context = None,
    context_field: ContextField = None,
    context_const: ContextConst = None,
    json_out: JsonOut = False,
) -> None:
    """Count the job's ciphertexts per key version and wrap chain; optionally retire.

    --decrypt binds the job's own context (records; re-encryption jobs) unless --context,
    --context-field or --context-const are given here."""
    with _errors(ctx):
        from keygate.bootstrap import build_gateway
        from keygate.bulk.engine import open_store
        from keygate.bulk.spec import ContextRule
        from keygate.bulk.verify import verify_job

        rules = (
            *(ContextRule.parse("column", c) for c in context or ()),
            *(ContextRule.parse("field", c) for c in context_field or ()),
            *(ContextRule.parse("const", c) for c in context_const or ()),
        )
        settings = _settings()
        gw = build_gateway(settings, start_refresher=False)
        store = open_store(settings.registry_url)
        try:
            record = store.get(job)
            result = verify_job(
                gw, store, record, actor=_actor(ctx), decrypt=decrypt, retire=retire,
                version=version, dsn=dsn, context=rules or None,
            )  # fmt: skip
        finally:
            store.close()
            gw.close()
    if json_out:
        sys.stdout.write(json.dumps(result.as_dict(), ensure_ascii=False) + "\n")
    else:
        table = Table("tenant", "purpose", "key version", "wrap chain", "ciphertexts")
        from keygate.bulk.verify import parse_label

        for label, n in sorted(result.census.items()):
            parsed = parse_label(label)
            if parsed is None:
                table.add_row("-", "-", "-", "[red]not an envelope[/]", f"{n:,}")
            else:
                table.add_row(parsed[0], parsed[1], str(parsed[2]), parsed[3], f"{n:,}")
        out.print(table)
        out.print(
            f"{result.records:,} records, {result.values:,} values; "
            f"{result.failed_records:,} records unreadable"
            + (f"; {result.decrypt_failed:,} failed to decrypt" if decrypt else ""),
            highlight=False,
        )
        for e in result.errors:
            err.print(f"  {e.line()}", highlight=False, markup=False)
        for r in result.retired:
            out.print(f"[yellow]retired[/] {r} (now disabled)", highlight=False)
    for r in result.refused:
        err.print(f"[bold red]refused[/] {r}; nothing was disabled", highlight=False)
    if result.refused or result.decrypt_failed or result.failed_records:
        raise typer.Exit(_EX_DATAERR)


@bulk_app.command("status")
def status(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="The job id.")],
    errors: Annotated[int, typer.Option("--errors", help="Show this many record errors.")] = 20,
    json_out: JsonOut = False,
) -> None:
    """A job's state, counters, checkpoint, errors and last verification."""
    with _errors(ctx):
        from keygate.bulk.store import JobStore, owner_is_alive

        store = JobStore(_settings().registry_url)
        try:
            store.create_schema()
            rec = store.get(job)
            errs = store.errors(job, limit=errors)
        finally:
            store.close()
    state = rec.state
    if state == "running" and owner_is_alive(rec.owner) is False:
        state = "interrupted (resumable)"
    data: dict[str, Any] = {
        "job": rec.id,
        "operation": rec.operation,
        "kind": rec.kind,
        "tenant": rec.tenant,
        "state": state,
        "actor": rec.actor,
        "created_at": rec.created_at.isoformat(timespec="seconds"),
        "updated_at": rec.updated_at.isoformat(timespec="seconds"),
        "finished_at": rec.finished_at.isoformat(timespec="seconds") if rec.finished_at else None,
        "counters": rec.counters,
        "checkpoint": rec.checkpoint,
        "last_error": rec.last_error,
        "spec": rec.spec,
        "errors": [e.line() for e in errs],
        "verify": rec.verify,
    }
    if json_out:
        sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
        return
    for key in ("job", "operation", "kind", "tenant", "state", "actor", "created_at",
                "updated_at", "finished_at", "last_error"):  # fmt: skip
        if data[key] is not None:
            out.print(f"{key:12} {data[key]}", highlight=False)
    out.print(f"{'counters':12} {json.dumps(rec.counters)}", highlight=False)
    out.print(f"{'checkpoint':12} {json.dumps(rec.checkpoint, default=str)}", highlight=False)
    out.print(f"{'scope':12} {json.dumps(rec.spec, ensure_ascii=False)}", highlight=False)
    for line in [e.line() for e in errs]:
        out.print(f"  {line}", highlight=False, markup=False)
    if rec.verify:
        out.print(f"{'verified':12} {json.dumps(rec.verify.get('census'))}", highlight=False)


@bulk_app.command("list")
def list_jobs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", help="The newest this many jobs.")] = 50,
    json_out: JsonOut = False,
) -> None:
    """Bulk jobs, newest first."""
    with _errors(ctx):
        from keygate.bulk.store import JobStore, owner_is_alive

        store = JobStore(_settings().registry_url)
        try:
            store.create_schema()
            jobs = store.list_jobs(limit=limit)
        finally:
            store.close()
    rows: list[dict[str, Any]] = []
    for j in jobs:
        state = j.state
        if state == "running" and owner_is_alive(j.owner) is False:
            state = "interrupted"
        rows.append(
            {
                "job": j.id,
                "operation": j.operation,
                "kind": j.kind,
                "tenant": j.tenant,
                "state": state,
                "read": j.counters.get("read", 0),
                "failed": j.counters.get("failed", 0),
                "updated_at": j.updated_at.isoformat(timespec="seconds"),
            }
        )
    if json_out:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table("job", "operation", "source", "tenant", "state", "records", "failed", "updated")
    for r in rows:
        table.add_row(
            r["job"], r["operation"], r["kind"], r["tenant"], r["state"],
            f"{r['read']:,}", f"{r['failed']:,}", r["updated_at"],
        )  # fmt: skip
    out.print(table)
