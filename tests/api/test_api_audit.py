"""The audit trail seen from HTTP: one event per call, carrying the response's X-Request-Id."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
from api_support import (
    CHIYODA,
    OSAKA,
    ApiEnv,
    b64,
    batch,
    ciphertext_of,
    decrypt,
    encrypt,
    event_text,
    record_batch,
    record_call,
)

from keygate.testing.synthetic import SyntheticRecords

pytestmark = pytest.mark.api

SECRET = "監査に残ってはならない平文-7c1e"
RESIDENT_ID, RESIDENT = next(SyntheticRecords(seed=31).resident(1))


@dataclass
class Expect:
    action: str
    outcome: str
    actor: str
    code: str | None = None


def _rid() -> str:
    return f"audit-{uuid.uuid4().hex}"


def test_each_call_leaves_exactly_one_event(api: ApiEnv) -> None:
    """Every call, allowed, denied or failed, leaves exactly one audit event with the response's
    request id, the right action, outcome, actor and code."""
    full, reader, osaka = api.clients["full"], api.clients["reader"], api.clients["osaka"]
    ct = ciphertext_of(full, SECRET, context={"f": "1"})
    enc_record = record_call(full, "resident", "encrypt", RESIDENT_ID, RESIDENT).json()["record"]
    bad_token = api.client("kgt_not-a-real-token")

    calls: list[tuple[Callable[[dict[str, str]], httpx.Response], Expect]] = [
        (
            lambda h: encrypt(full, SECRET, headers=h),
            Expect("crypto.encrypt", "ok", "full"),
        ),
        (
            lambda h: decrypt(full, ct, context={"f": "1"}, headers=h),
            Expect("crypto.decrypt", "ok", "full"),
        ),
        (
            lambda h: full.post(
                "/v1/encrypt/batch",
                json={"tenant": CHIYODA, "purpose": "tax", "items": [{"plaintext": b64("a")}] * 3},
                headers=h,
            ),
            Expect("crypto.encrypt", "ok", "full"),
        ),
        (
            lambda h: full.post(
                "/v1/rewrap/batch",
                json={"tenant": CHIYODA, "purpose": "resident", "items": [{"ciphertext": ct}]},
                headers=h,
            ),
            Expect("crypto.rewrap", "ok", "full"),
        ),
        (
            lambda h: full.post(
                "/v1/records/resident/encrypt",
                json={"tenant": CHIYODA, "record_id": RESIDENT_ID, "record": RESIDENT},
                headers=h,
            ),
            Expect("record.encrypt", "ok", "full"),
        ),
        (
            lambda h: reader.post(
                "/v1/records/resident/decrypt",
                json={"tenant": CHIYODA, "record_id": RESIDENT_ID, "record": enc_record},
                headers=h,
            ),
            Expect("record.decrypt", "ok", "reader"),
        ),
        (
            lambda h: api.clients["anon"].post("/v1/encrypt", json={}, headers=h),
            Expect("auth.failed", "denied", "anonymous", "UNAUTHENTICATED"),
        ),
        (
            lambda h: encrypt(bad_token, SECRET, headers=h),
            Expect("auth.failed", "denied", "anonymous", "UNAUTHENTICATED"),
        ),
        (
            lambda h: encrypt(full, SECRET, tenant=OSAKA, headers=h),
            Expect("crypto.encrypt", "denied", "full", "FORBIDDEN"),
        ),
        (
            lambda h: decrypt(reader, ct, purpose="mynumber", headers=h),
            Expect("crypto.decrypt", "denied", "reader", "FORBIDDEN"),
        ),
        (
            lambda h: decrypt(osaka, ct, tenant=OSAKA, context={"f": "1"}, headers=h),
            Expect("crypto.decrypt", "error", "osaka", "DECRYPTION_FAILED"),
        ),
        (
            lambda h: encrypt(full, SECRET, purpose="no-such-purpose", headers=h),
            Expect("crypto.encrypt", "error", "full", "NOT_FOUND"),
        ),
        (
            lambda h: encrypt(full, SECRET, tenant="131017", headers=h),
            Expect("crypto.encrypt", "error", "full", "INVALID_TENANT"),
        ),
        (
            lambda h: encrypt(full, "x" * 5000, headers=h),
            Expect("crypto.encrypt", "error", "full", "PAYLOAD_TOO_LARGE"),
        ),
        (
            lambda h: full.post(
                "/v1/records/resident/encrypt",
                json={"tenant": CHIYODA, "record_id": "R-1", "record": {"氏名": SECRET, "x": 1}},
                headers=h,
            ),
            Expect("record.encrypt", "error", "full", "VALIDATION_FAILED"),
        ),
        (
            lambda h: full.post(
                "/v1/records/pets/encrypt",
                json={"tenant": CHIYODA, "record_id": "P-1", "record": {}},
                headers=h,
            ),
            Expect("record.encrypt", "error", "full", "NOT_FOUND"),
        ),
    ]
    for given in (True, False):
        for call, expect in calls:
            rid = _rid()
            response = call({"X-Request-Id": rid} if given else {})
            got = response.headers["x-request-id"]
            if given:
                assert got == rid
            events = api.events(got)
            assert len(events) == 1, (expect, response.status_code, events)
            event = events[0]
            assert (event.action, event.outcome, event.actor) == (
                expect.action,
                expect.outcome,
                expect.actor,
            ), (expect, response.text)
            assert event.code == expect.code
            if response.status_code >= 400:
                assert response.json()["request_id"] == got


@pytest.mark.parametrize(
    "body",
    [
        {"tenant": CHIYODA, "purpose": "resident", "plaintext": 12345},
        {"tenant": CHIYODA, "purpose": "resident", "plaintext": "eA==", "extra": SECRET},
    ],
    ids=["wrong-type", "unknown-field"],
)
def test_rejected_body_of_authenticated_caller_is_audited(
    api: ApiEnv, full: httpx.Client, body: dict[str, object]
) -> None:
    """An authenticated caller's request refused by the schema (400 INVALID_REQUEST) still
    leaves exactly one audit event naming the caller."""
    rid = _rid()
    r = full.post("/v1/encrypt", json=body, headers={"X-Request-Id": rid})
    assert r.status_code == 400
    events = api.events(rid)
    assert len(events) == 1, events
    assert events[0].actor == "full"
    assert events[0].code == "INVALID_REQUEST"
    assert SECRET not in event_text(events[0])


def test_event_fields(api: ApiEnv, full: httpx.Client, reader: httpx.Client) -> None:
    """Events name tenant, purpose, key version, batch sizes and withheld fields."""
    rid = _rid()
    encrypt(full, SECRET, purpose="tax", headers={"X-Request-Id": rid})
    (event,) = api.events(rid)
    assert (event.tenant, event.purpose, event.key_version) == (CHIYODA, "tax", 1)

    rid = _rid()
    items = [{"ciphertext": "kg1.bad"}, {"ciphertext": ciphertext_of(full, "a")}]
    full.post(
        "/v1/decrypt/batch",
        json={"tenant": CHIYODA, "purpose": "resident", "items": items},
        headers={"X-Request-Id": rid},
    )
    (event,) = api.events(rid)
    assert (event.outcome, event.items, event.items_failed) == ("ok", 2, 1)

    enc = record_call(full, "resident", "encrypt", RESIDENT_ID, RESIDENT).json()["record"]
    rid = _rid()
    reader.post(
        "/v1/records/resident/decrypt",
        json={"tenant": CHIYODA, "record_id": RESIDENT_ID, "record": enc},
        headers={"X-Request-Id": rid},
    )
    (event,) = api.events(rid)
    assert event.record_type == "resident"
    assert event.detail.get("fields_withheld") == 1


def test_no_secrets_in_any_event(api: ApiEnv, full: httpx.Client) -> None:
    """No audit event holds a plaintext, its base64, a record value or a bearer token."""
    secrets = [SECRET, b64(SECRET), *api.tokens.values()]
    secrets += [
        str(v) for k, v in RESIDENT.items() if k in ("氏名", "個人番号", "住所", "住民票コード")
    ]
    # Make sure failing calls with secrets in them are in the trail too.
    encrypt(full, SECRET, tenant="131017")
    encrypt(full, SECRET, context={"bad key": SECRET})
    record_call(full, "resident", "encrypt", "R-1", {**RESIDENT, "個人番号": "123456789010"})
    record_batch(full, "resident", "encrypt", [(RESIDENT_ID, RESIDENT)])
    batch(full, "encrypt", [{"plaintext": b64(SECRET)}, {"plaintext": SECRET}])
    api.client(f"{api.tokens['full']}x").post("/v1/encrypt", json={})

    events = list(api.gw.audit_store.query())
    assert len(events) > 20
    for event in events:
        text = event_text(event)
        for secret in secrets:
            assert secret not in text, (secret[:6], event.action)
        assert "123456789010" not in text


@pytest.mark.parametrize(
    ("field", "value"),
    [("tenant", "123456789018"), ("tenant", "1234-5678-9018"), ("purpose", "123456789018")],
)
def test_personal_data_in_the_wrong_field_is_not_audited(
    api: ApiEnv, full: httpx.Client, field: str, value: str
) -> None:
    """A My Number sent by mistake as tenant or purpose is refused and not written to the audit
    trail (the error detail already refuses to echo it)."""
    rid = _rid()
    body = {"tenant": CHIYODA, "purpose": "resident", "plaintext": b64("x"), field: value}
    r = full.post("/v1/encrypt", json=body, headers={"X-Request-Id": rid})
    assert r.status_code == 400
    assert value not in r.text
    (event,) = api.events(rid)
    assert value not in event_text(event)
