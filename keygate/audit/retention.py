"""Retention: the trail in segments, old segments archived to verifiable files and pruned.

Segments
    A *segment* is the run of events between two signed checkpoints that closes a calendar
    period (a UTC month by default, or a day): segment *P* ends at the last checkpoint signed
    in period *P* and starts right after the segment before it.  Segment boundaries are always
    signed checkpoints, so every segment verifies on its own.  A segment is *closed* once a
    checkpoint of a later period exists; the newest one (up to the chain head) is *open* and
    is never archived or pruned.

Archive
    :func:`archive_segments` writes each closed segment as a JSON Lines export
    (``keygate-audit-export/1``, header ``"segment": {…}``): its events, every checkpoint in it
    and, unless it starts at seq 1, the closing checkpoint of the segment before as its signed
    anchor.  The file is verified as written, then renamed into place; its SHA-256 goes to
    ``kg_audit_segments`` and into an ``audit.archived`` record in the trail.

Prune
    :func:`prune_segments` deletes the closed segments that are older than the retention
    (``audit_retention_days``, at least :data:`MIN_RETENTION_DAYS`), oldest first.  Each must
    have an archive that still exists, matches its recorded digest and verifies — unless
    ``force``, which deletes without one.  In one short transaction under the append lock the
    checkpoints before the last pruned segment's closing checkpoint are deleted (that one is
    kept: it anchors the first remaining event), the segments are marked pruned (their events
    are out of the trail from then on) and one ``audit.pruned`` record per segment is appended,
    naming what went: ``from_seq``, ``to_seq``, ``events``, ``last_hash`` (= the anchor's
    signed hash), ``period``, ``archive_file``, ``archive_sha256`` (None when forced) and
    ``forced``.  The rows are then deleted in batches, each its own transaction, so that
    gateways appending meanwhile never wait long (an interrupted deletion is finished by the
    next prune), and the new head is signed.

A later export of the whole trail starts at that anchor, and :mod:`keygate.audit.verify`
accepts it only if it contains the pruning record naming the anchor; the archives and the
export verify together, oldest first, as one chain (:func:`~keygate.audit.verify.verify_exports`).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from keygate.audit.events import AuditEvent
from keygate.audit.export import export_segment
from keygate.audit.store import AuditStore, Checkpoint, SegmentRecord
from keygate.audit.verify import PRUNE_ACTION, verify_export
from keygate.core.errors import ConfigurationError, InvalidRequest, ValidationFailed

__all__ = [
    "ARCHIVE_ACTION",
    "MIN_RETENTION_DAYS",
    "PERIODS",
    "PRUNE_ACTION",
    "PruneResult",
    "Segment",
    "archive_segments",
    "check_retention_days",
    "list_segments",
    "plan_prune",
    "prune_segments",
]

#: the shortest retention a prune accepts (days); 0 in the settings means "keep everything"
MIN_RETENTION_DAYS: Final = 365
#: segment periods and the length of the RFC 3339 prefix that names one
PERIODS: Final = {"month": 7, "day": 10}
ARCHIVE_ACTION: Final = "audit.archived"

CheckpointNow = Callable[[], Checkpoint | None]


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of events ``from_seq..to_seq``; closed segments end at a signed checkpoint."""

    period: str
    from_seq: int
    to_seq: int
    #: events stored in the range (``to_seq - from_seq + 1`` unless rows went missing)
    events: int
    first_ts: datetime | None
    last_ts: datetime | None
    closed: bool
    #: the closing checkpoint's timestamp and signed hash (closed segments only)
    end_ts: str | None = None
    last_hash: str | None = None
    #: its archive, if it was archived
    archive: SegmentRecord | None = None

    @property
    def archive_name(self) -> str:
        return f"keygate-audit-{self.period}-{self.from_seq:012d}-{self.to_seq:012d}.jsonl"

    def record(self, **changes: object) -> SegmentRecord:
        if self.last_hash is None:
            raise ValueError("an open segment has no record")
        fields: dict[str, object] = {
            "from_seq": self.from_seq,
            "to_seq": self.to_seq,
            "period": self.period,
            "events": self.events,
            "last_hash": self.last_hash,
        }
        if self.archive is not None:
            fields.update(
                archive_file=self.archive.archive_file,
                archive_sha256=self.archive.archive_sha256,
                archived_at=self.archive.archived_at,
            )
        fields.update(changes)
        return SegmentRecord(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class PruneResult:
    segments: tuple[Segment, ...]
    events: int
    #: the pruning records (appended unless it was a dry run)
    records: tuple[AuditEvent, ...]
    #: the chain head after the prune (None for a dry run or nothing to prune)
    head: tuple[int, str] | None
    #: the segments pruned without a valid archive (``force``)
    forced: tuple[Segment, ...] = ()


def _width(period: str) -> int:
    try:
        return PERIODS[period]
    except KeyError:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}") from None


def list_segments(store: AuditStore, *, period: str = "month") -> list[Segment]:
    """The stored trail as segments, oldest first; the last one is open (not yet closed)."""
    width = _width(period)
    first = store.first_seq()
    if first is None:
        return []
    head_seq, _ = store.head()
    records = {r.to_seq: r for r in store.segment_records()}
    bounds: list[tuple[str, int, str]] = []
    for name, seq, ts in store.checkpoint_periods(width):
        # Periods only move forward; a checkpoint from a clock running behind joins the next
        # segment rather than reopening an earlier one.
        if not bounds or name > bounds[-1][0]:
            bounds.append((name, seq, ts))
    segments: list[Segment] = []
    start = first
    for name, seq, ts in bounds[:-1]:  # the newest period may still grow: open
        if seq < start:
            continue  # pruned already (the kept anchor)
        cp = store.checkpoint_at(seq)
        count, low, high = store.seq_stats(start, seq)
        segments.append(
            Segment(
                name, start, seq, count, low, high, True, ts,
                cp.hash if cp is not None else None, records.get(seq),
            )
        )  # fmt: skip
        start = seq + 1
    if start <= head_seq:
        count, low, high = store.seq_stats(start, head_seq)
        name = bounds[-1][0] if bounds else "-"
        segments.append(Segment(name, start, head_seq, count, low, high, False))
    return segments


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_archive(seg: Segment, path: Path, public_key_pem: bytes) -> str:
    """Raise unless ``path`` is a verifying archive of exactly ``seg``; its SHA-256."""
    with path.open(encoding="utf-8", newline="") as lines:
        result = verify_export(lines, public_key_pem)
    if not result.ok:
        raise ValidationFailed(
            f"archive {path.name} does not verify: line {result.line} (seq {result.seq}): "
            f"{result.reason}"
        )
    if (result.first_seq, result.last_seq, result.segment) != (
        seg.from_seq,
        seg.to_seq,
        seg.period,
    ):
        raise ValidationFailed(
            f"archive {path.name} holds seq {result.first_seq}..{result.last_seq} "
            f"({result.segment}), not the segment {seg.period} seq {seg.from_seq}..{seg.to_seq}"
        )
    return _sha256(path)


def _archive_ok(seg: Segment, directory: Path, public_key_pem: bytes) -> str | None:
    """Why the segment's archive is not usable, or None if it is."""
    rec = seg.archive
    if rec is None or not rec.archive_file or not rec.archive_sha256:
        return "not archived"
    path = directory / rec.archive_file
    if not path.is_file():
        return f"archive {rec.archive_file} is missing from {directory}"
    try:
        digest = _check_archive(seg, path, public_key_pem)
    except ValidationFailed as exc:
        return exc.detail
    if digest != rec.archive_sha256:
        return f"archive {rec.archive_file} changed since it was written (SHA-256 differs)"
    return None


def archive_segments(
    store: AuditStore,
    directory: Path,
    *,
    public_key_pem: bytes,
    key_id: str,
    actor: str,
    checkpoint_now: CheckpointNow,
    period: str = "month",
    now: datetime | None = None,
) -> list[SegmentRecord]:
    """Archive every closed segment without a usable archive; returns the new archives.

    Each file is written beside its final name, flushed, verified with ``public_key_pem``, then
    renamed into place; an ``audit.archived`` record per file is appended and the head signed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    when = now or datetime.now(UTC)
    done: list[SegmentRecord] = []
    records: list[AuditEvent] = []
    for seg in list_segments(store, period=period):
        if not seg.closed or _archive_ok(seg, directory, public_key_pem) is None:
            continue
        final = directory / seg.archive_name
        partial = directory / (seg.archive_name + ".partial")
        with partial.open("wb") as out:
            export_segment(
                store, out, from_seq=seg.from_seq, to_seq=seg.to_seq, period=seg.period,
                key_id=key_id, now=when,
            )  # fmt: skip
            out.flush()
            os.fsync(out.fileno())
        try:
            digest = _check_archive(seg, partial, public_key_pem)
        except ValidationFailed:
            partial.unlink()
            raise
        partial.chmod(0o640)
        partial.replace(final)
        _fsync_dir(directory)
        rec = seg.record(archive_file=final.name, archive_sha256=digest, archived_at=when)
        store.record_archive(rec)
        done.append(rec)
        records.append(
            AuditEvent(
                action=ARCHIVE_ACTION,
                outcome="ok",
                actor=actor,
                request_id=uuid.uuid4().hex,
                detail={
                    "period": seg.period,
                    "from_seq": seg.from_seq,
                    "to_seq": seg.to_seq,
                    "events": seg.events,
                    "last_hash": rec.last_hash,
                    "archive_file": final.name,
                    "archive_sha256": digest,
                },
                ts=when,
            )
        )
    if records:
        store.append(records)
        checkpoint_now()
    return done


def check_retention_days(days: int, *, minimum_days: int = MIN_RETENTION_DAYS) -> None:
    """Raise :class:`ConfigurationError` unless ``days`` is a retention a prune may use."""
    if days <= 0:
        raise ConfigurationError(
            "no audit retention is configured (KEYGATE_AUDIT_RETENTION_DAYS = 0 keeps "
            f"everything); set it to at least {minimum_days} days to prune"
        )
    if days < minimum_days:
        raise ConfigurationError(
            f"audit retention of {days} days is below the minimum of {minimum_days} days"
        )


def plan_prune(
    segments: Sequence[Segment],
    *,
    retention_days: int,
    now: datetime,
    minimum_days: int = MIN_RETENTION_DAYS,
) -> list[Segment]:
    """The oldest closed segments whose every event and closing checkpoint are older than the
    retention (a prefix of ``segments``: pruning never leaves a hole)."""
    check_retention_days(retention_days, minimum_days=minimum_days)
    cutoff = now - timedelta(days=retention_days)
    expired: list[Segment] = []
    for seg in segments:
        if not seg.closed or seg.end_ts is None or seg.last_hash is None:
            break
        end = datetime.fromisoformat(seg.end_ts)
        if end >= cutoff or (seg.last_ts is not None and seg.last_ts >= cutoff):
            break
        expired.append(seg)
    return expired


def prune_segments(
    store: AuditStore,
    directory: Path,
    *,
    retention_days: int,
    public_key_pem: bytes,
    actor: str,
    checkpoint_now: CheckpointNow,
    period: str = "month",
    force: bool = False,
    dry_run: bool = False,
    now: datetime | None = None,
    minimum_days: int = MIN_RETENTION_DAYS,
) -> PruneResult:
    """Delete the expired segments (see :func:`plan_prune`), each archived first unless
    ``force``; append one pruning record per segment in the same transaction; sign the head.

    Raises :class:`InvalidRequest` (nothing deleted) when a segment to prune has no usable
    archive and ``force`` is not given.
    """
    when = now or datetime.now(UTC)
    check_retention_days(retention_days, minimum_days=minimum_days)
    leftover = 0 if dry_run else store.finish_pruning()  # a prune interrupted while deleting
    expired = plan_prune(
        list_segments(store, period=period),
        retention_days=retention_days,
        now=when,
        minimum_days=minimum_days,
    )
    if not expired:
        return PruneResult((), leftover, (), None)
    problems = [(seg, _archive_ok(seg, directory, public_key_pem)) for seg in expired]
    missing = [(seg, why) for seg, why in problems if why is not None]
    if missing and not force:
        listed = "; ".join(
            f"{seg.period} (seq {seg.from_seq}..{seg.to_seq}): {why}" for seg, why in missing
        )
        raise InvalidRequest(
            f"not pruned: {listed}.  Run `keygate audit segments archive` first, or give "
            "--force to delete without a verifiable archive"
        )
    forced = {seg.to_seq for seg, _ in missing}
    request_id = uuid.uuid4().hex
    records = tuple(
        AuditEvent(
            action=PRUNE_ACTION,
            outcome="ok",
            actor=actor,
            request_id=request_id,
            detail={
                "period": seg.period,
                "from_seq": seg.from_seq,
                "to_seq": seg.to_seq,
                "events": seg.events,
                "last_hash": seg.last_hash,
                "archive_file": None
                if seg.to_seq in forced or seg.archive is None
                else seg.archive.archive_file,
                "archive_sha256": None
                if seg.to_seq in forced or seg.archive is None
                else seg.archive.archive_sha256,
                "forced": seg.to_seq in forced,
                "retention_days": retention_days,
            },
            ts=when,
        )
        for seg in expired
    )
    forced_segments = tuple(seg for seg in expired if seg.to_seq in forced)
    if dry_run:
        return PruneResult(tuple(expired), 0, records, None, forced_segments)
    deleted, head = store.prune(
        from_seq=expired[0].from_seq,
        through_seq=expired[-1].to_seq,
        records=records,
        segments=[seg.record() for seg in expired],
        now=when,
    )
    checkpoint_now()
    return PruneResult(tuple(expired), leftover + deleted, records, head, forced_segments)
