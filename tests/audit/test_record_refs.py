"""Record refs: every record an event touches is indexed, committed to by the chain, exported,
checked by ``verify`` and ``who-touched``, and pruned with its event.

Runs on SQLite and PostgreSQL (the ``audit_store`` fixture), with a software checkpoint signer;
``test_record_refs_api.py`` does the same through the HTTP API, the real HSM key and the CLI.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from audit_support import Signer  # type: ignore[import-not-found]

import keygate.audit.store as store_module
from keygate.audit.events import AuditEvent, canonical_bytes
from keygate.audit.export import export_trail
from keygate.audit.lookup import search_exports, who_touched
from keygate.audit.pseudonym import (
    RECORD_REFS_DOMAIN,
    record_refs_detail,
    record_refs_digest,
    record_refs_problem,
)
from keygate.audit.retention import archive_segments, prune_segments
from keygate.audit.store import AuditStore
from keygate.audit.verify import verify_export
from keygate.core.errors import Unavailable

TENANT = "131016"
TS = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


def ref(*parts: object) -> str:
    """A made-up pseudonym (64 hex digits)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def refs_event(refs: list[str], n: int = 0, *, ts: datetime = TS, **kw: Any) -> AuditEvent:
    """A record batch event over the records whose pseudonyms are ``refs``."""
    detail: dict[str, Any] = dict(record_refs_detail(refs))
    if len(refs) == 1:
        detail["record_ref"] = refs[0]
    elif len(refs) <= 15:
        detail["record_refs"] = ",".join(refs)
    fields: dict[str, Any] = {
        "action": "record.encrypt",
        "outcome": "ok",
        "actor": "juki-app",
        "request_id": f"req-{n}",
        "tenant": TENANT,
        "record_type": "resident",
        "items": len(refs),
        "detail": detail,
        "record_refs": tuple(refs),
        "ts": ts,
    }
    fields.update(kw)
    return AuditEvent(**fields)


def plain_event(n: int, *, ts: datetime = TS) -> AuditEvent:
    return AuditEvent(
        action="key.rotated", outcome="ok", actor="custodian:a", request_id=f"k-{n}",
        tenant=TENANT, purpose="resident", ts=ts,
    )  # fmt: skip


BIG = [ref("big", i) for i in range(1000)]
SMALL = [ref("small", i) for i in range(12)]
ONE = [ref("one")]
MIDDLE = BIG[500]


@pytest.fixture
def signer() -> Signer:
    return Signer()


@pytest.fixture
def filled(audit_store: AuditStore) -> AuditStore:
    """seq 1 plain, seq 2 a 1000-record batch, seq 3 a batch of 12, seq 4 one record (also in
    the big batch), seq 5 plain."""
    audit_store.append([plain_event(1), refs_event(BIG, 2), refs_event(SMALL, 3)])
    audit_store.append([refs_event([MIDDLE], 4), plain_event(5)])
    return audit_store


def export_text(store: AuditStore, signer: Signer, **kw: Any) -> str:
    buf = io.BytesIO()
    export_trail(
        store, buf, checkpoint_now=lambda: store.checkpoint(signer, now=TS), key_id=signer.key_id,
        **kw,
    )  # fmt: skip
    return buf.getvalue().decode("utf-8")


def lines_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in text.splitlines()]


def text_of(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(o, ensure_ascii=False, separators=(",", ":")) + "\n" for o in lines)


def sql(store: AuditStore, statement: str, **params: object) -> None:
    with store._engine.begin() as conn:
        conn.execute(sa.text(statement), params)


def ref_rows(store: AuditStore) -> list[tuple[int, str]]:
    with store._engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT seq, ref FROM kg_audit_record_refs")).all()
    return sorted((int(s), bytes(r).hex()) for s, r in rows)


# ---------------------------------------------------------------------- the commitment
def test_digest_is_pinned_and_order_free() -> None:
    """The digest is SHA-256 of the domain tag and the refs as raw bytes, sorted; the order
    given does not matter; duplicates and malformed refs are refused."""
    refs = [ref(i) for i in range(5)]
    expected = hashlib.sha256(
        b"keygate-audit-record-refs-v1\x00" + b"".join(bytes.fromhex(r) for r in sorted(refs))
    ).hexdigest()
    assert RECORD_REFS_DOMAIN == b"keygate-audit-record-refs-v1\x00"
    assert record_refs_digest(refs) == record_refs_digest(reversed(refs)) == expected
    assert record_refs_detail([*refs, refs[0]]) == {
        "record_refs_count": 5,
        "record_refs_digest": expected,
    }
    with pytest.raises(ValueError, match="distinct"):
        record_refs_digest([refs[0], refs[0]])
    with pytest.raises(ValueError, match="hex"):
        record_refs_digest([refs[0].upper()])


def test_problems_name_what_changed() -> None:
    """A set compared with its commitment: removed, added, modified, duplicated; an event from
    before the digest is compared with its inline refs."""
    refs = [ref(i) for i in range(20)]
    detail = record_refs_detail(refs)
    assert record_refs_problem(detail, refs) is None
    assert "1 record ref(s) removed" in str(record_refs_problem(detail, refs[1:]))
    assert "1 record ref(s) added" in str(record_refs_problem(detail, [*refs, ref("x")]))
    assert "modified" in str(record_refs_problem(detail, [*refs[1:], ref("x")]))
    assert "twice" in str(record_refs_problem(detail, [*refs[1:], refs[2]]))
    legacy = {"record_refs": ",".join(refs[:3])}
    assert record_refs_problem(legacy, refs[:3]) is None
    assert "differ" in str(record_refs_problem(legacy, refs[:2]))
    assert "commits to no record refs" in str(record_refs_problem({}, refs[:1]))


def test_event_refs_must_match_its_detail_and_stay_out_of_the_encoding() -> None:
    """An event refuses refs its detail does not commit to; its refs are kept sorted, are not
    part of the canonical encoding (nor of equality), and never appear in its repr."""
    event = refs_event(list(reversed(SMALL)))
    assert event.record_refs == tuple(sorted(SMALL))
    bare = AuditEvent(**{**_fields(event), "record_refs": ()})
    assert canonical_bytes(bare) == canonical_bytes(event) and bare == event
    unlisted = AuditEvent(**{**_fields(event), "detail": {}, "record_refs": ()})
    assert SMALL[0] not in canonical_bytes(unlisted).decode()
    assert "record_refs=" not in repr(event)
    with pytest.raises(ValueError, match="record_refs_count"):
        AuditEvent(**{**_fields(event), "detail": {}})
    with pytest.raises(ValueError, match="removed"):
        AuditEvent(**{**_fields(event), "record_refs": tuple(SMALL[1:])})


def _fields(event: AuditEvent) -> dict[str, Any]:
    names = (
        "action", "outcome", "actor", "request_id", "tenant", "purpose", "record_type",
        "key_version", "code", "items", "items_failed", "detail", "event_id", "ts", "record_refs",
    )  # fmt: skip
    return {n: getattr(event, n) for n in names}


# ---------------------------------------------------------------------- the side table
def test_every_ref_is_stored_with_its_event(filled: AuditStore) -> None:
    """All 1000 refs of a large batch are stored (not just 15), with the event's seq, and the
    record in the middle of it is found by an index lookup, with the single-record event."""
    rows = ref_rows(filled)
    assert len(rows) == 1000 + 12 + 1
    assert [r for s, r in rows if s == 2] == sorted(BIG)
    assert filled.record_refs(2) == sorted(BIG) and filled.record_refs(1) == []
    found = filled.touching(MIDDLE)
    assert [(c.seq, c.event.request_id) for c in found] == [(2, "req-2"), (4, "req-4")]
    assert found[0].record_refs == tuple(sorted(BIG))
    assert filled.touching(MIDDLE, tenant="011002") == []
    touches = who_touched(filled, MIDDLE)
    assert [(t.seq, t.problem) for t in touches] == [(2, None), (4, None)]
    assert touches[0].event["detail"]["record_refs_count"] == 1000
    assert "record_refs" not in touches[0].event["detail"]  # not inline above 15 records
    assert [t.seq for t in who_touched(filled, SMALL[3])] == [3]
    assert who_touched(filled, ref("nobody")) == []
    with pytest.raises(ValueError, match="hex"):
        who_touched(filled, "R-000123")


def test_failed_append_stores_no_refs(filled: AuditStore) -> None:
    """Refs are written in the event's transaction: a batch that fails leaves none behind."""
    before = ref_rows(filled)
    duplicate = plain_event(1)
    filled.append([duplicate])
    with pytest.raises(Unavailable):
        filled.append([refs_event([ref("lost", i) for i in range(50)], 9), duplicate])
    assert ref_rows(filled) == before


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        ("UPDATE kg_audit_record_refs SET ref = :new WHERE ref = :victim", "modified"),
        ("DELETE FROM kg_audit_record_refs WHERE ref = :victim", "removed"),
        ("INSERT INTO kg_audit_record_refs (ref, seq) VALUES (:new, 2)", "added"),
        ("UPDATE kg_audit_events SET actor = 'someone' WHERE seq = 2", "hash does not match"),
    ],
    ids=["modify", "delete", "insert", "event-row"],
)
def test_who_touched_reports_refs_changed_in_the_database(
    filled: AuditStore, tamper: str, problem: str
) -> None:
    """A ref of the 1000-record event changed, deleted or added in the database (or the event
    row itself edited) is reported for that event; the untouched event still checks out."""
    victim = bytes.fromhex(BIG[7])
    sql(filled, tamper, victim=victim, new=bytes.fromhex(ref("forged")))
    touches = {t.seq: t.problem for t in who_touched(filled, MIDDLE)}
    assert problem in str(touches[2]), touches
    assert touches[4] is None


def test_who_touched_reports_a_ref_pinned_on_an_event_that_touched_no_record(
    filled: AuditStore,
) -> None:
    """A row claiming that a key rotation touched a record is reported, not trusted."""
    sql(
        filled,
        "INSERT INTO kg_audit_record_refs (ref, seq) VALUES (:r, 5)",
        r=bytes.fromhex(ONE[0]),
    )
    [touch] = who_touched(filled, ONE[0])
    assert touch.seq == 5 and "commits to no record refs" in str(touch.problem)


# ---------------------------------------------------------------------- export and verify
def test_export_carries_every_ref_and_verifies(filled: AuditStore, signer: Signer) -> None:
    """Each event that commits to refs carries them all, sorted, in its line; other events
    carry none; the export verifies and counts the refs it checked."""
    text = export_text(filled, signer)
    events = {o["seq"]: o for o in lines_of(text) if o["type"] == "event"}
    assert events[2]["record_refs"] == sorted(BIG)
    assert events[3]["record_refs"] == sorted(SMALL)
    assert events[4]["record_refs"] == [MIDDLE]
    assert "record_refs" not in events[1] and "record_refs" not in events[5]
    result = verify_export(text.splitlines(True), signer.pem)
    assert result.ok, result
    assert result.record_refs == 1013


def _change(obj: dict[str, Any]) -> None:
    obj["record_refs"][500] = ref("forged")
    obj["record_refs"].sort()


def _drop(obj: dict[str, Any]) -> None:
    del obj["record_refs"][500]


def _add(obj: dict[str, Any]) -> None:
    obj["record_refs"] = sorted([*obj["record_refs"], ref("forged")])


def _strip(obj: dict[str, Any]) -> None:
    del obj["record_refs"]


def _duplicate(obj: dict[str, Any]) -> None:
    obj["record_refs"][1] = obj["record_refs"][0]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_change, "modified"),
        (_drop, "1 record ref(s) removed"),
        (_add, "1 record ref(s) added"),
        (_strip, "lists none: they were removed"),
        (_duplicate, "twice"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_verify_catches_refs_tampered_in_an_export(
    filled: AuditStore, signer: Signer, tamper: Callable[[dict[str, Any]], None], reason: str
) -> None:
    """A ref of the 1000-record event changed, dropped or added in the export (or the list
    removed) fails verification at that event's line and seq, although the chain is intact."""
    lines = lines_of(export_text(filled, signer))
    index = next(i for i, o in enumerate(lines) if o.get("seq") == 2 and o["type"] == "event")
    tamper(lines[index])
    result = verify_export(text_of(lines).splitlines(True), signer.pem)
    assert not result.ok
    assert (result.line, result.seq) == (index + 1, 2), result
    assert reason in result.reason, result.reason


def test_verify_refuses_refs_on_an_event_that_commits_to_none(
    filled: AuditStore, signer: Signer
) -> None:
    """Refs added to an event that touched no record are reported at that line."""
    lines = lines_of(export_text(filled, signer))
    index = next(i for i, o in enumerate(lines) if o.get("seq") == 5 and o["type"] == "event")
    lines[index]["record_refs"] = [ONE[0]]
    result = verify_export(text_of(lines).splitlines(True), signer.pem)
    assert (result.ok, result.line, result.seq) == (False, index + 1, 5)
    assert "commits to none" in result.reason


def test_refs_changed_in_the_database_fail_the_export(filled: AuditStore, signer: Signer) -> None:
    """A ref changed in the side table is exported as stored, and verify names the event."""
    sql(
        filled, "UPDATE kg_audit_record_refs SET ref = :new WHERE ref = :old",
        old=bytes.fromhex(SMALL[4]), new=bytes.fromhex(ref("forged")),
    )  # fmt: skip
    lines = lines_of(export_text(filled, signer))
    result = verify_export(text_of(lines).splitlines(True), signer.pem)
    assert not result.ok and result.seq == 3 and "modified" in result.reason
    assert lines[result.line - 1]["seq"] == 3  # type: ignore[operator]


def test_refs_are_loaded_in_bounded_chunks(
    audit_store: AuditStore, db_url: str, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With small pages and small ref chunks every event still gets exactly its own refs."""
    monkeypatch.setattr(store_module, "_REFS_CHUNK", 1500)
    batches = [[ref("chunk", n, i) for i in range(300 + 400 * (n % 3))] for n in range(9)]
    audit_store.append(
        [refs_event(b, n) if n % 4 else plain_event(n) for n, b in enumerate(batches)]
    )
    small_pages = AuditStore(db_url, page_size=2)
    try:
        text = export_text(small_pages, signer)
    finally:
        small_pages.close()
    result = verify_export(text.splitlines(True), signer.pem)
    assert result.ok, result
    exported = {o["seq"]: o.get("record_refs") for o in lines_of(text) if o["type"] == "event"}
    for n, batch in enumerate(batches):
        assert exported[n + 1] == (sorted(batch) if n % 4 else None)


def test_csv_and_ocsf_carry_the_count_and_digest_only(filled: AuditStore, signer: Signer) -> None:
    """CSV and OCSF keep the commitment (in detail) but not the 1000 refs themselves."""
    for fmt in ("csv", "ocsf"):
        text = export_text(filled, signer, fmt=fmt)
        assert record_refs_digest(BIG) in text and '"record_refs_count":1000' in text.replace(
            '""', '"'
        )
        assert BIG[0] not in text


def test_search_exports_offline(filled: AuditStore, signer: Signer) -> None:
    """An export is searched by pseudonym with no database: the big batch (refs array) and the
    single-record event (inline ref) are found, and a tampered one is flagged."""
    text = export_text(filled, signer)
    touches = search_exports([("trail.jsonl", text.splitlines(True))], MIDDLE)
    assert [(t.seq, t.problem, t.file) for t in touches] == [
        (2, None, "trail.jsonl"),
        (4, None, "trail.jsonl"),
    ]
    lines = lines_of(text)
    index = next(i for i, o in enumerate(lines) if o.get("seq") == 2 and o["type"] == "event")
    _drop(lines[index])
    [first, _] = search_exports([("t", text_of(lines).splitlines(True))], MIDDLE)
    assert first.line == index + 1 and "removed" in str(first.problem)


# ---------------------------------------------------------------------- old trails
def test_events_from_before_the_side_table_are_indexed_once(
    audit_store: AuditStore, signer: Signer
) -> None:
    """A trail written before the side table existed (inline refs, no digest) is indexed when
    the table is created; its events are found, check out against their inline refs, and
    export and verify as before (no refs array)."""
    legacy = [
        AuditEvent(
            action="record.encrypt", outcome="ok", actor="app", request_id="old-1",
            tenant=TENANT, detail={"record_ref": ONE[0]}, ts=TS,
        ),
        AuditEvent(
            action="record.encrypt", outcome="ok", actor="app", request_id="old-2",
            tenant=TENANT, items=3, detail={"record_refs": ",".join([ONE[0], *SMALL[:2]])}, ts=TS,
        ),
        AuditEvent(
            action="record.encrypt", outcome="ok", actor="app", request_id="old-3",
            tenant=TENANT, items=400, ts=TS,  # a large batch: its records were never named
        ),
    ]  # fmt: skip
    audit_store.append(legacy)
    sql(audit_store, "DROP TABLE kg_audit_record_refs")
    audit_store.create_schema()
    assert ref_rows(audit_store) == sorted([(1, ONE[0]), (2, ONE[0]), (2, SMALL[0]), (2, SMALL[1])])
    assert [(t.seq, t.problem) for t in who_touched(audit_store, ONE[0])] == [(1, None), (2, None)]
    audit_store.create_schema()  # idempotent: indexed once
    assert len(ref_rows(audit_store)) == 4
    audit_store.append([refs_event(SMALL, 4)])
    text = export_text(audit_store, signer)
    assert ["record_refs" in o for o in lines_of(text) if o["type"] == "event"] == [
        False, False, False, True,
    ]  # fmt: skip
    assert verify_export(text.splitlines(True), signer.pem).ok
    sql(audit_store, "DELETE FROM kg_audit_record_refs WHERE seq = 2 AND ref = :r",
        r=bytes.fromhex(SMALL[0]))  # fmt: skip
    problems = {t.seq: t.problem for t in who_touched(audit_store, ONE[0])}
    assert problems[1] is None and "differ" in str(problems[2])


# ---------------------------------------------------------------------- retention
def test_archives_carry_the_refs_and_a_prune_deletes_them(
    audit_store: AuditStore, signer: Signer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Archived segments hold every ref of their events and verify; pruning deletes the refs
    of the pruned events (in batches, resumable) and leaves the others."""
    now = datetime(2026, 1, 15, 12, tzinfo=UTC)
    old_refs: list[str] = []
    for month in range(1, 4):  # three expired months, 2024-01..03
        ts = datetime(2024, month, 5, 9, tzinfo=UTC)
        batch = [ref("old", month, i) for i in range(700)]
        old_refs += batch
        audit_store.append([refs_event(batch, month, ts=ts), plain_event(month, ts=ts)])
        audit_store.checkpoint(signer, now=ts + timedelta(hours=1))
    recent = [ref("recent", i) for i in range(30)]
    audit_store.append([refs_event(recent, 99, ts=now)])
    audit_store.checkpoint(signer, now=now)
    checkpoint_now = lambda: audit_store.checkpoint(signer, now=now)  # noqa: E731

    done = archive_segments(
        audit_store, tmp_path, public_key_pem=signer.pem, key_id=signer.key_id,
        actor="custodian:t", checkpoint_now=checkpoint_now, now=now,
    )  # fmt: skip
    assert len(done) == 3
    for rec in done:
        text = (tmp_path / str(rec.archive_file)).read_text(encoding="utf-8")
        listed = [r for o in lines_of(text) for r in o.get("record_refs", [])]
        assert len(listed) == 700
        verified = verify_export(text.splitlines(True), signer.pem)
        assert verified.ok and verified.record_refs == 700

    finish = audit_store.finish_pruning
    monkeypatch.setattr(audit_store, "finish_pruning", lambda **kw: 0)  # "crash" before deleting
    result = prune_segments(
        audit_store, tmp_path, retention_days=400, public_key_pem=signer.pem,
        actor="custodian:t", checkpoint_now=checkpoint_now, now=now,
    )  # fmt: skip
    through = result.segments[-1].to_seq
    assert who_touched(audit_store, old_refs[0]) == []  # out of the trail already
    assert len(ref_rows(audit_store)) == 2100 + 30  # not yet deleted
    monkeypatch.undo()
    assert finish(batch=300) == through  # resumes; refs go ~300 rows (or one event) at a time
    rows = ref_rows(audit_store)
    assert sorted(r for _, r in rows) == sorted(recent)
    assert all(seq > through for seq, _ in rows)
    assert [t.problem for t in who_touched(audit_store, recent[3])] == [None]
    assert verify_export(export_text(audit_store, signer).splitlines(True), signer.pem).ok


def test_offline_who_touched_needs_no_database_or_hsm(
    filled: AuditStore, signer: Signer, tmp_path: Path
) -> None:
    """`who-touched --ref … --export … --public-key …` runs from the files alone: it imports no
    SQLAlchemy, registry or PKCS#11 code, verifies the export and lists the record's events."""
    export, pem = tmp_path / "trail.jsonl", tmp_path / "audit.pem"
    export.write_text(export_text(filled, signer), encoding="utf-8")
    pem.write_bytes(signer.pem)
    code = (
        "import sys, runpy\n"
        "sys.argv = ['keygate', 'audit', 'who-touched', '--ref', sys.argv[1], '--export',"
        " sys.argv[2], '--public-key', sys.argv[3]]\n"
        "try:\n"
        "    runpy.run_module('keygate.cli.main', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = [m for m in ('sqlalchemy', 'pkcs11', 'keygate.keys.registry', 'keygate.hsm')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYGATE_", "SOFTHSM"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env["COLUMNS"] = "200"
    done = subprocess.run(
        [sys.executable, "-c", code, MIDDLE, str(export), str(pem)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "2 event(s) in 1 file(s), verified" in done.stderr
    assert "req-2" in done.stdout and "req-4" in done.stdout
    lines = lines_of(export.read_text(encoding="utf-8"))
    index = next(i for i, o in enumerate(lines) if o.get("seq") == 2 and o["type"] == "event")
    _drop(lines[index])
    export.write_text(text_of(lines), encoding="utf-8")
    failed = subprocess.run(
        [sys.executable, "-m", "keygate.cli.main", "audit", "who-touched", "--ref", MIDDLE,
         "--export", str(export), "--public-key", str(pem)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert failed.returncode == 65, (failed.stdout, failed.stderr)
    assert f"line {index + 1} (seq 2)" in failed.stderr and "removed" in failed.stderr
    unverified = subprocess.run(
        [sys.executable, "-m", "keygate.cli.main", "audit", "who-touched", "--ref", MIDDLE,
         "--export", str(export)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert unverified.returncode == 65 and "NOT verified" in unverified.stderr
    assert "TAMPERED" in unverified.stderr and "removed" in unverified.stderr
