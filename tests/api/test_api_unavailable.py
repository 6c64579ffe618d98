"""UNAVAILABLE over HTTP: the HSM token taken away, and an audit trail that cannot be written.

Each test runs a gateway of its own (own SoftHSM token, own SQLite directory, own server), so the
shared session gateway is never disturbed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import httpx
import pytest
from api_support import (
    OwnGateway,
    assert_problem,
    b64,
    batch,
    ciphertext_of,
    decrypt,
    encrypt,
    record_call,
)

from keygate.audit.writer import AuditWriter
from keygate.testing.synthetic import SyntheticRecords

pytestmark = pytest.mark.api

SECRET = "監査が書けないときに漏れてはならない平文"


def _retry_after(response: httpx.Response) -> int:
    value = int(response.headers["retry-after"])
    assert value >= 1
    return value


def _eventually_ok(call: Callable[[], httpx.Response], timeout: float = 15.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = call()
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_hsm_away_is_503_then_recovers(make_gateway: Callable[[], OwnGateway]) -> None:
    """With the HSM token away an operation that needs the HSM is 503 UNAVAILABLE with
    Retry-After and /readyz is 503 naming the HSM; once it is back the gateway recovers alone."""
    own = make_gateway()
    ct = ciphertext_of(own.client, "before", context={"a": "1"})
    assert own.anon.get("/readyz").status_code == 200

    with own.hsm_token.detached():
        # The tax key was never used: encrypting needs a new DEK, wrapped by the HSM.
        r = encrypt(own.client, SECRET, purpose="tax")
        problem = assert_problem(r, 503, "UNAVAILABLE")
        _retry_after(r)
        assert SECRET not in r.text and b64(SECRET) not in r.text
        assert own.hsm_token.user_pin not in problem["detail"]

        # The resident DEK is already unwrapped and cached: no HSM call, so it keeps working.
        assert encrypt(own.client, "cached", context={"a": "2"}).status_code == 200
        assert decrypt(own.client, ct, context={"a": "1"}).status_code == 200

        r = own.anon.get("/readyz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["ready"] is False
        assert body["checks"]["hsm"] != "ok"
        assert body["checks"]["registry"] == "ok"
        assert body["checks"]["audit"] == "ok"

        # Liveness does not depend on the HSM.
        assert own.anon.get("/healthz").status_code == 200

        # A batch needing the HSM fails its items (or the batch) as UNAVAILABLE, never a 500.
        r = batch(own.client, "encrypt", [{"plaintext": b64("x")}], purpose="mynumber")
        if r.status_code == 200:
            assert r.json()["items"][0]["error"]["code"] == "UNAVAILABLE"
        else:
            assert_problem(r, 503, "UNAVAILABLE")

    r = _eventually_ok(lambda: encrypt(own.client, "after", purpose="tax"))
    assert r.status_code == 200, r.text
    assert _eventually_ok(lambda: own.anon.get("/readyz")).status_code == 200
    r = decrypt(own.client, ct, context={"a": "1"})
    assert r.status_code == 200


class _BrokenStore:
    """An audit store whose every append fails."""

    def __init__(self) -> None:
        self.calls = 0

    def append(self, events: Sequence[object]) -> None:
        self.calls += 1
        raise RuntimeError("audit disk unavailable")


def test_audit_failure_fails_closed(make_gateway: Callable[[], OwnGateway]) -> None:
    """When the audit trail cannot be written every call is 503 UNAVAILABLE, its result
    (plaintext or ciphertext) is withheld, and /readyz reports the audit trail."""
    own = make_gateway()
    record_id, record = next(SyntheticRecords(seed=5).mynumber(1))
    ct = ciphertext_of(own.client, SECRET)
    enc = record_call(own.client, "mynumber", "encrypt", record_id, record).json()["record"]

    working = own.gw.audit
    broken_store = _BrokenStore()
    broken = AuditWriter(broken_store, timeout_s=2)
    own.gw.audit = broken
    try:
        r = encrypt(own.client, SECRET)
        assert_problem(r, 503, "UNAVAILABLE")
        _retry_after(r)
        assert "kg1." not in r.text and "ciphertext" not in r.text

        r = decrypt(own.client, ct)
        assert_problem(r, 503, "UNAVAILABLE")
        assert b64(SECRET) not in r.text and SECRET not in r.text

        r = batch(own.client, "decrypt", [{"ciphertext": ct}] * 3)
        assert_problem(r, 503, "UNAVAILABLE")
        assert b64(SECRET) not in r.text

        r = record_call(own.client, "mynumber", "decrypt", record_id, enc)
        assert_problem(r, 503, "UNAVAILABLE")
        for value in record.values():
            assert str(value) not in r.text

        r = own.anon.post("/v1/encrypt", json={})
        assert r.status_code in (401, 503)
        assert broken_store.calls >= 5

        r = own.anon.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["audit"] != "ok"
    finally:
        own.gw.audit = working
        broken.close()

    r = decrypt(own.client, ct)
    assert r.status_code == 200
    assert own.anon.get("/readyz").status_code == 200
