"""Retention: segments, verifiable archives, pruning with a pruning record, and tampering.

Runs on SQLite and PostgreSQL (the ``audit_store`` fixture), with a software ECDSA P-256 signer
standing in for the HSM (the signatures are the same: DER ECDSA-SHA256 over the checkpoint
message); the CLI test at the end uses the real SoftHSM key through ``keygate``.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keygate.audit.chain import checkpoint_message, key_id
from keygate.audit.events import AuditEvent
from keygate.audit.export import export_trail
from keygate.audit.retention import (
    MIN_RETENTION_DAYS,
    archive_segments,
    list_segments,
    plan_prune,
    prune_segments,
)
from keygate.audit.store import AuditStore
from keygate.audit.verify import VerifyResult, verify_export, verify_exports
from keygate.config import load_settings
from keygate.core.errors import ConfigurationError, InvalidRequest

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
OLD_MONTHS = [(2024, m) for m in range(1, 6)]  # five closed, expired segments
RETENTION = 400


class Signer:
    """A software stand-in for the HSM checkpoint key (same signature format)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.pem = self.key.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        )
        self.key_id = key_id(self.pem)

    def __call__(self, seq: int, digest: str, prev_seq: int, ts: str) -> tuple[str, str]:
        message = checkpoint_message(seq=seq, hash=digest, prev_seq=prev_seq, ts=ts)
        signature = self.key.sign(message, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode("ascii"), self.key_id


def _event(ts: datetime, n: int, **kw: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "action": "crypto.decrypt" if n % 3 else "crypto.encrypt",
        "outcome": "ok",
        "actor": f"app-{n % 2}",
        "request_id": f"r-{ts:%Y%m%d}-{n}",
        "tenant": "131016" if n % 2 else "011002",
        "purpose": "resident",
        "ts": ts,
    }
    fields.update(kw)
    return AuditEvent(**fields)


def build_trail(store: AuditStore, signer: Signer) -> None:
    """Five old months (two checkpoints each), a recent month, then the current one (open)."""
    months = [*OLD_MONTHS, (2025, 12), (2026, 1)]
    for year, month in months:
        for day, count in ((3, 4), (17, 3)):
            ts = datetime(year, month, day, 9, 0, tzinfo=UTC)
            store.append([_event(ts + timedelta(minutes=i), i) for i in range(count)])
            store.checkpoint(signer, now=ts + timedelta(hours=1))
    store.append([_event(NOW, 99)])  # an unsigned tail in the open segment


def checkpoint_now(store: AuditStore, signer: Signer) -> Any:
    return lambda: store.checkpoint(signer, now=NOW)


def export_text(store: AuditStore, signer: Signer, **kw: Any) -> str:
    buf = io.BytesIO()
    export_trail(
        store, buf, checkpoint_now=checkpoint_now(store, signer), key_id=signer.key_id, **kw
    )
    return buf.getvalue().decode("utf-8")


def verify_text(text: str, signer: Signer) -> VerifyResult:
    return verify_export(text.splitlines(keepends=True), signer.pem)


def lines_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in text.splitlines()]


def text_of(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(o, ensure_ascii=False, separators=(",", ":")) + "\n" for o in lines)


@pytest.fixture
def signer() -> Signer:
    return Signer()


@pytest.fixture
def trail(audit_store: AuditStore, signer: Signer) -> AuditStore:
    build_trail(audit_store, signer)
    return audit_store


def archive(store: AuditStore, signer: Signer, directory: Path) -> list[Any]:
    return archive_segments(
        store, directory, public_key_pem=signer.pem, key_id=signer.key_id, actor="custodian:t",
        checkpoint_now=checkpoint_now(store, signer), now=NOW,
    )  # fmt: skip


def prune(store: AuditStore, signer: Signer, directory: Path, **kw: Any) -> Any:
    return prune_segments(
        store, directory, retention_days=kw.pop("retention_days", RETENTION),
        public_key_pem=signer.pem, actor="custodian:t",
        checkpoint_now=checkpoint_now(store, signer), now=NOW, **kw,
    )  # fmt: skip


def test_segments_end_at_the_last_checkpoint_of_each_month(trail: AuditStore) -> None:
    """Segments cover the trail without gaps; closed ones end at a month's last checkpoint,
    and the last one (up to the head) is open."""
    segs = list_segments(trail)
    assert [s.period for s in segs] == [
        "2024-01", "2024-02", "2024-03", "2024-04", "2024-05", "2025-12", "2026-01",
    ]  # fmt: skip
    assert [s.closed for s in segs] == [True] * 6 + [False]
    assert segs[0].from_seq == 1
    for a, b in itertools.pairwise(segs):
        assert b.from_seq == a.to_seq + 1
    assert segs[-1].to_seq == trail.head()[0]
    for s in segs[:-1]:
        cp = trail.checkpoint_at(s.to_seq)
        assert cp is not None and cp.hash == s.last_hash and cp.ts == s.end_ts
        assert s.events == s.to_seq - s.from_seq + 1 == 7
    day_segs = list_segments(trail, period="day")
    assert len(day_segs) == 14 and day_segs[0].period == "2024-01-03"


def test_plan_prune_takes_expired_closed_segments_and_enforces_the_minimum(
    trail: AuditStore,
) -> None:
    """Only closed segments older than the retention go, oldest first; retention below the
    minimum (or none) is refused."""
    segs = list_segments(trail)
    assert [s.period for s in plan_prune(segs, retention_days=RETENTION, now=NOW)] == [
        "2024-01", "2024-02", "2024-03", "2024-04", "2024-05",
    ]  # fmt: skip
    assert plan_prune(segs, retention_days=3650, now=NOW) == []
    assert len(plan_prune(segs, retention_days=1, now=NOW, minimum_days=0)) == 6  # never the open
    with pytest.raises(ConfigurationError, match="minimum"):
        plan_prune(segs, retention_days=MIN_RETENTION_DAYS - 1, now=NOW)
    with pytest.raises(ConfigurationError, match="no audit retention"):
        plan_prune(segs, retention_days=0, now=NOW)


def test_settings_refuse_a_retention_below_one_year() -> None:
    """KEYGATE_AUDIT_RETENTION_DAYS is 0 (keep everything) or at least MIN_RETENTION_DAYS."""
    assert load_settings(audit_retention_days=0).audit_retention_days == 0
    assert load_settings(audit_retention_days=MIN_RETENTION_DAYS).audit_retention_days == 365
    with pytest.raises(ValueError, match="at least 365"):
        load_settings(audit_retention_days=30)


def test_archives_verify_alone_and_chain_together(
    trail: AuditStore, signer: Signer, tmp_path: Path
) -> None:
    """Each closed segment becomes a file that verifies on its own (anchored by the previous
    segment's closing checkpoint); together, oldest first, they verify as one chain from seq 1;
    each archive is recorded in the trail."""
    done = archive(trail, signer, tmp_path)
    assert len(done) == 6
    files = [tmp_path / str(rec.archive_file) for rec in done]
    for rec, path in zip(done, files, strict=True):
        result = verify_export(path.read_text(encoding="utf-8").splitlines(True), signer.pem)
        assert result.ok, result
        assert (result.first_seq, result.last_seq) == (rec.from_seq, rec.to_seq)
        assert result.segment == rec.period
        assert result.anchor_seq == (None if rec.from_seq == 1 else rec.from_seq - 1)
    joined = verify_exports(
        [(p.name, p.read_text(encoding="utf-8").splitlines(True)) for p in files], signer.pem
    )
    assert joined.ok and joined.first_seq == 1 and joined.files == 6
    assert joined.last_seq == done[-1].to_seq
    archived = [e for e in trail.query() if e.action == "audit.archived"]
    assert len(archived) == 6
    assert archived[0].detail["archive_sha256"] == done[0].archive_sha256
    assert archive(trail, signer, tmp_path) == []  # idempotent: valid archives are kept


def test_prune_refuses_segments_without_an_archive(
    trail: AuditStore, signer: Signer, tmp_path: Path
) -> None:
    """Without archives (or with a changed archive) nothing is deleted unless --force."""
    before = trail.count()
    with pytest.raises(InvalidRequest, match="not archived"):
        prune(trail, signer, tmp_path)
    assert trail.count() == before
    done = archive(trail, signer, tmp_path)
    victim = tmp_path / str(done[2].archive_file)
    victim.write_text(victim.read_text(encoding="utf-8").replace("app-1", "app-9"), "utf-8")
    with pytest.raises(InvalidRequest, match=r"2024-03.*does not verify"):
        prune(trail, signer, tmp_path)
    (tmp_path / str(done[1].archive_file)).unlink()
    with pytest.raises(InvalidRequest, match=r"2024-02.*missing"):
        prune(trail, signer, tmp_path)
    assert trail.count() == before + 6  # only the six audit.archived records were added


def test_prune_keeps_the_rest_verifiable_from_a_signed_anchor(
    trail: AuditStore, signer: Signer, tmp_path: Path
) -> None:
    """After a prune the whole-trail export starts after the kept checkpoint, carries the
    pruning records, and verifies; with the archives first it verifies from seq 1."""
    archives = archive(trail, signer, tmp_path)
    head_before = trail.head()[0]
    result = prune(trail, signer, tmp_path)
    assert [s.period for s in result.segments] == [f"2024-0{m}" for m in range(1, 6)]
    through = result.segments[-1].to_seq
    assert result.events == through == 35
    assert trail.first_seq() == through + 1
    assert next(c.seq for c in trail.checkpoints()) == through  # the anchor is kept
    records = [e for e in trail.query() if e.action == "audit.pruned"]
    assert len(records) == 5
    last = records[-1].detail
    assert last["to_seq"] == through and last["events"] == 7 and last["forced"] is False
    assert last["last_hash"] == result.segments[-1].last_hash
    assert last["archive_sha256"] == archives[4].archive_sha256
    assert trail.head()[0] == head_before + 5

    text = export_text(trail, signer)
    lines = lines_of(text)
    assert lines[1]["type"] == "checkpoint" and lines[1]["seq"] == through
    verified = verify_text(text, signer)
    assert verified.ok, verified
    assert verified.anchor_seq == through and verified.first_seq == through + 1
    assert [p.to_seq for p in verified.prunes][-1] == through

    files = [tmp_path / str(a.archive_file) for a in archives[:5]]
    chained = verify_exports(
        [
            *((p.name, p.read_text(encoding="utf-8").splitlines(True)) for p in files),
            ("now.jsonl", text.splitlines(True)),
        ],
        signer.pem,
    )
    assert chained.ok, chained
    assert (chained.first_seq, chained.anchor_seq, chained.files) == (1, None, 6)

    segs = list_segments(trail)
    assert segs[0].from_seq == through + 1 and segs[0].period == "2025-12"
    tenant_export = export_text(trail, signer, tenant="131016")
    assert verify_text(tenant_export, signer).ok  # pruning records are kept for tenants too
    since_export = export_text(trail, signer, since=datetime(2025, 12, 1, tzinfo=UTC))
    assert verify_text(since_export, signer).ok


def test_forced_prune_records_that_no_archive_exists(
    trail: AuditStore, signer: Signer, tmp_path: Path
) -> None:
    """--force prunes without an archive; the pruning record says so and what remains still
    verifies."""
    result = prune(trail, signer, tmp_path, force=True)
    assert len(result.forced) == 5
    record = next(e for e in trail.query() if e.action == "audit.pruned").detail
    assert record["forced"] is True and record["archive_sha256"] is None
    verified = verify_text(export_text(trail, signer), signer)
    assert verified.ok and all(p.forced for p in verified.prunes)


def test_dry_run_changes_nothing(trail: AuditStore, signer: Signer, tmp_path: Path) -> None:
    """A dry run reports the segments it would prune and deletes nothing."""
    before = (trail.count(), trail.head())
    result = prune(trail, signer, tmp_path, force=True, dry_run=True)
    assert len(result.segments) == 5 and result.head is None
    assert (trail.count(), trail.head()) == before


def test_interrupted_deletion_is_out_of_the_trail_and_finished_later(
    trail: AuditStore, signer: Signer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the prune is recorded the events are out of the trail, even while their rows still
    await deletion (deleted in batches); the next prune finishes the deletion."""
    finish = trail.finish_pruning
    monkeypatch.setattr(trail, "finish_pruning", lambda **kw: 0)  # "crashed" before deleting
    result = prune(trail, signer, tmp_path, force=True)
    through = result.segments[-1].to_seq
    assert trail.first_seq() == through + 1 and trail.pruned_through() == through
    with trail._engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT min(seq) FROM kg_audit_events")).scalar_one()
    assert stored == 1  # the rows are still there …
    assert verify_text(export_text(trail, signer), signer).ok  # … but not in the trail
    since = export_text(trail, signer, since=datetime(2024, 1, 1, tzinfo=UTC))
    assert verify_text(since, signer).ok
    assert list_segments(trail)[0].from_seq == through + 1
    monkeypatch.setattr(trail, "finish_pruning", finish)
    again = prune(trail, signer, tmp_path)
    assert again.segments == () and again.events == through
    assert trail.count() == trail.head()[0] - through
    assert finish(batch=2) == 0


def test_prune_deletes_in_batches(trail: AuditStore, signer: Signer, tmp_path: Path) -> None:
    """Small deletion batches remove exactly the pruned rows."""
    archive(trail, signer, tmp_path)
    result = prune_segments(
        trail, tmp_path, retention_days=RETENTION, public_key_pem=signer.pem,
        actor="custodian:t", checkpoint_now=checkpoint_now(trail, signer), now=NOW,
    )  # fmt: skip
    assert result.events == 35 and trail.first_seq() == 36
    with trail._engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT min(seq) FROM kg_audit_events")).scalar_one()
    assert stored == 36


def test_store_prune_refuses_an_unexpected_trail(trail: AuditStore) -> None:
    """The store prunes only from the oldest event up to a signed checkpoint before the head."""
    event = AuditEvent(action="audit.pruned", outcome="ok", actor="t", request_id="x")
    segs = list_segments(trail)
    with pytest.raises(ValueError, match="not a signed checkpoint"):
        trail.prune(from_seq=1, through_seq=segs[0].to_seq - 1, records=[event], segments=[])
    with pytest.raises(ValueError, match="oldest stored event"):
        trail.prune(from_seq=2, through_seq=segs[0].to_seq, records=[event], segments=[])
    assert trail.first_seq() == 1


# ---------------------------------------------------------------------- tampering
def _delete_rows(store: AuditStore, through: int, *, keep_checkpoint: bool = True) -> None:
    """What an operator with database access does: delete old rows, no pruning record."""
    op = "<" if keep_checkpoint else "<="
    with store._engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM kg_audit_events WHERE seq <= :s"), {"s": through})
        statement = f"DELETE FROM kg_audit_checkpoints WHERE seq {op} :s"  # noqa: S608 - fixed
        conn.execute(sa.text(statement), {"s": through})


def test_deleting_a_segment_without_pruning_record_is_caught(
    trail: AuditStore, signer: Signer
) -> None:
    """Old rows deleted in the database (the anchor checkpoint kept, so the export is signed
    at both ends) are caught: no pruning record names the anchor — at the anchor line."""
    through = list_segments(trail)[1].to_seq
    _delete_rows(trail, through)
    result = verify_text(export_text(trail, signer), signer)
    assert not result.ok
    assert (result.line, result.seq) == (2, through)
    assert "without a recorded prune" in result.reason


def test_deleting_a_segment_and_its_checkpoint_is_caught(trail: AuditStore, signer: Signer) -> None:
    """With the checkpoint gone too, the export cannot start at an anchor: caught at line 2."""
    through = list_segments(trail)[0].to_seq
    _delete_rows(trail, through, keep_checkpoint=False)
    result = verify_text(export_text(trail, signer), signer)
    assert not result.ok and (result.line, result.seq) == (2, through + 1)
    assert "events before it were removed" in result.reason


def test_deleting_more_than_the_pruning_record_names_is_caught(
    trail: AuditStore, signer: Signer, tmp_path: Path
) -> None:
    """After a real prune, deleting the next segment in the database leaves an anchor that the
    pruning record does not name."""
    prune(trail, signer, tmp_path, force=True)
    through = list_segments(trail)[0].to_seq
    _delete_rows(trail, through)
    result = verify_text(export_text(trail, signer), signer)
    assert not result.ok and (result.line, result.seq) == (2, through)
    assert "no pruning record" in result.reason


def test_forged_anchor_is_caught(trail: AuditStore, signer: Signer, tmp_path: Path) -> None:
    """An export whose anchor is altered, signed by another key, or swapped for another real
    checkpoint fails at the first bad line."""
    prune(trail, signer, tmp_path, force=True)
    lines = lines_of(export_text(trail, signer))
    anchor = lines[1]
    assert anchor["type"] == "checkpoint"

    altered = json.loads(json.dumps(lines))
    altered[1]["hash"] = lines[2]["hash"]
    result = verify_text(text_of(altered), signer)
    assert not result.ok and result.line == 2 and "signature" in result.reason

    other = Signer()
    forged = json.loads(json.dumps(lines))
    sig, _ = other(anchor["seq"], anchor["hash"], anchor["prev_seq"], anchor["ts"])
    forged[1]["signature"] = sig
    result = verify_text(text_of(forged), signer)
    assert not result.ok and result.line == 2

    later = next(o for o in lines[3:] if o["type"] == "checkpoint")
    swapped = json.loads(json.dumps(lines))
    swapped[1] = later
    result = verify_text(text_of(swapped), signer)
    assert not result.ok and result.line == 3 and "expected seq" in result.reason


def test_reordered_or_missing_segments_are_caught(
    trail: AuditStore, signer: Signer, tmp_path: Path
) -> None:
    """Archives given out of order, with one missing, or with two events swapped inside, fail
    naming the file, line and seq."""
    files = [tmp_path / str(r.archive_file) for r in archive(trail, signer, tmp_path)]

    def read(p: Path) -> tuple[str, list[str]]:
        return p.name, p.read_text(encoding="utf-8").splitlines(True)

    swapped = verify_exports([read(files[1]), read(files[0]), read(files[2])], signer.pem)
    assert not swapped.ok and swapped.file == files[0].name
    assert (swapped.line, swapped.seq) == (2, 1) and "out of order" in swapped.reason

    gap = verify_exports([read(files[0]), read(files[2])], signer.pem)
    assert not gap.ok and gap.file == files[2].name and "missing" in gap.reason
    assert gap.line == 2 and gap.seq == list_segments(trail)[1].to_seq

    lines = lines_of(files[3].read_text(encoding="utf-8"))
    events = [i for i, o in enumerate(lines) if o["type"] == "event"]
    i, j = events[1], events[2]
    lines[i], lines[j] = lines[j], lines[i]
    inner = verify_exports(
        [read(files[2]), ("seg4.jsonl", text_of(lines).splitlines(True))], signer.pem
    )
    assert not inner.ok and inner.file == "seg4.jsonl"
    assert inner.line == i + 1 and "expected seq" in inner.reason
