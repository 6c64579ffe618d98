"""A local Sakura Cloud KMS (さくらのクラウド KMS) for tests and the bench.

:class:`FakeSakuraKmsServer` is a small HTTP server (the standard library's ThreadingHTTPServer,
HTTP/1.1 keep-alive, optionally TLS with a throwaway CA) on 127.0.0.1 that implements the KMS API
of the service's OpenAPI document (``KMS API`` 1.0.0) under the spec's path layout
``/cloud/zone/{zone}/api/cloud/1.1``:

- ``GET/POST /kms/keys`` (list → ``PaginatedKeyList``; create → 201 ``WrappedCreateKey``, with
  ``PlainKey`` (base64 AES-256 key) for an imported key), ``GET/PUT/DELETE /kms/keys/{id}``
  (``WrappedKey``; delete → 204), ``POST …/rotate`` (new key version; 403 unless active, as the
  spec says), ``POST …/status`` (``active`` / ``restricted`` / ``suspended``; 200, no body),
  ``POST …/schedule-destruction`` (``PendingDays`` 7–14 → ``pending_destruction``; 200, no body),
  ``POST …/encrypt`` / ``…/decrypt`` (``WrappedKeyPlain`` / ``WrappedKeyCipher``);
- HTTP Basic authentication with one API key (access token + secret): anything else gets 401;
- zones: a key lives in the zone it was created in; its id under another zone's path is 404;
- key status: encrypt needs ``active``; decrypt ``active`` or ``restricted`` (``復号…にのみ利用
  可能``); otherwise :attr:`state_error_status` (403, the status the spec gives a key "not
  available for rotation"; set it to 400 or 409 to try other plausible answers);
- ciphertext format of its own: base64 of ``version (4 bytes, big-endian) || nonce (12) ||
  AES-256-GCM(ciphertext || tag)`` with ``zone/id/version`` as the GCM AAD, so another key's
  ciphertext, a truncated or a tampered one is refused (400).

Where it differs from the real service, or guesses:

- The spec defines no error bodies.  Errors here use Sakura Cloud's common API error body
  (``is_fatal``, ``serial``, ``status``, ``error_code``, ``error_msg``), as other Sakura Cloud
  APIs answer; the KMS service may answer differently.  The status codes for refused key states
  and bad ciphertexts are guesses too (see above); the real ciphertext format is unknown.
- Only ``aes-256-gcm`` is implemented; ``aes-256-cbc`` / ``aes-256-kw`` are refused with 400.
- No pagination, query parameters, tags search, rate limits or real destruction after
  ``PendingDays``; ``DELETE`` removes a key at once (then 404).
- Resource ids are random 12-digit numbers starting with ``11``; ``LatestVersion`` starts at 0.

Test hooks (the common shape of keygate's local KMS servers): :attr:`received` (every non-empty
request body, as sent), :attr:`calls` (per operation), :meth:`fault` (``"down"``: the listening
socket is closed, so new connections are refused, and kept-alive ones are closed on their next
request; ``"slow"``: each request is held :attr:`slow_s` seconds; ``"error"``: 503;
``"throttle"``: 429 with ``Retry-After: 1``), :attr:`denied` (operations the API key may not call:
403).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import struct
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

from keygate.providers.sakura import SakuraKmsAdapter, SakuraKmsSettings

__all__ = ["FakeSakuraKmsServer"]

FAULT_MODES: Final = frozenset({"down", "slow", "error", "throttle"})
_PATH: Final = re.compile(
    r"/cloud/zone/(?P<zone>[a-z]{2}[0-9][a-z])/api/cloud/1\.1/kms/keys"
    r"(?:/(?P<id>[^/?]+)(?:/(?P<action>rotate|status|schedule-destruction|encrypt|decrypt))?)?"
)
_JST: Final = dt.timezone(dt.timedelta(hours=9))
_MAX_BODY: Final = 1024 * 1024
_REASONS: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


def _now() -> str:
    return dt.datetime.now(_JST).isoformat()


@dataclass
class _Key:
    id: str
    zone: str
    name: str
    description: str
    origin: str
    tags: list[str]
    versions: list[bytes]
    status: str = "active"
    created_at: str = field(default_factory=_now)
    modified_at: str = field(default_factory=_now)

    def view(self) -> dict[str, Any]:
        """The spec's ``Key``."""
        return {
            "ID": self.id,
            "CreatedAt": self.created_at,
            "ModifiedAt": self.modified_at,
            "ServiceClass": "cloud/kms/key",
            "Name": self.name,
            "Description": self.description,
            "KeyOrigin": self.origin,
            "LatestVersion": len(self.versions) - 1,
            "Status": self.status,
            "Tags": list(self.tags),
        }


class _Reply(Exception):
    """An answer other than 200 with a JSON body (raised from the operations)."""

    def __init__(self, status: int, body: dict[str, Any] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _error(status: int, code: str, message: str) -> _Reply:
    return _Reply(
        status,
        {
            "is_fatal": True,
            "serial": secrets.token_hex(16),
            "status": f"{status} {_REASONS.get(status, '')}".strip(),
            "error_code": code,
            "error_msg": message,
        },
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops SYNs when many clients connect at once
    owner: FakeSakuraKmsServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        owner = self.owner
        if owner.mode == "down":
            return  # closed at once by shutdown_request
        if owner.tls is not None:
            request.settimeout(5)
            try:
                request = owner.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        owner.track(request, add=True)
        try:
            super().finish_request(request, client_address)
        finally:
            owner.track(request, add=False)
            if owner.tls is not None:  # shutdown_request closes only the unwrapped socket
                request.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: clients that time out leave broken pipes behind."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):  # headers and body are two writes: no Nagle delay
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests read :attr:`FakeSakuraKmsServer.received` instead."""

    def _handle(self) -> None:
        owner = self.server.owner
        if owner.mode == "down":
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= _MAX_BODY:
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        reply = owner.handle(self.command, self.path, self.headers.get("Authorization", ""), body)
        if reply is None:
            self.close_connection = True
            return
        status, payload, headers = reply
        data = b"" if payload is None else json.dumps(payload, ensure_ascii=False).encode()
        with contextlib.suppress(OSError):  # the client may have given up (timeouts)
            self.send_response(status)
            if payload is not None:
                self.send_header("Content-Type", "application/json; charset=UTF-8")
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle  # noqa: N815


class FakeSakuraKmsServer:
    """Sakura Cloud KMS on 127.0.0.1 (a free port); a context manager.

    ``with FakeSakuraKmsServer() as kms: uri = kms.create_key("k1")`` →
    ``sakura-kms://is1a/11xxxxxxxxxx``; ``SakuraKmsAdapter(options, kms.settings())`` reaches it.
    ``tls=True`` serves HTTPS with a throwaway CA (``settings().ca_bundle``).
    """

    scheme: Final = "sakura-kms"
    host: Final = "127.0.0.1"

    def __init__(self, *, tls: bool = False, slow_s: float = 2.0) -> None:
        self.access_token = f"fake-{secrets.token_hex(8)}"
        self.access_token_secret = secrets.token_urlsafe(24)
        #: how long "slow" holds each request, seconds
        self.slow_s = slow_s
        #: status answered when the key's state refuses encrypt/decrypt
        self.state_error_status = 403
        #: operations (as in :attr:`calls`) the API key lacks the permission for: 403
        self.denied: set[str] = set()
        self.mode: str | None = None
        self.received: list[bytes] = []
        self.calls: Counter[str] = Counter()
        self.port = 0
        self.tls: ssl.SSLContext | None = None
        self.ca_bundle: Path | None = None
        self._want_tls = tls
        self._tmp: str | None = None
        self._keys: dict[str, _Key] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conns: set[Any] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        """The base URL template, as ``KEYGATE_SAKURA_ENDPOINT`` takes it."""
        scheme = "https" if self._want_tls else "http"
        return f"{scheme}://{self.host}:{self.port}/cloud/zone/{{zone}}/api/cloud/1.1"

    def start(self) -> None:
        self._stopping.clear()
        if self._want_tls and self.tls is None:
            self._make_tls()
        self._listen()

    def stop(self) -> None:
        self._stopping.set()
        self._close(drop_connections=True)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp, self.tls, self.ca_bundle = None, None, None

    def __enter__(self) -> FakeSakuraKmsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self) -> None:
        server = _Server((self.host, self.port), _Handler)
        server.owner = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="sakura-kms", daemon=True
        )
        self._thread.start()

    def _close(self, *, drop_connections: bool) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if drop_connections:
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def track(self, conn: Any, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _make_tls(self) -> None:
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keygate fake Sakura CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(self.host))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self._tmp = tempfile.mkdtemp(prefix="fake-sakura-kms-")
        tmp = Path(self._tmp)
        (tmp / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        key_path = tmp / "server.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                leaf_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        (tmp / "server.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(tmp / "server.pem", key_path)
        self.tls, self.ca_bundle = context, tmp / "ca.pem"

    # ------------------------------------------------------------------------ test hooks
    def fault(self, mode: str | None) -> None:
        """Inject a fault (``"down"``, ``"slow"``, ``"error"``, ``"throttle"``) or end it."""
        if mode is not None and mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {sorted(FAULT_MODES)}")
        previous, self.mode = self.mode, mode
        if mode == "down" and previous != "down":
            self._close(drop_connections=False)
        elif previous == "down" and mode != "down":
            self._listen()  # the same port again (SO_REUSEADDR)

    def reset(self) -> None:
        """Forget what was received and counted."""
        with self._lock:
            self.received.clear()
            self.calls.clear()

    def settings(self) -> SakuraKmsSettings:
        """Valid credentials pointing at this server (every field given: the env cannot leak in)."""
        return self._settings(self.access_token_secret)

    def bad_settings(self) -> SakuraKmsSettings:
        """This server, with a wrong access token secret."""
        return self._settings(self.access_token_secret + "-wrong")

    def _settings(self, secret: str) -> SakuraKmsSettings:
        return SakuraKmsSettings(
            access_token=SecretStr(self.access_token),
            access_token_file=None,
            access_token_secret=SecretStr(secret),
            access_token_secret_file=None,
            endpoint=self.endpoint,
            ca_bundle=self.ca_bundle,
        )

    def env(self) -> dict[str, str]:
        """``KEYGATE_SAKURA_*`` for a subprocess to reach this server with valid credentials."""
        env = {
            "KEYGATE_SAKURA_ACCESS_TOKEN": self.access_token,
            "KEYGATE_SAKURA_ACCESS_TOKEN_SECRET": self.access_token_secret,
            "KEYGATE_SAKURA_ENDPOINT": self.endpoint,
        }
        if self.ca_bundle is not None:
            env["KEYGATE_SAKURA_CA_BUNDLE"] = str(self.ca_bundle)
        return env

    # ------------------------------------------------------------------------ keys
    def create_key(self, name: str, *, region: str | None = None) -> str:
        """A new active key in ``region`` (a zone; ``is1a`` by default); returns its URI."""
        zone = region or "is1a"
        if not re.fullmatch(r"[a-z]{2}[0-9][a-z]", zone):
            raise ValueError("zone must look like is1a")
        with self._lock:
            key = self._new_key(zone, name, "", [], None)
        return f"{self.scheme}://{zone}/{key.id}"

    def _key_of(self, uri: str) -> _Key:
        parsed = SakuraKmsAdapter.parse_uri(uri)
        key = self._keys.get(parsed.parts["resource_id"])
        if key is None or key.zone != parsed.region:
            raise KeyError(uri)
        return key

    def set_key_status(self, uri: str, status: str) -> None:
        """Any ``KeyStatusEnum`` value: active, restricted, suspended, pending_destruction."""
        if status not in {"active", "restricted", "suspended", "pending_destruction"}:
            raise ValueError(status)
        with self._lock:
            key = self._key_of(uri)
            key.status, key.modified_at = status, _now()

    def set_key_enabled(self, uri: str, enabled: bool) -> None:
        """``active`` or ``suspended`` (利用不可)."""
        self.set_key_status(uri, "active" if enabled else "suspended")

    def destroy_key(self, uri: str) -> None:
        """Schedule destruction: ``pending_destruction`` (the key is never really removed)."""
        self.set_key_status(uri, "pending_destruction")

    def delete_key(self, uri: str) -> None:
        """Remove the key at once (as ``DELETE /kms/keys/{id}``): 404 from then on."""
        with self._lock:
            del self._keys[self._key_of(uri).id]

    def rotate_key(self, uri: str) -> int:
        """Add a key version; returns the new ``LatestVersion``."""
        with self._lock:
            key = self._key_of(uri)
            key.versions.append(secrets.token_bytes(32))
            key.modified_at = _now()
            return len(key.versions) - 1

    def key_status(self, uri: str) -> str:
        with self._lock:
            return self._key_of(uri).status

    def _new_key(
        self, zone: str, name: str, description: str, tags: list[str], material: bytes | None
    ) -> _Key:
        while True:
            key_id = f"11{secrets.randbelow(10**10):010d}"
            if key_id not in self._keys:
                break
        key = _Key(
            id=key_id,
            zone=zone,
            name=name,
            description=description,
            origin="generated" if material is None else "imported",
            tags=tags,
            versions=[material or secrets.token_bytes(32)],
        )
        self._keys[key_id] = key
        return key

    # ------------------------------------------------------------------------ HTTP
    def handle(
        self, method: str, path: str, authorization: str, body: bytes
    ) -> tuple[int, dict[str, Any] | None, list[tuple[str, str]]] | None:
        """Answer one request: (status, JSON body or None, extra headers); None drops it."""
        match = _PATH.fullmatch(path.split("?", 1)[0])
        op = self._operation(method, match)
        with self._lock:
            if body:
                self.received.append(body)
            self.calls[op] += 1
        mode = self.mode
        if mode == "slow" and self._stopping.wait(self.slow_s):
            return None
        if self.mode == "down":
            return None
        try:
            if mode == "error":
                raise _error(503, "service_unavailable", "サービスが一時的に利用できません")
            if mode == "throttle":
                raise _error(429, "too_many_requests", "リクエストが多すぎます")
            if not self._authorized(authorization):
                raise _error(401, "unauthorized", "error-unauthorized")
            if match is None or op == "unknown":
                raise _error(404, "not_found", "リソースが見つかりません")
            if op in self.denied:
                raise _error(403, "forbidden", "権限がありません")
            with self._lock:
                status, payload = self._dispatch(op, match["zone"], match["id"], body)
        except _Reply as reply:
            headers = [("Retry-After", "1")] if reply.status == 429 else []
            return reply.status, reply.body, headers
        return status, payload, []

    @staticmethod
    def _operation(method: str, match: re.Match[str] | None) -> str:
        if match is None:
            return "unknown"
        action, key_id = match["action"], match["id"]
        if action is not None:
            return action.replace("-", "_") if method == "POST" else "unknown"
        if key_id is None:
            return {"GET": "list", "POST": "create"}.get(method, "unknown")
        return {"GET": "get", "PUT": "update", "DELETE": "delete"}.get(method, "unknown")

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return bool(sep) and secrets.compare_digest(
            f"{user}:{password}".encode(),
            f"{self.access_token}:{self.access_token_secret}".encode(),
        )

    def _dispatch(
        self, op: str, zone: str, key_id: str | None, body: bytes
    ) -> tuple[int, dict[str, Any] | None]:
        if op == "list":
            keys = [k.view() for k in self._keys.values() if k.zone == zone]
            return 200, {"Count": len(keys), "From": 0, "Total": len(keys), "Keys": keys}
        if op == "create":
            return 201, self._create(zone, _wrapped(body))
        key = self._keys.get(key_id or "")
        if key is None or key.zone != zone:
            raise _error(404, "not_found", "リソースが見つかりません")
        if op == "get":
            return 200, {"Key": key.view()}
        if op == "update":
            fields = _wrapped(body)
            for attr, name in (("name", "Name"), ("description", "Description")):
                if name in fields:
                    setattr(key, attr, _text(fields, name, 255))
            if "Tags" in fields:
                key.tags = _tags(fields)
            key.modified_at = _now()
            return 200, {"Key": key.view()}
        if op == "delete":
            del self._keys[key.id]
            return 204, None
        if op == "rotate":
            if key.status != "active":
                raise _error(403, "forbidden", "Key is not available for rotation")
            key.versions.append(secrets.token_bytes(32))
            key.modified_at = _now()
            return 200, {"Key": key.view()}
        if op == "status":
            status = _wrapped(body).get("Status")
            if status not in {"active", "restricted", "suspended"}:
                raise _error(400, "bad_request", "Status must be active, restricted or suspended")
            if key.status == "pending_destruction":
                raise _error(403, "forbidden", "the key is pending destruction")
            key.status, key.modified_at = status, _now()
            return 200, None
        if op == "schedule_destruction":
            days = _wrapped(body).get("PendingDays")
            if not isinstance(days, int) or isinstance(days, bool) or not 7 <= days <= 14:
                raise _error(400, "bad_request", "PendingDays must be between 7 and 14")
            key.status, key.modified_at = "pending_destruction", _now()
            return 200, None
        if op == "encrypt":
            return 200, {"Key": {"Cipher": self._encrypt(key, _wrapped(body))}}
        # decrypt
        return 200, {"Key": {"Plain": self._decrypt(key, _wrapped(body))}}

    def _create(self, zone: str, fields: dict[str, Any]) -> dict[str, Any]:
        name = _text(fields, "Name", 255)
        if not name:
            raise _error(400, "bad_request", "Name is required")
        description = _text(fields, "Description", 10_000) if "Description" in fields else ""
        tags = _tags(fields) if "Tags" in fields else []
        material = None
        if fields.get("PlainKey") is not None:
            material = _b64(fields["PlainKey"], "PlainKey")
            if len(material) != 32:
                raise _error(400, "bad_request", "PlainKey must be a base64 AES-256 key")
        key = self._new_key(zone, name, description, tags, material)
        view = {k: v for k, v in key.view().items() if k not in {"ServiceClass", "Status"}}
        view.pop("LatestVersion")
        return {"Key": view}

    def _encrypt(self, key: _Key, fields: dict[str, Any]) -> str:
        algo = fields.get("Algo", "aes-256-gcm")
        if algo not in {"aes-256-gcm", "aes-256-cbc", "aes-256-kw"}:
            raise _error(400, "bad_request", "Algo must be aes-256-gcm, aes-256-cbc or aes-256-kw")
        if algo != "aes-256-gcm":
            raise _error(400, "bad_request", "this fake implements aes-256-gcm only")
        plain = _b64(fields.get("Plain"), "Plain")
        if key.status != "active":
            raise _error(self.state_error_status, "key_not_available", "key is not available")
        version = len(key.versions) - 1
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(key.versions[version]).encrypt(nonce, plain, _aad(key, version))
        return base64.b64encode(struct.pack(">I", version) + nonce + sealed).decode("ascii")

    def _decrypt(self, key: _Key, fields: dict[str, Any]) -> str:
        cipher = fields.get("Cipher")
        if key.status not in {"active", "restricted"}:
            raise _error(self.state_error_status, "key_not_available", "key is not available")
        refused = _error(400, "bad_request", "復号できません")
        if not isinstance(cipher, str):
            raise refused
        try:
            raw = base64.b64decode(cipher, validate=True)
        except (binascii.Error, ValueError):
            raise refused from None
        if len(raw) < 4 + 12 + 16:
            raise refused
        (version,) = struct.unpack(">I", raw[:4])
        if version >= len(key.versions):
            raise refused
        try:
            plain = AESGCM(key.versions[version]).decrypt(raw[4:16], raw[16:], _aad(key, version))
        except InvalidTag:
            raise refused from None
        return base64.b64encode(plain).decode("ascii")


def _aad(key: _Key, version: int) -> bytes:
    return f"{key.zone}/{key.id}/{version}".encode()


def _wrapped(body: bytes) -> dict[str, Any]:
    """The ``{"Key": {...}}`` object every request body of the spec is."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise _error(400, "bad_request", "the body is not JSON") from None
    inner = doc.get("Key") if isinstance(doc, dict) else None
    if not isinstance(inner, dict):
        raise _error(400, "bad_request", "Key is required")
    return inner


def _text(fields: dict[str, Any], name: str, limit: int) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise _error(400, "bad_request", f"{name} must be a string of at most {limit} characters")
    return value


def _tags(fields: dict[str, Any]) -> list[str]:
    tags = fields.get("Tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _error(400, "bad_request", "Tags must be a list of strings")
    return list(tags)


def _b64(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise _error(400, "bad_request", f"{name} is required")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _error(400, "bad_request", f"{name} is not base64") from None
