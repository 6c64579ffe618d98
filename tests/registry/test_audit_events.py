"""Audit events: validation, the redaction check, and the canonical encoding's golden vectors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from datetime import UTC, datetime, timedelta, timezone

import pytest

import keygate.audit
from keygate.audit import AuditEvent, canonical_bytes, format_timestamp, redact_check

JST = timezone(timedelta(hours=9))

GOLDEN_EVENT = AuditEvent(
    action="crypto.decrypt",
    outcome="denied",
    actor="juki-app",
    request_id="req-0001",
    tenant="131016",
    purpose="mynumber",
    record_type="resident",
    key_version=3,
    code="FORBIDDEN",
    items=10,
    items_failed=2,
    detail={"reason": "テナント外", "note": None, "count": 7, "batch": True},
    event_id="0123456789abcdef0123456789abcdef",
    ts=datetime(2026, 11, 22, 18, 14, 0, 123456, tzinfo=JST),
)
# Written by hand from the specification (sorted keys, no spaces, raw UTF-8, UTC "Z" with µs).
GOLDEN_JSON = (
    '{"action":"crypto.decrypt","actor":"juki-app","code":"FORBIDDEN",'
    '"detail":{"batch":true,"count":7,"note":null,"reason":"テナント外"},'
    '"event_id":"0123456789abcdef0123456789abcdef","items":10,"items_failed":2,"key_version":3,'
    '"outcome":"denied","purpose":"mynumber","record_type":"resident","request_id":"req-0001",'
    '"tenant":"131016","ts":"2026-11-22T09:14:00.123456Z"}'
)
GOLDEN_SHA256 = "a2a28b9cf6d16b49c7d72001227b83cc2b4c9156a58ed776731cac74e8371807"

MINIMAL_EVENT = AuditEvent(
    action="auth.failed",
    outcome="denied",
    actor="anonymous",
    request_id="r",
    code="UNAUTHENTICATED",
    event_id="ffffffffffffffffffffffffffffffff",
    ts=datetime(2026, 1, 1, tzinfo=UTC),
)
MINIMAL_JSON = (
    '{"action":"auth.failed","actor":"anonymous","code":"UNAUTHENTICATED","detail":{},'
    '"event_id":"ffffffffffffffffffffffffffffffff","items":1,"items_failed":0,"key_version":null,'
    '"outcome":"denied","purpose":null,"record_type":null,"request_id":"r","tenant":null,'
    '"ts":"2026-01-01T00:00:00.000000Z"}'
)


def _event(**changes: object) -> AuditEvent:
    base: dict[str, object] = {
        "action": "crypto.encrypt",
        "outcome": "ok",
        "actor": "juki-app",
        "request_id": "req-1",
    }
    base.update(changes)
    return AuditEvent(**base)  # type: ignore[arg-type]


def _isort_style(name: str) -> tuple[int, str]:
    # ruff RUF022 order: CONSTANTS, then Classes, then functions.
    group = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return group, name


def test_exported_members() -> None:
    """keygate.audit re-exports a sorted __all__ whose names all exist."""
    assert keygate.audit.__all__ == sorted(keygate.audit.__all__, key=_isort_style)
    for name in keygate.audit.__all__:
        assert hasattr(keygate.audit, name)


@pytest.mark.parametrize(
    ("event", "expected"),
    [(GOLDEN_EVENT, GOLDEN_JSON), (MINIMAL_EVENT, MINIMAL_JSON)],
    ids=["full-event-jst-timestamp", "minimal-event-nulls"],
)
def test_canonical_bytes_golden(event: AuditEvent, expected: str) -> None:
    """canonical_bytes matches the hand-written golden encoding byte for byte."""
    assert canonical_bytes(event) == expected.encode("utf-8")


def test_canonical_bytes_golden_digest() -> None:
    """The SHA-256 of the golden encoding is pinned (what the audit chain will hash)."""
    assert hashlib.sha256(canonical_bytes(GOLDEN_EVENT)).hexdigest() == GOLDEN_SHA256


def test_canonical_bytes_is_plain_sorted_json() -> None:
    """The encoding parses as JSON and re-encodes identically with the documented settings."""
    raw = canonical_bytes(GOLDEN_EVENT)
    again = json.dumps(
        json.loads(raw), sort_keys=True, ensure_ascii=False, separators=(",", ":")
    ).encode()
    assert again == raw
    assert "テナント外".encode() in raw


def test_canonical_bytes_ignores_detail_insertion_order() -> None:
    """Two events differing only in detail insertion order encode identically."""
    reordered = dataclasses.replace(
        GOLDEN_EVENT, detail={"batch": True, "count": 7, "note": None, "reason": "テナント外"}
    )
    assert canonical_bytes(reordered) == canonical_bytes(GOLDEN_EVENT)


def test_timestamp_is_normalised_to_utc() -> None:
    """An aware timestamp in another zone is stored as the same instant in UTC."""
    assert GOLDEN_EVENT.ts.tzinfo is UTC
    assert GOLDEN_EVENT.ts == datetime(2026, 11, 22, 9, 14, 0, 123456, tzinfo=UTC)
    assert format_timestamp(datetime(5, 1, 2, 3, 4, 5, tzinfo=UTC)) == "0005-01-02T03:04:05.000000Z"


def test_defaults() -> None:
    """A new event gets a random 32-hex event id, the current UTC time, one item and no detail."""
    before = datetime.now(UTC)
    event = _event()
    assert len(event.event_id) == 32
    assert int(event.event_id, 16) >= 0
    assert event.event_id != _event().event_id
    assert before <= event.ts <= datetime.now(UTC)
    assert (event.items, event.items_failed, dict(event.detail)) == (1, 0, {})


def test_event_is_immutable_including_detail() -> None:
    """Neither the event nor its detail mapping can be changed after creation."""
    source = {"field": "氏名"}
    event = _event(detail=source)
    source["field"] = "changed"
    assert event.detail["field"] == "氏名"
    with pytest.raises(TypeError):
        event.detail["x"] = 1  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.actor = "someone"  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes",
    [
        {"action": "encrypt"},
        {"action": "Crypto.Encrypt"},
        {"outcome": "failed"},
        {"actor": ""},
        {"request_id": "r" * 129},
        {"tenant": ""},
        {"key_version": 0},
        {"key_version": True},
        {"items": -1},
        {"items": 2, "items_failed": 3},
        {"ts": datetime(2026, 1, 1)},  # naive on purpose
        {"detail": {"ratio": 0.5}},
        {"detail": {"": "x"}},
        {"detail": {"long": "x" * 1025}},
        {"detail": {f"k{i}": i for i in range(33)}},
    ],
    ids=",".join,
)
def test_invalid_events_are_refused(changes: dict[str, object]) -> None:
    """Malformed actions, outcomes, counts, naive timestamps and bad detail raise ValueError."""
    with pytest.raises(ValueError, match="audit"):
        _event(**changes)


def test_event_pickles() -> None:
    """An event survives pickling (bulk workers hand events to their parent process)."""
    again: AuditEvent = pickle.loads(pickle.dumps(GOLDEN_EVENT))  # noqa: S301 - our own bytes
    assert again == GOLDEN_EVENT
    assert canonical_bytes(again) == canonical_bytes(GOLDEN_EVENT)
    with pytest.raises(TypeError):
        again.detail["x"] = 1  # type: ignore[index]


def test_detail_must_be_a_mapping() -> None:
    """A detail that is not a mapping is a TypeError."""
    with pytest.raises(TypeError):
        _event(detail=[("a", "b")])


@pytest.mark.parametrize(
    "key",
    [
        "plaintext",
        "ciphertext",
        "dek",
        "key",
        "pin",
        "token",
        "password",
        "secret",
        "PlainText",
        "api_token",
        "apiToken",
        "wrapped-dek",
        "db.password",
        "private_key",
        "hsm_pin",
        "client_secret",
        "userPlainTextValue",
        "privateKey",
    ],
)
def test_redact_check_refuses_secret_keys(key: str) -> None:
    """redact_check raises ValueError for detail keys naming secret material."""
    with pytest.raises(ValueError, match=key):
        redact_check(_event(detail={key: "x"}))


@pytest.mark.parametrize(
    "key",
    ["key_version", "key_id", "keyLabel", "field", "reason", "provider", "keyring", "record_id"],
)
def test_redact_check_allows_ordinary_keys(key: str) -> None:
    """redact_check accepts ordinary detail keys, including ones that merely start with key."""
    redact_check(_event(detail={key: "x"}))
