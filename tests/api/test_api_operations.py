"""Operations endpoints and cross-cutting headers: request ids, health, metrics, OpenAPI."""

from __future__ import annotations

import re

import httpx
import pytest
from api_support import API_PATHS, CHIYODA, ApiEnv, assert_problem, batch, decrypt, encrypt

pytestmark = pytest.mark.api

GENERATED_ID = re.compile(r"[A-Za-z0-9._:-]{8,128}")


@pytest.mark.parametrize("given", ["abc-123", "req:2026.11.22_x", "A" * 128])
def test_request_id_echoed(full: httpx.Client, anon: httpx.Client, given: str) -> None:
    """A valid X-Request-Id is echoed on success, on errors (header and body) and without auth."""
    r = encrypt(full, "x", headers={"X-Request-Id": given})
    assert r.status_code == 200 and r.headers["x-request-id"] == given
    r = encrypt(full, "x", tenant="131017", headers={"X-Request-Id": given})
    assert assert_problem(r, 400, "INVALID_TENANT")["request_id"] == given
    r = anon.get("/healthz", headers={"X-Request-Id": given})
    assert r.headers["x-request-id"] == given


@pytest.mark.parametrize(
    "given", ["", "has space", "A" * 129, "semi;colon", "new\tline", "ümlaut", "<script>"]
)
def test_invalid_request_id_replaced(full: httpx.Client, given: str) -> None:
    """An unusable X-Request-Id is replaced by a generated one."""
    r = full.post(
        "/v1/encrypt",
        json={"tenant": CHIYODA, "purpose": "resident", "plaintext": ""},
        headers=[("X-Request-Id", given.encode("utf-8"))],  # type: ignore[arg-type]
    )
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert rid != given and GENERATED_ID.fullmatch(rid)


def test_request_id_generated_and_unique(full: httpx.Client, anon: httpx.Client) -> None:
    """Without X-Request-Id every response still carries a fresh id, errors and 404s included."""
    responses = [
        encrypt(full, "x"),
        encrypt(full, "x"),
        decrypt(full, "kg1.AAAA"),
        anon.post("/v1/encrypt", json={}),
        anon.get("/no/such/path"),
        anon.get("/healthz"),
        anon.get("/readyz"),
        anon.get("/metrics"),
        full.post("/v1/encrypt", content=b"{", headers={"content-type": "application/json"}),
    ]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(GENERATED_ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)
    for r in responses:
        if r.status_code >= 400:
            assert r.json()["request_id"] == r.headers["x-request-id"]


def test_healthz_without_auth(anon: httpx.Client) -> None:
    """/healthz answers 200 without credentials."""
    r = anon.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_reports_every_dependency(anon: httpx.Client) -> None:
    """/readyz answers 200 without credentials and names the HSM, registry and audit checks."""
    r = anon.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ready"] is True
    assert {"hsm", "registry", "audit"} <= set(body["checks"])
    assert all(v == "ok" for v in body["checks"].values())


def _samples(text: str, name: str) -> dict[str, float]:
    """Prometheus samples of metric ``name`` keyed by their label set."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key[len(name) :]] = float(value)
    return out


def test_metrics(api: ApiEnv, full: httpx.Client, anon: httpx.Client) -> None:
    """/metrics serves Prometheus text with request counts by endpoint and code, HSM calls and
    DEK cache hits and misses, without credentials."""
    purpose = api.fresh_purpose()  # a new key: its first encrypt needs the HSM
    ct = encrypt(full, "m", purpose=purpose).json()["ciphertext"]
    for _ in range(3):
        assert decrypt(full, ct, purpose=purpose).status_code == 200
    encrypt(full, "m", tenant="271004")  # FORBIDDEN
    batch(full, "decrypt", [{"ciphertext": ct}] * 5, purpose=purpose)

    r = anon.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    requests = _samples(text, "keygate_http_requests_total")
    assert requests['{code="200",endpoint="/v1/encrypt"}'] >= 1
    assert requests['{code="200",endpoint="/v1/decrypt"}'] >= 3
    assert requests['{code="FORBIDDEN",endpoint="/v1/encrypt"}'] >= 1
    assert requests['{code="200",endpoint="/v1/decrypt/batch"}'] >= 1
    assert _samples(text, "keygate_http_request_duration_seconds_count")
    hsm = _samples(text, "keygate_hsm_calls_total")
    assert hsm.get('{operation="wrap"}', 0) >= 1
    hits = _samples(text, "keygate_dek_cache_hits_total")
    misses = _samples(text, "keygate_dek_cache_misses_total")
    assert hits and misses
    assert next(iter(hits.values())) >= 3
    # Counters only grow.
    again = _samples(anon.get("/metrics").text, "keygate_http_requests_total")
    assert (
        again['{code="200",endpoint="/v1/decrypt"}']
        >= requests['{code="200",endpoint="/v1/decrypt"}']
    )


def test_metrics_unmatched_paths_do_not_explode_labels(anon: httpx.Client) -> None:
    """Requests to unknown paths are counted under one label, not one label per path."""
    for i in range(5):
        anon.get(f"/random/{i}")
    text = anon.get("/metrics").text
    assert "/random/" not in text


def test_openapi_lists_every_api_path(anon: httpx.Client) -> None:
    """/openapi.json documents every path of API.md and the problem+json error responses."""
    r = anon.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    missing = [p for p in API_PATHS if p not in doc["paths"]]
    assert not missing, missing
    encrypt_op = doc["paths"]["/v1/encrypt"]["post"]
    for status in ("400", "401", "403", "404", "409", "410", "413", "422", "503"):
        assert status in encrypt_op["responses"], status
