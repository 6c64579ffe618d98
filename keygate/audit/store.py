"""The audit event store: one append-only SQL table, ``kg_audit_events``.

It may live in the same database as the registry.  :meth:`AuditStore.append` writes a batch in one
transaction and returns only once it is durable (SQLite runs with ``synchronous=FULL``); any
failure raises :class:`~keygate.core.errors.Unavailable` so the caller refuses the operation
(*fail closed*).  Callers batch the events of concurrent requests into one call (group commit).

Order
    ``seq`` is assigned by the database and defines the order of the trail.  Appends are
    serialised (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a transaction-scoped advisory lock), so
    ``seq`` order is also commit order: a reader never sees seq *n + 1* without seq *n*.  That
    is what lets a later change chain each event to its predecessor through the reserved
    ``prev_hash``/``hash`` columns, computed over :func:`~keygate.audit.events.canonical_bytes`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection

from keygate.audit.events import AuditEvent, DetailValue, redact_check
from keygate.core.errors import Unavailable
from keygate.keys.registry import (
    UTCDateTime,
    connection_guard,
    database_errors,
    describe_database_error,
    is_postgresql,
    make_engine,
    redacted_url,
    sqlite_begin_immediate,
)

__all__ = ["DEFAULT_PAGE_SIZE", "AuditStore", "audit_events_table", "audit_metadata"]

#: advisory lock serialising appends on PostgreSQL ("kgaudit\0")
_APPEND_LOCK_ID: Final = 0x6B67617564697400
#: advisory lock serialising concurrent ``create_schema`` calls ("kgschema", as the registry's)
_SCHEMA_LOCK_ID: Final = 0x6B67736368656D61
#: rows fetched per round trip by :meth:`AuditStore.query` unless told otherwise
DEFAULT_PAGE_SIZE: Final = 1000
#: room for "sha256:" + 64 hex digits, or a longer digest later
_HASH_LEN: Final = 128

audit_metadata: Final = sa.MetaData()

audit_events_table: Final = sa.Table(
    "kg_audit_events",
    audit_metadata,
    # INTEGER PRIMARY KEY AUTOINCREMENT on SQLite (never reused), BIGSERIAL on PostgreSQL.
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("ts", UTCDateTime(), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=True),
    sa.Column("purpose", sa.String(64), nullable=True),
    sa.Column("record_type", sa.String(64), nullable=True),
    sa.Column("key_version", sa.Integer(), nullable=True),
    sa.Column("code", sa.String(64), nullable=True),
    sa.Column("items", sa.Integer(), nullable=False),
    sa.Column("items_failed", sa.Integer(), nullable=False),
    #: the detail mapping as sorted-key JSON (exactly as canonical_bytes encodes it)
    sa.Column("detail", sa.Text(), nullable=False),
    #: reserved for the tamper-evident chain: hash of the previous event and of this one
    sa.Column("prev_hash", sa.String(_HASH_LEN), nullable=True),
    sa.Column("hash", sa.String(_HASH_LEN), nullable=True),
    sa.UniqueConstraint("event_id", name="uq_kg_audit_events_event_id"),
    sqlite_autoincrement=True,
)
sa.Index("ix_kg_audit_events_ts", audit_events_table.c.ts)
sa.Index("ix_kg_audit_events_tenant_seq", audit_events_table.c.tenant, audit_events_table.c.seq)


def _encode_detail(detail: dict[str, DetailValue]) -> str:
    return json.dumps(detail, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _row(event: AuditEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "ts": event.ts,
        "action": event.action,
        "outcome": event.outcome,
        "actor": event.actor,
        "request_id": event.request_id,
        "tenant": event.tenant,
        "purpose": event.purpose,
        "record_type": event.record_type,
        "key_version": event.key_version,
        "code": event.code,
        "items": event.items,
        "items_failed": event.items_failed,
        "detail": _encode_detail(dict(event.detail)),
    }


def _event(row: sa.Row[Any]) -> AuditEvent:
    return AuditEvent(
        action=row.action,
        outcome=row.outcome,
        actor=row.actor,
        request_id=row.request_id,
        tenant=row.tenant,
        purpose=row.purpose,
        record_type=row.record_type,
        key_version=row.key_version,
        code=row.code,
        items=int(row.items),
        items_failed=int(row.items_failed),
        detail=json.loads(row.detail),
        event_id=row.event_id,
        ts=row.ts,
    )


def _check_aware(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
        raise ValueError(f"{name} must be a timezone-aware datetime")


def _sqlite_file(url: URL) -> str | None:
    """The database file of a plain file-based SQLite URL (``None`` for anything else)."""
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    if database.startswith("file:") or url.query.get("uri") == "true":
        return None
    return database


def _check_limit(limit: object) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError("limit must be a non-negative integer or None")


class AuditStore:
    """Append-only audit trail in ``kg_audit_events``."""

    def __init__(self, url: str, *, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self._page_size = page_size
        self._engine = make_engine(url)  # ConfigurationError for a bad URL or a missing driver
        self._url = self._engine.url
        self._guard = connection_guard(self._url)
        self._sqlite_path = _sqlite_file(self._url)
        self._file_identity: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"AuditStore({redacted_url(self._url)!r})"

    def create_schema(self) -> None:
        """Create the table and its indexes if they do not exist (idempotent)."""
        with (
            self._guard,
            database_errors("create audit schema", self._url),
            self._engine.connect() as conn,
        ):
            sqlite_begin_immediate(conn)
            with conn.begin():
                if is_postgresql(self._engine):
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_ID)))
                audit_metadata.create_all(conn, checkfirst=True)
        if self._sqlite_path is not None and self._file_identity is None:
            st = os.stat(self._sqlite_path)
            self._file_identity = (st.st_dev, st.st_ino)

    def ping(self) -> None:
        """Raise :class:`Unavailable` unless the audit table can be read."""
        with (
            self._guard,
            database_errors("ping audit trail", self._url),
            self._engine.connect() as conn,
        ):
            conn.execute(sa.select(audit_events_table.c.seq).limit(1)).all()

    def append(self, events: Sequence[AuditEvent]) -> None:
        """Write ``events`` in one transaction, durable on return, in the order given.

        Raises :class:`ValueError` (before touching the database) if an event fails
        :func:`~keygate.audit.events.redact_check`, and :class:`Unavailable` on any storage
        failure, in which case none of the events was written.
        """
        if not events:
            return
        for event in events:
            if not isinstance(event, AuditEvent):
                raise TypeError("append() takes AuditEvent objects")
            redact_check(event)
        rows = [_row(event) for event in events]
        try:
            self._check_file()
            with self._guard, self._engine.connect() as conn:
                sqlite_begin_immediate(conn)
                with conn.begin():
                    self._lock_appends(conn)
                    conn.execute(sa.insert(audit_events_table), rows)
        except Exception as exc:
            # Fail closed whatever went wrong (constraint, driver, disk): nothing was written.
            raise Unavailable(
                f"append {len(rows)} audit event(s): the audit trail at "
                f"{redacted_url(self._url)} cannot be written "
                f"({describe_database_error(exc, self._url)})"
            ) from exc

    def _check_file(self) -> None:
        """Refuse to write if the SQLite file was removed or replaced under open connections.

        SQLite keeps writing to an unlinked file through connections that are already open; the
        events would then be lost with it.  A changed file is noticed here, the pool is dropped
        and this append fails; later appends use whatever file is now at the path.
        """
        if self._sqlite_path is None:
            return
        st = os.stat(self._sqlite_path)
        identity = (st.st_dev, st.st_ino)
        if self._file_identity is None:
            self._file_identity = identity
        elif identity != self._file_identity:
            self._file_identity = None
            self._engine.dispose()
            raise FileNotFoundError("the audit database file was removed or replaced")

    def _lock_appends(self, conn: Connection) -> None:
        if is_postgresql(self._engine):
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_APPEND_LOCK_ID)))

    def query(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        tenant: str | None = None,
        limit: int | None = None,
    ) -> Iterator[AuditEvent]:
        """Events in commit (``seq``) order, filtered by ``since <= ts < until`` and tenant.

        Streams in pages, each read in its own short transaction, so memory stays flat however
        long the trail.  Arguments are checked at call time; database failures surface as
        :class:`Unavailable` while iterating.
        """
        _check_aware("since", since)
        _check_aware("until", until)
        _check_limit(limit)
        table = audit_events_table
        conditions: list[sa.ColumnElement[bool]] = []
        if since is not None:
            conditions.append(table.c.ts >= since)
        if until is not None:
            conditions.append(table.c.ts < until)
        if tenant is not None:
            conditions.append(table.c.tenant == tenant)
        return self._pages(conditions, limit)

    def _pages(
        self, conditions: list[sa.ColumnElement[bool]], limit: int | None
    ) -> Iterator[AuditEvent]:
        table = audit_events_table
        remaining = limit
        last_seq = 0
        while remaining is None or remaining > 0:
            page = self._page_size if remaining is None else min(self._page_size, remaining)
            statement = (
                sa.select(table)
                .where(table.c.seq > last_seq, *conditions)
                .order_by(table.c.seq)
                .limit(page)
            )
            with (
                self._guard,
                database_errors("query audit trail", self._url),
                self._engine.connect() as conn,
            ):
                rows = conn.execute(statement).all()
            for row in rows:
                yield _event(row)
            if len(rows) < page:
                return
            last_seq = int(rows[-1].seq)
            if remaining is not None:
                remaining -= len(rows)

    def count(self) -> int:
        statement = sa.select(sa.func.count()).select_from(audit_events_table)
        with (
            self._guard,
            database_errors("count audit events", self._url),
            self._engine.connect() as conn,
        ):
            return int(conn.execute(statement).scalar_one())

    def close(self) -> None:
        self._engine.dispose()
