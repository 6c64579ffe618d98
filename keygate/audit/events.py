"""Audit events: what happened, to which key, for whom, and how it ended.

An :class:`AuditEvent` is a small immutable value.  It never carries plaintext, ciphertext, DEKs,
PINs, tokens or passwords: :func:`redact_check` refuses ``detail`` keys that name such things,
and the store runs it on every append.

:func:`canonical_bytes` is *the* encoding of an event for hashing (the tamper-evident chain hashes
exactly these bytes), pinned by a golden test: sorted-key JSON of every field, UTF-8 without
``\\u`` escapes, separators ``,`` and ``:``, timestamps in RFC 3339 UTC with microseconds
(``2026-11-22T09:14:00.123456Z``).  Changing it is a **BACKWARDS INCOMPATIBLE** change to every
exported trail.

``record_refs`` (the pseudonyms of every record the event touched) is not one of the encoded
fields: it goes to the side table ``kg_audit_record_refs``, and the event commits to it through
``record_refs_count`` and ``record_refs_digest`` in its ``detail``, which are encoded (see
:mod:`keygate.audit.pseudonym`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from keygate.audit.pseudonym import record_refs_problem

__all__ = [
    "DENIED_DETAIL_KEYS",
    "MAX_DETAIL_ITEMS",
    "MAX_DETAIL_VALUE_LEN",
    "OUTCOMES",
    "AuditEvent",
    "DetailValue",
    "canonical_bytes",
    "format_timestamp",
    "redact_check",
]

DetailValue = str | int | bool | None

#: how an operation ended
OUTCOMES: Final = frozenset({"ok", "denied", "error"})
#: ``detail`` keys that would name secret material (compared after normalisation, see below)
DENIED_DETAIL_KEYS: Final = frozenset(
    {"plaintext", "ciphertext", "dek", "key", "pin", "token", "password", "secret"}
)
MAX_DETAIL_ITEMS: Final = 32
MAX_DETAIL_KEY_LEN: Final = 64
MAX_DETAIL_VALUE_LEN: Final = 1024
MAX_ACTION_LEN: Final = 64
MAX_NAME_LEN: Final = 128
MAX_CODE_LEN: Final = 64

_ACTION: Final = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
_CAMEL_BOUNDARY: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS: Final = re.compile(r"[^a-z0-9]+")


class _Detail(Mapping[str, "DetailValue"]):
    """A read-only copy of an event's ``detail`` that compares like a dict and pickles."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, DetailValue]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> DetailValue:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Detail, (dict(self._data),))


def _new_event_id() -> str:
    return uuid.uuid4().hex


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _check_text(name: str, value: object, max_len: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ValueError(f"audit event {name} must be a non-empty string of at most {max_len}")


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited operation (or one batch of them: ``items``/``items_failed``)."""

    #: ``noun.verb``: ``crypto.encrypt``, ``key.rotated``, ``auth.failed`` …
    action: str
    #: ``ok`` | ``denied`` | ``error``
    outcome: str
    #: service identity name, custodian, or ``anonymous``
    actor: str
    request_id: str
    tenant: str | None = None
    purpose: str | None = None
    record_type: str | None = None
    key_version: int | None = None
    #: the error code when ``outcome`` is not ``ok``
    code: str | None = None
    items: int = 1
    items_failed: int = 0
    #: small and non-sensitive; values are str, int, bool or None (no floats: exact encoding)
    detail: Mapping[str, DetailValue] = field(default_factory=dict)
    event_id: str = field(default_factory=_new_event_id)
    #: aware; normalised to UTC
    ts: datetime = field(default_factory=_utcnow)
    #: the pseudonyms of every record the event touched (distinct, stored sorted); not part of
    #: the canonical encoding: written to ``kg_audit_record_refs`` beside the event, which
    #: commits to them by ``detail["record_refs_count"]`` and ``detail["record_refs_digest"]``.
    #: Empty for an event read back from the store (load them with ``AuditStore.record_refs``).
    record_refs: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        action: object = self.action
        if not isinstance(action, str) or not _ACTION.fullmatch(action):
            raise ValueError(f"audit action must look like noun.verb, not {action!r}")
        if len(action) > MAX_ACTION_LEN:
            raise ValueError(f"audit action must be at most {MAX_ACTION_LEN} characters")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {sorted(OUTCOMES)}")
        _check_text("actor", self.actor, MAX_NAME_LEN)
        _check_text("request_id", self.request_id, MAX_NAME_LEN)
        _check_text("event_id", self.event_id, MAX_ACTION_LEN)
        for name in ("tenant", "purpose", "record_type"):
            _check_text(name, getattr(self, name), MAX_ACTION_LEN, optional=True)
        _check_text("code", self.code, MAX_CODE_LEN, optional=True)
        _check_int("key_version", self.key_version, minimum=1, optional=True)
        _check_int("items", self.items, minimum=0)
        _check_int("items_failed", self.items_failed, minimum=0)
        if self.items_failed > self.items:
            raise ValueError("audit items_failed cannot exceed items")
        object.__setattr__(self, "ts", _utc(self.ts))
        object.__setattr__(self, "detail", _Detail(_checked_detail(self.detail)))
        if self.record_refs:
            refs: object = self.record_refs
            if isinstance(refs, str) or not isinstance(refs, tuple | list | set | frozenset):
                raise TypeError("audit record_refs must be a sequence of pseudonyms")
            ordered = tuple(sorted(refs))
            if "record_refs_digest" not in self.detail:
                raise ValueError("audit record_refs need record_refs_count and _digest in detail")
            if not all(isinstance(r, str) for r in ordered):
                raise TypeError("audit record_refs must be strings")
            problem = record_refs_problem(self.detail, ordered)
            if problem is not None:
                raise ValueError(f"audit record_refs do not match the detail: {problem}")
            object.__setattr__(self, "record_refs", ordered)


def _check_int(name: str, value: object, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"audit {name} must be an integer >= {minimum}")


def _utc(value: object) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError("audit ts must be a timezone-aware datetime")
    return value.astimezone(UTC)


def _checked_detail(detail: object) -> dict[str, DetailValue]:
    if not isinstance(detail, Mapping):
        raise TypeError("audit detail must be a mapping")
    if len(detail) > MAX_DETAIL_ITEMS:
        raise ValueError(f"audit detail may hold at most {MAX_DETAIL_ITEMS} entries")
    checked: dict[str, DetailValue] = {}
    for key, value in detail.items():
        _check_text("detail key", key, MAX_DETAIL_KEY_LEN)
        if value is not None and not isinstance(value, str | int):
            # bool is an int; floats are refused so that the canonical encoding stays exact.
            raise ValueError(f"audit detail {key!r} must be str, int, bool or None")
        if isinstance(value, str) and len(value) > MAX_DETAIL_VALUE_LEN:
            raise ValueError(f"audit detail {key!r} is longer than {MAX_DETAIL_VALUE_LEN}")
        checked[key] = value
    return checked


def _normalised_parts(key: str) -> list[str]:
    return [p for p in _SEPARATORS.split(_CAMEL_BOUNDARY.sub("_", key).lower()) if p]


def _is_denied(key: str) -> bool:
    parts = _normalised_parts(key)
    # Any run of adjacent words that spells a denied name: "token", "api_token", "apiToken",
    # "PlainText", "wrapped-dek", "db.password"…  "key" only as the whole key or its last word
    # ("api_key", "privateKey"), so that "key_version" or "key_id" stay allowed.
    for start in range(len(parts)):
        for end in range(start + 1, len(parts) + 1):
            word = "".join(parts[start:end])
            if word in DENIED_DETAIL_KEYS and (word != "key" or end == len(parts)):
                return True
    return False


def redact_check(event: AuditEvent) -> None:
    """Raise :class:`ValueError` if a ``detail`` key names secret material.

    Keys are compared case-insensitively, split on ``_``, ``-``, ``.`` and camelCase: ``token``,
    ``api_token``, ``apiToken`` and ``private_key`` are refused, ``key_version`` is not.
    """
    denied = sorted(k for k in event.detail if _is_denied(k))
    if denied:
        raise ValueError(
            f"audit event {event.action} carries forbidden detail keys: {', '.join(denied)}"
        )


def format_timestamp(ts: datetime) -> str:
    """RFC 3339 in UTC with microseconds: ``2026-11-22T09:14:00.123456Z``."""
    if ts.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return ts.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def canonical_bytes(event: AuditEvent) -> bytes:
    """The canonical encoding of an event (hashed by the tamper-evident chain)."""
    payload = {
        "action": event.action,
        "actor": event.actor,
        "code": event.code,
        "detail": dict(event.detail),
        "event_id": event.event_id,
        "items": event.items,
        "items_failed": event.items_failed,
        "key_version": event.key_version,
        "outcome": event.outcome,
        "purpose": event.purpose,
        "record_type": event.record_type,
        "request_id": event.request_id,
        "tenant": event.tenant,
        "ts": format_timestamp(event.ts),
    }
    return json.dumps(
        payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")
