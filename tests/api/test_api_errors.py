"""Every error code of API.md over HTTP, with its status and the problem+json shape."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from api_support import (
    ACTOR,
    CHIYODA,
    MAX_BATCH,
    MAX_BODY,
    MAX_PLAINTEXT,
    OSAKA,
    ApiEnv,
    assert_problem,
    assert_slot_error,
    b64,
    batch,
    ciphertext_of,
    decrypt,
    encrypt,
    envelope,
    flip,
    record_batch,
    record_call,
)

from keygate.core.model import KeyState
from keygate.core.wire import to_text
from keygate.testing.synthetic import SyntheticRecords

pytestmark = pytest.mark.api

ENCRYPT_BODY = {"tenant": CHIYODA, "purpose": "resident", "context": {}, "plaintext": b64("x")}
MYNUMBER_ID, MYNUMBER_RECORD = next(SyntheticRecords(seed=7).mynumber(1))


def _post_raw(client: httpx.Client, path: str, raw: bytes) -> httpx.Response:
    return client.post(path, content=raw, headers={"content-type": "application/json"})


# ---------------------------------------------------------------------- INVALID_REQUEST


@pytest.mark.parametrize(
    "raw",
    [
        b'{"tenant": "131016", "purpose": ',
        b"not json at all",
        b"",
        b"[1, 2, 3]",
        b'"a string"',
        b'{"tenant": "131016", "purpose": "resident", "plaintext": "eA==",}',
    ],
    ids=["truncated", "garbage", "empty", "array", "string", "trailing-comma"],
)
def test_malformed_json_is_invalid_request(full: httpx.Client, raw: bytes) -> None:
    """A body that is not a JSON object of the right shape is 400 INVALID_REQUEST."""
    assert_problem(_post_raw(full, "/v1/encrypt", raw), 400, "INVALID_REQUEST")


@pytest.mark.parametrize(
    "change",
    [
        {"plaintext": 12345},
        {"plaintext": None},
        {"tenant": 131016},
        {"purpose": ["resident"]},
        {"context": {"record_id": 1}},
        {"context": ["record_id", "x"]},
        {"context": "record_id=1"},
        {"plaintext": True},
    ],
    ids=lambda c: "-".join(f"{k}:{type(v).__name__}" for k, v in c.items()),
)
def test_wrong_types_are_invalid_request(full: httpx.Client, change: dict[str, Any]) -> None:
    """A field of the wrong JSON type is 400 INVALID_REQUEST."""
    r = full.post("/v1/encrypt", json={**ENCRYPT_BODY, **change})
    assert_problem(r, 400, "INVALID_REQUEST")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/encrypt/batch", {"tenant": CHIYODA, "purpose": "resident", "items": {"a": 1}}),
        ("/v1/encrypt/batch", {"tenant": CHIYODA, "purpose": "resident", "items": ["eA=="]}),
        ("/v1/decrypt", {"tenant": CHIYODA, "purpose": "resident", "ciphertext": 7}),
        ("/v1/rewrap/batch", {"tenant": CHIYODA, "purpose": "tax", "items": [{"ciphertext": 1}]}),
        ("/v1/records/resident/encrypt", {"tenant": CHIYODA, "record_id": 1, "record": {}}),
        ("/v1/records/resident/encrypt", {"tenant": CHIYODA, "record_id": "R", "record": [1]}),
        ("/v1/records/resident/decrypt/batch", {"tenant": CHIYODA, "items": [["R", {}]]}),
    ],
    ids=["items-object", "items-strings", "ciphertext-int", "rewrap-int", "record-id-int",
         "record-array", "record-items-arrays"],
)  # fmt: skip
def test_wrong_types_on_other_endpoints(
    full: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    """Wrong JSON types on batch and record endpoints are 400 INVALID_REQUEST as a whole."""
    assert_problem(full.post(path, json=body), 400, "INVALID_REQUEST")


def test_missing_field_is_invalid_request(full: httpx.Client) -> None:
    """A missing required field is 400 INVALID_REQUEST naming the field."""
    body = {k: v for k, v in ENCRYPT_BODY.items() if k != "plaintext"}
    problem = assert_problem(full.post("/v1/encrypt", json=body), 400, "INVALID_REQUEST")
    assert "plaintext" in problem["detail"]


@pytest.mark.parametrize(
    "plaintext",
    ["not base64!", "eA", "eA=", "-_-_", "eA==\n", "eA== ", "ＡＡＡＡ", "e A=="],
    ids=[
        "punct",
        "no-padding",
        "short-padding",
        "urlsafe",
        "newline",
        "space",
        "fullwidth",
        "inner",
    ],
)
def test_bad_base64_is_invalid_request(full: httpx.Client, plaintext: str) -> None:
    """A plaintext that is not strict standard base64 is 400 INVALID_REQUEST."""
    r = full.post("/v1/encrypt", json={**ENCRYPT_BODY, "plaintext": plaintext})
    assert_problem(r, 400, "INVALID_REQUEST")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/encrypt", {**ENCRYPT_BODY, "key_version": 1}),
        ("/v1/decrypt", {"tenant": CHIYODA, "purpose": "resident", "ciphertext": "kg1.", "x": 1}),
        ("/v1/encrypt/batch", {"tenant": CHIYODA, "purpose": "resident", "items": [], "all": 1}),
        (
            "/v1/encrypt/batch",
            {"tenant": CHIYODA, "purpose": "resident", "items": [{"plaintext": "eA==", "y": 1}]},
        ),
        ("/v1/rewrap/batch", {"tenant": CHIYODA, "purpose": "resident", "items": [{"x": "y"}]}),
        (
            "/v1/records/resident/encrypt",
            {"tenant": CHIYODA, "record_id": "R-1", "record": {}, "purpose": "resident"},
        ),
    ],
    ids=["encrypt", "decrypt", "batch", "batch-item", "rewrap-item", "record"],
)
def test_unknown_fields_are_invalid_request(
    full: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    """Unknown fields in request bodies are 400 INVALID_REQUEST."""
    assert_problem(full.post(path, json=body), 400, "INVALID_REQUEST")


def test_context_limits(full: httpx.Client) -> None:
    """A context of 32 pairs, 64-character keys and 1024-character values is fine; one more
    pair, character or a bad key is 400 INVALID_REQUEST, on encrypt and on decrypt."""
    ok = {f"k{i}": "v" for i in range(32)}
    ok["k" * 64] = "v" * 1024
    del ok["k0"]
    ct = ciphertext_of(full, "x", context=ok)
    assert decrypt(full, ct, context=ok).status_code == 200

    bad_contexts = [
        {f"k{i}": "v" for i in range(33)},
        {"k" * 65: "v"},
        {"bad key": "v"},
        {"": "v"},
        {"ключ": "v"},
        {"a/b": "v"},
        {"k": "v" * 1025},
    ]
    for context in bad_contexts:
        assert_problem(encrypt(full, "x", context=context), 400, "INVALID_REQUEST")
        assert_problem(decrypt(full, ct, context=context), 400, "INVALID_REQUEST")


@pytest.mark.parametrize(
    ("path", "template"),
    [
        (
            "/v1/encrypt",
            '{"tenant": "131016", "purpose": "tax", "context": {"f": "%s"}, "plaintext": ""}',
        ),
        (
            "/v1/encrypt",
            '{"tenant": "131016", "purpose": "tax", "context": {"%s": "v"}, "plaintext": ""}',
        ),
        ("/v1/encrypt", '{"tenant": "131016", "purpose": "resident", "plaintext": "eA%s=="}'),
        ("/v1/encrypt", '{"tenant": "131016", "purpose": "res%sident", "plaintext": "eA=="}'),
        (
            "/v1/records/resident/encrypt",
            '{"tenant": "131016", "record_id": "R-%s", "record": {"氏名": "x"}}',
        ),
    ],
    ids=["context-value", "context-key", "plaintext", "purpose", "record-id"],
)
def test_lone_surrogate_is_invalid_request(full: httpx.Client, path: str, template: str) -> None:
    """A lone surrogate (JSON \\ud800) in a string is 400 INVALID_REQUEST, never a 500."""
    raw = (template % "\\ud800").encode("utf-8")
    assert_problem(_post_raw(full, path, raw), 400, "INVALID_REQUEST")


def test_lone_surrogate_in_record_value_is_rejected(full: httpx.Client) -> None:
    """A lone surrogate in a record field value is refused with a 4xx problem, never a 500."""
    record = json.dumps({**MYNUMBER_RECORD, "氏名": "\ud800"}, ensure_ascii=True)
    raw = f'{{"tenant": "131016", "record_id": "M-1", "record": {record}}}'.encode()
    r = _post_raw(full, "/v1/records/mynumber/encrypt", raw)
    assert r.status_code in (400, 422), r.text
    assert_problem(r, r.status_code, r.json()["code"])
    assert r.json()["code"] in ("INVALID_REQUEST", "VALIDATION_FAILED")


def test_bad_record_id_is_invalid_request(full: httpx.Client) -> None:
    """An empty or over-long record_id is 400 INVALID_REQUEST."""
    for record_id in ("", "R" * 129, "R\x00"):
        r = record_call(full, "mynumber", "encrypt", record_id, MYNUMBER_RECORD)
        assert_problem(r, 400, "INVALID_REQUEST")


def test_bad_record_type_name_is_invalid_request(full: httpx.Client) -> None:
    """A record type that is not a well-formed name is 400 INVALID_REQUEST."""
    r = record_call(full, "Bad_Type", "encrypt", "R-1", {"a": "b"})
    assert_problem(r, 400, "INVALID_REQUEST")


# ---------------------------------------------------------------------- INVALID_TENANT


@pytest.mark.parametrize(
    "tenant",
    ["131017", "13101", "1310160", "481000", "001000", "１３１０１６", "Digital-Agency", "-abc",
     "a", "abc-", "ab--c", "digital_agency", "", "a" * 64],
)  # fmt: skip
def test_invalid_tenant(full: httpx.Client, tenant: str) -> None:
    """A tenant that is neither a valid LG code (check digit) nor a valid slug is 400
    INVALID_TENANT, on every kind of endpoint."""
    assert_problem(encrypt(full, "x", tenant=tenant), 400, "INVALID_TENANT")
    assert_problem(decrypt(full, "kg1.AAAA", tenant=tenant), 400, "INVALID_TENANT")
    assert_problem(batch(full, "rewrap", [], tenant=tenant), 400, "INVALID_TENANT")
    r = record_call(full, "mynumber", "encrypt", "M-1", MYNUMBER_RECORD, tenant=tenant)
    assert_problem(r, 400, "INVALID_TENANT")


def test_invalid_tenant_never_echoes_long_numbers(full: httpx.Client) -> None:
    """A My Number sent as tenant is refused without being echoed in the error."""
    problem = assert_problem(encrypt(full, "x", tenant="123456789018"), 400, "INVALID_TENANT")
    assert "123456789018" not in problem["detail"]


# ---------------------------------------------------------------------- UNAUTHENTICATED


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer a b", "Basic dXNlcjpwYXNz", "Token abc", "bearer-kgt_x",
     "Bearer kgt_wrongwrongwrongwrongwrongwrongwrongwrongwr"],
    ids=["missing", "empty", "bearer-only", "two-words", "basic", "token", "no-space", "wrong"],
)  # fmt: skip
def test_unauthenticated(api: ApiEnv, authorization: str | None) -> None:
    """Missing, malformed or wrong credentials are 401 UNAUTHENTICATED with WWW-Authenticate."""
    headers = {} if authorization is None else {"Authorization": authorization}
    client = api.client(headers=headers)
    for path, body in [
        ("/v1/encrypt", ENCRYPT_BODY),
        ("/v1/decrypt", {"tenant": CHIYODA, "purpose": "resident", "ciphertext": "kg1.AAAA"}),
        ("/v1/records/resident/decrypt", {"tenant": CHIYODA, "record_id": "R", "record": {}}),
        ("/v1/rewrap/batch", {"tenant": CHIYODA, "purpose": "resident", "items": []}),
    ]:
        r = client.post(path, json=body)
        assert_problem(r, 401, "UNAUTHENTICATED")
        assert r.headers["www-authenticate"].lower().startswith("bearer")


def test_revoked_token_is_refused(api: ApiEnv) -> None:
    """A token works until its identity is revoked, then is 401 within the refresh interval."""
    _, token = api.gw.add_identity(
        ACTOR, "to-revoke", tenants=[CHIYODA], purposes=["*"], record_types=["*"],
        operations=["*"],
    )  # fmt: skip
    assert token is not None
    client = api.client(token)
    assert encrypt(client, "x").status_code == 200
    api.gw.revoke_identity(ACTOR, "to-revoke")
    deadline = time.monotonic() + 30  # refresh interval, with room for a busy machine
    while (r := encrypt(client, "x")).status_code == 200:
        assert time.monotonic() < deadline, "the revoked token still works"
        time.sleep(0.05)
    assert_problem(r, 401, "UNAUTHENTICATED")


# ---------------------------------------------------------------------- FORBIDDEN


def test_forbidden_tenant(full: httpx.Client, osaka: httpx.Client) -> None:
    """An identity is refused tenants it was not granted (403 FORBIDDEN)."""
    assert_problem(encrypt(full, "x", tenant=OSAKA), 403, "FORBIDDEN")
    ct = ciphertext_of(osaka, "x", tenant=OSAKA)
    assert_problem(decrypt(full, ct, tenant=OSAKA), 403, "FORBIDDEN")
    r = record_call(full, "mynumber", "encrypt", MYNUMBER_ID, MYNUMBER_RECORD, tenant=OSAKA)
    assert_problem(r, 403, "FORBIDDEN")
    assert_problem(batch(full, "encrypt", [], tenant=OSAKA), 403, "FORBIDDEN")


def test_forbidden_purpose(full: httpx.Client, reader: httpx.Client) -> None:
    """A decrypt-only reader of resident+tax is refused the mynumber purpose (403)."""
    ct = ciphertext_of(full, "x", purpose="mynumber")
    assert_problem(decrypt(reader, ct, purpose="mynumber"), 403, "FORBIDDEN")
    r = batch(reader, "decrypt", [{"ciphertext": ct}], purpose="mynumber")
    assert_problem(r, 403, "FORBIDDEN")
    ok = ciphertext_of(full, "y", purpose="tax")
    assert decrypt(reader, ok, purpose="tax").status_code == 200


def test_forbidden_operation(
    full: httpx.Client,
    reader: httpx.Client,
    encryptor: httpx.Client,
    rewrapper: httpx.Client,
) -> None:
    """Identities are refused operations they were not granted (403 FORBIDDEN)."""
    ct = ciphertext_of(encryptor, "x")
    assert_problem(encrypt(reader, "x"), 403, "FORBIDDEN")
    assert_problem(decrypt(encryptor, ct), 403, "FORBIDDEN")
    assert_problem(encrypt(rewrapper, "x"), 403, "FORBIDDEN")
    assert_problem(decrypt(rewrapper, ct), 403, "FORBIDDEN")
    assert_problem(batch(encryptor, "rewrap", [{"ciphertext": ct}]), 403, "FORBIDDEN")
    assert_problem(batch(reader, "encrypt", [{"plaintext": "eA=="}]), 403, "FORBIDDEN")
    r = record_call(reader, "tax", "encrypt", "T-1", {"氏名": "x"})
    assert_problem(r, 403, "FORBIDDEN")
    enc = record_call(full, "mynumber", "encrypt", MYNUMBER_ID, MYNUMBER_RECORD).json()["record"]
    assert_problem(
        record_call(encryptor, "mynumber", "decrypt", MYNUMBER_ID, enc), 403, "FORBIDDEN"
    )
    assert decrypt(full, ct).status_code == 200


def test_forbidden_record_type(full: httpx.Client, reader: httpx.Client) -> None:
    """A reader granted resident+tax record types is refused the mynumber record type (403)."""
    enc = record_call(full, "mynumber", "encrypt", MYNUMBER_ID, MYNUMBER_RECORD).json()["record"]
    assert_problem(record_call(reader, "mynumber", "decrypt", MYNUMBER_ID, enc), 403, "FORBIDDEN")
    r = record_batch(reader, "mynumber", "decrypt", [(MYNUMBER_ID, enc)])
    assert_problem(r, 403, "FORBIDDEN")


# ---------------------------------------------------------------------- NOT_FOUND


def test_not_found_purpose_for_allowed_tenant(full: httpx.Client) -> None:
    """An unknown key purpose on a tenant the caller may use is 404 NOT_FOUND."""
    assert_problem(encrypt(full, "x", purpose="no-such-purpose"), 404, "NOT_FOUND")
    r = batch(full, "encrypt", [{"plaintext": "eA=="}], purpose="no-such-purpose")
    assert r.status_code in (200, 404)
    if r.status_code == 200:
        assert_slot_error(r.json()["items"][0], 404, "NOT_FOUND")
    else:
        assert_problem(r, 404, "NOT_FOUND")


def test_not_found_tenant(star: httpx.Client) -> None:
    """A valid but unregistered tenant is 404 NOT_FOUND for a caller allowed any tenant."""
    assert_problem(encrypt(star, "x", tenant="281000"), 404, "NOT_FOUND")


def test_not_found_record_type(full: httpx.Client) -> None:
    """An unknown record type is 404 NOT_FOUND for a caller allowed every record type."""
    assert_problem(record_call(full, "pets", "encrypt", "P-1", {"name": "x"}), 404, "NOT_FOUND")
    assert_problem(record_batch(full, "pets", "decrypt", [("P-1", {})]), 404, "NOT_FOUND")


@pytest.mark.parametrize("path", ["/v1/nothing", "/v2/encrypt", "/", "/v1/records/resident"])
def test_not_found_path(full: httpx.Client, anon: httpx.Client, path: str) -> None:
    """An unknown path is 404 NOT_FOUND as problem+json, with or without credentials."""
    assert_problem(full.post(path, json={}), 404, "NOT_FOUND")
    assert_problem(anon.get(path), 404, "NOT_FOUND")


# ---------------------------------------------------------------------- KEY_NOT_USABLE / DESTROYED


def test_disabled_key_version(api: ApiEnv, full: httpx.Client) -> None:
    """A disabled key version refuses decrypt and encrypt with 409 KEY_NOT_USABLE until enabled."""
    purpose = api.fresh_purpose()
    ct = ciphertext_of(full, "secret", purpose=purpose)
    api.gw.set_key_state(ACTOR, CHIYODA, purpose, 1, enabled=False)
    assert_problem(decrypt(full, ct, purpose=purpose), 409, "KEY_NOT_USABLE")
    assert_problem(encrypt(full, "x", purpose=purpose), 409, "KEY_NOT_USABLE")
    r = batch(full, "decrypt", [{"ciphertext": ct}], purpose=purpose)
    assert_slot_error(r.json()["items"][0], 409, "KEY_NOT_USABLE")

    api.gw.set_key_state(ACTOR, CHIYODA, purpose, 1, enabled=True)
    assert decrypt(full, ct, purpose=purpose).status_code == 200
    assert encrypt(full, "x", purpose=purpose).status_code == 200


def test_disabled_tenant(api: ApiEnv, star: httpx.Client) -> None:
    """A disabled tenant's keys refuse encrypt and decrypt with 409 until it is enabled again."""
    tenant = "disabled-org"
    api.gw.add_tenant(ACTOR, tenant, name="無効化試験")
    api.gw.create_key(ACTOR, tenant, "resident")
    ct = ciphertext_of(star, "x", tenant=tenant)
    api.gw.set_tenant_enabled(ACTOR, tenant, False)
    assert_problem(encrypt(star, "x", tenant=tenant), 409, "KEY_NOT_USABLE")
    assert_problem(decrypt(star, ct, tenant=tenant), 409, "KEY_NOT_USABLE")
    api.gw.set_tenant_enabled(ACTOR, tenant, True)
    assert decrypt(star, ct, tenant=tenant).status_code == 200
    assert encrypt(star, "x", tenant=tenant).status_code == 200


def test_no_active_version_refuses_encrypt(api: ApiEnv, full: httpx.Client) -> None:
    """With the active version disabled and the old one decrypt-only, encrypt is 409 while
    the old version still decrypts."""
    purpose = api.fresh_purpose()
    old = ciphertext_of(full, "old", purpose=purpose)
    api.gw.rotate_key(ACTOR, CHIYODA, purpose)
    api.gw.set_key_state(ACTOR, CHIYODA, purpose, 2, enabled=False)
    assert_problem(encrypt(full, "x", purpose=purpose), 409, "KEY_NOT_USABLE")
    assert decrypt(full, old, purpose=purpose).status_code == 200


def test_destroyed_key_version(api: ApiEnv, full: httpx.Client, rewrapper: httpx.Client) -> None:
    """A ciphertext whose key version was destroyed is 410 KEY_DESTROYED."""
    purpose = api.fresh_purpose()
    ct = ciphertext_of(full, "shredded", purpose=purpose)
    assert decrypt(full, ct, purpose=purpose).status_code == 200
    api.gw.registry.set_version_state(CHIYODA, purpose, 1, KeyState.DESTROYED)
    api.gw.keys.refresh(force=True)
    assert_problem(decrypt(full, ct, purpose=purpose), 410, "KEY_DESTROYED")
    r = batch(full, "decrypt", [{"ciphertext": ct}], purpose=purpose)
    assert_slot_error(r.json()["items"][0], 410, "KEY_DESTROYED")
    r = batch(rewrapper, "rewrap", [{"ciphertext": ct}], purpose=purpose)
    assert_slot_error(r.json()["items"][0], 410, "KEY_DESTROYED")


# ---------------------------------------------------------------------- PAYLOAD_TOO_LARGE


def test_plaintext_over_limit(full: httpx.Client) -> None:
    """A plaintext one byte over the configured limit is 413; at the limit it is fine."""
    assert encrypt(full, b"a" * MAX_PLAINTEXT).status_code == 200
    assert_problem(encrypt(full, b"a" * (MAX_PLAINTEXT + 1)), 413, "PAYLOAD_TOO_LARGE")


def test_record_field_over_plaintext_limit(full: httpx.Client) -> None:
    """A record value over the plaintext limit is refused with a 4xx problem, never a 500."""
    record = {"name": "x" * (MAX_PLAINTEXT + 10)}
    r = record_call(full, "typed", "encrypt", "X-1", record)
    assert_problem(r, 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize(
    ("path", "item"),
    [
        ("/v1/encrypt/batch", {"plaintext": "eA=="}),
        ("/v1/decrypt/batch", {"ciphertext": "kg1.AAAA"}),
        ("/v1/rewrap/batch", {"ciphertext": "kg1.AAAA"}),
        ("/v1/records/mynumber/encrypt/batch", {"record_id": "M-1", "record": {}}),
        ("/v1/records/mynumber/decrypt/batch", {"record_id": "M-1", "record": {}}),
    ],
    ids=["encrypt", "decrypt", "rewrap", "record-encrypt", "record-decrypt"],
)
def test_batch_over_max_items(full: httpx.Client, path: str, item: dict[str, Any]) -> None:
    """A batch with one item more than the limit is 413 as a whole; at the limit it is 200."""
    base: dict[str, Any] = {"tenant": CHIYODA}
    if "/records/" not in path:
        base["purpose"] = "resident"
    r = full.post(path, json={**base, "items": [item] * MAX_BATCH})
    assert r.status_code == 200, r.text
    r = full.post(path, json={**base, "items": [item] * (MAX_BATCH + 1)})
    assert_problem(r, 413, "PAYLOAD_TOO_LARGE")


def test_body_over_max_bytes(full: httpx.Client) -> None:
    """A body over the configured byte limit is 413 before it is parsed."""
    filler = "A" * MAX_BODY
    r = full.post("/v1/encrypt", json={**ENCRYPT_BODY, "plaintext": filler})
    assert_problem(r, 413, "PAYLOAD_TOO_LARGE")


def test_chunked_body_over_max_bytes(full: httpx.Client) -> None:
    """A chunked body (no Content-Length) that grows over the limit is 413 PAYLOAD_TOO_LARGE."""

    def chunks() -> Iterator[bytes]:
        yield b'{"tenant": "131016", "purpose": "resident", "plaintext": "'
        for _ in range(MAX_BODY // 1024 + 8):
            yield b"A" * 1024
        yield b'"}'

    r = full.post("/v1/encrypt", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "PAYLOAD_TOO_LARGE")


def _raw_request(url: str, head: str, body: bytes) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(head.encode("latin-1") + body)
    response = http.client.HTTPResponse(sock)
    response.begin()
    text = response.read()
    sock.close()
    assert b"Traceback" not in text
    return response


def test_content_length_claims_over_limit(api: ApiEnv) -> None:
    """A Content-Length over the limit is refused with 413 without waiting for the body."""
    head = (
        "POST /v1/encrypt HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {api.tokens['full']}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY * 100}\r\n\r\n"
    )
    started = time.monotonic()
    response = _raw_request(api.url, head, b'{"tenant": "131016"')
    assert time.monotonic() - started < 5
    assert response.status == 413
    assert response.getheader("content-type", "").startswith("application/problem+json")
    assert response.getheader("x-request-id")


def test_content_length_smaller_than_body(api: ApiEnv) -> None:
    """A Content-Length smaller than the body actually sent is answered with a 4xx, never a 5xx
    and never a stack trace (HTTP framing errors are the server's own plain-text 400)."""
    body = json.dumps({**ENCRYPT_BODY, "plaintext": "A" * (MAX_BODY + 4096)}).encode()
    head = (
        "POST /v1/encrypt HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {api.tokens['full']}\r\n"
        "Content-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    )
    response = _raw_request(api.url, head, body)
    assert response.status in (400, 413), response.status
    # The gateway keeps serving.
    assert encrypt(api.clients["full"], "still fine").status_code == 200


# ---------------------------------------------------------------------- DECRYPTION_FAILED


def test_tampered_byte_anywhere(full: httpx.Client) -> None:
    """Flipping a bit in any byte of the envelope (header, wrapped DEK, commitment, nonce,
    ciphertext or tag) is 422 DECRYPTION_FAILED."""
    context = {"record_id": "R-1"}
    ct = ciphertext_of(full, "tamper me", context=context)
    size = len(envelope(ct))
    tampered = [flip(ct, i) for i in range(size)]
    codes: dict[int, str] = {}
    for start in range(0, size, MAX_BATCH):
        chunk = tampered[start : start + MAX_BATCH]
        r = batch(full, "decrypt", [{"context": context, "ciphertext": t} for t in chunk])
        assert r.status_code == 200, r.text
        for offset, slot in enumerate(r.json()["items"]):
            codes[start + offset] = slot.get("error", {}).get("code", "DECRYPTED")
    wrong = {i: c for i, c in codes.items() if c != "DECRYPTION_FAILED"}
    assert not wrong, f"byte index -> outcome for tampered envelopes: {wrong}"

    for i in range(0, size, 9):
        assert_problem(decrypt(full, tampered[i], context=context), 422, "DECRYPTION_FAILED")
    assert decrypt(full, ct, context=context).status_code == 200


def test_truncated_and_extended(full: httpx.Client) -> None:
    """Truncated or extended ciphertexts, in binary or text form, are 422 DECRYPTION_FAILED."""
    ct = ciphertext_of(full, "whole")
    raw = envelope(ct)
    variants = [
        to_text(raw[:-1]),
        to_text(raw[:-16]),
        to_text(raw[: len(raw) // 2]),
        to_text(raw[:10]),
        to_text(raw + b"\x00"),
        to_text(raw + raw[-16:]),
        ct[:-1],
        ct + "A",
        ct + "AA",
        "kg1.",
        "kg1",
        "",
        ct.replace("kg1.", "kg2.", 1),
        ct.replace("kg1.", "", 1),
        ct[:20] + "+" + ct[21:],
        ct[:20] + "=" + ct[21:],
        ct[:20] + "*" + ct[21:],
    ]
    for text in variants:
        assert_problem(decrypt(full, text), 422, "DECRYPTION_FAILED")


def test_wrong_context(full: httpx.Client) -> None:
    """A ciphertext decrypted with any other context is 422 DECRYPTION_FAILED."""
    context = {"record_id": "R-000123", "field": "name"}
    ct = ciphertext_of(full, "bound", context=context)
    for other in [
        {},
        {"record_id": "R-000124", "field": "name"},
        {"record_id": "R-000123"},
        {"record_id": "R-000123", "field": "name", "extra": ""},
        {"record_id": "R-000123", "field": "Name"},
    ]:
        assert_problem(decrypt(full, ct, context=other), 422, "DECRYPTION_FAILED")
    assert_problem(decrypt(full, ct, context=context, purpose="tax"), 422, "DECRYPTION_FAILED")
    assert decrypt(full, ct, context=context).status_code == 200


def test_other_tenants_ciphertext(full: httpx.Client, star: httpx.Client) -> None:
    """A ciphertext made for another tenant is 422 DECRYPTION_FAILED under the caller's tenant."""
    ct = ciphertext_of(star, "osaka data", tenant=OSAKA)
    assert_problem(decrypt(full, ct), 422, "DECRYPTION_FAILED")
    assert_problem(decrypt(star, ct, tenant="digital-agency"), 422, "DECRYPTION_FAILED")


def test_decryption_failures_look_alike(full: httpx.Client, star: httpx.Client) -> None:
    """Tampered, wrong-context and foreign ciphertexts get the same opaque detail."""
    ct = ciphertext_of(full, "x", context={"a": "1"})
    foreign = ciphertext_of(star, "x", tenant=OSAKA, context={"a": "1"})
    details = {
        assert_problem(decrypt(full, t, context=c), 422, "DECRYPTION_FAILED")["detail"]
        for t, c in [(flip(ct, len(envelope(ct)) - 1), {"a": "1"}), (ct, {"a": "2"}),
                     (foreign, {"a": "1"})]
    }  # fmt: skip
    assert len(details) == 1, details


# ---------------------------------------------------------------------- VALIDATION_FAILED


def test_bad_my_number(full: httpx.Client) -> None:
    """A My Number with a wrong check digit is 422 VALIDATION_FAILED naming the field only."""
    good = str(MYNUMBER_RECORD["個人番号"])
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    r = record_call(full, "mynumber", "encrypt", MYNUMBER_ID, {**MYNUMBER_RECORD, "個人番号": bad})
    problem = assert_problem(r, 422, "VALIDATION_FAILED")
    assert "個人番号" in problem["detail"]
    assert bad not in problem["detail"]


def test_unknown_field(full: httpx.Client) -> None:
    """A field the policy does not know is 422 VALIDATION_FAILED naming it, not its value."""
    record = {**MYNUMBER_RECORD, "血液型": "極秘の値-AB型"}
    problem = assert_problem(
        record_call(full, "mynumber", "encrypt", MYNUMBER_ID, record), 422, "VALIDATION_FAILED"
    )
    assert "血液型" in problem["detail"]
    assert "極秘の値" not in problem["detail"]


def test_invalid_values_are_not_echoed(full: httpx.Client) -> None:
    """Every validation problem names fields and rules but never echoes a value."""
    record = {
        **MYNUMBER_RECORD,
        "性別": "秘密の性別値",
        "生年月日": "1999-02-30",
        "氏名カナ": "ひらがなの秘密",
        "個人番号": None,
    }
    r = record_call(full, "mynumber", "encrypt", MYNUMBER_ID, record)
    problem = assert_problem(r, 422, "VALIDATION_FAILED")
    for name in ("性別", "生年月日", "氏名カナ", "個人番号"):
        assert name in problem["detail"]
    for value in ("秘密の性別値", "1999-02-30", "ひらがなの秘密"):
        assert value not in problem["detail"]


def test_nested_value_is_rejected(full: httpx.Client) -> None:
    """A record value that is an object or array is refused: values are JSON scalars."""
    for value in ({"a": 1}, [1, 2]):
        record = {"name": value}
        r = record_call(full, "typed", "encrypt", "X-2", record)
        assert_problem(r, 422, "VALIDATION_FAILED")
