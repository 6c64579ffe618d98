"""No secrets in logs: a full sequence over HTTP with logging at DEBUG, captured from stderr."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import structlog
from api_support import (
    ACTOR,
    CHIYODA,
    PURPOSES,
    ApiEnv,
    b64,
    batch,
    ciphertext_of,
    decrypt,
    encrypt,
    flip,
    record_batch,
    record_call,
)

from keygate.logging import configure_logging
from keygate.testing.synthetic import SyntheticRecords

pytestmark = pytest.mark.api

TENANT = "logtest-org"
SECRET = "ログに出てはならない平文-4b9d"
BAD_MYNUMBER = "987654321098"


class DekSpy:
    """Forwards to the key manager's HSM adapter and remembers every DEK that passes through."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.deks: list[bytes] = []

    def wrap_dek(self, label: str, dek: bytes, *, aad: bytes) -> Any:
        self.deks.append(bytes(dek))
        return self._inner.wrap_dek(label, dek, aad=aad)

    def unwrap_dek(self, label: str, mechanism: Any, wrapped: bytes, *, aad: bytes) -> bytes:
        dek: bytes = self._inner.unwrap_dek(label, mechanism, wrapped, aad=aad)
        self.deks.append(bytes(dek))
        return dek

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextmanager
def debug_logging(capfd: pytest.CaptureFixture[str]) -> Iterator[list[str]]:
    """keygate's JSON logging at DEBUG to the captured stderr, then the previous configuration.

    Configured inside the test body: pytest swaps the captured stream between test phases, so a
    logger bound to it in a fixture would write to a closed file.
    """
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging(fmt="json", level="debug")
    out: list[str] = []
    try:
        yield out
    finally:
        time.sleep(0.3)  # let the server thread write its last access-log line
        out.append("".join(capfd.readouterr()))
        structlog.reset_defaults()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        logging.getLogger("uvicorn.access").disabled = False


def _encodings(dek: bytes) -> list[str]:
    return [
        dek.hex(),
        dek.hex().upper(),
        base64.b64encode(dek).decode(),
        base64.urlsafe_b64encode(dek).decode().rstrip("="),
        repr(dek)[2:-1],
    ]


def test_no_secrets_in_logs(api: ApiEnv, capfd: pytest.CaptureFixture[str]) -> None:
    """Plaintexts, their base64, record values, DEKs, the HSM PIN and bearer tokens never appear
    in the log output of a full sequence of calls, errors included."""
    spy = DekSpy(api.gw.keys._hsm)
    api.gw.keys._hsm = spy
    gen = SyntheticRecords(seed=777)
    samples = {
        "resident": list(gen.resident(3)),
        "tax": list(gen.tax(3)),
        "mynumber": list(gen.mynumber(3)),
    }
    with debug_logging(capfd) as output:
        try:
            _run_sequence(api, samples)
        finally:
            api.gw.keys._hsm = spy._inner
    captured = output[0]

    # The capture worked, at DEBUG.
    assert '"http.request"' in captured
    assert '"dek.created"' in captured
    assert spy.deks, "the spy saw no DEK"

    secrets: dict[str, str] = {
        "plaintext": SECRET,
        "plaintext-b64": b64(SECRET),
        "bad-mynumber": BAD_MYNUMBER,
        "hsm-user-pin": api.hsm_token.user_pin,
        "hsm-so-pin": api.hsm_token.so_pin,
    }
    for i in range(5):
        secrets[f"batch-b64-{i}"] = b64(f"{SECRET}-{i}")
    for name, token in api.tokens.items():
        secrets[f"token-{name}"] = token
        secrets[f"token-{name}-body"] = token.removeprefix("kgt_")
    for record_type, rows in samples.items():
        for rid, rec in rows:
            for field in ("氏名", "個人番号", "住所", "住民票コード", "氏名カナ"):
                value = rec.get(field)
                if isinstance(value, str):
                    secrets[f"{record_type}/{rid}/{field}"] = value
    for n, dek in enumerate(spy.deks):
        for m, text in enumerate(_encodings(dek)):
            secrets[f"dek-{n}-{m}"] = text

    leaked = sorted(name for name, value in secrets.items() if value in captured)
    assert not leaked, leaked


def _run_sequence(api: ApiEnv, samples: dict[str, list[tuple[str, dict[str, Any]]]]) -> None:
    """Encrypt, decrypt, records, rotation, rewrap and many failing calls, over HTTP."""
    star, reader, full = api.clients["star"], api.clients["reader"], api.clients["full"]

    api.gw.add_tenant(ACTOR, TENANT, name="ログ試験")
    for purpose in PURPOSES:
        api.gw.create_key(ACTOR, TENANT, purpose)

    # Opaque values, single and batch.
    ctx = {"record_id": "L-1", "field": "memo"}
    ct = ciphertext_of(star, SECRET, tenant=TENANT, context=ctx)
    assert decrypt(star, ct, tenant=TENANT, context=ctx).status_code == 200
    items = [{"context": ctx, "plaintext": b64(f"{SECRET}-{i}")} for i in range(5)]
    out = batch(star, "encrypt", items, tenant=TENANT).json()["items"]
    cts = [o["ciphertext"] for o in out]
    dec = [{"context": ctx, "ciphertext": c} for c in cts]
    assert batch(star, "decrypt", dec, tenant=TENANT).status_code == 200

    # Records of every type, single and batch.
    encrypted: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for record_type, rows in samples.items():
        r = record_batch(star, record_type, "encrypt", rows, tenant=TENANT)
        enc = [
            (rid, slot["record"]) for (rid, _), slot in zip(rows, r.json()["items"], strict=True)
        ]
        encrypted[record_type] = enc
        assert record_batch(star, record_type, "decrypt", enc, tenant=TENANT).status_code == 200
        rid, rec = rows[0]
        assert record_call(star, record_type, "encrypt", rid, rec, tenant=TENANT).status_code == 200
        rid, rec = enc[0]
        assert record_call(star, record_type, "decrypt", rid, rec, tenant=TENANT).status_code == 200

    # Rotation and rewrap (the DEK is re-wrapped inside the gateway).
    api.gw.rotate_key(ACTOR, TENANT, "resident")
    r = batch(star, "rewrap", [{"ciphertext": c} for c in [ct, *cts]], tenant=TENANT)
    assert r.status_code == 200
    rewrapped = r.json()["items"][0]["ciphertext"]
    assert decrypt(star, rewrapped, tenant=TENANT, context=ctx).status_code == 200

    # Errors, with secrets in the requests.
    decrypt(star, flip(ct, len(ct) // 2), tenant=TENANT, context=ctx)
    decrypt(star, ct, tenant=TENANT, context={"record_id": SECRET})
    decrypt(star, ct, tenant=CHIYODA, context=ctx)
    encrypt(full, SECRET, tenant=TENANT)
    encrypt(star, SECRET, tenant=TENANT, context={"bad key": SECRET})
    encrypt(star, SECRET * 200, tenant=TENANT)
    star.post("/v1/encrypt", json={"tenant": TENANT, "purpose": "resident", "plaintext": SECRET})
    star.post("/v1/encrypt", json={"tenant": SECRET, "purpose": "resident", "plaintext": ""})
    star.post("/v1/encrypt", json={"tenant": TENANT, "purpose": SECRET, "plaintext": ""})
    star.post("/v1/encrypt", json={"tenant": TENANT, "plaintext": b64(SECRET), "x": SECRET})
    rid, rec = samples["mynumber"][1]
    record_call(star, "mynumber", "encrypt", rid, {**rec, "個人番号": BAD_MYNUMBER}, tenant=TENANT)
    record_call(star, "mynumber", "encrypt", rid, {**rec, SECRET: SECRET}, tenant=TENANT)
    rid, rec = encrypted["resident"][1]
    record_call(reader, "resident", "decrypt", rid, rec, tenant=CHIYODA)
    record_call(star, "resident", "decrypt", "other-id", rec, tenant=TENANT)
    api.client(api.tokens["star"][:-2] + "xx").post("/v1/encrypt", json={})
    api.client().post("/v1/decrypt", json={"tenant": TENANT, "ciphertext": ct})
    star.get("/readyz")
    star.get("/metrics")
