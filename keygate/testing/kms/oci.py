"""A local OCI Vault (Key Management) server for tests and the bench, driven by the ``oci`` SDK.

:class:`FakeOciVaultServer` listens on 127.0.0.1 (a free port) in this process and speaks the parts
of OCI's REST API that keygate uses, as the SDK sends and reads them:

- ``POST /20180608/encrypt`` and ``POST /20180608/decrypt`` (the vault's crypto endpoint): camelCase
  JSON (``keyId``, ``plaintext``/``ciphertext`` as base64 text, ``associatedData`` as a string
  map, ``encryptionAlgorithm``);
- ``GET /20180608/keys/{keyId}`` (the management endpoint): the ``Key`` resource (``id``,
  ``lifecycleState``, ``keyShape {algorithm, length}``, ``protectionMode``,
  ``currentKeyVersion`` …).

Every request must carry OCI's HTTP signature (draft-cavage, ``version="1"``, ``rsa-sha256``): the
server rebuilds the signing string from the ``headers=`` list (``(request-target)``, ``date``,
``host`` and, with a body, ``content-length``, ``content-type``, ``x-content-sha256``), checks that
the required headers are signed, that ``x-content-sha256`` and ``content-length`` match the body
and that ``date`` is within 5 minutes, and verifies PKCS#1 v1.5/SHA-256 with the public key
registered for ``keyId="<tenancy>/<user>/<fingerprint>"``.  Anything else is answered 401
``NotAuthenticated`` with OCI's error JSON ``{"code", "message"}`` and an ``opc-request-id``.

Key state is enforced: an unknown key is 404 ``NotAuthorizedOrNotFound``; a key that is not
``ENABLED`` (disabled, pending deletion) is refused with :attr:`FakeOciVaultServer.state_error`
(409 ``IncorrectState`` by default; set it to ``(400, "InvalidParameter")`` to model the other
answer seen for such keys); a ``DELETED`` key is 404 on the crypto endpoint but still readable with
GetKey.  A ciphertext that this key did not make, that was tampered with or whose
``associatedData`` differs is 400 ``InvalidParameter``.

Where it differs from the real service:

- one server plays every vault's crypto and management endpoints (point the SDK at :attr:`url`);
  the real service has one host pair per vault and refuses keys of other vaults;
- the ciphertext format is its own: ``version-id length (1 byte) || key version OCID || 12-byte
  nonce || AES-256-GCM(plaintext) || tag``, with the key version and the canonical JSON of
  ``associatedData`` as GCM AAD, then base64 (the real format is opaque and differs);
- keys are only AES-256 (``HSM``) with one version; there is no key rotation, no RSA/ECDSA key,
  no ``generateDataEncryptionKey``/sign/verify, no IAM policy evaluation (any registered key
  may use any key) and no management write API: tests change key state with
  :meth:`set_key_enabled`, :meth:`destroy_key` and :meth:`set_key_state`;
- the exact wording of OCI's error messages is not reproduced (codes and statuses are).

Faults (:meth:`fault`): ``"down"`` closes the listening socket (new connections are refused, kept-
alive ones are closed on their next request), ``"slow"`` holds each request :attr:`slow_s` seconds
before answering, ``"error"`` answers 503 ``ServiceUnavailable``.

Credentials: :meth:`settings` returns :class:`~keygate.providers.oci.OciVaultSettings` with a fresh
RSA API signing key (written 0600 into a temporary directory the server removes on :meth:`stop`)
registered here; :meth:`bad_settings` claims the same tenancy/user/fingerprint but signs with
another private key, so the server answers 401 exactly as OCI does for a wrong key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keygate.providers.oci import OciVaultAdapter, OciVaultSettings
from keygate.testing.kms._front import ServedOnLoopback

__all__ = ["FakeOciVaultServer"]

_API: Final = "/20180608"
_KEY_PATH: Final = re.compile(r"/20180608/keys/(?P<key_id>[^/?]+)")
_MAX_BODY: Final = 1024 * 1024
_MAX_PLAINTEXT: Final = 4096
_MAX_SKEW_S: Final = 300.0
_ALGORITHM: Final = "AES_256_GCM"
_SIGNED_ALWAYS: Final = ("(request-target)", "date", "host")
_SIGNED_WITH_BODY: Final = ("content-length", "content-type", "x-content-sha256")
_AUTH_PARAM: Final = re.compile(r'(\w+)="([^"]*)"')
_REALM_DOMAINS: Final = {"oc1": "oraclecloud.com", "oc8": "oraclecloud8.com"}
_REGION_REALMS: Final = {
    "ap-tokyo-1": "oc1",
    "ap-osaka-1": "oc1",
    "ap-chiyoda-1": "oc8",
    "ap-ibaraki-1": "oc8",
    # outside Japan: for the residency tests (keygate must refuse these)
    "us-ashburn-1": "oc1",
    "eu-frankfurt-1": "oc1",
}
_DEFAULT_REGION: Final = "ap-tokyo-1"
_ALNUM: Final = "abcdefghijklmnopqrstuvwxyz0123456789"

_NOT_AUTHENTICATED: Final = (
    401,
    "NotAuthenticated",
    "The required information to complete authentication was not provided or was incorrect.",
)
_NOT_FOUND: Final = (
    404,
    "NotAuthorizedOrNotFound",
    "Authorization failed or requested resource not found.",
)


def _random_id(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def _fingerprint(public_key: rsa.RSAPublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.md5(der, usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _canonical_aad(version_id: str, associated: dict[str, str] | None) -> bytes:
    body = json.dumps(associated or {}, sort_keys=True, separators=(",", ":"))
    return version_id.encode() + b"\x00" + body.encode()


@dataclass
class _Key:
    key_id: str
    name: str
    vault_id: str
    compartment_id: str
    version_id: str
    material: bytes = field(repr=False)
    state: str = "ENABLED"
    created: str = ""
    time_of_deletion: str | None = None

    def resource(self) -> dict[str, Any]:
        return {
            "id": self.key_id,
            "compartmentId": self.compartment_id,
            "currentKeyVersion": self.version_id,
            "displayName": self.name,
            "keyShape": {"algorithm": "AES", "length": 32},
            "protectionMode": "HSM",
            "lifecycleState": self.state,
            "timeCreated": self.created,
            "timeOfDeletion": self.time_of_deletion,
            "vaultId": self.vault_id,
            "isPrimary": True,
            "freeformTags": {},
            "definedTags": {},
        }


class _Refusal(Exception):
    """An OCI error answer: status, code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeOciVaultServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests read :attr:`FakeOciVaultServer.received`."""

    def _handle(self) -> None:
        fake = self.server.fake
        if fake.mode == "down":
            self.close_connection = True
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self.close_connection = True
            self._send(400, {"code": "CannotParseRequest", "message": "Bad Content-Length."})
            return
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        answer = fake.handle(self.command, self.path, headers, body)
        if answer is None:  # stopped or went down while this request waited
            self.close_connection = True
            return
        self._send(*answer)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        with contextlib.suppress(OSError):  # the client may have given up (timeouts)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("opc-request-id", secrets.token_hex(16).upper())
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815


class FakeOciVaultServer(ServedOnLoopback):
    """OCI Vault crypto + management endpoints on ``http://127.0.0.1:PORT`` (see the module doc)."""

    scheme: Final = "oci-kms"
    host: Final = "127.0.0.1"

    def __init__(self, *, slow_s: float = 2.0) -> None:
        #: how long "slow" holds each request, seconds
        self.slow_s = slow_s
        #: (status, code) answered for crypto calls with a key that is disabled or pending deletion
        self.state_error: tuple[int, str] = (409, "IncorrectState")
        self.received: list[bytes] = []
        self.calls: Counter[str] = Counter()
        self.mode: str | None = None
        self.port = 0
        self.tenancy = f"ocid1.tenancy.oc1..{_random_id(60)}"
        self.user = f"ocid1.user.oc1..{_random_id(60)}"
        self.compartment = f"ocid1.compartment.oc1..{_random_id(60)}"
        self._keys: dict[str, _Key] = {}
        self._versions: dict[str, _Key] = {}
        self._vaults: dict[str, str] = {}  # region → vault endpoint prefix
        self._api_keys: dict[str, rsa.RSAPublicKey] = {}  # "tenancy/user/fingerprint" → key
        self._good: OciVaultSettings | None = None
        self._bad: OciVaultSettings | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._tmp: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._stopping.clear()
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="keygate-oci-"))
        self._listen()

    def stop(self) -> None:
        self._stopping.set()
        self._close()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        self._good = self._bad = None

    def __enter__(self) -> FakeOciVaultServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _listen(self) -> None:
        server = _Server((self.host, self.port), _Handler)
        server.fake = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fake-oci", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------ keys
    def create_key(self, name: str, *, region: str | None = None) -> str:
        """Create an ENABLED AES-256 HSM key; returns its ``oci-kms://`` URI (Tokyo by default)."""
        region = region or _DEFAULT_REGION
        realm = _REGION_REALMS.get(region)
        if realm is None:
            raise ValueError(f"the fake knows these regions only: {sorted(_REGION_REALMS)}")
        with self._lock:
            vault = self._vaults.setdefault(region, _random_id(13))
            key_id = f"ocid1.key.{realm}.{region}.{vault}.{_random_id(60)}"
            version_id = f"ocid1.keyversion.{realm}.{region}.{vault}.{_random_id(60)}"
            key = _Key(
                key_id=key_id,
                name=name,
                vault_id=f"ocid1.vault.{realm}.{region}.{vault}.{_random_id(60)}",
                compartment_id=self.compartment,
                version_id=version_id,
                material=AESGCM.generate_key(bit_length=256),
                created=datetime.now(UTC).isoformat(),
            )
            self._keys[key_id] = key
            self._versions[version_id] = key
        return f"{self.scheme}://{vault}-crypto.kms.{region}.{_REALM_DOMAINS[realm]}/{key_id}"

    def _key_of(self, uri: str) -> _Key:
        key_id = OciVaultAdapter.parse_uri(uri).parts["key_id"]
        key = self._keys.get(key_id)
        if key is None:
            raise KeyError(f"no key {key_id}")
        return key

    def set_key_enabled(self, uri: str, enabled: bool) -> None:
        self.set_key_state(uri, "ENABLED" if enabled else "DISABLED")

    def destroy_key(self, uri: str) -> None:
        """Schedule the key's deletion (OCI's shortest window, 7 days): PENDING_DELETION."""
        self.set_key_state(uri, "PENDING_DELETION")

    def set_key_state(self, uri: str, state: str) -> None:
        """Put the key in any OCI lifecycleState (``DELETED``: the window has passed)."""
        with self._lock:
            key = self._key_of(uri)
            key.state = state
            key.time_of_deletion = (
                datetime.fromtimestamp(time.time() + 7 * 86400, UTC).isoformat()
                if state in ("PENDING_DELETION", "DELETED")
                else None
            )

    # ------------------------------------------------------------------------ credentials
    def _new_api_key(self, label: str) -> tuple[rsa.RSAPrivateKey, Path]:
        if self._tmp is None:
            raise RuntimeError("start the server first")
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path = self._tmp / f"{label}_api_key.pem"
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return private, path

    def settings(self) -> OciVaultSettings:
        """Valid credentials (a registered API signing key) pointing at this server."""
        if self._good is None:
            private, path = self._new_api_key("good")
            fingerprint = _fingerprint(private.public_key())
            with self._lock:
                self._api_keys[f"{self.tenancy}/{self.user}/{fingerprint}"] = private.public_key()
            self._good = OciVaultSettings(
                endpoint=self.url,
                user=self.user,
                tenancy=self.tenancy,
                fingerprint=fingerprint,
                key_file=path,
                region=_DEFAULT_REGION,
            )
        return self._good.model_copy(update={"endpoint": self.url})

    def bad_settings(self) -> OciVaultSettings:
        """Same tenancy, user and fingerprint claim, but signed with an unregistered private key."""
        good = self.settings()
        if self._bad is None:
            _, path = self._new_api_key("bad")
            self._bad = good.model_copy(update={"key_file": path})
        return self._bad.model_copy(update={"endpoint": self.url})

    def env(self) -> dict[str, str]:
        """``KEYGATE_OCI_*`` for a subprocess to reach this server with valid credentials."""
        s = self.settings()
        return {
            "KEYGATE_OCI_ENDPOINT": self.url,
            "KEYGATE_OCI_USER": str(s.user),
            "KEYGATE_OCI_TENANCY": str(s.tenancy),
            "KEYGATE_OCI_FINGERPRINT": str(s.fingerprint),
            "KEYGATE_OCI_KEY_FILE": str(s.key_file),
            "KEYGATE_OCI_REGION": str(s.region),
        }

    # ------------------------------------------------------------------------ requests
    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]] | None:
        """Answer one request: (status, JSON payload), or None to drop the connection."""
        path = urlsplit(target).path
        operation, handler = self._route(method, path)
        with self._lock:
            self.received.append(body)
            if operation:
                self.calls[operation] += 1
        if self.mode == "slow" and self._stopping.wait(self.slow_s):
            return None
        if self.mode == "down":
            return None
        if self.mode == "error":
            return 503, {"code": "ServiceUnavailable", "message": "Service is unavailable."}
        if handler is None:
            return 404, {"code": "NotFound", "message": "There is no operation at this path."}
        try:
            self._authenticate(method, target, headers, body)
            return 200, handler(path, body)
        except _Refusal as refusal:
            return refusal.status, {"code": refusal.code, "message": refusal.message}

    def _route(self, method: str, path: str) -> tuple[str, Any]:
        if method == "POST" and path == f"{_API}/encrypt":
            return "encrypt", self._encrypt
        if method == "POST" and path == f"{_API}/decrypt":
            return "decrypt", self._decrypt
        if method == "GET" and _KEY_PATH.fullmatch(path):
            return "get_key", self._get_key
        return "", None

    def _authenticate(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        refuse = _Refusal(*_NOT_AUTHENTICATED)
        auth = headers.get("authorization", "")
        if not auth.startswith("Signature "):
            raise refuse
        params = dict(_AUTH_PARAM.findall(auth))
        signed = params.get("headers", "date").lower().split()
        required = _SIGNED_ALWAYS + (_SIGNED_WITH_BODY if method in ("POST", "PUT") else ())
        if (
            params.get("version") != "1"
            or params.get("algorithm") != "rsa-sha256"
            or not set(required) <= set(signed)
        ):
            raise refuse
        with self._lock:
            public_key = self._api_keys.get(params.get("keyId", ""))
        if public_key is None:
            raise refuse
        lines = []
        for name in signed:
            if name == "(request-target)":
                lines.append(f"(request-target): {method.lower()} {target}")
            elif name in headers:
                lines.append(f"{name}: {headers[name]}")
            else:
                raise refuse
        try:
            signature = base64.b64decode(params.get("signature", ""), validate=True)
            public_key.verify(
                signature, "\n".join(lines).encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
            )
        except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError):
            raise refuse from None
        try:
            sent = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
        except (TypeError, ValueError, IndexError):
            raise refuse from None
        if abs(time.time() - sent) > _MAX_SKEW_S:
            raise refuse
        if method in ("POST", "PUT"):
            digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
            if headers.get("x-content-sha256") != digest or headers.get("content-length") != str(
                len(body)
            ):
                raise refuse

    # ------------------------------------------------------------------------ operations
    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise _Refusal(400, "CannotParseRequest", "The request body is not JSON.") from None
        if not isinstance(data, dict):
            raise _Refusal(400, "CannotParseRequest", "The request body is not a JSON object.")
        return data

    @staticmethod
    def _associated(data: dict[str, Any]) -> dict[str, str] | None:
        value = data.get("associatedData")
        if value is None:
            return None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise _Refusal(400, "InvalidParameter", "associatedData must be a map of strings.")
        if len(json.dumps(value)) >= 4096:
            raise _Refusal(400, "InvalidParameter", "associatedData is too long.")
        return value

    def _usable_key(self, data: dict[str, Any]) -> _Key:
        key_id = data.get("keyId")
        if not isinstance(key_id, str) or not key_id:
            raise _Refusal(400, "MissingParameter", "keyId is required.")
        algorithm = data.get("encryptionAlgorithm") or _ALGORITHM
        if algorithm != _ALGORITHM:
            raise _Refusal(400, "InvalidParameter", "The encryption algorithm is not supported.")
        with self._lock:
            key = self._keys.get(key_id)
            state = key.state if key is not None else None
        if key is None or state == "DELETED":
            raise _Refusal(*_NOT_FOUND)
        if state != "ENABLED":
            status, code = self.state_error
            raise _Refusal(status, code, f"The key is in the {state} state.")
        return key

    def _encrypt(self, _path: str, body: bytes) -> dict[str, Any]:
        data = self._json(body)
        key = self._usable_key(data)
        associated = self._associated(data)
        try:
            plaintext = base64.b64decode(data.get("plaintext") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise _Refusal(400, "InvalidParameter", "plaintext must be base64.") from None
        if not plaintext or len(plaintext) > _MAX_PLAINTEXT:
            raise _Refusal(400, "InvalidParameter", "plaintext must be 1 to 4096 bytes.")
        nonce = os.urandom(12)
        version = key.version_id.encode()
        sealed = AESGCM(key.material).encrypt(
            nonce, plaintext, _canonical_aad(key.version_id, associated)
        )
        blob = bytes([len(version)]) + version + nonce + sealed
        return {
            "ciphertext": base64.b64encode(blob).decode(),
            "keyId": key.key_id,
            "keyVersionId": key.version_id,
            "encryptionAlgorithm": _ALGORITHM,
        }

    def _decrypt(self, _path: str, body: bytes) -> dict[str, Any]:
        data = self._json(body)
        key = self._usable_key(data)
        associated = self._associated(data)
        invalid = _Refusal(400, "InvalidParameter", "The ciphertext is invalid.")
        try:
            blob = base64.b64decode(data.get("ciphertext") or "", validate=True)
            size = blob[0]
            version_id = blob[1 : 1 + size].decode("ascii")
            nonce = blob[1 + size : 13 + size]
            sealed = blob[13 + size :]
        except (binascii.Error, ValueError, TypeError, IndexError, UnicodeDecodeError):
            raise invalid from None
        with self._lock:
            owner = self._versions.get(version_id)
        if owner is not key or len(nonce) != 12 or len(sealed) < 16:
            raise invalid
        try:
            plaintext = AESGCM(key.material).decrypt(
                nonce, sealed, _canonical_aad(version_id, associated)
            )
        except InvalidTag:
            raise invalid from None
        return {
            "plaintext": base64.b64encode(plaintext).decode(),
            "plaintextChecksum": str(zlib.crc32(plaintext)),
            "keyId": key.key_id,
            "keyVersionId": version_id,
            "encryptionAlgorithm": _ALGORITHM,
        }

    def _get_key(self, path: str, _body: bytes) -> dict[str, Any]:
        match = _KEY_PATH.fullmatch(path)
        key_id = unquote(match["key_id"]) if match else ""
        with self._lock:
            key = self._keys.get(key_id)
            if key is None:
                raise _Refusal(*_NOT_FOUND)
            return key.resource()
