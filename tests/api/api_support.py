"""Helpers for the HTTP API tests: a uvicorn server in a thread, problem+json checks, envelopes.

Kept out of ``conftest.py`` so test modules can import them by name (``tests/api`` is on
``sys.path`` under pytest's default ``prepend`` import mode).
"""

from __future__ import annotations

import base64
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import uvicorn

from keygate.api.metrics import Metrics
from keygate.audit.events import AuditEvent, canonical_bytes
from keygate.config import Settings
from keygate.core.wire import from_text, parse_header, to_text
from keygate.hsm.softhsm import SoftHsmToken
from keygate.service import Gateway

#: the problem+json fields every error response carries (API.md "Errors")
PROBLEM_FIELDS: Final = frozenset({"type", "title", "status", "code", "detail", "request_id"})
TYPE_BASE: Final = "https://keygate.example/errors/"
#: every path API.md names
API_PATHS: Final = (
    "/v1/encrypt",
    "/v1/decrypt",
    "/v1/encrypt/batch",
    "/v1/decrypt/batch",
    "/v1/rewrap/batch",
    "/v1/records/{record_type}/encrypt",
    "/v1/records/{record_type}/decrypt",
    "/v1/records/{record_type}/encrypt/batch",
    "/v1/records/{record_type}/decrypt/batch",
    "/healthz",
    "/readyz",
    "/metrics",
)


def b64(data: bytes | str) -> str:
    """Standard base64 (RFC 4648 §4) of bytes, or of a string's UTF-8."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a daemon thread; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Check an application/problem+json error response of API.md and return its body."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert set(body) == PROBLEM_FIELDS, body
    assert body["status"] == status
    assert body["code"] == code, body
    assert body["type"] == TYPE_BASE + code.lower().replace("_", "-")
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def assert_slot_error(slot: dict[str, Any], status: int, code: str) -> dict[str, Any]:
    """Check one batch result slot that carries an error object."""
    assert set(slot) == {"error"}, slot
    error: dict[str, Any] = slot["error"]
    assert error["code"] == code, error
    assert error["status"] == status
    assert error["type"] == TYPE_BASE + code.lower().replace("_", "-")
    assert isinstance(error["title"], str) and error["title"]
    assert isinstance(error["detail"], str) and error["detail"]
    return error


def envelope(text: str) -> bytes:
    """The binary envelope of a ``kg1.`` text ciphertext."""
    return from_text(text)


def header_len(raw: bytes) -> int:
    return raw[2] << 8 | raw[3]


def key_version(text: str) -> int:
    return parse_header(from_text(text)).key_ref.version


def data_part(text: str) -> bytes:
    """Nonce, ciphertext and tag: everything after the key header."""
    raw = from_text(text)
    return raw[header_len(raw) :]


def rewrite_tenant(text: str, old: str, new: str) -> str:
    """The same ciphertext with the tenant named in its header replaced (same length)."""
    assert len(old) == len(new)
    raw = bytearray(from_text(text))
    assert raw[4] == len(old) and raw[5 : 5 + len(old)] == old.encode()
    raw[5 : 5 + len(new)] = new.encode()
    return to_text(bytes(raw))


def flip(text: str, index: int) -> str:
    """The ciphertext with one bit of byte ``index`` of its binary envelope flipped."""
    raw = bytearray(from_text(text))
    raw[index] ^= 0x01
    return to_text(bytes(raw))


def event_text(event: AuditEvent) -> str:
    """Everything an audit event holds, as text (for leak checks)."""
    return canonical_bytes(event).decode("utf-8")


CHIYODA = "131016"
OSAKA = "271004"
AGENCY = "digital-agency"
PURPOSES = ("resident", "tax", "mynumber")
ACTOR = "custodian:api-tests"

MAX_PLAINTEXT = 4096
MAX_BATCH = 100
MAX_BODY = 64 * 1024

#: identity name -> grants (tenants, purposes, record types, operations)
IDENTITIES: dict[str, dict[str, list[str]]] = {
    "full": {"tenants": [CHIYODA], "purposes": ["*"], "record_types": ["*"], "operations": ["*"]},
    "osaka": {"tenants": [OSAKA], "purposes": ["*"], "record_types": ["*"], "operations": ["*"]},
    "reader": {
        "tenants": [CHIYODA],
        "purposes": ["resident", "tax"],
        "record_types": ["resident", "tax"],
        "operations": ["decrypt"],
    },
    "encryptor": {
        "tenants": [CHIYODA],
        "purposes": ["*"],
        "record_types": ["*"],
        "operations": ["encrypt"],
    },
    "rewrapper": {
        "tenants": [CHIYODA],
        "purposes": ["*"],
        "record_types": ["*"],
        "operations": ["rewrap"],
    },
    "star": {"tenants": ["*"], "purposes": ["*"], "record_types": ["*"], "operations": ["*"]},
}

#: a test-only record type whose fields take any JSON scalar, to check that types round-trip
TYPED_POLICY = """
record_type = "typed"
description = "test only: every JSON scalar type"
default_purpose = "resident"
allow_unknown_fields = false

[fields.name]
treatment = "encrypt"

[fields.count]
treatment = "encrypt"

[fields.flag]
treatment = "encrypt"

[fields.ratio]
treatment = "encrypt"

[fields.note]
treatment = "encrypt"

[fields.group]
treatment = "clear"
"""

_counter = itertools.count(1)


@dataclass
class ApiEnv:
    """The running session gateway and everything a test needs to talk to it."""

    gw: Gateway
    settings: Settings
    url: str
    hsm_token: SoftHsmToken
    tokens: dict[str, str]
    clients: dict[str, httpx.Client]
    metrics: Metrics
    extra_clients: list[httpx.Client] = field(default_factory=list)

    def client(
        self, token: str | None = None, headers: dict[str, str] | None = None
    ) -> httpx.Client:
        """A new client with ``token`` (or none) and extra headers; closed at session end."""
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        c = httpx.Client(base_url=self.url, headers=h, timeout=30)
        self.extra_clients.append(c)
        return c

    def fresh_purpose(self, tenant: str = CHIYODA) -> str:
        """Create a key under a purpose no other test uses and return the purpose."""
        purpose = f"t{next(_counter)}-{int(time.monotonic() * 1000) % 100000}"
        self.gw.create_key(ACTOR, tenant, purpose)
        return purpose

    def events(self, request_id: str) -> list[AuditEvent]:
        """Every audit event recorded for one request id."""
        return [e for e in self.gw.audit_store.query() if e.request_id == request_id]


@dataclass
class OwnGateway:
    """A function-scoped gateway on its own token and data directory, served over HTTP."""

    gw: Gateway
    hsm_token: SoftHsmToken
    url: str
    client: httpx.Client
    anon: httpx.Client


def encrypt(
    client: httpx.Client,
    plaintext: bytes | str,
    *,
    tenant: str = CHIYODA,
    purpose: str = "resident",
    context: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST /v1/encrypt."""
    body: dict[str, Any] = {"tenant": tenant, "purpose": purpose, "plaintext": b64(plaintext)}
    if context is not None:
        body["context"] = context
    return client.post("/v1/encrypt", json=body, headers=headers)


def decrypt(
    client: httpx.Client,
    ciphertext: str,
    *,
    tenant: str = CHIYODA,
    purpose: str = "resident",
    context: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST /v1/decrypt."""
    body: dict[str, Any] = {"tenant": tenant, "purpose": purpose, "ciphertext": ciphertext}
    if context is not None:
        body["context"] = context
    return client.post("/v1/decrypt", json=body, headers=headers)


def ciphertext_of(client: httpx.Client, plaintext: bytes | str, **kw: Any) -> str:
    """Encrypt and return the ciphertext, failing the test unless the call succeeded."""
    r = encrypt(client, plaintext, **kw)
    assert r.status_code == 200, r.text
    return str(r.json()["ciphertext"])


def batch(
    client: httpx.Client,
    op: str,
    items: list[dict[str, Any]],
    *,
    tenant: str = CHIYODA,
    purpose: str = "resident",
) -> httpx.Response:
    """POST /v1/{op}/batch (op: encrypt, decrypt or rewrap)."""
    body = {"tenant": tenant, "purpose": purpose, "items": items}
    return client.post(f"/v1/{op}/batch", json=body)


def record_call(
    client: httpx.Client,
    record_type: str,
    op: str,
    record_id: str,
    record: dict[str, Any],
    *,
    tenant: str = CHIYODA,
) -> httpx.Response:
    """POST /v1/records/{record_type}/{op} (op: encrypt or decrypt)."""
    body = {"tenant": tenant, "record_id": record_id, "record": record}
    return client.post(f"/v1/records/{record_type}/{op}", json=body)


def record_batch(
    client: httpx.Client,
    record_type: str,
    op: str,
    items: list[tuple[str, dict[str, Any]]],
    *,
    tenant: str = CHIYODA,
) -> httpx.Response:
    """POST /v1/records/{record_type}/{op}/batch."""
    body = {"tenant": tenant, "items": [{"record_id": i, "record": r} for i, r in items]}
    return client.post(f"/v1/records/{record_type}/{op}/batch", json=body)
