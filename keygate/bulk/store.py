"""Bulk jobs and their checkpoints, kept in the registry's database.

Two tables beside the registry's (created by :meth:`JobStore.create_schema`, as
:mod:`keygate.audit.store` adds its own):

``kg_bulk_jobs``
    One row per job: its spec (JSON, never a database password), state, owner, the last
    checkpoint (JSON: where the input was read up to, how long the output was, the counters) and
    the result of the last verification.
``kg_bulk_errors``
    Per-record errors: where (line, row or key), which field, the error code and a message that
    names the field and the rule, never the value.  At most :data:`MAX_STORED_ERRORS` per job.

Ownership
    A running job is *owned* by one process (``host:pid:start-time``).  Every checkpoint is a
    compare-and-set on the owner, so two processes can never both advance one job.  A job whose
    owner has died (SIGKILL, power loss) is taken over by the next run at once when the owner ran
    on this host (its pid is gone or belongs to another process); from another host, once its
    heartbeat is older than :data:`STALE_AFTER_S`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keygate.core.errors import InvalidRequest, NotFound, Unavailable
from keygate.keys.registry import (
    UTCDateTime,
    connection_guard,
    database_errors,
    is_postgresql,
    make_engine,
    redacted_url,
    sqlite_begin_immediate,
)

__all__ = [
    "MAX_STORED_ERRORS",
    "STALE_AFTER_S",
    "JobRecord",
    "JobStore",
    "RecordError",
    "bulk_errors_table",
    "bulk_jobs_table",
    "bulk_metadata",
    "current_owner",
    "owner_is_alive",
]

MAX_STORED_ERRORS: Final = 1000
#: a job owned by a process on another host may be taken over after this long without heartbeat
STALE_AFTER_S: Final = 120.0
_SCHEMA_LOCK_ID: Final = 0x6B67736368656D61  # the registry's ("kgschema")

bulk_metadata: Final = sa.MetaData()

bulk_jobs_table: Final = sa.Table(
    "kg_bulk_jobs",
    bulk_metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("operation", sa.String(16), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    #: running | failed | done
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("spec", sa.Text(), nullable=False),
    #: the input file's size and mtime when the job started (files), to refuse a changed input
    sa.Column("input_identity", sa.Text(), nullable=True),
    sa.Column("checkpoint", sa.Text(), nullable=False),
    sa.Column("counters", sa.Text(), nullable=False),
    sa.Column("owner", sa.String(200), nullable=True),
    sa.Column("heartbeat_at", UTCDateTime(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Column("last_error", sa.String(400), nullable=True),
    sa.Column("verify", sa.Text(), nullable=True),
)
sa.Index("ix_kg_bulk_jobs_fingerprint", bulk_jobs_table.c.fingerprint, bulk_jobs_table.c.state)

bulk_errors_table: Final = sa.Table(
    "kg_bulk_errors",
    bulk_metadata,
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("job_id", sa.String(32), nullable=False),
    sa.Column("position", sa.String(200), nullable=False),
    sa.Column("field", sa.String(200), nullable=True),
    sa.Column("code", sa.String(64), nullable=False),
    sa.Column("detail", sa.String(400), nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sqlite_autoincrement=True,
)
sa.Index("ix_kg_bulk_errors_job", bulk_errors_table.c.job_id, bulk_errors_table.c.seq)


@dataclass(frozen=True, slots=True)
class RecordError:
    """One record that could not be processed (copied unchanged to the output, or left as is)."""

    position: str
    field: str | None
    code: str
    detail: str

    def line(self) -> str:
        where = self.position + (f", {self.field}" if self.field else "")
        return f"{where}: [{self.code}] {self.detail}"


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    fingerprint: str
    operation: str
    kind: str
    tenant: str
    state: str
    actor: str
    spec: dict[str, Any]
    input_identity: dict[str, Any] | None
    checkpoint: dict[str, Any]
    counters: dict[str, int]
    owner: str | None
    heartbeat_at: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    last_error: str | None
    verify: dict[str, Any] | None


def _now() -> datetime:
    return datetime.now(UTC)


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _record(row: sa.Row[Any]) -> JobRecord:
    return JobRecord(
        id=row.id,
        fingerprint=row.fingerprint,
        operation=row.operation,
        kind=row.kind,
        tenant=row.tenant,
        state=row.state,
        actor=row.actor,
        spec=json.loads(row.spec),
        input_identity=json.loads(row.input_identity) if row.input_identity else None,
        checkpoint=json.loads(row.checkpoint),
        counters=json.loads(row.counters),
        owner=row.owner,
        heartbeat_at=row.heartbeat_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        last_error=row.last_error,
        verify=json.loads(row.verify) if row.verify else None,
    )


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[19] if len(fields) > 19 else None


def current_owner() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '?'}"


def owner_is_alive(owner: str | None) -> bool | None:
    """True/False for an owner on this host; None when it ran elsewhere (cannot tell)."""
    if not owner:
        return False
    parts = owner.rsplit(":", 2)
    if len(parts) != 3:
        return False
    host, pid_text, started = parts
    if host != socket.gethostname():
        return None
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    current = _start_time(pid)
    return current is not None and started in ("?", current)


class JobStore:
    """Jobs, checkpoints and per-record errors in ``kg_bulk_*`` tables."""

    def __init__(self, url: str) -> None:
        self._engine = make_engine(url)
        self._url = self._engine.url
        self._guard = connection_guard(self._url)

    def __repr__(self) -> str:
        return f"JobStore({redacted_url(self._url)!r})"

    @contextlib.contextmanager
    def _tx(self, what: str, *, write: bool = True) -> Iterator[Connection]:
        with self._guard, database_errors(what, self._url), self._engine.connect() as conn:
            if write:
                sqlite_begin_immediate(conn)
            with conn.begin():
                yield conn

    def create_schema(self) -> None:
        with self._tx("create bulk job schema") as conn:
            if is_postgresql(self._engine):
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_ID)))
            bulk_metadata.create_all(conn, checkfirst=True)

    def close(self) -> None:
        self._engine.dispose()

    # -- jobs -------------------------------------------------------------------------------
    def create(
        self,
        *,
        fingerprint: str,
        operation: str,
        kind: str,
        tenant: str,
        actor: str,
        spec: dict[str, Any],
        input_identity: dict[str, Any] | None,
        owner: str,
    ) -> JobRecord:
        now = _now()
        job_id = secrets.token_hex(6)
        with self._tx("create bulk job") as conn:
            conn.execute(
                sa.insert(bulk_jobs_table).values(
                    id=job_id,
                    fingerprint=fingerprint,
                    operation=operation,
                    kind=kind,
                    tenant=tenant,
                    state="running",
                    actor=actor[:128],
                    spec=_json(spec),
                    input_identity=_json(input_identity) if input_identity else None,
                    checkpoint=_json({}),
                    counters=_json({}),
                    owner=owner,
                    heartbeat_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self._tx("read bulk job", write=False) as conn:
            row = conn.execute(
                sa.select(bulk_jobs_table).where(bulk_jobs_table.c.id == job_id)
            ).first()
        if row is None:
            raise NotFound(f"no bulk job {job_id}")
        return _record(row)

    def find_unfinished(self, fingerprint: str) -> JobRecord | None:
        with self._tx("find bulk job", write=False) as conn:
            row = conn.execute(
                sa.select(bulk_jobs_table)
                .where(
                    bulk_jobs_table.c.fingerprint == fingerprint,
                    bulk_jobs_table.c.state != "done",
                )
                .order_by(bulk_jobs_table.c.created_at.desc())
                .limit(1)
            ).first()
        return _record(row) if row is not None else None

    def list_jobs(self, *, limit: int = 50) -> list[JobRecord]:
        with self._tx("list bulk jobs", write=False) as conn:
            rows = conn.execute(
                sa.select(bulk_jobs_table)
                .order_by(bulk_jobs_table.c.created_at.desc())
                .limit(limit)
            ).all()
        return [_record(r) for r in rows]

    def claim(self, job_id: str, owner: str) -> JobRecord:
        """Become the job's owner; refuses while another live process owns it."""
        with self._tx("claim bulk job") as conn:
            row = conn.execute(
                sa.select(bulk_jobs_table).where(bulk_jobs_table.c.id == job_id)
            ).first()
            if row is None:
                raise NotFound(f"no bulk job {job_id}")
            if row.state == "done":
                raise InvalidRequest(f"bulk job {job_id} is already done")
            if row.owner and row.owner != owner and row.state == "running":
                alive = owner_is_alive(row.owner)
                stale = row.heartbeat_at is None or _now() - row.heartbeat_at > timedelta(
                    seconds=STALE_AFTER_S
                )
                if alive or (alive is None and not stale):
                    raise InvalidRequest(
                        f"bulk job {job_id} is running in another process ({row.owner}); "
                        "wait for it or stop it first"
                    )
            conn.execute(
                sa.update(bulk_jobs_table)
                .where(bulk_jobs_table.c.id == job_id)
                .values(
                    owner=owner,
                    state="running",
                    heartbeat_at=_now(),
                    updated_at=_now(),
                    last_error=None,
                )
            )
        return self.get(job_id)

    def checkpoint(
        self,
        job_id: str,
        owner: str,
        checkpoint: dict[str, Any],
        counters: dict[str, int],
        errors: Sequence[RecordError] = (),
    ) -> None:
        """Record progress (and the new errors) atomically, if ``owner`` still owns the job."""
        now = _now()
        with self._tx("checkpoint bulk job") as conn:
            done = conn.execute(
                sa.update(bulk_jobs_table)
                .where(bulk_jobs_table.c.id == job_id, bulk_jobs_table.c.owner == owner)
                .values(
                    checkpoint=_json(checkpoint),
                    counters=_json(counters),
                    heartbeat_at=now,
                    updated_at=now,
                )
            )
            if done.rowcount != 1:
                raise Unavailable(f"bulk job {job_id} was taken over by another process")
            if errors:
                stored = conn.execute(
                    sa.select(sa.func.count())
                    .select_from(bulk_errors_table)
                    .where(bulk_errors_table.c.job_id == job_id)
                ).scalar_one()
                room = max(0, MAX_STORED_ERRORS - int(stored))
                rows = [
                    {
                        "job_id": job_id,
                        "position": e.position[:200],
                        "field": e.field[:200] if e.field else None,
                        "code": e.code[:64],
                        "detail": e.detail[:400],
                        "at": now,
                    }
                    for e in errors[:room]
                ]
                if rows:
                    conn.execute(sa.insert(bulk_errors_table), rows)

    def finish(
        self,
        job_id: str,
        owner: str,
        *,
        state: str,
        counters: dict[str, int] | None = None,
        last_error: str | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "state": state,
            "updated_at": _now(),
            "last_error": last_error[:400] if last_error else None,
        }
        if state == "done":
            values["finished_at"] = _now()
        if counters is not None:
            values["counters"] = _json(counters)
        with self._tx("finish bulk job") as conn:
            conn.execute(
                sa.update(bulk_jobs_table)
                .where(bulk_jobs_table.c.id == job_id, bulk_jobs_table.c.owner == owner)
                .values(**values)
            )

    def set_verify(self, job_id: str, result: dict[str, Any]) -> None:
        with self._tx("record bulk verification") as conn:
            conn.execute(
                sa.update(bulk_jobs_table)
                .where(bulk_jobs_table.c.id == job_id)
                .values(verify=_json(result), updated_at=_now())
            )

    def errors(self, job_id: str, *, limit: int = 20) -> list[RecordError]:
        with self._tx("read bulk job errors", write=False) as conn:
            rows = conn.execute(
                sa.select(bulk_errors_table)
                .where(bulk_errors_table.c.job_id == job_id)
                .order_by(bulk_errors_table.c.seq)
                .limit(limit)
            ).all()
        return [RecordError(r.position, r.field, r.code, r.detail) for r in rows]
