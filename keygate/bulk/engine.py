"""The bulk job coordinator: find or create the job, stream batches to workers, write results in
order, checkpoint, audit, report.

Crash safety, exactly (see docs/bulk.md):

- *Files*: a checkpoint records the input position and the output length.  The output is
  ``fsync``-ed before the checkpoint that covers it commits, so after a crash the partial output
  holds at least what the last checkpoint says; on resume it is cut back to exactly that and
  reading restarts at the checkpointed input position.  Every input record therefore appears in
  the output exactly once.  The input is never written.
- *Tables*: each batch commits its rows in its own transaction; the checkpoint (the last key of
  the longest run of committed batches) follows.  After a crash the batches after the checkpoint
  run again: rewrapping is idempotent (a value already under the active key maps to itself);
  re-encrypting such a value again re-encrypts it again, which is harmless.
- At every moment every value is decryptable: a batch either committed (new values, under the
  active key) or did not (old values, under a key version that stays decrypt-only); the job never
  disables a key (``keygate bulk verify --retire`` does, after counting).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import structlog

from keygate.audit.events import AuditEvent
from keygate.bulk.executors import Executor, make_executor
from keygate.bulk.files import (
    CsvSource,
    JsonlSource,
    ParquetSink,
    ParquetSource,
    Step,
    StreamSink,
    input_identity,
    temp_output,
)
from keygate.bulk.migrate import provider_migrate
from keygate.bulk.progress import make_progress
from keygate.bulk.spec import JobSpec, RunOptions
from keygate.bulk.store import JobRecord, JobStore, RecordError, current_owner
from keygate.bulk.tasks import TableTask
from keygate.bulk.transform import Scope
from keygate.core.errors import GatewayError, InvalidRequest
from keygate.policy.tenants import validate_tenant

__all__ = ["JobSummary", "open_store", "run_job"]

log = structlog.get_logger(__name__)

COUNTERS = (
    "read",
    "changed",
    "unchanged",
    "failed",
    "hsm_calls",
    "deks_created",
    "deks_opened",
    "batches",
)


@dataclass(slots=True)
class JobSummary:
    job_id: str
    operation: str
    state: str
    resumed: bool
    counters: dict[str, int]
    #: this run only
    seconds: float
    records_this_run: int
    errors: list[RecordError] = field(default_factory=list)
    output: str | None = None
    stop_reason: str | None = None

    @property
    def records_per_s(self) -> float:
        return self.records_this_run / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "operation": self.operation,
            "state": self.state,
            "resumed": self.resumed,
            **{k: self.counters.get(k, 0) for k in COUNTERS},
            "seconds": round(self.seconds, 3),
            "records_this_run": self.records_this_run,
            "records_per_s": round(self.records_per_s, 1),
            "output": self.output,
            "stop_reason": self.stop_reason,
            "errors": [e.line() for e in self.errors[:20]],
            "peak_rss_mib": peak_rss_mib(),
        }


def peak_rss_mib() -> float | None:
    """This process's peak resident memory since it started (its program, not its parent's).

    ``VmHWM`` belongs to the process's own address space, so it starts afresh at exec; the
    ``ru_maxrss`` a parent reads with wait4 does not (Linux carries the pre-exec peak over, so a
    child of a large process reports the parent's size).  Worker processes are not included.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def open_store(registry_url: str) -> JobStore:
    """The job store on the registry's database (tables created if missing)."""
    store = JobStore(registry_url)
    store.create_schema()
    return store


def _key_state(value: Any) -> dict[str, Any]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {"last_key": value}
    return {"last_key": str(value)}


class _Source:
    """A file or table source with the sink (files) that goes with it."""

    def __init__(self, spec: JobSpec, options: RunOptions, scope: Scope, job_id: str) -> None:
        self.spec = spec
        self.sink: Any = None
        self.table: Any = None
        self.unit = "rows"
        self.total: int | None = None
        if spec.kind == "postgresql":
            from keygate.bulk.pg import TableSource, connect

            assert spec.dsn is not None  # noqa: S101 - validated
            self.conn = connect(spec.dsn)
            self.table = TableSource(self.conn, spec)
            self.total = self.table.estimate_rows()
            return
        assert spec.input is not None and spec.output is not None  # noqa: S101 - validated
        wanted = _file_columns(spec, scope)
        temp = temp_output(spec.output, job_id)
        if spec.kind == "jsonl":
            self.reader: Any = JsonlSource(spec.input, options.max_line_bytes)
            self.sink = StreamSink(temp, spec.input)
        elif spec.kind == "csv":
            self.reader = CsvSource(spec.input, options.max_line_bytes, wanted[0])
            self.sink = StreamSink(temp, spec.input)
        else:
            self.reader = ParquetSource(spec.input, wanted[0], wanted[1])
            self.sink = ParquetSink(temp, self.reader)
        self.unit = self.reader.unit
        self.total = self.reader.total

    def done_units(self, position: dict[str, Any]) -> int:
        if self.spec.kind in ("jsonl", "csv"):
            return int(position.get("input_offset", 0))
        if self.spec.kind == "parquet":
            return int(position.get("rows", 0))
        return 0

    def steps(self, position: dict[str, Any], batch_size: int) -> Iterator[Step]:
        if self.table is None:
            yield from self.reader.steps(position, batch_size)
            return
        lo = position.get("last_key")
        seq = int(position.get("batches", 0))
        while True:
            hi = self.table.next_bound(lo, batch_size)
            if hi is None:
                return
            seq += 1
            yield Step(TableTask(seq, lo, hi), {**_key_state(hi), "batches": seq}, 0)
            lo = hi

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.table is not None:
            self.conn.close()


def _file_columns(spec: JobSpec, scope: Scope) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) columns of a CSV or Parquet job."""
    if scope.policy is not None:
        optional = (*scope.policy.fields, spec.id_field or "record_id")
        required = (spec.id_field,) if spec.id_field and scope.needs_context else ()
        return tuple(required), tuple(optional)
    return (*spec.fields, *scope.context_columns), ()


class _Run:
    """One run of one job (a new job, or a resumed one)."""

    def __init__(
        self,
        gateway: Any,
        store: JobStore,
        job: JobRecord,
        spec: JobSpec,
        options: RunOptions,
        *,
        resumed: bool,
        progress_stream: TextIO | None,
    ) -> None:
        self.gw = gateway
        self.store = store
        self.job = job
        self.spec = spec
        self.options = options
        self.resumed = resumed
        self.owner = job.owner or current_owner()
        self.counters = {k: int(job.counters.get(k, 0)) for k in COUNTERS}
        self.position = dict(job.checkpoint)
        self.pending_errors: list[RecordError] = []
        self.errors_seen = self.counters["failed"]
        self.progress_stream = progress_stream
        self.error_code: str | None = None

    # -- audit --------------------------------------------------------------------------------
    def audit(
        self, action: str, outcome: str = "ok", code: str | None = None, **detail: Any
    ) -> None:
        spec = self.spec
        self.gw.audit_event(
            AuditEvent(
                action=action,
                outcome=outcome,
                actor=self.job.actor,
                request_id=f"bulk-{self.job.id}",
                tenant=spec.tenant,
                purpose=spec.purpose,
                record_type=spec.record_type,
                code=code,
                items=self.counters["read"],
                items_failed=min(self.counters["failed"], self.counters["read"]),
                detail={
                    "job": self.job.id,
                    "operation": spec.operation,
                    "source": spec.kind,
                    **detail,
                },
            )
        )

    # -- main loop ------------------------------------------------------------------------------
    def run(self) -> JobSummary:
        spec, options = self.spec, self.options
        scope = Scope(spec, self.gw.policies)
        source = _Source(spec, options, scope, self.job.id)
        t0 = time.monotonic()
        read0 = self.counters["read"]
        executor: Executor | None = None
        state = "failed"
        stop_reason: str | None = None
        progress = make_progress(options.progress, self.job.id, source.unit, self.progress_stream)
        try:
            if self.position.get("eof"):
                self._complete(source)
                state = "done"
                return self._summary(state, t0, read0, None)
            if source.sink is not None:
                length = self.position.get("parts" if spec.kind == "parquet" else "output_length")
                if length is None:  # a new job, or one that died before its first checkpoint
                    self.position = {}
                    source.sink.open(None, source.reader.prologue())
                else:
                    source.sink.open(int(length), b"")
            executor = make_executor(
                spec, self.job.id, self.job.actor, spec.operation, options, self.gw
            )
            progress.start(source.total, source.done_units(self.position), self.counters["read"])
            stop_reason = self._pipeline(source, executor, progress)
            if stop_reason is None:
                self.position["eof"] = True
                self._checkpoint(source)
                self._complete(source)
                state = "done"
            return self._summary(state, t0, read0, stop_reason)
        except BaseException as exc:
            self.error_code = exc.code if isinstance(exc, GatewayError) else "INTERNAL"
            self._fail(exc)
            raise
        finally:
            progress.stop()
            if executor is not None:
                executor.close()
            source.close()
            self._finish_audit(state, stop_reason)

    def _pipeline(self, source: _Source, executor: Executor, progress: Any) -> str | None:
        options = self.options
        inflight: collections.deque[tuple[Step, Any]] = collections.deque()
        limit = max(1, options.workers * options.inflight_per_worker)
        last_checkpoint = time.monotonic()
        steps = source.steps(self.position, options.batch_size)
        exhausted = False
        while True:
            while not exhausted and len(inflight) < limit:
                step = next(steps, None)
                if step is None:
                    exhausted = True
                    break
                inflight.append((step, executor.submit(step.task)))
            if not inflight:
                return None
            step, handle = inflight.popleft()
            result = executor.result(handle)
            if source.sink is not None:
                source.sink.write(step, result.output)
            self._count(result)
            self.position = step.position
            progress.advance(step.units or result.read, result.read)
            now = time.monotonic()
            over = self.counters["failed"] > options.max_errors
            if over or now - last_checkpoint >= options.checkpoint_interval_s or not inflight:
                self._checkpoint(source)
                last_checkpoint = now
            if over:
                # Wait for what is in flight (tables: it may have committed) and record it.
                while inflight:
                    step, handle = inflight.popleft()
                    result = executor.result(handle)
                    if source.sink is not None:
                        source.sink.write(step, result.output)
                    self._count(result)
                    self.position = step.position
                self._checkpoint(source)
                return (
                    f"{self.counters['failed']} records failed, more than --max-errors "
                    f"{options.max_errors}"
                )

    def _count(self, result: Any) -> None:
        c = self.counters
        c["read"] += result.read
        c["changed"] += result.changed
        c["failed"] += result.failed
        c["unchanged"] += result.unchanged
        c["hsm_calls"] += result.hsm_calls
        c["deks_created"] += result.deks_created
        c["deks_opened"] += result.deks_opened
        c["batches"] += 1
        self.pending_errors.extend(result.errors)

    def _checkpoint(self, source: _Source) -> None:
        if source.sink is not None:
            self.position.update(source.sink.sync())
        self.store.checkpoint(
            self.job.id, self.owner, self.position, self.counters, self.pending_errors
        )
        self.pending_errors = []

    def _complete(self, source: _Source) -> None:
        if source.sink is None:
            return
        assert self.spec.output is not None  # noqa: S101 - file job
        output = Path(self.spec.output)
        temp = source.sink.temp
        if self.spec.kind == "parquet":
            if source.sink.parts.exists():
                source.sink.count = int(self.position.get("parts", 0))
                source.sink.finish(output)
            elif not output.exists():
                raise InvalidRequest(f"the partial output of job {self.job.id} is gone")
        elif temp.exists():
            source.sink.finish(output)
        elif not output.exists():
            raise InvalidRequest(f"the partial output of job {self.job.id} is gone")

    def _fail(self, exc: BaseException) -> None:
        message = (
            f"[{exc.code}] {exc.detail}"
            if isinstance(exc, GatewayError)
            else f"{type(exc).__name__}"
        )
        try:
            self.store.finish(self.job.id, self.owner, state="failed", last_error=message)
        except GatewayError:
            log.warning("bulk.finish_failed", job=self.job.id)

    def _finish_audit(self, state: str, stop_reason: str | None) -> None:
        try:
            self.audit(
                "bulk.finished",
                outcome="ok" if state == "done" else "error",
                code=None if state == "done" else (self.error_code or "TOO_MANY_ERRORS"),
                state=state,
                changed=self.counters["changed"],
                hsm_calls=self.counters["hsm_calls"],
            )
        except GatewayError:
            log.warning("bulk.audit_failed", job=self.job.id)

    def _summary(self, state: str, t0: float, read0: int, stop_reason: str | None) -> JobSummary:
        if state == "done":
            self.store.finish(self.job.id, self.owner, state="done", counters=self.counters)
        else:
            self.store.finish(
                self.job.id, self.owner, state="failed", counters=self.counters,
                last_error=stop_reason,
            )  # fmt: skip
        return JobSummary(
            job_id=self.job.id,
            operation=self.spec.operation,
            state=state,
            resumed=self.resumed,
            counters=dict(self.counters),
            seconds=time.monotonic() - t0,
            records_this_run=self.counters["read"] - read0,
            errors=self.store.errors(self.job.id, limit=20),
            output=self.spec.output,
            stop_reason=stop_reason,
        )


def _check_keys(gateway: Any, spec: JobSpec, scope: Scope) -> None:
    """Every purpose of the job has a usable active key (one clear error before any work)."""
    validate_tenant(spec.tenant)
    for purpose in sorted(scope.purposes):
        gateway.keys.active_version(spec.tenant, purpose)


def run_job(
    gateway: Any,
    store: JobStore,
    spec: JobSpec,
    options: RunOptions,
    *,
    actor: str,
    resume_id: str | None = None,
    progress_stream: TextIO | None = None,
    on_start: Callable[[JobRecord, bool], None] | None = None,
) -> JobSummary:
    """Run (or resume) a bulk job to its end; returns its summary.

    Raises :class:`GatewayError` for a job that cannot start (bad spec, unknown key, output in
    the way) or that stopped on an error (worker, HSM, audit trail, database); the job is then
    left resumable.
    """
    owner = current_owner()
    job: JobRecord | None = None
    if resume_id is not None:
        job = store.get(resume_id)
        stored = JobSpec.from_stored(job.spec)
        if stored.operation != spec.operation:
            raise InvalidRequest(
                f"bulk job {resume_id} is a {stored.operation} job, not {spec.operation}"
            )
        spec = stored.with_dsn(spec.dsn or stored.dsn)
    spec.validate()
    scope = Scope(spec, gateway.policies)
    _check_keys(gateway, spec, scope)
    identity = input_identity(spec.input) if spec.is_file and spec.input else None
    if job is None:
        job = store.find_unfinished(spec.fingerprint())
    resumed = job is not None
    if job is not None:
        if identity is not None and job.input_identity not in (None, identity):
            raise InvalidRequest(
                f"the input {spec.input} changed since bulk job {job.id} started; "
                "it cannot be resumed"
            )
        job = store.claim(job.id, owner)
    else:
        if spec.is_file and spec.output and Path(spec.output).exists():
            raise InvalidRequest(f"the output {spec.output} exists; remove it or choose another")
        if spec.operation == "migrate":
            assert spec.purpose is not None or spec.record_type is not None  # noqa: S101
            for purpose in sorted(scope.purposes):
                provider_migrate(gateway, actor, spec.tenant, purpose, spec.to_uri or "")
        job = store.create(
            fingerprint=spec.fingerprint(),
            operation=spec.operation,
            kind=spec.kind,
            tenant=spec.tenant,
            actor=actor,
            spec=spec.stored(),
            input_identity=identity,
            owner=owner,
        )
    if on_start is not None:
        on_start(job, resumed)
    run = _Run(gateway, store, job, spec, options, resumed=resumed, progress_stream=progress_stream)
    run.audit(
        "bulk.resumed" if resumed else "bulk.started",
        workers=options.workers,
        engine=options.engine,
    )
    return run.run()
