"""The opaque batch endpoints' fast path (keygate.api._batch) over HTTP: same answers as the
declared FastAPI endpoints, for ordinary and hostile bodies alike.

Every body is sent twice to the same server: as ``application/json`` (the fast path may take it)
and as ``application/x-keygate+json`` (FastAPI reads that as JSON too, but the fast path never
takes it, so the declared endpoint with its Pydantic model answers).  Both answers — status,
content type, body byte for byte, and the audit event of each request — must agree, and a spy on
the fast path tells whether it took the request or left it to the declared endpoint.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from api_support import (
    ACTOR,
    CHIYODA,
    MAX_BATCH,
    MAX_PLAINTEXT,
    ApiEnv,
    assert_problem,
    assert_slot_error,
    b64,
    ciphertext_of,
    flip,
)

import keygate.api._batch as fast_module

pytestmark = pytest.mark.api

FAST = "application/json"
DECLARED = "application/x-keygate+json"
P = "resident"
KG1 = re.compile(r'"kg1\.[A-Za-z0-9_-]*"')


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """One entry per request that reached the fast path: True if it answered, False if it left
    the request to the declared endpoint."""
    seen: list[bool] = []
    original = fast_module.run_in_threadpool

    async def spy(func: Callable[..., Any], *args: Any) -> Any:
        try:
            result = await original(func, *args)
        except BaseException:
            seen.append(True)  # it took the request, and answered with the service's error
            raise
        seen.append(result is not None)
        return result

    monkeypatch.setattr(fast_module, "run_in_threadpool", spy)
    yield seen


def _events(api: ApiEnv, request_id: str) -> list[dict[str, Any]]:
    fields = ("action", "outcome", "actor", "code", "tenant", "purpose", "key_version", "items",
              "items_failed", "detail")  # fmt: skip
    return [{f: getattr(e, f, None) for f in fields} for e in api.events(request_id)]


def _send(
    client: httpx.Client, path: str, raw: bytes, ctype: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return client.post(path, content=raw, headers={"content-type": ctype, **(headers or {})})


def _same(
    api: ApiEnv,
    client: httpx.Client,
    path: str,
    raw: bytes,
    taken: list[bool],
    *,
    expect_taken: bool,
    headers: dict[str, str] | None = None,
    random_ciphertexts: bool = False,
) -> httpx.Response:
    """Send ``raw`` both ways; check that both answers and their audit events agree."""
    before = len(taken)
    fast = _send(client, path, raw, FAST, headers)
    if expect_taken:
        assert taken[before:] == [True], fast.text[:300]
    else:  # declined ([False]), or never offered (an empty body: [])
        assert taken[before:] in ([False], []), fast.text[:300]
    after = len(taken)
    declared = _send(client, path, raw, DECLARED, headers)
    assert len(taken) == after  # that content type never reaches the fast path
    assert fast.status_code == declared.status_code, (fast.text[:300], declared.text[:300])
    assert fast.headers["content-type"] == declared.headers["content-type"]
    fb, db = fast.text, declared.text
    fb = fb.replace(fast.headers["x-request-id"], "<rid>")
    db = db.replace(declared.headers["x-request-id"], "<rid>")
    if random_ciphertexts:  # encrypt: fresh nonces; compare the shape, check the values below
        fb, db = KG1.sub('"<kg1>"', fb), KG1.sub('"<kg1>"', db)
    assert fb == db
    assert int(fast.headers["content-length"]) == len(fast.content)
    assert _events(api, fast.headers["x-request-id"]) == _events(
        api, declared.headers["x-request-id"]
    )
    return fast


def _doc(items: list[Any], **top: Any) -> bytes:
    return json.dumps({"tenant": CHIYODA, "purpose": P, "items": items, **top}).encode()


# ---------------------------------------------------------------------- ordinary batches


def test_round_trip_through_the_fast_path(
    api: ApiEnv, full: httpx.Client, taken: list[bool]
) -> None:
    """Encrypt, decrypt and rewrap batches (with and without contexts) are answered by the fast
    path, exactly as the declared endpoints answer them."""
    values = [b"", b"x", "山田 太郎".encode(), bytes(range(256)) * 4, b"\x00" * MAX_PLAINTEXT]
    contexts: list[dict[str, str] | None] = [None, {}, {"record_id": "R-1", "field": "氏名"},
                                             None, {"a": "1"}]  # fmt: skip
    items = [
        {"plaintext": b64(v), **({} if c is None else {"context": c})}
        for v, c in zip(values, contexts, strict=True)
    ]
    r = _same(api, full, "/v1/encrypt/batch", _doc(items), taken, expect_taken=True,
              random_ciphertexts=True)  # fmt: skip
    cts = [slot["ciphertext"] for slot in r.json()["items"]]
    assert len(cts) == len(values)

    dec = [{"ciphertext": ct, **({} if c is None else {"context": c})}
           for ct, c in zip(cts, contexts, strict=True)]  # fmt: skip
    r = _same(api, full, "/v1/decrypt/batch", _doc(dec), taken, expect_taken=True)
    assert [base64.b64decode(s["plaintext"]) for s in r.json()["items"]] == values

    r = _same(api, full, "/v1/rewrap/batch", _doc([{"ciphertext": c} for c in cts]), taken,
              expect_taken=True)  # fmt: skip
    assert [s["ciphertext"] for s in r.json()["items"]] == cts  # already current: unchanged

    purpose = api.fresh_purpose()
    old = [ciphertext_of(full, f"v{i}", purpose=purpose) for i in range(3)]
    api.gw.rotate_key(ACTOR, CHIYODA, purpose)
    api.gw.keys.refresh(force=True)
    raw = json.dumps({"tenant": CHIYODA, "purpose": purpose,
                      "items": [{"ciphertext": c} for c in old]}).encode()  # fmt: skip
    r = _same(api, full, "/v1/rewrap/batch", raw, taken, expect_taken=True)
    new = [s["ciphertext"] for s in r.json()["items"]]
    assert all(n != o for n, o in zip(new, old, strict=True))
    dec_raw = json.dumps({"tenant": CHIYODA, "purpose": purpose,
                          "items": [{"ciphertext": c} for c in new]}).encode()  # fmt: skip
    r = _same(api, full, "/v1/decrypt/batch", dec_raw, taken, expect_taken=True)
    assert [s["plaintext"] for s in r.json()["items"]] == [b64(f"v{i}") for i in range(3)]


def test_empty_and_full_batches(api: ApiEnv, full: httpx.Client, taken: list[bool]) -> None:
    """An empty batch, a batch at the item limit and one over it (413 as a whole)."""
    for op, item in [("encrypt", {"plaintext": "eA=="}), ("decrypt", {"ciphertext": "kg1.AAAA"}),
                     ("rewrap", {"ciphertext": "kg1.AAAA"})]:  # fmt: skip
        path = f"/v1/{op}/batch"
        _same(api, full, path, _doc([]), taken, expect_taken=True)
        _same(api, full, path, _doc([item] * MAX_BATCH), taken, expect_taken=True,
              random_ciphertexts=True)  # fmt: skip
        r = _same(api, full, path, _doc([item] * (MAX_BATCH + 1)), taken, expect_taken=True)
        assert_problem(r, 413, "PAYLOAD_TOO_LARGE")


# ---------------------------------------------------------------------- per-item errors


def test_bad_items_get_the_same_slot_errors(
    api: ApiEnv, full: httpx.Client, taken: list[bool]
) -> None:
    """Bad base64, oversized plaintexts, bad contexts and damaged ciphertexts fail in their own
    slots with the same error as before; the other items succeed."""
    plaintexts = ["eA==", "not base64!", "eA", "eA=", "-_-_", "eA==\n", "eA== ", "ＡＡＡＡ",
                  "e A==", "eB==", "=eA=", "eA==eA==", "", b64(b"a" * (MAX_PLAINTEXT + 1)),
                  b64(b"a" * MAX_PLAINTEXT)]  # fmt: skip
    items: list[dict[str, Any]] = [{"plaintext": t} for t in plaintexts]
    items += [{"plaintext": "eA==", "context": c} for c in
              [{"bad key": "v"}, {"k": "v" * 1025}, {f"k{i}": "v" for i in range(33)},
               {"": "v"}, {"k": "\x00"}, {"鍵": "v"}]]  # fmt: skip
    r = _same(api, full, "/v1/encrypt/batch", _doc(items), taken, expect_taken=True,
              random_ciphertexts=True)  # fmt: skip
    slots = r.json()["items"]
    assert_slot_error(slots[1], 400, "INVALID_REQUEST")
    assert_slot_error(slots[13], 413, "PAYLOAD_TOO_LARGE")
    assert "ciphertext" in slots[0] and "ciphertext" in slots[14]

    ct = ciphertext_of(full, "damage me", context={"r": "1"})
    texts = [ct, ct[:-1], ct + "A", ct + "AA", "kg1.", "kg1", "", "kg2." + ct[4:], ct[4:],
             ct[:20] + "+" + ct[21:], ct[:20] + "=" + ct[21:], ct[:20] + "*" + ct[21:],
             ct[:20] + "é" + ct[21:], ct + "=", ct + "\n", " " + ct, flip(ct, 3), flip(ct, 150),
             "kg1." + "A" * 100]  # fmt: skip
    texts += [ct[:-1] + ch for ch in "AQgw_-9zB"]
    dec = [{"ciphertext": t, "context": {"r": "1"}} for t in texts]
    dec.append({"ciphertext": ct})  # wrong context
    r = _same(api, full, "/v1/decrypt/batch", _doc(dec), taken, expect_taken=True)
    slots = r.json()["items"]
    assert slots[0] == {"plaintext": b64("damage me")}
    for slot in slots[1:]:
        if "error" in slot:
            assert_slot_error(slot, 422, "DECRYPTION_FAILED")

    rew = [{"ciphertext": t} for t in texts]
    rew.append({"ciphertext": ct[:-8] + '"\\\x01<>&' + ct[-2:]})  # damaged data part, echoed
    r = _same(api, full, "/v1/rewrap/batch", _doc(rew), taken, expect_taken=True)
    assert r.json()["items"][-1] == {"ciphertext": rew[-1]["ciphertext"]}
    # no failed item: the quick frame check sees the quote, backslash and control character
    r = _same(api, full, "/v1/rewrap/batch", _doc([rew[0], rew[-1]]), taken, expect_taken=True)
    assert r.json()["items"] == [rew[0], rew[-1]]
    assert b'\\"\\\\\\u0001' in r.content


# ---------------------------------------------------------------------- malformed batches

FIELD = {"encrypt": "plaintext", "decrypt": "ciphertext", "rewrap": "ciphertext"}


def _hostile(op: str, good: str) -> list[tuple[str, bytes]]:
    """(name, raw body) of batches that must get the declared endpoint's answer."""
    field = FIELD[op]
    base = {"tenant": CHIYODA, "purpose": P}
    item = {field: good}
    raw = json.dumps({**base, "items": [item]}).encode()

    def doc(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode()

    def with_value(literal: str) -> bytes:
        return (
            json.dumps({**base, "items": [{field: "@@"}]})
            .encode()
            .replace(b'"@@"', literal.encode())
        )

    cases = [
        ("items-null", doc({**base, "items": None})),
        ("items-object", doc({**base, "items": {"a": 1}})),
        ("items-strings", doc({**base, "items": [good]})),
        ("items-nested", doc({**base, "items": [[item]]})),
        ("value-int", doc({**base, "items": [{field: 1}]})),
        ("value-null", doc({**base, "items": [{field: None}]})),
        ("value-bool", doc({**base, "items": [{field: True}]})),
        ("value-list", doc({**base, "items": [{field: [good]}]})),
        ("value-object", doc({**base, "items": [{field: {"a": good}}]})),
        ("item-extra", doc({**base, "items": [{**item, "y": 1}]})),
        ("item-extra-str", doc({**base, "items": [{**item, "y": "z"}]})),
        ("item-context-and-extra", doc({**base, "items": [{**item, "context": {}, "y": "z"}]})),
        ("item-empty", doc({**base, "items": [{}]})),
        ("item-missing-value", doc({**base, "items": [{"context": {}}]})),
        ("context-null", doc({**base, "items": [{**item, "context": None}]})),
        ("context-list", doc({**base, "items": [{**item, "context": ["a"]}]})),
        ("context-int-value", doc({**base, "items": [{**item, "context": {"a": 1}}]})),
        ("context-nested", doc({**base, "items": [{**item, "context": {"a": {"b": "c"}}}]})),
        ("top-extra", doc({**base, "items": [item], "all": 1})),
        ("top-missing-tenant", doc({"purpose": P, "items": [item]})),
        ("top-missing-items", doc(base)),
        ("tenant-int", doc({**base, "tenant": 131016, "items": [item]})),
        ("purpose-list", doc({**base, "purpose": [P], "items": [item]})),
        ("doc-array", doc([base])),
        ("doc-string", doc("x")),
        ("doc-null", b"null"),
        ("truncated", raw[:-3]),
        ("garbage", b"not json at all"),
        ("trailing-comma", raw[:-1] + b",}"),
        ("trailing-garbage", raw + b"x"),
        ("nan", with_value("NaN")),
        ("infinity", with_value("-Infinity")),
        ("huge-int", with_value("1" * 5000)),
        ("huge-float", with_value("1e400")),
        ("big-int-tenant", raw.replace(b'"131016"', b"123456789012345678901234567890")),
        ("dup-tenant-bad-last", raw.replace(b'"purpose"', b'"tenant": 5, "purpose"', 1)),
        ("dup-items-bad-last", raw[:-1] + b', "items": 5}'),
        ("dup-value-bad-last", raw.replace(b"}]", b', "' + field.encode() + b'": 5}]', 1)),
        ("deep-items", raw.replace(b"[", b"[" * 20_000, 1).replace(b"]", b"]" * 20_000, 1)),
        ("deep-object", b'{"a":' * 5_000 + b"1" + b"}" * 5_000),
        ("deep-1000", doc({**base, "items": "X"}).replace(b'"X"', b"[" * 1000 + b"]" * 1000)),
        ("non-utf8-key", raw.replace(b'"tenant"', b'"ten\xffant"')),
        ("non-utf8-value", raw.replace(b'"' + P.encode() + b'"', b'"res\xc3\x28ident"')),
        ("overlong-utf8", raw.replace(b'"tenant"', b'"t\xc0\xaenant"')),
        ("encoded-surrogate", raw.replace(b'"' + P.encode() + b'"', b'"res\xed\xa0\x80ident"')),
        ("lone-surrogate-value", with_value(json.dumps(good[:4]) [:-1] + '\\ud800"')),
        ("lone-surrogate-purpose", raw.replace(b'"' + P.encode() + b'"', b'"res\\ud800ident"')),
        ("lone-surrogate-field", raw.replace(b'"' + field.encode() + b'"',
                                             b'"' + field.encode() + b'\\udc00"')),
        ("escaped-field-name", raw.replace(b'"' + field.encode() + b'"',
                                           b'"' + "".join(f"\\u{ord(c):04x}" for c in field)
                                           .encode() + b'"')),
        ("nul-in-value", with_value('"eA\\u0000=="')),
        ("raw-control-char", with_value('"eA\x01=="')),
        ("bom", b"\xef\xbb\xbf" + raw),
        ("utf16", json.dumps({**base, "items": [item]}).encode("utf-16")),
        ("empty", b""),
        ("whitespace", b" \n\t "),
    ]  # fmt: skip
    if op != "rewrap":
        cases.append(("context-lone-surrogate",
                      raw.replace(b"}]", b', "context": {"k": "v\\ud800"}}]', 1)))  # fmt: skip
    else:
        cases.append(("rewrap-context", doc({**base, "items": [{**item, "context": {}}]})))
    return cases


# Bodies the fast path takes as they are: same values for Pydantic as for the fast path
# (json.loads reads a UTF-8 BOM, UTF-16, and UTF-8-encoded surrogates; Pydantic takes strings with
# lone surrogates and NULs: the service then refuses those values, in their slots or as a whole)
_TAKEN = {
    "escaped-field-name",
    "nul-in-value",
    "bom",
    "utf16",
    "lone-surrogate-value",
    "lone-surrogate-purpose",
    "context-lone-surrogate",
    "encoded-surrogate",
}


@pytest.mark.parametrize("op", ["encrypt", "decrypt", "rewrap"])
def test_hostile_bodies_get_the_declared_answer(
    api: ApiEnv, full: httpx.Client, taken: list[bool], op: str
) -> None:
    """Wrong types, unknown fields, malformed or hostile JSON (deep nesting, huge numbers,
    NaN, non-UTF-8 bytes, lone surrogates, BOM, UTF-16, duplicate keys) get exactly the answer
    of the declared endpoint: the fast path takes only what that endpoint would accept."""
    good = "eA==" if op == "encrypt" else ciphertext_of(full, "hostile")
    path = f"/v1/{op}/batch"
    outcomes = {}
    for name, raw in _hostile(op, good):
        before = len(taken)
        r = _same(api, full, path, raw, taken, expect_taken=name in _TAKEN,
                  random_ciphertexts=op == "encrypt")  # fmt: skip
        outcomes[name] = r.status_code
        if name not in _TAKEN:
            assert True not in taken[before:], name
        if r.status_code != 200:
            assert_problem(r, r.status_code, r.json()["code"])
    assert outcomes["deep-items"] == outcomes["deep-object"] == 400
    assert outcomes["non-utf8-value"] == outcomes["garbage"] == outcomes["value-int"] == 400
    assert outcomes["huge-int"] == outcomes["nan"] == 400
    assert all(status < 500 for status in outcomes.values()), outcomes


def test_duplicate_keys_take_the_last_value_both_ways(
    api: ApiEnv, full: httpx.Client, taken: list[bool]
) -> None:
    """Duplicate keys mean what json.loads makes of them (the last one wins), on both paths."""
    raw = (b'{"tenant": "271004", "tenant": "131016", "purpose": "resident", '
           b'"items": [{"plaintext": 5, "plaintext": "eA=="}]}')  # fmt: skip
    r = _same(api, full, "/v1/encrypt/batch", raw, taken, expect_taken=True,
              random_ciphertexts=True)  # fmt: skip
    assert "ciphertext" in r.json()["items"][0]


def test_content_types_and_credentials(api: ApiEnv, full: httpx.Client, taken: list[bool]) -> None:
    """Only application/json bodies reach the fast path; credentials are checked after the body
    (as the declared endpoint does): a malformed body is 400 even without credentials, a good
    one without valid credentials 401, and a forbidden scope 403."""
    raw = _doc([{"plaintext": "eA=="}])
    anon = api.client()
    bad = api.client("kgt_not-a-real-token")
    reader = api.clients["reader"]
    for ctype in ["application/json; charset=utf-8", "Application/JSON"]:
        before = len(taken)
        assert _send(full, "/v1/encrypt/batch", raw, ctype).status_code == 200
        assert taken[before:] == [True]
    for ctype in ["text/plain", "application/problem+json", "application/json; charset=utf-16"]:
        before = len(taken)
        r = _send(full, "/v1/encrypt/batch", raw, ctype)
        assert taken[before:] == []
        assert r.status_code in (200, 400)
    r = full.post("/v1/encrypt/batch", content=raw)  # no content type at all
    assert_problem(r, 400, "INVALID_REQUEST")

    assert_problem(_same(api, anon, "/v1/encrypt/batch", b"{", taken, expect_taken=False),
                   400, "INVALID_REQUEST")  # fmt: skip
    assert_problem(_same(api, anon, "/v1/encrypt/batch", raw, taken, expect_taken=True),
                   401, "UNAUTHENTICATED")  # fmt: skip
    assert_problem(_same(api, bad, "/v1/decrypt/batch", raw.replace(b"plaintext", b"ciphertext"),
                         taken, expect_taken=True), 401, "UNAUTHENTICATED")  # fmt: skip
    assert_problem(_same(api, anon, "/v1/rewrap/batch", _doc([{"x": "y"}]), taken,
                         expect_taken=False), 401, "UNAUTHENTICATED")  # fmt: skip
    assert_problem(_same(api, reader, "/v1/encrypt/batch", raw, taken, expect_taken=True),
                   403, "FORBIDDEN")  # fmt: skip
    r = _same(api, full, "/v1/encrypt/batch", raw, taken, expect_taken=True,
              headers={"x-request-id": "batch-fast-1"}, random_ciphertexts=True)  # fmt: skip
    assert r.headers["x-request-id"] == "batch-fast-1"


def test_body_over_the_limit_is_413(full: httpx.Client, taken: list[bool]) -> None:
    """A body over the byte limit is refused before anything parses it."""
    from api_support import MAX_BODY

    raw = _doc([{"plaintext": "A" * MAX_BODY}])
    r = _send(full, "/v1/encrypt/batch", raw, FAST)
    assert_problem(r, 413, "PAYLOAD_TOO_LARGE")
    assert taken == []


def test_metrics_count_fast_path_requests(api: ApiEnv, full: httpx.Client) -> None:
    """Requests answered by the fast path are counted under their endpoint like any other."""

    def count() -> float:
        for line in full.get("/metrics").text.splitlines():
            if (
                line.startswith("keygate_http_requests_total{")
                and 'endpoint="/v1/rewrap/batch"' in line
                and 'code="200"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count()
    for _ in range(3):
        assert _send(full, "/v1/rewrap/batch", _doc([]), FAST).status_code == 200
    assert count() >= before + 3
