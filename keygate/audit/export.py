"""Export the audit trail as JSON Lines (verifiable), CSV (for Excel) or OCSF API Activity.

JSON Lines (``keygate-audit-export/1``), one object per line:

``{"type":"header", ...}``
    line 1: format, export time, filters, ``from_seq``/``to_seq``, signing ``key_id``.
``{"type":"checkpoint","seq","hash","prev_seq","ts","key_id","signature"}``
    a signed chain head, right after the event it covers; a range export that does not start at
    seq 1 opens with the checkpoint just before its first event (the *anchor*), so its first
    ``prev_hash`` is signed too.
``{"type":"event","seq","prev_hash","hash","event":{…canonical fields…}}``
    an event: ``event`` is exactly :func:`~keygate.audit.events.canonical_bytes` parsed.  An
    event that commits to a set of record refs (``detail.record_refs_digest``) also carries
    ``"record_refs":[…]``: the pseudonyms stored for it (sorted, 64 hex digits each), so that the
    verifier can recompute the digest; the refs of a 1000-record batch are all there.
``{"type":"event","seq","prev_hash","hash","omitted":true}``
    a *stub*: an event in the exported seq range that the filters (``--tenant``, ``--since``,
    ``--until``) leave out.  Its hash keeps the chain verifiable without revealing it.

Every export first signs the current head (an on-demand checkpoint) and ends at a checkpoint,
so an untouched export has no unsigned tail.  Once the oldest segments were pruned
(:mod:`keygate.audit.retention`), an export of the whole trail opens with the checkpoint kept at
the prune as its anchor (the trail's pruning record names it); :func:`export_segment` writes one
segment's archive (header ``"segment"``).  CSV and OCSF carry the chain fields (``seq``,
``prev_hash``, ``hash``) and, in ``detail``, ``record_refs_count`` / ``record_refs_digest`` but
not the refs themselves; only the JSON Lines export can be verified.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Final

from keygate.audit.events import canonical_bytes, format_timestamp
from keygate.audit.store import AuditStore, ChainedEvent, Checkpoint

__all__ = ["EXPORT_FORMAT", "FORMATS", "ExportSummary", "export_segment", "export_trail"]

EXPORT_FORMAT: Final = "keygate-audit-export/1"
#: actions of the trail's own records (retention), kept in tenant-filtered exports
_TRAIL_PREFIX: Final = "audit."
FORMATS: Final = ("jsonl", "csv", "ocsf")

CSV_COLUMNS: Final = (
    "type", "seq", "ts", "action", "outcome", "actor", "tenant", "purpose", "record_type",
    "key_version", "code", "items", "items_failed", "request_id", "event_id", "detail",
    "prev_hash", "hash", "prev_seq", "key_id", "signature",
)  # fmt: skip
#: cells Excel would evaluate as a formula (CSV injection) get a leading apostrophe
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")

#: OCSF 1.x API Activity (class 6003) activity ids: 1 Create, 2 Read, 3 Update, 4 Delete, 99 Other
_OCSF_ACTIVITY: Final = {
    "encrypt": (1, "Create"),
    "added": (1, "Create"),
    "created": (1, "Create"),
    "rotated": (1, "Create"),
    "decrypt": (2, "Read"),
    "rewrap": (3, "Update"),
    "enabled": (3, "Update"),
    "disabled": (3, "Update"),
    "revoked": (4, "Delete"),
    "destroyed": (4, "Delete"),
}
OCSF_VERSION: Final = "1.1.0"


@dataclass(frozen=True, slots=True)
class ExportSummary:
    events: int
    omitted: int
    checkpoints: int
    from_seq: int
    to_seq: int


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _plan(
    store: AuditStore,
    head: Checkpoint,
    since: datetime | None,
    until: datetime | None,
) -> tuple[int, int, Checkpoint | None]:
    """``(from_seq, to_seq, anchor)``: the seq range to write and the checkpoint before it."""
    if since is None and until is None:
        # The whole trail: from seq 1, or, once the oldest segments were pruned, from the first
        # stored event, anchored by the checkpoint kept at the prune (the pruning record in the
        # trail names it; the verifier checks that).  No checkpoint there: no anchor, and the
        # verifier reports the removed events.
        first = store.first_seq() or 1
        anchor = store.checkpoint_at(first - 1) if first > 1 else None
        return first, head.seq, anchor
    found = store.seq_range(since=since, until=until)
    if found is None:
        return 1, 0, None
    low, high = found[0], min(found[1], head.seq)
    # End at the first checkpoint at or after the last selected event (the head at the latest)
    after = store.checkpoints(from_seq=high, to_seq=head.seq)
    to_seq = after[0].seq if after else head.seq
    # Start right after the last checkpoint before the first selected event: its hash anchors us
    before = store.checkpoints(from_seq=1, to_seq=low - 1) if low > 1 else []
    anchor = before[-1] if before else None
    return (anchor.seq + 1 if anchor else 1), to_seq, anchor


def export_trail(
    store: AuditStore,
    out: IO[bytes],
    *,
    checkpoint_now: Callable[[], Checkpoint | None],
    fmt: str = "jsonl",
    since: datetime | None = None,
    until: datetime | None = None,
    tenant: str | None = None,
    key_id: str | None = None,
    now: datetime | None = None,
) -> ExportSummary:
    """Write the trail to ``out`` (binary) in ``fmt``; signs the head first."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    head = checkpoint_now()
    if head is None:  # an empty trail
        from_seq, to_seq, anchor = 1, 0, None
    else:
        from_seq, to_seq, anchor = _plan(store, head, since, until)
    checkpoints = store.checkpoints(from_seq=from_seq, to_seq=to_seq) if to_seq else []
    refs = fmt == "jsonl"  # only the JSON Lines export carries the refs themselves

    def selected(item: ChainedEvent) -> bool:
        ev = item.event
        return (
            (since is None or ev.ts >= since)
            and (until is None or ev.ts < until)
            # the trail's own records (audit.pruned, audit.archived) name no tenant and are
            # kept in tenant exports, so that their verification can see what was pruned
            and (tenant is None or ev.tenant == tenant or ev.action.startswith(_TRAIL_PREFIX))
        )

    def lines() -> Iterator[tuple[str, Any]]:
        cps = iter(checkpoints)
        pending = next(cps, None)
        if anchor is not None:
            yield "checkpoint", anchor
        if to_seq:
            for item in store.chained(from_seq=from_seq, to_seq=to_seq, with_refs=refs):
                yield ("event" if selected(item) else "omitted"), item
                while pending is not None and pending.seq <= item.seq:
                    yield "checkpoint", pending
                    pending = next(cps, None)

    header = {
        "type": "header",
        "format": EXPORT_FORMAT,
        "exported_at": format_timestamp(now or datetime.now(UTC)),
        "filters": {
            "since": format_timestamp(since) if since else None,
            "until": format_timestamp(until) if until else None,
            "tenant": tenant,
        },
        "from_seq": from_seq,
        "to_seq": to_seq,
        "key_id": key_id,
    }
    return _write(out, fmt, header, lines(), from_seq, to_seq)


def export_segment(
    store: AuditStore,
    out: IO[bytes],
    *,
    from_seq: int,
    to_seq: int,
    period: str,
    key_id: str | None = None,
    now: datetime | None = None,
) -> ExportSummary:
    """Write the events ``from_seq..to_seq`` as a JSON Lines archive of one segment.

    ``to_seq`` must be a checkpoint (the segment's closing one); unless ``from_seq`` is 1 the
    file opens with the checkpoint at ``from_seq - 1`` as its anchor, so it verifies on its own
    and chains to the segments before and after it.  The header names the segment
    (``"segment": {"period", "from_seq", "to_seq"}``).
    """
    anchor = store.checkpoint_at(from_seq - 1) if from_seq > 1 else None
    if from_seq > 1 and anchor is None:
        raise ValueError(f"no checkpoint at seq {from_seq - 1} anchors the segment")
    if store.checkpoint_at(to_seq) is None:
        raise ValueError(f"no checkpoint at seq {to_seq} closes the segment")
    checkpoints = store.checkpoints(from_seq=from_seq, to_seq=to_seq)

    def lines() -> Iterator[tuple[str, Any]]:
        cps = iter(checkpoints)
        pending = next(cps, None)
        if anchor is not None:
            yield "checkpoint", anchor
        for item in store.chained(from_seq=from_seq, to_seq=to_seq, with_refs=True):
            yield "event", item
            while pending is not None and pending.seq <= item.seq:
                yield "checkpoint", pending
                pending = next(cps, None)

    header = {
        "type": "header",
        "format": EXPORT_FORMAT,
        "exported_at": format_timestamp(now or datetime.now(UTC)),
        "filters": {"since": None, "until": None, "tenant": None},
        "from_seq": from_seq,
        "to_seq": to_seq,
        "key_id": key_id,
        "segment": {"period": period, "from_seq": from_seq, "to_seq": to_seq},
    }
    return _write(out, "jsonl", header, lines(), from_seq, to_seq)


def _write(
    out: IO[bytes],
    fmt: str,
    header: dict[str, Any],
    items: Iterator[tuple[str, Any]],
    from_seq: int,
    to_seq: int,
) -> ExportSummary:
    counts = {"event": 0, "omitted": 0, "checkpoint": 0}
    if fmt == "jsonl":
        out.write((_dumps(header) + "\n").encode("utf-8"))
        for kind, obj in items:
            counts[kind] += 1
            out.write((_dumps(_jsonl(kind, obj)) + "\n").encode("utf-8"))
    elif fmt == "csv":
        text = io.TextIOWrapper(out, encoding="utf-8-sig", newline="", write_through=True)
        writer = csv.writer(text, lineterminator="\r\n")
        writer.writerow(CSV_COLUMNS)
        for kind, obj in items:
            counts[kind] += 1
            writer.writerow([_cell(v) for v in _csv_row(kind, obj)])
        text.flush()
        text.detach()
    else:
        for kind, obj in items:
            counts[kind] += 1
            if kind == "event":
                out.write((_dumps(_ocsf(obj)) + "\n").encode("utf-8"))
    return ExportSummary(counts["event"], counts["omitted"], counts["checkpoint"], from_seq, to_seq)


def _checkpoint_obj(cp: Checkpoint) -> dict[str, Any]:
    return {
        "type": "checkpoint",
        "seq": cp.seq,
        "hash": cp.hash,
        "prev_seq": cp.prev_seq,
        "ts": cp.ts,
        "key_id": cp.key_id,
        "signature": cp.signature,
    }


def _jsonl(kind: str, obj: Any) -> dict[str, Any]:
    if kind == "checkpoint":
        return _checkpoint_obj(obj)
    base = {"type": "event", "seq": obj.seq, "prev_hash": obj.prev_hash, "hash": obj.hash}
    if kind == "omitted":
        return {**base, "omitted": True}
    line = {**base, "event": json.loads(canonical_bytes(obj.event))}
    if obj.record_refs is not None:
        line["record_refs"] = list(obj.record_refs)
    return line


def _cell(value: object) -> object:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv_row(kind: str, obj: Any) -> list[object]:
    row: dict[str, object] = dict.fromkeys(CSV_COLUMNS, "")
    if kind == "checkpoint":
        cp: Checkpoint = obj
        row.update(
            type="checkpoint", seq=cp.seq, ts=cp.ts, hash=cp.hash, prev_seq=cp.prev_seq,
            key_id=cp.key_id, signature=cp.signature,
        )  # fmt: skip
    else:
        item: ChainedEvent = obj
        row.update(type=kind, seq=item.seq, prev_hash=item.prev_hash, hash=item.hash)
        if kind == "event":
            ev = item.event
            row.update(
                ts=format_timestamp(ev.ts), action=ev.action, outcome=ev.outcome, actor=ev.actor,
                tenant=ev.tenant or "", purpose=ev.purpose or "",
                record_type=ev.record_type or "",
                key_version="" if ev.key_version is None else ev.key_version,
                code=ev.code or "", items=ev.items, items_failed=ev.items_failed,
                request_id=ev.request_id, event_id=ev.event_id,
                detail=_dumps(dict(ev.detail)) if ev.detail else "",
            )  # fmt: skip
    return [row[c] for c in CSV_COLUMNS]


def _ocsf(item: ChainedEvent) -> dict[str, Any]:
    """One event as OCSF 1.x API Activity (class 6003); chain fields kept in ``unmapped``."""
    ev = item.event
    verb = ev.action.rsplit(".", 1)[-1]
    activity_id, activity_name = _OCSF_ACTIVITY.get(verb, (99, "Other"))
    ok = ev.outcome == "ok"
    resource: dict[str, Any] = {"type": ev.action.split(".", 1)[0]}
    if ev.tenant is not None:
        ref = "/".join(
            str(p)
            for p in (ev.tenant, ev.purpose, f"v{ev.key_version}" if ev.key_version else None)
            if p
        )
        resource["uid"] = ref
        resource["group"] = {"name": ev.tenant}
    obj: dict[str, Any] = {
        "class_uid": 6003,
        "class_name": "API Activity",
        "category_uid": 6,
        "category_name": "Application Activity",
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": 6003 * 100 + activity_id,
        "time": int(ev.ts.timestamp() * 1000),
        "severity_id": 1 if ok else 3,
        "severity": "Informational" if ok else "Medium",
        "status_id": 1 if ok else 2,
        "status": "Success" if ok else "Failure",
        "actor": {"user": {"name": ev.actor, "type": "User"}},
        "api": {
            "operation": ev.action,
            "service": {"name": "keygate"},
            "request": {"uid": ev.request_id},
        },
        "resources": [resource],
        "metadata": {
            "version": OCSF_VERSION,
            "uid": ev.event_id,
            "correlation_uid": ev.request_id,
            "sequence": item.seq,
            "log_name": "kg_audit_events",
            "product": {"name": "keygate", "vendor_name": "keygate"},
        },
        "unmapped": {
            "seq": item.seq,
            "prev_hash": item.prev_hash,
            "hash": item.hash,
            "outcome": ev.outcome,
            "tenant": ev.tenant,
            "purpose": ev.purpose,
            "record_type": ev.record_type,
            "key_version": ev.key_version,
            "items": ev.items,
            "items_failed": ev.items_failed,
            "detail": dict(ev.detail),
        },
    }
    if not ok:
        obj["status_code"] = ev.code
        obj["status_detail"] = ev.outcome
    return obj
