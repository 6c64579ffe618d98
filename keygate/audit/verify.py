"""Offline verification of a JSON Lines audit export with nothing but the public key.

Imports only the standard library, ``cryptography`` and :mod:`keygate.audit.chain` /
:mod:`keygate.audit.events` (pure): no registry, database driver or PKCS#11.

Checks, in file order, stopping at the first failure (reported with its line number and seq):

* every line is a JSON object of a known ``type``; line 1 is the header;
* events (and omitted-event stubs) have consecutive seqs, and each ``prev_hash`` is the hash of
  the line before (the genesis hash for seq 1);
* each full event's hash is recomputed from its canonical encoding;
* an event that commits to a set of record refs (``detail.record_refs_count`` and
  ``record_refs_digest``) must carry exactly that set in its ``record_refs`` array: the digest is
  recomputed, so a ref modified, removed or added is reported at that event's line (the chain
  and the signed checkpoints cover the digest); events without a digest (written before it
  existed) carry no array;
* each checkpoint follows the event it names, matches the running hash, names the previous
  checkpoint (``prev_seq``: a deleted checkpoint is caught), is signed by the given key and
  verifies;
* the export starts at seq 1 or at a signed anchor checkpoint, ends at the header's ``to_seq``,
  and no event comes after the last checkpoint (an *unsigned tail*: events appended, or the
  export truncated and re-chained, after the last signature);
* a whole-trail export (no ``since``/``until`` filter, not a segment archive) that starts at an
  anchor must contain the pruning record (an ``audit.pruned`` event) that names that anchor's
  seq and hash: the oldest events may only go away through a recorded prune.

:func:`verify_exports` verifies several files as one trail, oldest first (segment archives,
then a current export): each must verify on its own and start at the checkpoint the previous
one ends with.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from keygate.audit.chain import (
    GENESIS_HASH,
    chain_hash_bytes,
    checkpoint_message,
    is_hash,
    key_id,
)
from keygate.audit.pseudonym import record_refs_problem

__all__ = ["PRUNE_ACTION", "PruneRecord", "VerifyResult", "verify_export", "verify_exports"]

#: the action of a pruning record (:mod:`keygate.audit.retention`)
PRUNE_ACTION: Final = "audit.pruned"

_EVENT_LINE: Final = frozenset({"type", "seq", "prev_hash", "hash", "event"})
_EVENT_FIELDS: Final = frozenset(
    {
        "action", "actor", "code", "detail", "event_id", "items", "items_failed", "key_version",
        "outcome", "purpose", "record_type", "request_id", "tenant", "ts",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class PruneRecord:
    """What a verified pruning record (``audit.pruned``) says was removed."""

    seq: int
    from_seq: int
    to_seq: int
    events: int
    last_hash: str
    archive_sha256: str | None
    forced: bool


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    events: int = 0
    omitted: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    #: where verification failed: 1-based line number, the seq there (if any), and why
    line: int | None = None
    seq: int | None = None
    reason: str = ""
    #: the signed checkpoint the export starts after (None: it starts at seq 1)
    anchor_seq: int | None = None
    anchor_hash: str | None = None
    anchor_line: int | None = None
    #: the last signed checkpoint: everything up to it is covered by a signature
    last_checkpoint_seq: int | None = None
    last_checkpoint_hash: str | None = None
    last_checkpoint_ts: str | None = None
    #: SHA-256 (hex) of the public key that verified the signatures
    key_id: str | None = None
    #: pruning records found in the export, in order
    prunes: tuple[PruneRecord, ...] = ()
    #: the segment period of an archive file (header ``segment``), else None
    segment: str | None = None
    #: which file failed (verify_exports), and how many files were verified
    file: str | None = None
    files: int = 1
    #: record refs checked against their events' digests
    record_refs: int = 0


class _Bad(Exception):
    def __init__(self, reason: str, seq: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.seq = seq


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f"{name} must be a non-negative integer")
    return value


def _hash(obj: dict[str, Any], name: str, seq: int | None) -> str:
    value = obj.get(name)
    if not is_hash(value):
        raise _Bad(f"{name} is not a 64-digit hex hash", seq)
    return str(value)


class _Verifier:
    def __init__(self, public_key_pem: bytes) -> None:
        key = load_pem_public_key(public_key_pem)
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise ValueError("the public key must be an ECDSA P-256 key")
        self.key = key
        self.key_id = key_id(public_key_pem)
        self.header: dict[str, Any] | None = None
        self.running: str | None = None  # hash of the last event (or anchor)
        self.next_seq: int | None = None
        self.last_event_seq: int | None = None
        self.last_cp_seq: int | None = None
        self.first_seq: int | None = None
        self.events = self.omitted = self.checkpoints = self.record_refs = 0
        self.anchor: tuple[int, str] | None = None
        self.last_cp: tuple[int, str, str] | None = None
        self.prunes: list[PruneRecord] = []

    def line(self, number: int, obj: Any) -> None:
        if not isinstance(obj, dict):
            raise _Bad("not a JSON object")
        kind = obj.get("type")
        if number == 1:
            if kind != "header" or obj.get("format") != "keygate-audit-export/1":
                raise _Bad("line 1 is not a keygate-audit-export/1 header")
            self.header = obj
            return
        if kind == "event":
            self.event(obj)
        elif kind == "checkpoint":
            self.checkpoint(obj)
        else:
            raise _Bad(f"unknown line type {kind!r}")

    def event(self, obj: dict[str, Any]) -> None:
        seq = _int(obj, "seq")
        prev = _hash(obj, "prev_hash", seq)
        digest = _hash(obj, "hash", seq)
        if self.next_seq is None:  # the first event, with no anchor checkpoint before it
            if seq != 1 or prev != GENESIS_HASH:
                raise _Bad(
                    "the export starts neither at seq 1 (genesis) nor after a signed anchor "
                    "checkpoint: events before it were removed",
                    seq,
                )
            self.first_seq = 1
            self.running = GENESIS_HASH
        elif seq != self.next_seq:
            raise _Bad(
                f"expected seq {self.next_seq}, found {seq}: an event was deleted, inserted "
                "or moved",
                seq,
            )
        if prev != self.running:
            raise _Bad("prev_hash is not the hash of the previous event", seq)
        if obj.get("omitted") is True:
            if set(obj) != {"type", "seq", "prev_hash", "hash", "omitted"}:
                raise _Bad("an omitted-event stub carries extra fields", seq)
            self.omitted += 1
        else:
            event = obj.get("event")
            if set(obj) - {"record_refs"} != _EVENT_LINE or not isinstance(event, dict):
                raise _Bad("malformed event line", seq)
            if set(event) != _EVENT_FIELDS:
                raise _Bad("the event does not have exactly the canonical fields", seq)
            canonical = json.dumps(
                event, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode("utf-8")
            if chain_hash_bytes(prev, canonical, seq) != digest:
                raise _Bad("the event was modified: its hash does not match its content", seq)
            self.record_refs += _check_refs(obj, event, seq)
            self.events += 1
            if event.get("action") == PRUNE_ACTION and event.get("outcome") == "ok":
                self.prunes.append(_prune_record(seq, event))
        self.running = digest
        self.last_event_seq = seq
        self.next_seq = seq + 1

    def checkpoint(self, obj: dict[str, Any]) -> None:
        seq = _int(obj, "seq")
        digest = _hash(obj, "hash", seq)
        prev_seq = _int(obj, "prev_seq")
        ts, sig_text, kid = obj.get("ts"), obj.get("signature"), obj.get("key_id")
        if set(obj) != {"type", "seq", "hash", "prev_seq", "ts", "key_id", "signature"}:
            raise _Bad("malformed checkpoint line", seq)
        if not isinstance(ts, str) or not isinstance(sig_text, str):
            raise _Bad("malformed checkpoint line", seq)
        if kid != self.key_id:
            raise _Bad("checkpoint signed by another key than the one given", seq)
        try:
            signature = base64.b64decode(sig_text, validate=True)
            self.key.verify(
                signature,
                checkpoint_message(seq=seq, hash=digest, prev_seq=prev_seq, ts=ts),
                ec.ECDSA(hashes.SHA256()),
            )
        except (InvalidSignature, binascii.Error, ValueError):
            raise _Bad("checkpoint signature does not verify", seq) from None
        if self.next_seq is None and self.last_cp_seq is None:
            # The anchor of a range export: its hash is the prev_hash of the first event.
            if prev_seq >= seq:
                raise _Bad("checkpoint prev_seq is not before its seq", seq)
            self.running = digest
            self.next_seq = seq + 1
            self.first_seq = seq + 1
            self.last_cp_seq = seq
            self.checkpoints += 1
            self.anchor = (seq, digest)
            self.last_cp = (seq, digest, ts)
            return
        if seq != self.last_event_seq:
            raise _Bad("checkpoint does not follow the event it signs", seq)
        if digest != self.running:
            raise _Bad(
                "checkpoint hash does not match the chain: events since the previous "
                f"checkpoint (seq {self.last_cp_seq or 0}) were altered",
                seq,
            )
        if self.last_cp_seq is not None:
            if prev_seq != self.last_cp_seq:
                raise _Bad(
                    f"checkpoint names previous checkpoint seq {prev_seq} but the previous one "
                    f"in the export is seq {self.last_cp_seq}: a checkpoint was deleted",
                    seq,
                )
        elif self.first_seq is not None and prev_seq >= self.first_seq:
            raise _Bad(
                f"checkpoint names previous checkpoint seq {prev_seq}, which is missing: "
                "a checkpoint was deleted",
                seq,
            )
        self.last_cp_seq = seq
        self.last_cp = (seq, digest, ts)
        self.checkpoints += 1


def _check_refs(obj: dict[str, Any], event: dict[str, Any], seq: int) -> int:
    """Check an event line's ``record_refs`` against the digest its event commits to; the
    number of refs checked."""
    detail = event.get("detail")
    refs = obj.get("record_refs")
    if not isinstance(detail, dict) or "record_refs_digest" not in detail:
        if refs is not None:
            raise _Bad("the line lists record refs, but its event commits to none", seq)
        return 0
    if refs is None:
        raise _Bad(
            f"the event commits to {detail.get('record_refs_count')} record ref(s), but the "
            "line lists none: they were removed",
            seq,
        )
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise _Bad("record_refs is not a list of pseudonyms", seq)
    problem = record_refs_problem(detail, refs)
    if problem is not None:
        raise _Bad(f"the record refs of the event were tampered with: {problem}", seq)
    return len(refs)


def _prune_record(seq: int, event: dict[str, Any]) -> PruneRecord:
    """The fields of a pruning record (a malformed one simply matches no anchor)."""
    detail = event.get("detail")
    detail = detail if isinstance(detail, dict) else {}

    def number(name: str) -> int:
        value = detail.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else -1

    last_hash = detail.get("last_hash")
    digest = detail.get("archive_sha256")
    return PruneRecord(
        seq=seq,
        from_seq=number("from_seq"),
        to_seq=number("to_seq"),
        events=number("events"),
        last_hash=last_hash if isinstance(last_hash, str) else "",
        archive_sha256=digest if isinstance(digest, str) else None,
        forced=detail.get("forced") is True,
    )


def _is_whole_trail(header: dict[str, Any]) -> bool:
    """Whether the header describes an export of the whole trail (tenant filter allowed)."""
    if "segment" in header:
        return False
    filters = header.get("filters")
    if not isinstance(filters, dict):
        return True
    return filters.get("since") is None and filters.get("until") is None


def verify_export(lines: Iterable[str], public_key_pem: bytes) -> VerifyResult:
    """Verify an export given as text lines; never raises for a bad export (see the result)."""
    v = _Verifier(public_key_pem)
    number = 0
    last_event_line = 0
    tail_start: tuple[int, int] | None = None  # first event line after the last checkpoint

    anchor_line: int | None = None

    def result(
        ok: bool, line: int | None = None, reason: str = "", seq: int | None = None
    ) -> VerifyResult:
        segment = v.header.get("segment") if v.header is not None else None
        return VerifyResult(
            ok, v.events, v.omitted, v.checkpoints, v.first_seq, v.last_event_seq,
            line, seq, reason,
            anchor_seq=v.anchor[0] if v.anchor else None,
            anchor_hash=v.anchor[1] if v.anchor else None,
            anchor_line=anchor_line,
            last_checkpoint_seq=v.last_cp[0] if v.last_cp else None,
            last_checkpoint_hash=v.last_cp[1] if v.last_cp else None,
            last_checkpoint_ts=v.last_cp[2] if v.last_cp else None,
            key_id=v.key_id,
            prunes=tuple(v.prunes),
            segment=str(segment.get("period")) if isinstance(segment, dict) else None,
            record_refs=v.record_refs,
        )  # fmt: skip

    def bad(line: int | None, reason: str, seq: int | None = None) -> VerifyResult:
        return result(False, line, reason, seq)

    for number, raw in enumerate(lines, start=1):
        text = raw.rstrip("\r\n")
        if number == 1:
            text = text.removeprefix("\ufeff")
        try:
            obj = json.loads(text)
        except ValueError:
            return bad(number, "not valid JSON")
        try:
            before = v.checkpoints
            v.line(number, obj)
        except _Bad as exc:
            return bad(number, exc.reason, exc.seq)
        if isinstance(obj, dict) and obj.get("type") == "event":
            last_event_line = number
            if tail_start is None:
                tail_start = (number, v.last_event_seq or 0)
        elif v.checkpoints > before:
            tail_start = None
            if v.anchor is not None and anchor_line is None:
                anchor_line = number
    if v.header is None:
        return bad(1, "empty file: no header")
    last = v.last_event_seq if v.last_event_seq is not None else (v.next_seq or 1) - 1
    if tail_start is not None:
        return bad(
            tail_start[0],
            f"unsigned tail: events from seq {tail_start[1]} to {last} are not covered by a "
            f"signed checkpoint (last checkpoint: seq {v.last_cp_seq or 'none'})",
            tail_start[1],
        )
    to_seq = v.header.get("to_seq")
    if isinstance(to_seq, int) and to_seq and last != to_seq:
        return bad(
            (last_event_line or number) + 1 if last < to_seq else last_event_line,
            f"the export ends at seq {last} but its header says {to_seq}: the tail was "
            "truncated or extended",
            last,
        )
    if v.anchor is not None and _is_whole_trail(v.header):
        seq, digest = v.anchor
        if not any(p.to_seq == seq and p.last_hash == digest for p in v.prunes):
            return bad(
                anchor_line,
                f"the export of the whole trail starts after checkpoint seq {seq}, but no "
                f"pruning record ({PRUNE_ACTION}) names seq {seq} and its hash: events up to "
                f"seq {seq} were removed without a recorded prune",
                seq,
            )
    return result(True)


def verify_exports(
    files: Sequence[tuple[str, Iterable[str]]], public_key_pem: bytes
) -> VerifyResult:
    """Verify several exports as one trail, oldest first (archives, then a current export).

    Each file must verify on its own (:func:`verify_export`), and each after the first must
    start at the signed checkpoint the previous one ends with: a missing, repeated or reordered
    segment is reported at the anchor line of the file that does not follow on.
    """
    if not files:
        raise ValueError("no files to verify")
    done: list[VerifyResult] = []
    prev_name = ""
    for name, lines in files:
        r = verify_export(lines, public_key_pem)
        if not r.ok:
            return replace(r, file=name, files=len(done) + 1)
        if done:
            prev = done[-1]
            end = prev.last_checkpoint_seq
            reason = ""
            if r.anchor_seq is None:
                reason = (
                    f"starts at seq 1 but follows {prev_name}, which ends at seq {end}: the "
                    "files are out of order"
                )
            elif r.anchor_seq != end:
                what = "missing" if end is not None and r.anchor_seq > end else "out of order"
                reason = (
                    f"starts after seq {r.anchor_seq} but {prev_name} ends at seq {end}: "
                    f"segments are {what}"
                )
            elif r.anchor_hash != prev.last_checkpoint_hash:
                reason = (
                    f"its anchor at seq {r.anchor_seq} does not match the checkpoint that "
                    f"{prev_name} ends with"
                )
            if reason:
                return replace(
                    r, ok=False, line=r.anchor_line or 2, seq=r.anchor_seq or r.first_seq,
                    reason=reason, file=name, files=len(done) + 1,
                )  # fmt: skip
        done.append(r)
        prev_name = name
    first, last = done[0], done[-1]
    return replace(
        last,
        events=sum(r.events for r in done),
        omitted=sum(r.omitted for r in done),
        checkpoints=sum(r.checkpoints for r in done),
        record_refs=sum(r.record_refs for r in done),
        first_seq=first.first_seq,
        anchor_seq=first.anchor_seq,
        anchor_hash=first.anchor_hash,
        anchor_line=first.anchor_line,
        prunes=tuple(p for r in done for p in r.prunes),
        files=len(done),
    )
