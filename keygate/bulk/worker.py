"""A bulk worker: one Gateway (one HSM session, warm DEK caches) that transforms batch after batch.

The same class runs in the coordinator (``--workers 1``), in each process of the local pool
(built once by the pool initializer, in a *spawned* process: PKCS#11 sessions do not survive
``fork``) and in each Ray actor.  Every batch writes one ``bulk.batch`` audit event through the
Gateway before its result takes effect: before the table transaction commits, before the
coordinator appends the file output.  If the audit trail cannot be written the batch fails and
the job stops (fail closed).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog

from keygate.audit.events import AuditEvent
from keygate.bulk.spec import JobSpec
from keygate.bulk.store import RecordError
from keygate.bulk.tasks import (
    BatchResult,
    ColumnsTask,
    CsvTask,
    LinesTask,
    Oversized,
    TableTask,
    Task,
)
from keygate.bulk.transform import CellBatch, RowError, Scope, Transformer
from keygate.core.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    Unavailable,
    ValidationFailed,
)
from keygate.policy.tenants import validate_tenant

__all__ = ["BulkWorker", "init_process", "run_in_process"]

_LINE_ENDINGS: Final = (b"\r\n", b"\n")
#: tries per batch when the HSM, a provider, the registry or the database is unavailable
_ATTEMPTS: Final = 6
log = structlog.get_logger(__name__)
_raw_decode: Final = json.JSONDecoder().raw_decode
_WS: Final = re.compile(r"[ \t\n\r]*")


def _ending(raw: bytes) -> bytes:
    for e in _LINE_ENDINGS:
        if raw.endswith(e):
            return e
    return b""


class BulkWorker:
    """Transforms tasks of one job (see the module docstring)."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        job_id: str,
        actor: str,
        operation: str | None = None,
        gateway: Any = None,
        max_line_bytes: int = 4 << 20,
        lock_timeout_s: float = 10.0,
        audit: bool = True,
    ) -> None:
        #: verification: count the cells per key version instead of only transforming them
        self.census: dict[str, int] | None = (
            {} if (operation or spec.operation) in ("census", "check") else None
        )
        if gateway is None:
            from keygate.bootstrap import build_gateway
            from keygate.config import load_settings

            gateway = build_gateway(load_settings())
            self._owns_gateway = True
        else:
            self._owns_gateway = False
        self.gateway = gateway
        self.spec = spec
        self.job_id = job_id
        self.actor = actor
        self.operation = operation or spec.operation
        self.scope = Scope(spec, gateway.policies, operation=self.operation)
        self.transformer = Transformer(gateway.keys, self.operation, spec.tenant)
        self.max_line_bytes = max_line_bytes
        self.lock_timeout_s = lock_timeout_s
        self.audit = audit
        self._table: Any = None
        self._conn: Any = None
        validate_tenant(spec.tenant)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._owns_gateway:
            self.gateway.close()

    # -- dispatch -----------------------------------------------------------------------------
    def run(self, task: Task) -> BatchResult:
        """Process one batch.  A transient failure of the HSM, a provider, the registry, the
        audit trail or the table (``Unavailable``) is retried with backoff; a batch has no
        effect until it succeeds (table transactions roll back), so a retry is safe."""
        for attempt in range(_ATTEMPTS):
            try:
                return self._run_once(task)
            except Unavailable as exc:
                if attempt == _ATTEMPTS - 1:
                    raise
                log.warning(
                    "bulk.batch_retry", job=self.job_id, batch=task.seq, code=exc.code,
                    attempt=attempt + 1,
                )  # fmt: skip
                time.sleep(min(5.0, 0.2 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _run_once(self, task: Task) -> BatchResult:
        stats = self.gateway.keys.stats
        before = (stats.hsm_wraps + stats.hsm_unwraps, stats.deks_created, stats.hsm_unwraps)
        if isinstance(task, LinesTask):
            result = self._lines(task)
        elif isinstance(task, CsvTask):
            result = self._csv(task)
        elif isinstance(task, ColumnsTask):
            result = self._columns(task)
        elif isinstance(task, TableTask):
            return self._rows(task)  # accounted and audited inside the transaction
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown task {type(task).__name__}")
        self._account(result, before)
        self._audit(result)
        return result

    def take_census(self) -> dict[str, int]:
        census, self.census = self.census or {}, {}
        return census

    def _account(self, result: BatchResult, before: tuple[int, int, int]) -> None:
        stats = self.gateway.keys.stats
        result.hsm_calls = stats.hsm_wraps + stats.hsm_unwraps - before[0]
        result.deks_created = stats.deks_created - before[1]
        result.deks_opened = stats.hsm_unwraps - before[2]

    def _audit(self, result: BatchResult) -> None:
        if self.census is not None:
            result.census = self.take_census()
        if not self.audit:
            return
        spec = self.spec
        version = None
        if spec.purpose is not None:
            try:
                version = self.gateway.keys.active_version(spec.tenant, spec.purpose)
            except GatewayError:
                version = None
        self.gateway.audit_event(
            AuditEvent(
                action="bulk.batch",
                outcome="ok",
                actor=self.actor,
                request_id=f"bulk-{self.job_id}-{result.seq}",
                tenant=spec.tenant,
                purpose=spec.purpose,
                record_type=spec.record_type,
                key_version=version,
                items=result.read,
                items_failed=result.failed,
                detail={
                    "job": self.job_id,
                    "batch": result.seq,
                    "operation": self.operation,
                    "changed": result.changed,
                    "hsm_calls": result.hsm_calls,
                },
            )
        )

    # -- shared fold ----------------------------------------------------------------------------
    def _fold(
        self, cells: CellBatch, failed: dict[int, RecordError]
    ) -> dict[int, list[tuple[str, str, str]]]:
        """Transform the cells; per row, its changes ``(name, old, new)`` unless it failed."""
        if self.census is not None:
            from keygate.bulk.verify import header_label

            census = self.census
            for text in cells.texts:
                label = header_label(text)
                census[label] = census.get(label, 0) + 1
        results = self.transformer.apply(cells)
        changes: dict[int, list[tuple[str, str, str]]] = {}
        rows, names, texts = cells.rows, cells.names, cells.texts
        for k, new in enumerate(results):
            row = rows[k]
            if row in failed:
                continue
            if isinstance(new, GatewayError):
                if isinstance(new, Unavailable):
                    # The HSM, a provider or the registry failed, not the record: stop the
                    # batch (the job stops, resumable) rather than count good records as bad.
                    raise new
                failed[row] = RecordError("", names[k], new.code, new.detail)
                changes.pop(row, None)
                continue
            old = texts[k]
            if new != old:
                changes.setdefault(row, []).append((names[k], old, new))
        return changes

    def _row_error(
        self, failed: dict[int, RecordError], row: int, exc: RowError | GatewayError
    ) -> None:
        if isinstance(exc, RowError):
            failed[row] = RecordError("", exc.field_name, exc.error.code, exc.error.detail)
        else:
            failed[row] = RecordError("", None, exc.code, exc.detail)

    # -- JSON Lines -----------------------------------------------------------------------------
    def _lines(self, task: LinesTask) -> BatchResult:
        spec = self.spec
        scope = self.scope
        cells = CellBatch()
        failed: dict[int, RecordError] = {}
        objs: dict[int, Any] = {}
        records: dict[int, Any] = {}
        blank = 0
        record_field = spec.record_field or ""
        id_field = spec.id_field or "record_id"
        for i, raw in enumerate(task.lines):
            if isinstance(raw, Oversized):
                failed[i] = RecordError(
                    "", None, PayloadTooLarge.code,
                    f"line is longer than {self.max_line_bytes} bytes; copied unchanged",
                )  # fmt: skip
                continue
            if not raw.strip():
                blank += 1
                continue
            try:
                text = raw.decode("utf-8")
                obj, end = _raw_decode(text, _WS.match(text).end())  # type: ignore[union-attr]
                if end != len(text) and text[end:].strip():
                    raise ValueError("extra data")  # noqa: TRY301 - handled just below
            except ValueError:  # UnicodeDecodeError and JSONDecodeError included
                failed[i] = RecordError("", None, InvalidRequest.code, "not valid JSON (UTF-8)")
                continue
            if not isinstance(obj, dict):
                failed[i] = RecordError("", None, InvalidRequest.code, "not a JSON object")
                continue
            objs[i] = obj
            try:
                if scope.policy is not None:
                    if record_field:
                        record = obj.get(record_field)
                        if record is None:
                            raise RowError(  # noqa: TRY301 - caught below with the others
                                ValidationFailed("has no record"), record_field
                            )
                    else:
                        record = {k: v for k, v in obj.items() if k != id_field}
                    records[i] = record
                    scope.record_cells(cells, i, record, obj.get(id_field))
                else:
                    scope.value_cells(cells, i, obj.get)
            except RowError as exc:
                self._row_error(failed, i, exc)
        changes = self._fold(cells, failed)
        out: list[Any] = []
        pending = bytearray()
        for i, raw in enumerate(task.lines):
            if isinstance(raw, Oversized):
                if pending:
                    out.append(bytes(pending))
                    pending.clear()
                out.append(raw)
                continue
            change = changes.get(i)
            if change is None or i in failed:
                pending += raw
                continue
            pending += self._patch_line(raw, objs[i], records.get(i), change, record_field)
        if pending:
            out.append(bytes(pending))
        read = len(task.lines) - blank
        first = task.first_line
        return self._result(
            task.seq, out, read, len(changes), failed, lambda i: f"line {first + i}"
        )

    @staticmethod
    def _patch_line(
        raw: bytes,
        obj: dict[str, Any],
        record: Any,
        change: list[tuple[str, str, str]],
        record_field: str,
    ) -> bytes:
        # Fast path: each old envelope appears exactly once in the line, as a JSON string (its
        # characters need no escaping): swap it in place, keeping the line byte-for-byte.
        patched = raw
        for _, old, new in change:
            quoted = b'"' + old.encode("ascii") + b'"'
            if patched.count(quoted) != 1:
                break
            patched = patched.replace(quoted, b'"' + new.encode("ascii") + b'"')
        else:
            return patched
        target = record if record is not None and record_field else obj
        for name, _, new in change:
            target[name] = new
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8") + (_ending(raw) or b"")

    # -- CSV --------------------------------------------------------------------------------------
    def _csv(self, task: CsvTask) -> BatchResult:
        spec = self.spec
        scope = self.scope
        header = task.header
        index = {name: i for i, name in enumerate(header)}
        width = len(header)
        cells = CellBatch()
        failed: dict[int, RecordError] = {}
        parsed: dict[int, list[str]] = {}
        blank = 0
        id_col = index.get(spec.id_field or "record_id")
        policy = scope.policy
        record_cols = (
            [(name, index[name]) for name in header if name in policy.fields]
            if policy is not None
            else []
        )
        for i, raw in enumerate(task.records):
            if isinstance(raw, Oversized):
                failed[i] = RecordError(
                    "", None, PayloadTooLarge.code,
                    f"record is longer than {self.max_line_bytes} bytes; copied unchanged",
                )  # fmt: skip
                continue
            if not raw.strip():
                blank += 1
                continue
            try:
                text = raw.decode("utf-8")
                rows = list(csv.reader(io.StringIO(text, newline="")))
            except (UnicodeDecodeError, csv.Error):
                failed[i] = RecordError("", None, InvalidRequest.code, "not valid CSV (UTF-8)")
                continue
            if len(rows) != 1 or len(rows[0]) != width:
                got = len(rows[0]) if len(rows) == 1 else 0
                failed[i] = RecordError(
                    "", None, InvalidRequest.code,
                    f"has {got} fields where the header has {width}; copied unchanged",
                )  # fmt: skip
                continue
            row = rows[0]
            parsed[i] = row
            try:
                if policy is not None:
                    record = {name: (row[j] or None) for name, j in record_cols}
                    rid = row[id_col] if id_col is not None else None
                    scope.record_cells(cells, i, record, rid)
                else:
                    scope.value_cells(cells, i, _list_getter(row, index))
            except RowError as exc:
                self._row_error(failed, i, exc)
        changes = self._fold(cells, failed)
        out: list[Any] = []
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, lineterminator="\n")
        pending = bytearray()
        for i, raw in enumerate(task.records):
            if isinstance(raw, Oversized):
                if pending:
                    out.append(bytes(pending))
                    pending.clear()
                out.append(raw)
                continue
            change = changes.get(i)
            if change is None or i in failed:
                pending += raw
                continue
            row = list(parsed[i])
            for name, _, new in change:
                row[index[name]] = new
            buf.seek(0)
            buf.truncate()
            writer.writerow(row)
            line = buf.getvalue().encode("utf-8")
            ending = _ending(raw)
            pending += line[:-1] + (ending or b"")
        if pending:
            out.append(bytes(pending))
        read = len(task.records) - blank
        first = task.first_row
        return self._result(task.seq, out, read, len(changes), failed, lambda i: f"row {first + i}")

    # -- Parquet ----------------------------------------------------------------------------------
    def _columns(self, task: ColumnsTask) -> BatchResult:
        spec = self.spec
        scope = self.scope
        columns = task.columns
        n = len(next(iter(columns.values()))) if columns else 0
        cells = CellBatch()
        failed: dict[int, RecordError] = {}
        policy = scope.policy
        id_values = columns.get(spec.id_field or "record_id")
        for i in range(n):
            try:
                if policy is not None:
                    record = {
                        name: values[i] for name, values in columns.items() if name in policy.fields
                    }
                    scope.record_cells(cells, i, record, id_values[i] if id_values else None)
                else:
                    scope.value_cells(cells, i, _column_getter(columns, i))
            except RowError as exc:
                self._row_error(failed, i, exc)
        changes = self._fold(cells, failed)
        new_columns: dict[str, list[Any]] = {}
        for row, change in changes.items():
            for name, _, new in change:
                col = new_columns.get(name)
                if col is None:
                    col = new_columns[name] = list(columns[name])
                col[row] = new
        first = task.first_row
        return self._result(
            task.seq, new_columns, n, len(changes), failed, lambda i: f"row {first + i}"
        )

    # -- PostgreSQL -------------------------------------------------------------------------------
    def _ensure_table(self) -> Any:
        if self._table is None:
            from keygate.bulk.pg import TableSource, connect

            assert self.spec.dsn is not None  # noqa: S101 - validated
            self._conn = connect(self.spec.dsn)
            self._table = TableSource(self._conn, self.spec, lock=self.census is None)
        return self._table

    def _rows(self, task: TableTask) -> BatchResult:
        table = self._ensure_table()
        spec = self.spec
        scope = self.scope
        record_mode = scope.policy is not None
        value_index = {c: i for i, c in enumerate(table.read_columns)}
        id_index = value_index[table.id_column]

        def work(rows: list[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], BatchResult]:
            stats = self.gateway.keys.stats
            before = (stats.hsm_wraps + stats.hsm_unwraps, stats.deks_created, stats.hsm_unwraps)
            cells = CellBatch()
            failed: dict[int, RecordError] = {}
            records: dict[int, Any] = {}
            for i, row in enumerate(rows):
                try:
                    if record_mode:
                        record = row[1]
                        if isinstance(record, str | bytes):
                            try:
                                record = json.loads(record)
                            except ValueError:
                                raise RowError(
                                    InvalidRequest("does not hold valid JSON"), spec.record_field
                                ) from None
                        records[i] = record
                        scope.record_cells(cells, i, record, row[id_index])
                    else:
                        scope.value_cells(cells, i, _row_getter(row, value_index))
                except RowError as exc:
                    self._row_error(failed, i, exc)
            changes = self._fold(cells, failed)
            updates: list[tuple[Any, ...]] = []
            for i, change in changes.items():
                row = rows[i]
                if record_mode:
                    record = dict(records[i])
                    for name, _, new in change:
                        record[name] = new
                    updates.append(
                        (json.dumps(record, ensure_ascii=False, separators=(",", ":")), row[0])
                    )
                else:
                    values = {c: row[value_index[c]] for c in table.value_columns}
                    for name, _, new in change:
                        values[name] = new
                    updates.append((*(values[c] for c in table.value_columns), row[0]))
            result = self._result(
                task.seq, None, len(rows), len(changes), failed,
                lambda i: f"{spec.key_column}={rows[i][0]}",
            )  # fmt: skip
            result.updated = len(updates)
            self._account(result, before)
            self._audit(result)  # durable before the rows are
            return updates, result

        result: BatchResult = table.locked_batch(task.lo, task.hi, self.lock_timeout_s, work)
        return result

    # -- results -----------------------------------------------------------------------------------
    @staticmethod
    def _result(
        seq: int,
        output: Any,
        read: int,
        changed: int,
        failed: Mapping[int, RecordError],
        where: Callable[[int], str],
    ) -> BatchResult:
        errors = [
            RecordError(where(i), e.field, e.code, e.detail) for i, e in sorted(failed.items())
        ]
        return BatchResult(
            seq=seq, output=output, read=read, changed=changed, failed=len(failed), errors=errors
        )


def _column_getter(columns: Mapping[str, list[Any]], i: int) -> Callable[[str], Any]:
    def get(name: str) -> Any:
        values = columns.get(name)
        return None if values is None else values[i]

    return get


def _list_getter(row: list[str], index: Mapping[str, int]) -> Callable[[str], Any]:
    def get(name: str) -> Any:
        j = index.get(name)
        return None if j is None else row[j]

    return get


def _row_getter(row: tuple[Any, ...], index: Mapping[str, int]) -> Callable[[str], Any]:
    def get(name: str) -> Any:
        j = index.get(name)
        return None if j is None else row[j]

    return get


# -- local process pool -------------------------------------------------------------------------
_WORKER: BulkWorker | None = None


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the coordinator dies (SIGKILL included)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's broken pipe ends the worker
        return


def init_process(
    spec: JobSpec, job_id: str, actor: str, operation: str, options: dict[str, Any]
) -> None:
    """Pool initializer: build this process's Gateway once (its HSM session lives on)."""
    global _WORKER  # noqa: PLW0603 - one worker per pool process, by design
    _die_with_parent()
    parent = options.pop("parent_pid", None)
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    from keygate.logging import configure_logging

    configure_logging(fmt="console", level="warning")
    _WORKER = BulkWorker(spec, job_id=job_id, actor=actor, operation=operation, **options)


def run_in_process(task: Task) -> BatchResult:
    if _WORKER is None:  # pragma: no cover - the initializer always ran
        raise RuntimeError("bulk worker not initialised")
    return _WORKER.run(task)
