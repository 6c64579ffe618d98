"""The audit event store: one append-only SQL table, ``kg_audit_events``.

It may live in the same database as the registry.  :meth:`AuditStore.append` writes a batch in one
transaction and returns only once it is durable (SQLite runs with ``synchronous=FULL``); any
failure raises :class:`~keygate.core.errors.Unavailable` so the caller refuses the operation
(*fail closed*).  Callers batch the events of concurrent requests into one call (group commit).

Order and chain
    ``seq`` defines the order of the trail.  Appends are serialised (SQLite: ``BEGIN
    IMMEDIATE``; PostgreSQL: a transaction-scoped advisory lock); inside that lock the append
    reads the last row's ``seq`` and ``hash``, numbers the new events ``seq + 1, seq + 2 …``
    itself (a PostgreSQL sequence would leave gaps after a rolled-back transaction) and chains
    each one to its predecessor (:mod:`keygate.audit.chain`).  So several processes appending
    to one database produce one gap-free chain in ``seq`` order, and ``seq`` order is commit
    order.  If the previous row cannot be read or carries no valid hash, the append fails
    (fail closed).

Record refs
    ``kg_audit_record_refs`` holds one row ``(ref, seq)`` per record an event touched (its
    pseudonym, 32 bytes), keyed by ref so that "who touched record R" is an index lookup.  The
    rows are inserted by :meth:`AuditStore.append` in the same transaction as their event, and
    the chained event commits to them (``record_refs_count`` / ``record_refs_digest``, see
    :mod:`keygate.audit.pseudonym`).  Rows of pruned events are deleted with them.

Checkpoints
    ``kg_audit_checkpoints`` holds signed chain heads (:class:`Checkpoint`).  They are made by
    :meth:`AuditStore.checkpoint` under the same lock, with a signing callback (the HSM).

Segments and pruning
    ``kg_audit_segments`` records the segments that were archived or pruned
    (:mod:`keygate.audit.retention`).  :meth:`AuditStore.prune` deletes the oldest events up to a
    signed checkpoint, which it keeps as the *anchor* of what remains, and appends the pruning
    records in the same transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection

from keygate.audit.chain import GENESIS_HASH, chain_hash, is_hash
from keygate.audit.events import AuditEvent, DetailValue, format_timestamp, redact_check
from keygate.audit.pseudonym import is_record_ref
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

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "AuditStore",
    "ChainedEvent",
    "Checkpoint",
    "SegmentRecord",
    "audit_checkpoints_table",
    "audit_events_table",
    "audit_metadata",
    "audit_record_refs_table",
    "audit_segments_table",
]

#: advisory lock serialising appends on PostgreSQL ("kgaudit\0")
_APPEND_LOCK_ID: Final = 0x6B67617564697400
#: advisory lock serialising concurrent ``create_schema`` calls ("kgschema", as the registry's)
_SCHEMA_LOCK_ID: Final = 0x6B67736368656D61
#: rows fetched per round trip by :meth:`AuditStore.query` unless told otherwise
DEFAULT_PAGE_SIZE: Final = 1000
#: room for "sha256:" + 64 hex digits, or a longer digest later
_HASH_LEN: Final = 128
#: record refs loaded per query when exporting (events are grouped up to about this many refs)
_REFS_CHUNK: Final = 50_000
_COPY_REFS: Final = "COPY kg_audit_record_refs (ref, seq) FROM STDIN"
_INSERT_REFS_QMARK: Final = "INSERT INTO kg_audit_record_refs (ref, seq) VALUES (?, ?)"
_INSERT_REFS_FORMAT: Final = "INSERT INTO kg_audit_record_refs (ref, seq) VALUES (%s, %s)"

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

audit_record_refs_table: Final = sa.Table(
    "kg_audit_record_refs",
    audit_metadata,
    #: the pseudonym of a record (raw HMAC-SHA256, 32 bytes; exported as 64 hex digits)
    sa.Column("ref", sa.LargeBinary(32), primary_key=True),
    #: the event that touched it (no foreign key: rows are deleted before their pruned events)
    sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
    sqlite_with_rowid=False,
)
sa.Index("ix_kg_audit_record_refs_seq", audit_record_refs_table.c.seq)

audit_checkpoints_table: Final = sa.Table(
    "kg_audit_checkpoints",
    audit_metadata,
    #: the seq of the event whose hash is signed (the chain head when the checkpoint was made)
    sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("hash", sa.String(_HASH_LEN), nullable=False),
    #: seq of the previous checkpoint (0 for the first): a deleted checkpoint is noticed
    sa.Column("prev_seq", sa.BigInteger(), nullable=False),
    #: RFC 3339 text exactly as signed
    sa.Column("ts", sa.String(40), nullable=False),
    #: DER-encoded ECDSA signature, base64
    sa.Column("signature", sa.Text(), nullable=False),
    #: SHA-256 (hex) of the signing key's SubjectPublicKeyInfo DER
    sa.Column("key_id", sa.String(64), nullable=False),
)

audit_segments_table: Final = sa.Table(
    "kg_audit_segments",
    audit_metadata,
    #: the seq of the checkpoint that closes the segment (its last event)
    sa.Column("to_seq", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("from_seq", sa.BigInteger(), nullable=False),
    #: ``2026-01`` (month) or ``2026-01-31`` (day), UTC, of the closing checkpoint
    sa.Column("period", sa.String(16), nullable=False),
    sa.Column("events", sa.BigInteger(), nullable=False),
    #: hash of the last event (= the closing checkpoint's signed hash)
    sa.Column("last_hash", sa.String(_HASH_LEN), nullable=False),
    #: the archive's file name (in the archive directory) and SHA-256; NULL if never archived
    sa.Column("archive_file", sa.String(255), nullable=True),
    sa.Column("archive_sha256", sa.String(64), nullable=True),
    sa.Column("archived_at", UTCDateTime(), nullable=True),
    sa.Column("pruned_at", UTCDateTime(), nullable=True),
)


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    """A segment that was archived and/or pruned (a row of ``kg_audit_segments``)."""

    from_seq: int
    to_seq: int
    period: str
    events: int
    last_hash: str
    archive_file: str | None = None
    archive_sha256: str | None = None
    archived_at: datetime | None = None
    pruned_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ChainedEvent:
    """An event with its place in the chain."""

    seq: int
    prev_hash: str
    hash: str
    event: AuditEvent
    #: the record refs stored for the event, sorted, when they were asked for (``with_refs``)
    #: and the event commits to a set (``record_refs_digest``); None otherwise
    record_refs: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed chain head."""

    seq: int
    hash: str
    prev_seq: int
    ts: str
    signature: str
    key_id: str


#: signs a checkpoint: (seq, hash, prev_seq, ts) -> (base64 DER signature, key id)
CheckpointSigner = Callable[[int, str, int, str], tuple[str, str]]


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


def _checkpoint(row: sa.Row[Any]) -> Checkpoint:
    return Checkpoint(
        seq=int(row.seq),
        hash=row.hash,
        prev_seq=int(row.prev_seq),
        ts=row.ts,
        signature=row.signature,
        key_id=row.key_id,
    )


class _Refused(ValueError):
    """A prune refused because the trail is not in the expected state (nothing changed)."""


def _aware(value: object) -> datetime | None:
    """A timestamp from an aggregate (SQLite returns text for ``min``/``max`` of a column)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"not a timestamp: {value!r}")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _segment_record(row: sa.Row[Any]) -> SegmentRecord:
    return SegmentRecord(
        from_seq=int(row.from_seq),
        to_seq=int(row.to_seq),
        period=row.period,
        events=int(row.events),
        last_hash=row.last_hash,
        archive_file=row.archive_file,
        archive_sha256=row.archive_sha256,
        archived_at=_aware(row.archived_at),
        pruned_at=_aware(row.pruned_at),
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


def _chain_legacy_rows(conn: Connection) -> None:
    """Chain rows written before the chain existed (NULL hash), in seq order; idempotent.

    Renumbering is not possible without rewriting history, so a legacy PostgreSQL trail with
    gaps in ``seq`` keeps them, and ``keygate audit verify`` reports the first gap.
    """
    table = audit_events_table
    if conn.execute(sa.select(table.c.seq).where(table.c.hash.is_(None)).limit(1)).first() is None:
        return
    prev = GENESIS_HASH
    for n, row in enumerate(conn.execute(sa.select(table).order_by(table.c.seq)).all()):
        if n == 0 and int(row.seq) > 1 and is_hash(row.prev_hash):
            prev = row.prev_hash  # the oldest events were pruned: continue from the anchor
        if row.hash is None:
            digest = chain_hash(prev, _event(row), int(row.seq))
            conn.execute(
                sa.update(table).where(table.c.seq == row.seq).values(prev_hash=prev, hash=digest)
            )
            prev = digest
        else:
            prev = row.hash


def _index_legacy_refs(conn: Connection, page: int = 10_000) -> int:
    """Fill ``kg_audit_record_refs`` from events written before it existed; the rows added.

    Such events name their records only inline (``record_ref``, or ``record_refs`` for batches of
    at most 15; larger batches named none and cannot be indexed).  Run once, when the table is
    created, under the append lock.
    """
    events, refs = audit_events_table, audit_record_refs_table
    added = 0
    last_seq = 0
    while True:
        rows = conn.execute(
            sa.select(events.c.seq, events.c.detail)
            .where(events.c.seq > last_seq, events.c.detail.contains('"record_ref'))
            .order_by(events.c.seq)
            .limit(page)
        ).all()
        batch: list[dict[str, Any]] = []
        for row in rows:
            try:
                detail = json.loads(row.detail)
            except ValueError:
                continue
            if not isinstance(detail, dict) or "record_refs_digest" in detail:
                continue
            found = set()
            if is_record_ref(detail.get("record_ref")):
                found.add(detail["record_ref"])
            many = detail.get("record_refs")
            if isinstance(many, str):
                found.update(r for r in many.split(",") if is_record_ref(r))
            batch.extend({"seq": int(row.seq), "ref": bytes.fromhex(r)} for r in sorted(found))
        if batch:
            conn.execute(sa.insert(refs), batch)
            added += len(batch)
        if len(rows) < page:
            return added
        last_seq = int(rows[-1].seq)


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

    @contextlib.contextmanager
    def _connection(self, what: str) -> Iterator[Connection]:
        """A connection under the process guard; database errors become ``Unavailable``."""
        with self._guard, database_errors(what, self._url), self._engine.connect() as conn:
            yield conn

    def create_schema(self) -> None:
        """Create the table and its indexes if they do not exist (idempotent)."""
        with self._connection("create audit schema") as conn:
            sqlite_begin_immediate(conn)
            with conn.begin():
                if is_postgresql(self._engine):
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_ID)))
                new_refs = not sa.inspect(conn).has_table(audit_record_refs_table.name)
                audit_metadata.create_all(conn, checkfirst=True)
                if new_refs:
                    # A trail from before the side table: index its inline refs, once, in the
                    # transaction that creates the table (a crash leaves neither behind).
                    self._lock_appends(conn)
                    _index_legacy_refs(conn)
            sqlite_begin_immediate(conn)
            with conn.begin():
                self._lock_appends(conn)
                _chain_legacy_rows(conn)
        if self._sqlite_path is not None and self._file_identity is None:
            st = os.stat(self._sqlite_path)
            self._file_identity = (st.st_dev, st.st_ino)

    def ping(self) -> None:
        """Raise :class:`Unavailable` unless the audit table can be read."""
        with self._connection("ping audit trail") as conn:
            conn.execute(sa.select(audit_events_table.c.seq).limit(1)).all()

    def append(self, events: Sequence[AuditEvent]) -> tuple[int, str] | None:
        """Write ``events`` in one transaction, durable on return, in the order given.

        Returns the new chain head ``(seq, hash)`` (None for an empty batch).

        Raises :class:`ValueError` (before touching the database) if an event fails
        :func:`~keygate.audit.events.redact_check`, and :class:`Unavailable` on any storage
        failure, in which case none of the events was written.
        """
        if not events:
            return None
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
                    seq, prev = self._chain_in(conn, rows, events)
        except Exception as exc:
            # Fail closed whatever went wrong (constraint, driver, disk): nothing was written.
            raise Unavailable(
                f"append {len(rows)} audit event(s): the audit trail at "
                f"{redacted_url(self._url)} cannot be written "
                f"({describe_database_error(exc, self._url)})"
            ) from exc
        return seq, prev

    def _chain_in(
        self, conn: Connection, rows: list[dict[str, Any]], events: Sequence[AuditEvent]
    ) -> tuple[int, str]:
        """Number and chain ``rows`` after the head and insert them, with their record refs
        (under the append lock)."""
        seq, prev = self._head(conn)
        ref_rows: list[tuple[bytes, int]] = []
        for row, event in zip(rows, events, strict=True):
            seq += 1
            row["seq"] = seq
            row["prev_hash"] = prev
            row["hash"] = prev = chain_hash(prev, event, seq)
            if event.record_refs:
                ref_rows.extend((bytes.fromhex(r), seq) for r in event.record_refs)
        conn.execute(sa.insert(audit_events_table), rows)
        if ref_rows:
            self._insert_refs(conn, ref_rows)
        return seq, prev

    def _insert_refs(self, conn: Connection, ref_rows: list[tuple[bytes, int]]) -> None:
        """Insert ``(ref, seq)`` rows in the current transaction, the fastest way the driver
        has: ``COPY`` on PostgreSQL (psycopg 3), a plain ``executemany`` otherwise (a 1000-record
        batch is 1000 rows: SQLAlchemy's per-row parameter handling would cost more than the
        insert itself)."""
        if is_postgresql(self._engine):
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                if hasattr(cursor, "copy"):
                    with cursor.copy(_COPY_REFS) as copy:
                        for ref_row in ref_rows:
                            copy.write_row(ref_row)
                    return
            finally:
                cursor.close()
        qmark = self._engine.dialect.paramstyle == "qmark"
        conn.exec_driver_sql(_INSERT_REFS_QMARK if qmark else _INSERT_REFS_FORMAT, ref_rows)

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

    @staticmethod
    def _head(conn: Connection) -> tuple[int, str]:
        """``(seq, hash)`` of the last event (``(0, GENESIS_HASH)`` when empty), under the lock.

        Raises if the last row carries no valid hash: the chain cannot be extended.
        """
        table = audit_events_table
        row = conn.execute(
            sa.select(table.c.seq, table.c.hash).order_by(table.c.seq.desc()).limit(1)
        ).first()
        if row is None:
            return 0, GENESIS_HASH
        if not is_hash(row.hash):
            raise RuntimeError(f"audit event seq {row.seq} has no valid chain hash")
        return int(row.seq), str(row.hash)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the append lock (every process of every gateway waits for it) meanwhile.

        For one-time work that must not run twice at once across processes, such as creating
        the audit keys in the HSM.  Keep it short: every audit append waits.
        """
        with self._connection("lock audit trail") as conn:
            sqlite_begin_immediate(conn)
            with conn.begin():
                self._lock_appends(conn)
                yield

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last event; ``(0, GENESIS_HASH)`` for an empty trail."""
        with self._connection("read audit chain head") as conn:
            return self._head(conn)

    def last_checkpoint(self) -> Checkpoint | None:
        with self._connection("read audit checkpoints") as conn:
            return self._last_checkpoint(conn)

    @staticmethod
    def _last_checkpoint(conn: Connection) -> Checkpoint | None:
        table = audit_checkpoints_table
        row = conn.execute(sa.select(table).order_by(table.c.seq.desc()).limit(1)).first()
        return None if row is None else _checkpoint(row)

    def checkpoint(
        self, signer: CheckpointSigner, *, now: datetime | None = None
    ) -> Checkpoint | None:
        """Sign the current chain head unless it is already signed; returns the checkpoint.

        Runs under the append lock, so two processes never sign different heads out of order
        and the checkpoints form their own chain (``prev_seq``).  Returns None for an empty
        trail.  Raises :class:`Unavailable` on any failure (nothing was written).
        """
        try:
            with self._guard, self._engine.connect() as conn:
                sqlite_begin_immediate(conn)
                with conn.begin():
                    self._lock_appends(conn)
                    seq, head_hash = self._head(conn)
                    last = self._last_checkpoint(conn)
                    if seq == 0:
                        return None
                    if last is not None and last.seq >= seq:
                        return last
                    ts = format_timestamp(now or datetime.now(UTC))
                    prev_seq = last.seq if last is not None else 0
                    signature, key_id = signer(seq, head_hash, prev_seq, ts)
                    cp = Checkpoint(seq, head_hash, prev_seq, ts, signature, key_id)
                    conn.execute(
                        sa.insert(audit_checkpoints_table),
                        {
                            "seq": cp.seq,
                            "hash": cp.hash,
                            "prev_seq": cp.prev_seq,
                            "ts": cp.ts,
                            "signature": cp.signature,
                            "key_id": cp.key_id,
                        },
                    )
                    return cp
        except Exception as exc:
            raise Unavailable(
                f"audit checkpoint at {redacted_url(self._url)} failed "
                f"({describe_database_error(exc, self._url)})"
            ) from exc

    def checkpoints(self, *, from_seq: int = 1, to_seq: int | None = None) -> list[Checkpoint]:
        """Checkpoints with ``from_seq <= seq <= to_seq``, in order."""
        table = audit_checkpoints_table
        statement = sa.select(table).where(table.c.seq >= from_seq).order_by(table.c.seq)
        if to_seq is not None:
            statement = statement.where(table.c.seq <= to_seq)
        with self._connection("read audit checkpoints") as conn:
            return [_checkpoint(row) for row in conn.execute(statement).all()]

    def chained(
        self, *, from_seq: int = 1, to_seq: int | None = None, with_refs: bool = False
    ) -> Iterator[ChainedEvent]:
        """Events with their chain fields, ``from_seq <= seq <= to_seq``, streamed in pages.

        ``with_refs``: each event that commits to a set of record refs (``record_refs_digest``)
        comes with the refs stored for it (:attr:`ChainedEvent.record_refs`), loaded a few
        events at a time so that memory stays bounded (by about 50,000 refs, or one event's).
        """
        table = audit_events_table
        last_seq = from_seq - 1
        while True:
            statement = (
                sa.select(table).where(table.c.seq > last_seq).order_by(table.c.seq)
            ).limit(self._page_size)
            if to_seq is not None:
                statement = statement.where(table.c.seq <= to_seq)
            with self._connection("query audit trail") as conn:
                rows = conn.execute(statement).all()
            page = [
                ChainedEvent(int(row.seq), row.prev_hash, row.hash, _event(row)) for row in rows
            ]
            if with_refs:
                yield from self._with_refs(page)
            else:
                yield from page
            if len(rows) < self._page_size:
                return
            last_seq = int(rows[-1].seq)

    def _with_refs(self, page: list[ChainedEvent]) -> Iterator[ChainedEvent]:
        """``page`` with the record refs of its events that commit to some, chunk by chunk."""
        chunk: list[ChainedEvent] = []
        expected = 0

        def flush() -> Iterator[ChainedEvent]:
            wanted = [c for c in chunk if "record_refs_digest" in c.event.detail]
            found = self._refs_between(wanted[0].seq, wanted[-1].seq) if wanted else {}
            for item in chunk:
                if "record_refs_digest" in item.event.detail:
                    yield replace(item, record_refs=tuple(found.get(item.seq, ())))
                else:
                    yield item

        for item in page:
            count = item.event.detail.get("record_refs_count")
            size = count if isinstance(count, int) and count > 0 else 0
            if chunk and expected + size > _REFS_CHUNK:
                yield from flush()
                chunk, expected = [], 0
            chunk.append(item)
            expected += size
        if chunk:
            yield from flush()

    def _refs_between(self, low: int, high: int) -> dict[int, list[str]]:
        refs = audit_record_refs_table
        statement = (
            sa.select(refs.c.seq, refs.c.ref)
            .where(refs.c.seq >= low, refs.c.seq <= high)
            .order_by(refs.c.seq, refs.c.ref)
        )
        found: dict[int, list[str]] = {}
        with self._connection("read audit record refs") as conn:
            for seq, ref in conn.execute(statement):
                found.setdefault(int(seq), []).append(bytes(ref).hex())
        return found

    def record_refs(self, seq: int) -> list[str]:
        """The record refs stored for event ``seq``, sorted (64 hex digits each)."""
        return self._refs_between(seq, seq).get(seq, [])

    def touching(self, ref: str, *, tenant: str | None = None) -> list[ChainedEvent]:
        """The events of the trail whose record refs include ``ref``, in seq order, each with
        every ref stored for it (to check against its digest).

        Two index lookups, whatever the length of the trail: the seqs of ``ref`` (primary key
        of ``kg_audit_record_refs``), then those events by seq.  (A join lets the planners,
        without statistics, scan the tenant's events instead.)
        """
        if not is_record_ref(ref):
            raise ValueError("a record ref is 64 lower-case hex digits")
        events, refs = audit_events_table, audit_record_refs_table
        with self._connection("query audit record refs") as conn:
            seqs = sorted(
                int(s)
                for s in conn.execute(
                    sa.select(refs.c.seq).where(refs.c.ref == bytes.fromhex(ref))
                ).scalars()
            )
            rows: list[sa.Row[Any]] = []
            for start in range(0, len(seqs), 500):
                conditions: list[sa.ColumnElement[bool]] = [
                    events.c.seq.in_(seqs[start : start + 500]),
                    events.c.seq > self._pruned_through_query(),
                ]
                if tenant is not None:
                    conditions.append(events.c.tenant == tenant)
                rows += conn.execute(
                    sa.select(events).where(*conditions).order_by(events.c.seq)
                ).all()
        found = []
        for row in rows:
            seq = int(row.seq)
            stored = tuple(self.record_refs(seq))
            found.append(ChainedEvent(seq, row.prev_hash, row.hash, _event(row), stored))
        return found

    def seq_range(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> tuple[int, int] | None:
        """The smallest and largest seq with ``since <= ts < until`` (None when none)."""
        _check_aware("since", since)
        _check_aware("until", until)
        table = audit_events_table
        conditions: list[sa.ColumnElement[bool]] = [table.c.seq > self._pruned_through_query()]
        if since is not None:
            conditions.append(table.c.ts >= since)
        if until is not None:
            conditions.append(table.c.ts < until)
        statement = sa.select(sa.func.min(table.c.seq), sa.func.max(table.c.seq)).where(*conditions)
        with self._connection("query audit trail") as conn:
            low, high = conn.execute(statement).one()
        return None if low is None else (int(low), int(high))

    def find_detail(self, needle: str, *, tenant: str | None = None) -> Iterator[ChainedEvent]:
        """Events whose ``detail`` JSON contains ``needle`` (hex digits only), in seq order.

        A full scan of the trail: to find the events of a record use :meth:`touching` (indexed).
        """
        if not needle or not all(c in "0123456789abcdef" for c in needle):
            raise ValueError("needle must be lower-case hex digits")
        table = audit_events_table
        conditions = [table.c.detail.contains(needle)]
        if tenant is not None:
            conditions.append(table.c.tenant == tenant)
        last_seq = 0
        while True:
            statement = (
                sa.select(table)
                .where(table.c.seq > last_seq, *conditions)
                .order_by(table.c.seq)
                .limit(self._page_size)
            )
            with self._connection("query audit trail") as conn:
                rows = conn.execute(statement).all()
            for row in rows:
                yield ChainedEvent(int(row.seq), row.prev_hash, row.hash, _event(row))
            if len(rows) < self._page_size:
                return
            last_seq = int(rows[-1].seq)

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
            with self._connection("query audit trail") as conn:
                rows = conn.execute(statement).all()
            for row in rows:
                yield _event(row)
            if len(rows) < page:
                return
            last_seq = int(rows[-1].seq)
            if remaining is not None:
                remaining -= len(rows)

    # ------------------------------------------------------------------ segments and pruning
    def first_seq(self) -> int | None:
        """The seq of the oldest event of the trail (None for an empty trail).

        Events that a prune has already removed from the trail but not yet deleted (it deletes
        in batches after recording the prune) do not count.
        """
        events = audit_events_table
        statement = sa.select(sa.func.min(events.c.seq)).where(
            events.c.seq > self._pruned_through_query()
        )
        with self._connection("read audit trail") as conn:
            value = conn.execute(statement).scalar_one()
        return None if value is None else int(value)

    @staticmethod
    def _pruned_through_query() -> sa.ScalarSelect[Any]:
        segments = audit_segments_table
        return (
            sa.select(sa.func.coalesce(sa.func.max(segments.c.to_seq), 0))
            .where(segments.c.pruned_at.is_not(None))
            .scalar_subquery()
        )

    def pruned_through(self) -> int:
        """Every event up to this seq was pruned (0 if nothing was)."""
        with self._connection("read audit segments") as conn:
            return int(conn.execute(sa.select(self._pruned_through_query())).scalar_one())

    def checkpoint_at(self, seq: int) -> Checkpoint | None:
        """The checkpoint that signs event ``seq``, if there is one."""
        table = audit_checkpoints_table
        with self._connection("read audit checkpoints") as conn:
            row = conn.execute(sa.select(table).where(table.c.seq == seq)).first()
        return None if row is None else _checkpoint(row)

    def checkpoint_periods(self, width: int) -> list[tuple[str, int, str]]:
        """``(period, seq, ts)`` of the last checkpoint of each period, in seq order.

        A period is the first ``width`` characters of the checkpoint's RFC 3339 UTC timestamp
        (7: a month, ``2026-11``; 10: a day).  One small grouped query, whatever the number of
        checkpoints.
        """
        if width not in (7, 10):
            raise ValueError("width must be 7 (month) or 10 (day)")
        table = audit_checkpoints_table
        period = sa.func.substr(table.c.ts, 1, width)
        statement = (
            sa.select(period, sa.func.max(table.c.seq), sa.func.max(table.c.ts))
            .group_by(period)
            .order_by(sa.func.max(table.c.seq))
        )
        with self._connection("read audit checkpoints") as conn:
            return [(str(p), int(s), str(t)) for p, s, t in conn.execute(statement).all()]

    def seq_stats(self, from_seq: int, to_seq: int) -> tuple[int, datetime | None, datetime | None]:
        """``(count, oldest ts, newest ts)`` of the events with ``from_seq <= seq <= to_seq``."""
        table = audit_events_table
        statement = sa.select(
            sa.func.count(), sa.func.min(table.c.ts), sa.func.max(table.c.ts)
        ).where(table.c.seq >= from_seq, table.c.seq <= to_seq)
        with self._connection("read audit trail") as conn:
            count, low, high = conn.execute(statement).one()
        return int(count), _aware(low), _aware(high)

    def segment_records(self) -> list[SegmentRecord]:
        """Every archived or pruned segment, oldest first."""
        table = audit_segments_table
        with self._connection("read audit segments") as conn:
            rows = conn.execute(sa.select(table).order_by(table.c.to_seq)).all()
        return [_segment_record(row) for row in rows]

    def record_archive(self, record: SegmentRecord) -> None:
        """Remember that a segment was archived (replaces an earlier archive of it)."""
        table = audit_segments_table
        values = {
            "from_seq": record.from_seq,
            "period": record.period,
            "events": record.events,
            "last_hash": record.last_hash,
            "archive_file": record.archive_file,
            "archive_sha256": record.archive_sha256,
            "archived_at": record.archived_at,
        }
        with self._connection("record audit archive") as conn:
            sqlite_begin_immediate(conn)
            with conn.begin():
                done = conn.execute(
                    sa.update(table).where(table.c.to_seq == record.to_seq).values(**values)
                )
                if done.rowcount == 0:
                    conn.execute(sa.insert(table).values(to_seq=record.to_seq, **values))

    def prune(
        self,
        *,
        from_seq: int,
        through_seq: int,
        records: Sequence[AuditEvent],
        segments: Sequence[SegmentRecord],
        now: datetime | None = None,
        batch: int = 10_000,
    ) -> tuple[int, tuple[int, str]]:
        """Remove the events ``from_seq..through_seq`` from the trail, appending ``records``.

        ``through_seq`` must be a signed checkpoint that is not the head; that checkpoint is
        kept (it anchors the first remaining event), older checkpoints are deleted.
        ``from_seq`` must be the oldest event of the trail (so that two prunes at once cannot
        both succeed).  In one short transaction under the append lock: the checks, the
        checkpoints, the segments marked pruned and the pruning records appended; from then on
        the events are out of the trail (:meth:`first_seq`, exports).  They are then deleted in
        batches of ``batch`` rows, each its own transaction, so that gateways appending
        meanwhile never wait long; an interrupted deletion is finished by
        :meth:`finish_pruning`.  Returns ``(events deleted, head after the records)``.

        Raises :class:`ValueError` if the trail is not as expected (nothing is changed) and
        :class:`Unavailable` on a storage failure.
        """
        for event in records:
            redact_check(event)
        rows = [_row(event) for event in records]
        if not rows:
            raise ValueError("a prune must append at least one pruning record")
        events = audit_events_table
        # Old rows never change but by a prune, so they are counted before taking the lock.
        with self._connection("count audit events") as conn:
            stored = conn.execute(
                sa.select(sa.func.count()).where(
                    events.c.seq >= from_seq, events.c.seq <= through_seq
                )
            ).scalar_one()
        if stored != through_seq - from_seq + 1:
            raise _Refused(
                f"seq {from_seq}..{through_seq} should hold {through_seq - from_seq + 1} "
                f"events, found {stored}: the trail is not whole"
            )
        try:
            with self._guard, self._engine.connect() as conn:
                sqlite_begin_immediate(conn)
                with conn.begin():
                    self._lock_appends(conn)
                    self._check_prune(conn, from_seq, through_seq)
                    conn.execute(
                        sa.delete(audit_checkpoints_table).where(
                            audit_checkpoints_table.c.seq < through_seq
                        )
                    )
                    self._mark_pruned(conn, segments, now or datetime.now(UTC))
                    head = self._chain_in(conn, rows, records)
        except _Refused:
            raise
        except Exception as exc:
            raise Unavailable(
                f"pruning the audit trail at {redacted_url(self._url)} failed "
                f"({describe_database_error(exc, self._url)})"
            ) from exc
        return self.finish_pruning(batch=batch), head

    def _check_prune(self, conn: Connection, from_seq: int, through_seq: int) -> None:
        """Refuse unless the trail is as the prune expects (under the append lock)."""
        events, checkpoints = audit_events_table, audit_checkpoints_table
        first = conn.execute(
            sa.select(sa.func.min(events.c.seq)).where(events.c.seq > self._pruned_through_query())
        ).scalar_one()
        head_seq, _ = self._head(conn)
        anchor = conn.execute(
            sa.select(checkpoints).where(checkpoints.c.seq == through_seq)
        ).first()
        last = conn.execute(sa.select(events.c.hash).where(events.c.seq == through_seq)).first()
        if first is None or int(first) != from_seq:
            raise _Refused(
                f"the oldest stored event is seq {first}, not {from_seq}: the trail changed "
                "meanwhile"
            )
        if anchor is None or last is None or last.hash != anchor.hash:
            raise _Refused(f"seq {through_seq} is not a signed checkpoint of the chain")
        if through_seq >= head_seq:
            raise _Refused("the chain head cannot be pruned")

    def finish_pruning(self, *, batch: int = 10_000) -> int:
        """Delete the rows of pruned segments still stored, ``batch`` at a time; the count."""
        if batch < 1:
            raise ValueError("batch must be at least 1")
        events = audit_events_table
        through = self.pruned_through()
        self._delete_pruned_refs(through, batch)
        deleted = 0
        while True:
            with self._connection("delete pruned audit events") as conn:
                sqlite_begin_immediate(conn)
                with conn.begin():
                    low = conn.execute(
                        sa.select(sa.func.min(events.c.seq)).where(events.c.seq <= through)
                    ).scalar_one()
                    if low is None:
                        return deleted
                    high = min(through, int(low) + batch - 1)
                    done = conn.execute(
                        sa.delete(events).where(events.c.seq >= low, events.c.seq <= high)
                    )
                    deleted += int(done.rowcount)

    def _delete_pruned_refs(self, through: int, batch: int) -> None:
        """Delete the record refs of events up to ``through``, about ``batch`` rows (or one
        event's) per transaction."""
        refs = audit_record_refs_table
        while True:
            with self._connection("delete pruned audit record refs") as conn:
                sqlite_begin_immediate(conn)
                with conn.begin():
                    low = conn.execute(
                        sa.select(sa.func.min(refs.c.seq)).where(refs.c.seq <= through)
                    ).scalar_one()
                    if low is None:
                        return
                    cut = conn.execute(
                        sa.select(refs.c.seq)
                        .where(refs.c.seq >= low, refs.c.seq <= through)
                        .order_by(refs.c.seq)
                        .limit(1)
                        .offset(batch)
                    ).scalar_one_or_none()
                    high = through if cut is None else max(int(low), int(cut) - 1)
                    conn.execute(sa.delete(refs).where(refs.c.seq >= low, refs.c.seq <= high))

    @staticmethod
    def _mark_pruned(conn: Connection, segments: Sequence[SegmentRecord], now: datetime) -> None:
        table = audit_segments_table
        for seg in segments:
            done = conn.execute(
                sa.update(table).where(table.c.to_seq == seg.to_seq).values(pruned_at=now)
            )
            if done.rowcount == 0:
                conn.execute(
                    sa.insert(table).values(
                        to_seq=seg.to_seq,
                        from_seq=seg.from_seq,
                        period=seg.period,
                        events=seg.events,
                        last_hash=seg.last_hash,
                        archive_file=seg.archive_file,
                        archive_sha256=seg.archive_sha256,
                        archived_at=seg.archived_at,
                        pruned_at=now,
                    )
                )

    def count(self) -> int:
        statement = sa.select(sa.func.count()).select_from(audit_events_table)
        with self._connection("count audit events") as conn:
            return int(conn.execute(statement).scalar_one())

    def close(self) -> None:
        self._engine.dispose()
