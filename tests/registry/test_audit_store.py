"""The audit store: durable batched appends, commit order, filters, and failing closed."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from keygate.audit import AuditEvent, AuditStore, canonical_bytes
from keygate.core.errors import Unavailable
from keygate.keys import Registry
from keygate.testing.postgres import PostgresServer

RunPython = Callable[..., subprocess.Popen[str]]
T0 = datetime(2026, 11, 22, 0, 0, tzinfo=UTC)
JST = timezone(timedelta(hours=9))

APPEND_AND_DIE = """
import os, sys
from keygate.audit import AuditEvent, AuditStore
store = AuditStore(sys.argv[1])
store.append([AuditEvent("key.rotated", "ok", "custodian-1", f"r{i}") for i in range(3)])
os._exit(0)  # no close, no flush, no atexit: only what append made durable survives
"""


def _event(n: int, *, tenant: str | None = "131016", **changes: object) -> AuditEvent:
    fields: dict[str, object] = {
        "action": "crypto.encrypt",
        "outcome": "ok",
        "actor": "juki-app",
        "request_id": f"req-{n}",
        "tenant": tenant,
        "purpose": "resident",
        "key_version": 1,
        "ts": T0 + timedelta(seconds=n),
        "detail": {"n": n},
    }
    fields.update(changes)
    return AuditEvent(**fields)  # type: ignore[arg-type]


def _ns(events: list[AuditEvent]) -> list[object]:
    return [e.detail["n"] for e in events]


def test_append_and_query_round_trip(audit_store: AuditStore) -> None:
    """Appended events come back equal, with identical canonical bytes, in append order."""
    events = [
        _event(
            1,
            outcome="denied",
            code="FORBIDDEN",
            record_type="resident",
            items=5,
            items_failed=5,
            detail={"n": 1, "reason": "テナント外", "batch": True, "note": None},
            ts=datetime(2026, 11, 22, 9, 0, 0, 999999, tzinfo=UTC),
        ),
        _event(2, tenant=None, key_version=None, action="auth.failed", actor="anonymous"),
        _event(3),
    ]
    audit_store.append(events)
    back = list(audit_store.query())
    assert back == events
    assert [canonical_bytes(e) for e in back] == [canonical_bytes(e) for e in events]
    assert all(e.ts.tzinfo is UTC for e in back)
    assert audit_store.count() == 3


def test_commit_order_across_and_within_batches(audit_store: AuditStore) -> None:
    """Query order is append order, whatever the events' own timestamps say."""
    audit_store.append([_event(5), _event(1)])
    audit_store.append([_event(9)])
    audit_store.append([_event(0), _event(7), _event(3)])
    assert _ns(list(audit_store.query())) == [5, 1, 9, 0, 7, 3]


def test_empty_append_is_a_no_op(audit_store: AuditStore) -> None:
    """Appending an empty batch writes nothing and does not fail."""
    audit_store.append([])
    assert audit_store.count() == 0
    assert list(audit_store.query()) == []


def test_query_filters(audit_store: AuditStore) -> None:
    """since is inclusive, until exclusive, tenant exact, and limit caps the result."""
    audit_store.append([_event(n, tenant="131016" if n % 2 else "281000") for n in range(10)])
    assert _ns(list(audit_store.query(since=T0 + timedelta(seconds=7)))) == [7, 8, 9]
    assert _ns(list(audit_store.query(until=T0 + timedelta(seconds=2)))) == [0, 1]
    assert _ns(list(audit_store.query(tenant="281000"))) == [0, 2, 4, 6, 8]
    assert _ns(
        list(
            audit_store.query(
                since=T0 + timedelta(seconds=2), until=T0 + timedelta(seconds=8), tenant="131016"
            )
        )
    ) == [3, 5, 7]
    assert _ns(list(audit_store.query(limit=3))) == [0, 1, 2]
    assert list(audit_store.query(limit=0)) == []
    assert list(audit_store.query(tenant="000000")) == []


def test_query_accepts_other_time_zones(audit_store: AuditStore) -> None:
    """since/until in JST select the same instants as in UTC."""
    audit_store.append([_event(n) for n in range(4)])
    since_jst = (T0 + timedelta(seconds=2)).astimezone(JST)
    assert since_jst.hour == 9
    assert _ns(list(audit_store.query(since=since_jst))) == [2, 3]


def test_query_pages_through_long_trails(db_url: str, audit_store: AuditStore) -> None:
    """Queries stream past the page size and honour a limit that spans pages."""
    audit_store.append([_event(n) for n in range(25)])
    paged = AuditStore(db_url, page_size=4)
    try:
        assert _ns(list(paged.query())) == list(range(25))
        assert _ns(list(paged.query(limit=10))) == list(range(10))
        assert _ns(list(paged.query(limit=8))) == list(range(8))
        assert _ns(list(paged.query(since=T0 + timedelta(seconds=13)))) == list(range(13, 25))
        assert _ns(list(paged.query(limit=30))) == list(range(25))
    finally:
        paged.close()


def test_query_arguments_are_checked_at_call_time(audit_store: AuditStore) -> None:
    """Naive datetimes and negative limits raise ValueError before any iteration."""
    with pytest.raises(ValueError, match="since"):
        audit_store.query(since=datetime(2026, 1, 1))  # naive on purpose
    with pytest.raises(ValueError, match="until"):
        audit_store.query(until=datetime(2026, 1, 1))  # naive on purpose
    with pytest.raises(ValueError, match="limit"):
        audit_store.query(limit=-1)


def test_redaction_violation_writes_nothing(audit_store: AuditStore) -> None:
    """A batch holding an event with a secret-named detail key is refused whole."""
    with pytest.raises(ValueError, match="token"):
        audit_store.append([_event(1), _event(2, detail={"n": 2, "token": "x"})])
    assert audit_store.count() == 0


def test_batch_is_one_transaction(audit_store: AuditStore) -> None:
    """If one event of a batch cannot be stored, none is, and the caller gets Unavailable."""
    first = _event(1)
    audit_store.append([first])
    with pytest.raises(Unavailable):
        audit_store.append([_event(2), _event(3), first])  # duplicate event_id
    assert _ns(list(audit_store.query())) == [1]


def test_concurrent_batches_stay_contiguous(audit_store: AuditStore) -> None:
    """Batches appended from several threads at once are each stored contiguously and whole."""
    threads_n, batches, size = 4, 10, 5
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def append(t: int) -> None:
        try:
            barrier.wait(timeout=10)
            for b in range(batches):
                audit_store.append(
                    [_event(i, actor=f"t{t}", request_id=f"t{t}-b{b}") for i in range(size)]
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    events = list(audit_store.query())
    assert len(events) == threads_n * batches * size
    for start in range(0, len(events), size):
        chunk = events[start : start + size]
        assert len({e.request_id for e in chunk}) == 1
        assert _ns(chunk) == list(range(size))
    for t in range(threads_n):
        mine = [e.request_id for e in events if e.actor == f"t{t}"][::size]
        assert mine == [f"t{t}-b{b}" for b in range(batches)]


def test_append_is_durable_when_it_returns(db_url: str, spawn_python: RunPython) -> None:
    """Events appended by a process that dies right after append returns are all there."""
    store = AuditStore(db_url)
    store.create_schema()
    proc = spawn_python(APPEND_AND_DIE, db_url)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert [e.request_id for e in store.query()] == ["r0", "r1", "r2"]
    store.close()


def test_read_only_sqlite_fails_closed(tmp_path: Path) -> None:
    """Appending to a SQLite database opened read-only raises Unavailable."""
    path = tmp_path / "audit.db"
    writable = AuditStore(f"sqlite:///{path}")
    writable.create_schema()
    writable.append([_event(1)])
    writable.close()
    read_only = AuditStore(f"sqlite:///file:{path}?mode=ro&uri=true")
    try:
        with pytest.raises(Unavailable, match="cannot be written") as info:
            read_only.append([_event(2)])
        assert info.value.__cause__ is not None
        assert read_only.count() == 1
    finally:
        read_only.close()


def test_removed_sqlite_file_fails_closed(tmp_path: Path) -> None:
    """Appending after the database file was deleted under open connections raises Unavailable."""
    path = tmp_path / "audit.db"
    store = AuditStore(f"sqlite:///{path}")
    store.create_schema()
    store.append([_event(1)])
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(Unavailable):
        store.append([_event(2)])
    with pytest.raises(Unavailable):
        store.append([_event(3)])
    store.close()


def test_removed_directory_fails_closed(tmp_path: Path) -> None:
    """Appending when the database's directory is gone raises Unavailable."""
    directory = tmp_path / "trail"
    directory.mkdir()
    store = AuditStore(f"sqlite:///{directory / 'audit.db'}")
    store.create_schema()
    store.close()
    shutil.rmtree(directory)
    with pytest.raises(Unavailable):
        store.append([_event(1)])
    with pytest.raises(Unavailable):
        store.ping()
    store.close()


@pytest.mark.postgres
def test_read_only_postgresql_fails_closed(pg_server: PostgresServer) -> None:
    """Appending through a read-only PostgreSQL session raises Unavailable."""
    db_url = pg_server.create_schema("kg_read_only")
    writable = AuditStore(db_url)
    writable.create_schema()
    writable.close()
    url = sa.make_url(db_url)
    options = f"{url.query['options']} -cdefault_transaction_read_only=on"
    read_only = AuditStore(url.update_query_dict({"options": options}).render_as_string(False))
    try:
        read_only.ping()
        with pytest.raises(Unavailable, match="cannot be written"):
            read_only.append([_event(1)])
        assert read_only.count() == 0
    finally:
        read_only.close()


def test_ping(audit_store: AuditStore) -> None:
    """ping succeeds once the schema exists."""
    audit_store.ping()


def test_schema_reserves_chain_columns(db_url: str, audit_store: AuditStore) -> None:
    """The table has a seq key and prev_hash/hash columns, filled in by the chain on append."""
    audit_store.append([_event(1), _event(2)])
    engine = sa.create_engine(db_url)
    try:
        columns = {c["name"]: c for c in sa.inspect(engine).get_columns("kg_audit_events")}
        assert columns["prev_hash"]["nullable"]
        assert columns["hash"]["nullable"]
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT seq, prev_hash, hash FROM kg_audit_events ORDER BY seq")
            ).all()
    finally:
        engine.dispose()
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert rows[0].seq < rows[1].seq
    assert rows[0].prev_hash == "00" * 32
    assert rows[1].prev_hash == rows[0].hash and len(rows[1].hash) == 64


def test_shares_a_database_with_the_registry(registry: Registry, db_url: str) -> None:
    """The audit table lives beside the registry tables in one database."""
    store = AuditStore(db_url)
    try:
        store.create_schema()
        registry.add_tenant("131016", kind="lgcode", name="千代田区")
        store.append([_event(1, action="tenant.added", actor="custodian-1")])
        assert registry.generation() == 1
        assert [e.action for e in store.query(tenant="131016")] == ["tenant.added"]
    finally:
        store.close()
