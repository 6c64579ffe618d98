"""The hash chain of kg_audit_events: correctness, fail-closed appends and concurrent writers."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from keygate.audit.chain import GENESIS_HASH, chain_hash
from keygate.audit.events import AuditEvent, canonical_bytes
from keygate.audit.store import AuditStore
from keygate.core.errors import Unavailable

RunPython = Any


def _event(n: int, **kw: object) -> AuditEvent:
    fields: dict[str, object] = {
        "action": "crypto.encrypt",
        "outcome": "ok",
        "actor": "app",
        "request_id": f"r{n}",
        "tenant": "131016",
        "detail": {"n": n, "名前": "千代田区"},
        "ts": datetime(2026, 11, 22, 9, 14, n % 60, 123456, tzinfo=UTC),
    }
    fields.update(kw)
    return AuditEvent(**fields)  # type: ignore[arg-type]


def _rows(store: AuditStore) -> list[sa.Row[tuple[int, str, str]]]:
    with store._engine.connect() as conn:
        return list(
            conn.execute(sa.text("SELECT seq, prev_hash, hash FROM kg_audit_events ORDER BY seq"))
        )


def _check_chain(store: AuditStore) -> int:
    prev, n = GENESIS_HASH, 0
    for n, item in enumerate(store.chained(), start=1):
        assert item.seq == n
        assert item.prev_hash == prev
        assert item.hash == chain_hash(prev, item.event, item.seq)
        prev = item.hash
    return n


def test_hash_formula_is_pinned() -> None:
    """The event hash is SHA-256 over the domain tag, prev hash, canonical bytes and u64be seq."""
    event = _event(1, event_id="e" * 32)
    expected = hashlib.sha256(
        b"keygate-audit-v1\x00" + bytes(32) + canonical_bytes(event) + (1).to_bytes(8, "big")
    ).hexdigest()
    assert chain_hash(GENESIS_HASH, event, 1) == expected
    assert chain_hash(GENESIS_HASH, event, 2) != expected


def test_appends_are_chained(audit_store: AuditStore) -> None:
    """Every appended event gets seq n, the previous hash and its own recomputable hash."""
    audit_store.append([_event(1)])
    head = audit_store.append([_event(i) for i in range(2, 6)])
    rows = _rows(audit_store)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == GENESIS_HASH
    assert all(rows[i].prev_hash == rows[i - 1].hash for i in range(1, 5))
    assert head == (5, rows[-1].hash)
    assert audit_store.head() == head
    assert _check_chain(audit_store) == 5


def test_failed_append_leaves_no_gap(audit_store: AuditStore) -> None:
    """A rolled-back append (duplicate event id) consumes no seq: the next append follows on."""
    first = _event(1)
    audit_store.append([first])
    with pytest.raises(Unavailable):
        audit_store.append([_event(2), first])  # the duplicate event_id aborts the batch
    audit_store.append([_event(3)])
    assert [r.seq for r in _rows(audit_store)] == [1, 2]
    assert _check_chain(audit_store) == 2


def test_unreadable_previous_hash_fails_closed(audit_store: AuditStore) -> None:
    """If the last row's hash is missing or invalid, the chain cannot be extended: Unavailable."""
    audit_store.append([_event(1)])
    with audit_store._engine.begin() as conn:
        conn.execute(sa.text("UPDATE kg_audit_events SET hash = 'not-a-hash'"))
    with pytest.raises(Unavailable):
        audit_store.append([_event(2)])
    assert audit_store.count() == 1


def test_legacy_rows_are_chained_by_create_schema(audit_store: AuditStore) -> None:
    """Rows written before the chain existed (NULL hashes) are chained, in seq order, by
    create_schema, and appends continue the chain."""
    audit_store.append([_event(i) for i in range(1, 4)])
    with audit_store._engine.begin() as conn:
        conn.execute(sa.text("UPDATE kg_audit_events SET prev_hash = NULL, hash = NULL"))
    audit_store.create_schema()
    audit_store.append([_event(4)])
    assert _check_chain(audit_store) == 4


WRITER = """
import sys
from datetime import UTC, datetime
from keygate.audit.events import AuditEvent
from keygate.audit.store import AuditStore

url, name = sys.argv[1], sys.argv[2]
store = AuditStore(url)
for b in range(15):
    store.append([
        AuditEvent(action="crypto.decrypt", outcome="ok", actor=name, request_id=f"{name}-{b}-{i}")
        for i in range(3)
    ])
store.close()
"""


@pytest.mark.slow
def test_concurrent_processes_produce_one_chain(
    audit_store: AuditStore, db_url: str, spawn_python: RunPython
) -> None:
    """Four processes appending to one database at once produce one gap-free, duplicate-free
    chain in seq order, with every batch whole."""
    procs = [spawn_python(WRITER, db_url, f"w{n}") for n in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert _check_chain(audit_store) == 4 * 15 * 3
    events = [item.event for item in audit_store.chained()]
    assert len({e.event_id for e in events}) == len(events)
    for start in range(0, len(events), 3):
        assert len({e.request_id.rsplit("-", 1)[0] for e in events[start : start + 3]}) == 1
