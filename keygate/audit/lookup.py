"""Who touched a record: the events of one pseudonym, in the live trail or in exports.

Online (:func:`who_touched`)
    ``kg_audit_record_refs`` is looked up by the record's pseudonym (an index lookup, however
    long the trail); each event found is loaded with *every* ref stored for it and checked: its
    chain hash against its content, and its refs against the ``record_refs_count`` /
    ``record_refs_digest`` it commits to (or, for an event written before the digest existed,
    against the refs it lists inline).  A mismatch is returned with the event, for the caller
    to report loudly: someone changed the trail's database.

Offline (:func:`search_exports`)
    A JSON Lines export (or archives) is searched for the pseudonym: in each event's
    ``record_refs`` array and in the inline ``record_ref`` / ``record_refs``.  Matching events
    are checked the same way (hash, digest); the whole files should be verified first
    (:func:`keygate.audit.verify.verify_exports`), which the CLI does when given the public key.
    The pseudonym itself needs the HSM key: a reviewer computes it online with ``keygate audit
    who-touched TENANT RECORD_ID`` (it is printed) and searches exports with ``--ref``.

Imports only pure modules (no registry, database driver or PKCS#11), like the verifier.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from keygate.audit.chain import chain_hash, chain_hash_bytes, is_hash
from keygate.audit.events import canonical_bytes
from keygate.audit.pseudonym import is_record_ref, record_refs_problem

__all__ = ["Touch", "search_exports", "who_touched"]


@dataclass(frozen=True, slots=True)
class Touch:
    """An event that touched the record, and what is wrong with it (None: it checks out)."""

    seq: int
    #: the event's canonical fields (``action``, ``actor``, ``ts`` …) as a dict
    event: dict[str, Any]
    problem: str | None
    #: where it was found in an export (offline search only)
    file: str | None = None
    line: int | None = None


class _Store(Protocol):
    def touching(self, ref: str, *, tenant: str | None = None) -> Sequence[Any]: ...


def _check_ref(ref: str) -> None:
    if not is_record_ref(ref):
        raise ValueError("a record ref is 64 lower-case hex digits (keygate audit who-touched)")


def who_touched(store: _Store, ref: str, *, tenant: str | None = None) -> list[Touch]:
    """The events of the live trail that touched the record whose pseudonym is ``ref``."""
    _check_ref(ref)
    found = []
    for item in store.touching(ref, tenant=tenant):
        problem = None
        if not is_hash(item.hash) or chain_hash(item.prev_hash, item.event, item.seq) != item.hash:
            problem = "the event was modified in the database: its hash does not match its content"
        else:
            why = record_refs_problem(item.event.detail, item.record_refs or ())
            if why is not None:
                problem = f"its record refs in the database were tampered with: {why}"
        found.append(Touch(item.seq, json.loads(canonical_bytes(item.event)), problem))
    return found


def _inline(detail: dict[str, Any]) -> set[str]:
    refs = set()
    if isinstance(detail.get("record_ref"), str):
        refs.add(detail["record_ref"])
    if isinstance(detail.get("record_refs"), str):
        refs.update(detail["record_refs"].split(","))
    return refs


def _matches(name: str, lines: Iterable[str], ref: str) -> Iterator[Touch]:
    for number, raw in enumerate(lines, start=1):
        if ref not in raw:  # most lines: no JSON parsing at all
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("type") != "event":
            continue
        event = obj.get("event")
        if not isinstance(event, dict):
            continue
        found = event.get("detail")
        detail: dict[str, Any] = found if isinstance(found, dict) else {}
        refs = obj.get("record_refs")
        listed = refs if isinstance(refs, list) else []
        if ref not in listed and ref not in _inline(detail):
            continue
        problem = None
        seq, prev, digest = obj.get("seq"), obj.get("prev_hash"), obj.get("hash")
        canonical = json.dumps(
            event, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")
        if (
            not isinstance(seq, int)
            or not is_hash(prev)
            or not is_hash(digest)
            or chain_hash_bytes(str(prev), canonical, seq) != digest
        ):
            problem = "the event was modified: its hash does not match its content"
        elif "record_refs_digest" in detail:
            why = record_refs_problem(detail, [str(r) for r in listed])
            if why is not None:
                problem = f"its record refs were tampered with: {why}"
        yield Touch(seq if isinstance(seq, int) else -1, event, problem, name, number)


def search_exports(files: Sequence[tuple[str, Iterable[str]]], ref: str) -> list[Touch]:
    """The events of JSON Lines exports ``(name, lines)`` that touched the record ``ref``."""
    _check_ref(ref)
    return [touch for name, lines in files for touch in _matches(name, lines, ref)]
