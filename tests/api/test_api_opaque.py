"""Opaque values over HTTP: encrypt, decrypt, their batches, and rewrap after a rotation."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
from api_support import (
    ACTOR,
    AGENCY,
    CHIYODA,
    ApiEnv,
    assert_slot_error,
    b64,
    batch,
    ciphertext_of,
    data_part,
    decrypt,
    encrypt,
    key_version,
    unb64,
)

pytestmark = pytest.mark.api

CONTEXT = {"record_id": "R-000123", "field": "name"}


def test_encrypt_then_decrypt_round_trip(full: httpx.Client) -> None:
    """/v1/encrypt returns a kg1 ciphertext and its key_version; /v1/decrypt reverses it."""
    plaintext = "山田 太郎".encode()
    r = encrypt(full, plaintext, context=CONTEXT)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"ciphertext", "key_version"}
    assert body["ciphertext"].startswith("kg1")
    assert body["key_version"] == 1 == key_version(body["ciphertext"])

    r = decrypt(full, body["ciphertext"], context=CONTEXT)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"plaintext": b64(plaintext)}


def test_api_md_example_values(full: httpx.Client) -> None:
    """The API.md opaque example (plaintext 5bGx55Sw5aSq6YOO) round-trips byte for byte."""
    body = {"tenant": "131016", "purpose": "resident", "context": CONTEXT}
    r = full.post("/v1/encrypt", json={**body, "plaintext": "5bGx55Sw5aSq6YOO"})
    assert r.status_code == 200, r.text
    r2 = full.post("/v1/decrypt", json={**body, "ciphertext": r.json()["ciphertext"]})
    assert r2.json() == {"plaintext": "5bGx55Sw5aSq6YOO"}


def test_empty_context_and_empty_plaintext(full: httpx.Client) -> None:
    """Context defaults to empty and an empty plaintext is a valid value."""
    ct = ciphertext_of(full, b"", purpose="tax")
    r = decrypt(full, ct, purpose="tax")
    assert r.json() == {"plaintext": ""}


def test_slug_tenant_round_trip(star: httpx.Client) -> None:
    """A central organisation named by a slug encrypts and decrypts like a municipality."""
    value = os.urandom(100)
    ct = ciphertext_of(star, value, tenant=AGENCY, purpose="mynumber")
    r = decrypt(star, ct, tenant=AGENCY, purpose="mynumber")
    assert unb64(r.json()["plaintext"]) == value


def test_batch_round_trip_in_order(full: httpx.Client) -> None:
    """Batch encrypt and decrypt keep the request order and each item's own context."""
    values = [os.urandom(n) for n in (0, 1, 31, 500, 4096)]
    items = [{"context": {"i": str(i)}, "plaintext": b64(v)} for i, v in enumerate(values)]
    r = batch(full, "encrypt", items)
    assert r.status_code == 200, r.text
    out = r.json()["items"]
    assert len(out) == len(values)
    assert all(set(o) == {"ciphertext"} and o["ciphertext"].startswith("kg1") for o in out)
    assert len({o["ciphertext"] for o in out}) == len(out)

    dec = [{"context": {"i": str(i)}, "ciphertext": o["ciphertext"]} for i, o in enumerate(out)]
    r = batch(full, "decrypt", dec)
    assert r.status_code == 200, r.text
    assert [unb64(o["plaintext"]) for o in r.json()["items"]] == values


def test_batch_one_bad_item_fails_only_its_slot(full: httpx.Client) -> None:
    """One bad item gets {"error": …} in its own slot while the batch still answers 200."""
    items: list[dict[str, Any]] = [
        {"plaintext": b64("a")},
        {"plaintext": "not base64!"},
        {"plaintext": b64("x" * 5000)},  # over the 4096-byte plaintext limit
        {"context": {"bad key!": "v"}, "plaintext": b64("c")},
        {"plaintext": b64("d")},
    ]
    r = batch(full, "encrypt", items)
    assert r.status_code == 200, r.text
    out = r.json()["items"]
    assert len(out) == 5
    assert set(out[0]) == {"ciphertext"}
    assert_slot_error(out[1], 400, "INVALID_REQUEST")
    assert_slot_error(out[2], 413, "PAYLOAD_TOO_LARGE")
    assert_slot_error(out[3], 400, "INVALID_REQUEST")
    assert set(out[4]) == {"ciphertext"}

    good = out[0]["ciphertext"]
    dec = [
        {"ciphertext": good},
        {"ciphertext": good[:-4]},
        {"ciphertext": "kg1.garbage"},
        {"context": {"other": "x"}, "ciphertext": good},
        {"ciphertext": out[4]["ciphertext"]},
    ]
    r = batch(full, "decrypt", dec)
    assert r.status_code == 200, r.text
    res = r.json()["items"]
    assert unb64(res[0]["plaintext"]) == b"a"
    for slot in res[1:4]:
        assert_slot_error(slot, 422, "DECRYPTION_FAILED")
    assert unb64(res[4]["plaintext"]) == b"d"


def test_rewrap_after_rotation(api: ApiEnv, full: httpx.Client, rewrapper: httpx.Client) -> None:
    """After a rotation rewrap moves old ciphertexts to the new version by rewriting only their
    header, returns current ones unchanged, and the old ones still decrypt."""
    purpose = api.fresh_purpose()
    values = [os.urandom(40) for _ in range(4)]
    items = [{"context": {"n": str(i)}, "plaintext": b64(v)} for i, v in enumerate(values)]
    old = [o["ciphertext"] for o in batch(full, "encrypt", items, purpose=purpose).json()["items"]]
    assert {key_version(c) for c in old} == {1}

    api.gw.rotate_key(ACTOR, CHIYODA, purpose)
    r = encrypt(full, "new", purpose=purpose, context={"n": "new"})
    assert r.json()["key_version"] == 2
    current = r.json()["ciphertext"]

    r = batch(rewrapper, "rewrap", [{"ciphertext": c} for c in [*old, current]], purpose=purpose)
    assert r.status_code == 200, r.text
    out = [o["ciphertext"] for o in r.json()["items"]]
    assert len(out) == 5
    for before, after in zip(old, out[:4], strict=True):
        assert after != before
        assert key_version(after) == 2
        assert data_part(after) == data_part(before)
    assert out[4] == current

    # Old ciphertexts stay readable (decrypt-only); the rewrapped ones decrypt to the same values.
    for i, (before, after) in enumerate(zip(old, out[:4], strict=True)):
        for text in (before, after):
            r = decrypt(full, text, purpose=purpose, context={"n": str(i)})
            assert r.status_code == 200, r.text
            assert unb64(r.json()["plaintext"]) == values[i]

    # Rewrapping again changes nothing.
    r = batch(rewrapper, "rewrap", [{"ciphertext": c} for c in out], purpose=purpose)
    assert [o["ciphertext"] for o in r.json()["items"]] == out


def test_rewrap_bad_item_gets_error_slot(rewrapper: httpx.Client, full: httpx.Client) -> None:
    """A malformed ciphertext in a rewrap batch fails its own slot only."""
    ct = ciphertext_of(full, "x")
    r = batch(rewrapper, "rewrap", [{"ciphertext": "kg1.AAAA"}, {"ciphertext": ct}])
    assert r.status_code == 200, r.text
    out = r.json()["items"]
    assert_slot_error(out[0], 422, "DECRYPTION_FAILED")
    assert out[1] == {"ciphertext": ct}
