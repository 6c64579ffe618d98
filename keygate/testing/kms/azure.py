"""A local Azure Key Vault (or Managed HSM) with its Microsoft Entra ID token endpoint, for tests.

:class:`FakeAzureKeyVaultServer` is driven by the real ``azure-keyvault-keys`` and
``azure-identity`` clients, unpatched::

    with FakeAzureKeyVaultServer() as kv:                    # or managed_hsm=True
        uri = kv.create_key("kek-1")                          # azure-kv://….vault.azure.net/keys/kek-1?region=japaneast
        adapter = AzureKeyVaultAdapter(ProviderOptions(), kv.settings())

What it reproduces (one HTTPS port, 127.0.0.1, a throwaway CA made here with ``cryptography``:
EC P-256 CA and leaf with SAN ``localhost`` and ``127.0.0.1``; ``ca_pem`` is the trust anchor):

- **Key Vault REST JSON** (``api-version`` required): create key (``RSA``/``RSA-HSM``; ``oct-HSM``
  on a Managed HSM only), get key (a disabled key is still readable, ``attributes.enabled`` false),
  update key (``enabled``, ``nbf``, ``exp``), delete key (soft delete: ``/deletedkeys/{name}``
  answers until :meth:`purge_key`), ``wrapkey`` / ``unwrapkey`` (``RSA-OAEP-256``, ``RSA-OAEP``;
  ``A128KW``/``A192KW``/``A256KW`` on AES keys, RFC 3394), ``encrypt`` / ``decrypt`` with the same
  algorithms.  Errors are Key Vault's ``{"error": {"code", "message", "innererror"}}``: 404
  ``KeyNotFound``, 403 ``Forbidden``/``KeyDisabled`` for private-key operations on a disabled key
  (public-key RSA ``wrapkey``/``encrypt`` stay allowed, as the real service reportedly does), 400
  ``BadParameter`` for a ciphertext the key cannot unwrap.  Every response carries
  ``x-ms-keyvault-region`` (the region the key was created in, else the server's), as the real
  service does.
- **The bearer challenge** of ``_shared/challenge_auth_policy.py``: a request without
  ``Authorization`` gets 401 with ``WWW-Authenticate: Bearer
  authorization="https://login.microsoftonline.com/{tenant}", resource="https://vault.azure.net"``
  (``https://managedhsm.azure.net`` for a Managed HSM); a token that is forged, expired, for another
  tenant or another audience gets 401 again; a valid token of a principal without a role
  (:attr:`authorized` false) gets 403 ``ForbiddenByRbac``.
- **Microsoft Entra ID** on the same port: ``GET /{tenant}/v2.0/.well-known/openid-configuration``
  (the discovery document MSAL reads when instance discovery is off) and the OAuth 2.0
  client-credentials grant ``POST /{tenant}/oauth2/v2.0/token``; a wrong secret gets 401
  ``invalid_client`` (``AADSTS7000215``), an unknown client 400 ``unauthorized_client``
  (``AADSTS700016``).  Tokens are HS256 JWTs with ``aud``, ``tid``, ``appid``, ``exp``.

Test hooks beyond the common shape: ``create_key(..., kty=, size=, versioned=)``,
:meth:`rotate_key`, :meth:`purge_key`, :meth:`unwrap_locally` (what the server-side key makes of
a ciphertext), :attr:`authorized` (False: 403 ``ForbiddenByRbac``), :attr:`deleted_keys_readable`
(False: a least-privilege role, 403 on ``/deletedkeys``), :attr:`issued_tokens`.  ``received``
holds every Key Vault request body (the bodiless challenge probes included, as ``b""``) but not
the token requests, which carry the client secret; ``calls`` counts the Key Vault operations
served (``get_key``, ``wrap_key``, ``unwrap_key``, ``update_key``, ``delete_key``,
``get_deleted_key``, ``create_key``, ``challenge``, ``unauthorized``, ``forbidden``) and the Entra
requests as they arrive (``discovery``, ``token``).

Where it differs from the real service: one server holds the keys of one vault (any vault host
routed to it reaches the same keys); key names are matched case-insensitively but nothing else of
Key Vault's naming rules is checked; no key rotation policy, backup, tags or release policy; tokens
are HS256-signed by the server, not by Entra's keys, and carry only the claims above; the
disabled / expired / RBAC error texts follow public Key Vault messages but were not compared with a
live vault, and whether the real service lets a *disabled* RSA key do the public-key ``wrapkey``
is taken from one public report (the adapter checks ``enabled`` itself before wrapping, so it does
not depend on it).

Faults (:meth:`fault`): ``"down"`` closes open connections and every new one before TLS,
``"slow"`` answers after :attr:`slow_s` seconds, ``"error"`` answers 503 ``ServiceUnavailable``,
``"throttle"`` 429 ``Throttled``; they apply to the token endpoint too.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime
import hashlib
import hmac
import http.server
import ipaddress
import json
import re
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

from keygate.providers.azure import AzureKeyVaultSettings

__all__ = ["FakeAzureKeyVaultServer"]

_VAULT_RESOURCE: Final = "https://vault.azure.net"
_HSM_RESOURCE: Final = "https://managedhsm.azure.net"
_API_VERSIONS: Final = frozenset(
    {"2016-10-01", "7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01"}
)
_RSA_OPS: Final = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
_OCT_OPS: Final = ["encrypt", "decrypt", "wrapKey", "unwrapKey"]
_KW_BITS: Final = {"A128KW": 128, "A192KW": 192, "A256KW": 256}
_OAEP: Final = {"RSA-OAEP-256": hashes.SHA256, "RSA-OAEP": hashes.SHA1}
_KEY_PATH: Final = re.compile(
    r"/keys/(?P<name>[0-9A-Za-z-]{1,127})(?:/(?P<version>[0-9a-fA-F]{0,32}))?"
    r"(?:/(?P<op>wrapkey|unwrapkey|encrypt|decrypt))?"
)
_CREATE_PATH: Final = re.compile(r"/keys/(?P<name>[0-9A-Za-z-]{1,127})/create")
_DELETED_PATH: Final = re.compile(r"/deletedkeys/(?P<name>[0-9A-Za-z-]{1,127})")
_ENTRA_DISCOVERY: Final = re.compile(r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration")
_ENTRA_TOKEN: Final = re.compile(r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token")
_FAULTS: Final = frozenset({"down", "slow", "error", "throttle"})


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


class _Reply(Exception):
    """An HTTP answer raised from deep inside a route."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _kv_error(status: int, code: str, message: str, inner: str | None = None) -> _Reply:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return _Reply(status, {"error": error})


@dataclass
class _KeyVersion:
    name: str
    version: str
    kty: str
    region: str
    private: rsa.RSAPrivateKey | None = None
    secret: bytes | None = None
    key_ops: list[str] = field(default_factory=list)
    enabled: bool = True
    nbf: int | None = None
    exp: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    updated: int = field(default_factory=lambda: int(time.time()))


def _make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """EC P-256 CA and a leaf for ``localhost`` / ``127.0.0.1``: (ca.pem, leaf.pem, leaf.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keygate test CA (azure-kv)")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = directory / "ca.pem"
    leaf_pem = directory / "leaf.pem"
    leaf_pkey = directory / "leaf.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    leaf_pkey.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    leaf_pkey.chmod(0o600)
    return ca_pem, leaf_pem, leaf_pkey


class _HttpsServer(http.server.ThreadingHTTPServer):
    """Accepts on the serving thread; TLS handshakes happen in each connection's own thread."""

    daemon_threads = True
    request_queue_size = 64
    owner: FakeAzureKeyVaultServer

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.owner.fault_mode != "down"

    def finish_request(self, request: Any, client_address: Any) -> None:
        owner = self.owner
        request.settimeout(30)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = owner.tls_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        owner.track(tls, add=True)
        try:
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]  # typeshed's Self
        except (OSError, ssl.SSLError):
            pass
        finally:
            owner.track(tls, add=False)
            with contextlib.suppress(OSError):
                tls.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpsServer
    server_version = "keygate-fake-azure-kv"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        region_header = owner.region
        is_entra = bool(
            _ENTRA_DISCOVERY.fullmatch(split.path) or _ENTRA_TOKEN.fullmatch(split.path)
        )
        if is_entra:
            owner.calls["token" if _ENTRA_TOKEN.fullmatch(split.path) else "discovery"] += 1
        else:
            with owner.lock:
                owner.received.append(body)
            region_header = owner.region_for(split.path)
        headers: dict[str, str] = {}
        try:
            owner.apply_fault()
            if owner.fault_mode == "down":
                self.close_connection = True
                return
            if is_entra:
                status, payload, headers = owner.entra(method, split.path, body)
            else:
                owner.check_kv_auth(self.headers, query)
                status, payload = owner.key_vault(method, split.path, body)
        except _Reply as reply:
            status, payload, headers = reply.status, reply.body, reply.headers
        if not is_entra:
            headers.setdefault("x-ms-keyvault-region", region_header)
            headers.setdefault("x-ms-keyvault-service-version", "1.9.0.0")
        self._send(status, payload, headers)

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class FakeAzureKeyVaultServer:
    """Key Vault (``managed_hsm=False``) or Managed HSM data plane plus Entra ID, over HTTPS."""

    scheme: ClassVar[str] = "azure-kv"

    def __init__(
        self,
        *,
        managed_hsm: bool = False,
        region: str = "japaneast",
        vault_name: str | None = None,
        slow_s: float = 1.0,
    ) -> None:
        self.managed_hsm = managed_hsm
        self.region = region
        suffix = "managedhsm.azure.net" if managed_hsm else "vault.azure.net"
        self.vault_host = f"{vault_name or 'kgtest-' + secrets.token_hex(3)}.{suffix}"
        self.resource = _HSM_RESOURCE if managed_hsm else _VAULT_RESOURCE
        self.tenant_id = str(uuid.uuid4())
        self.client_id = str(uuid.uuid4())
        self._client_secret = "kv-secret-" + secrets.token_urlsafe(18)
        self._jwt_key = secrets.token_bytes(32)
        self.slow_s = slow_s
        #: False: the principal has no role on the vault (403 ForbiddenByRbac)
        self.authorized = True
        #: False: the principal may not read deleted keys (a least-privilege role): 403 there
        self.deleted_keys_readable = True
        self.fault_mode: str | None = None
        self.received: list[bytes] = []
        self.calls: collections.Counter[str] = collections.Counter()
        #: every access token Entra handed out (tests check that none leaks into logs or errors)
        self.issued_tokens: list[str] = []
        self.lock = threading.RLock()
        self._keys: dict[str, list[_KeyVersion]] = {}
        self._deleted: dict[str, tuple[int, list[_KeyVersion]]] = {}
        self._connections: set[ssl.SSLSocket] = set()
        self._stopping = threading.Event()
        self._dir: Path | None = None
        self._httpd: _HttpsServer | None = None
        self._thread: threading.Thread | None = None
        self.ca_pem = Path()
        self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> FakeAzureKeyVaultServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._httpd is not None:
            return
        self._dir = Path(tempfile.mkdtemp(prefix="keygate-azure-kv-"))
        self.ca_pem, leaf_pem, leaf_key = _make_certificates(self._dir)
        self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls_context.load_cert_chain(leaf_pem, leaf_key)
        self._stopping.clear()
        httpd = _HttpsServer(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-azure-kv-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        self._stopping.set()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        self._close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def track(self, conn: ssl.SSLSocket, *, add: bool) -> None:
        with self.lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _close_connections(self) -> None:
        with self.lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ common shape
    def settings(self) -> AzureKeyVaultSettings:
        """Valid credentials and the endpoint/authority/CA overrides that reach this server."""
        return AzureKeyVaultSettings(
            tenant_id=self.tenant_id,
            client_id=self.client_id,
            client_secret=SecretStr(self._client_secret),
            authority_host=self.url,
            endpoint=self.url,
            ca_bundle=self.ca_pem,
        )

    def bad_settings(self) -> AzureKeyVaultSettings:
        """Same server, same application, a wrong client secret (Entra answers AADSTS7000215)."""
        return self.settings().model_copy(
            update={"client_secret": SecretStr("wrong-" + secrets.token_urlsafe(12))}
        )

    def env(self) -> dict[str, str]:
        """``KEYGATE_AZURE_*`` for a subprocess (``keygate serve``, the CLI) to use."""
        return {
            "KEYGATE_AZURE_TENANT_ID": self.tenant_id,
            "KEYGATE_AZURE_CLIENT_ID": self.client_id,
            "KEYGATE_AZURE_CLIENT_SECRET": self._client_secret,
            "KEYGATE_AZURE_AUTHORITY_HOST": self.url,
            "KEYGATE_AZURE_ENDPOINT": self.url,
            "KEYGATE_AZURE_CA_BUNDLE": str(self.ca_pem),
        }

    def create_key(
        self,
        name: str,
        *,
        region: str | None = None,
        kty: str | None = None,
        size: int | None = None,
        versioned: bool = False,
    ) -> str:
        """Create a key (a new version if it exists) and return its ``azure-kv://`` URI.

        Defaults: ``RSA-HSM`` 2048 on a vault (use ``size=3072`` as production should; 2048 keeps
        tests fast), ``oct-HSM`` 256 on a Managed HSM.  ``region`` (default: the server's) is what
        the URI declares and what ``x-ms-keyvault-region`` reports for this key.
        """
        kty = kty or ("oct-HSM" if self.managed_hsm else "RSA-HSM")
        key = self._new_version(name, kty, size, region or self.region)
        uri = f"azure-kv://{self.vault_host}/keys/{name}"
        if versioned:
            uri += f"/{key.version}"
        return f"{uri}?region={key.region}"

    def rotate_key(self, uri: str) -> str:
        """A new version of the key named in ``uri`` (same type and size); returns the version."""
        current = self._latest(self._name_of(uri))
        size = current.private.key_size if current.private else len(current.secret or b"") * 8
        return self._new_version(current.name, current.kty, size, current.region).version

    def set_key_enabled(self, uri: str, enabled: bool) -> None:
        """Enable/disable the URI's version, or every version when the URI names none."""
        name, version = self._name_of(uri), self._version_of(uri)
        with self.lock:
            for key in self._versions(name):
                if version is None or key.version == version:
                    key.enabled = enabled
                    key.updated = int(time.time())

    def destroy_key(self, uri: str) -> None:
        """Soft-delete the key (all its versions), as ``DELETE /keys/{name}`` does."""
        with self.lock:
            name = self._name_of(uri).lower()
            self._deleted[name] = (int(time.time()), self._keys.pop(name))

    def purge_key(self, uri: str) -> None:
        """Purge a deleted key: afterwards nothing tells it ever existed."""
        with self.lock:
            self._deleted.pop(self._name_of(uri).lower(), None)

    def fault(self, mode: str | None) -> None:
        if mode is not None and mode not in _FAULTS:
            raise ValueError(f"unknown fault {mode!r}; expected one of {sorted(_FAULTS)}")
        self.fault_mode = mode
        if mode == "down":
            self._close_connections()

    def unwrap_locally(self, uri: str, version: str, alg: str, wrapped: bytes) -> bytes:
        """What the server-side key makes of ``wrapped`` (lets tests check the provider state)."""
        with self.lock:
            key = self._find(self._name_of(uri), version)
        return self._unwrap(key, alg, wrapped)

    # ------------------------------------------------------------------ faults
    def apply_fault(self) -> None:
        mode = self.fault_mode
        if mode == "slow":
            self._stopping.wait(self.slow_s)
        elif mode == "error":
            raise _kv_error(
                503,
                "ServiceUnavailable",
                "The service is temporarily unavailable. Please retry the request.",
            )
        elif mode == "throttle":
            reply = _kv_error(
                429,
                "Throttled",
                "Request was not processed because too many requests were received. "
                "Reason: VaultRequestTypeLimitReached",
            )
            reply.headers["Retry-After"] = "1"
            raise reply

    # ------------------------------------------------------------------ Entra ID
    def entra(
        self, method: str, path: str, body: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if m := _ENTRA_DISCOVERY.fullmatch(path):
            tenant = m["tenant"]
            if method != "GET":
                return 405, {"error": "invalid_request"}, {}
            if tenant.lower() != self.tenant_id:
                return (
                    400,
                    self._aad_error("invalid_tenant", 90002, f"Tenant '{tenant}' not found."),
                    {},
                )
            base = f"{self.url}/{tenant}"
            return (
                200,
                {
                    "token_endpoint": f"{base}/oauth2/v2.0/token",
                    "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                    "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                    "issuer": f"{base}/v2.0",
                    "jwks_uri": f"{base}/discovery/v2.0/keys",
                    "token_endpoint_auth_methods_supported": [
                        "client_secret_post",
                        "private_key_jwt",
                        "client_secret_basic",
                    ],
                    "response_types_supported": ["code", "id_token", "code id_token"],
                    "tenant_region_scope": "AS",
                },
                {},
            )
        m = _ENTRA_TOKEN.fullmatch(path)
        assert m is not None  # noqa: S101 - dispatch matched it
        if method != "POST":
            return (
                405,
                self._aad_error("invalid_request", 900561, "The endpoint only accepts POST."),
                {},
            )
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        if m["tenant"].lower() != self.tenant_id:
            return (
                400,
                self._aad_error("invalid_request", 90002, f"Tenant '{m['tenant']}' not found."),
                {},
            )
        if form.get("grant_type") != "client_credentials":
            return (
                400,
                self._aad_error(
                    "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
                ),
                {},
            )
        if form.get("client_id") != self.client_id:
            return (
                400,
                self._aad_error(
                    "unauthorized_client",
                    700016,
                    f"Application with identifier '{form.get('client_id', '')}' was not found "
                    f"in the directory '{self.tenant_id}'.",
                ),
                {},
            )
        secret = form.get("client_secret", "")
        if not hmac.compare_digest(secret.encode(), self._client_secret.encode()):
            return (
                401,
                self._aad_error(
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request "
                    "is the client secret value, not the client secret ID, for a secret added to "
                    f"app '{self.client_id}'.",
                ),
                {},
            )
        scope = form.get("scope", "")
        resource = scope.removesuffix("/.default")
        if not scope.endswith("/.default") or resource not in (_VAULT_RESOURCE, _HSM_RESOURCE):
            return (
                400,
                self._aad_error(
                    "invalid_scope",
                    70011,
                    "The provided value for the input parameter 'scope' is not valid.",
                ),
                {},
            )
        now = int(time.time())
        claims = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "tid": self.tenant_id,
            "appid": self.client_id,
            "iat": now,
            "nbf": now - 5,
            "exp": now + 3600,
        }
        token = self._jwt(claims)
        with self.lock:
            self.issued_tokens.append(token)
        return (
            200,
            {
                "token_type": "Bearer",
                "expires_in": 3599,
                "ext_expires_in": 3599,
                "access_token": token,
            },
            {},
        )

    def _aad_error(self, error: str, code: int, text: str) -> dict[str, Any]:
        trace = str(uuid.uuid4())
        return {
            "error": error,
            "error_description": f"AADSTS{code}: {text} Trace ID: {trace}",
            "error_codes": [code],
            "timestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
            "trace_id": trace,
            "correlation_id": str(uuid.uuid4()),
        }

    def _jwt(self, claims: dict[str, Any]) -> str:
        head = _b64u(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = _b64u(json.dumps(claims).encode())
        sig = hmac.new(self._jwt_key, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{_b64u(sig)}"

    def _token_claims(self, token: str) -> dict[str, Any] | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        want = hmac.new(self._jwt_key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(_unb64u(parts[2]), want):
                return None
            claims = json.loads(_unb64u(parts[1]))
        except ValueError:
            return None
        return claims if isinstance(claims, dict) else None

    # ------------------------------------------------------------------ Key Vault
    def region_for(self, path: str) -> str:
        m = _KEY_PATH.match(path) or _DELETED_PATH.match(path)
        with self.lock:
            versions = self._keys.get(m["name"].lower()) if m else None
        return versions[-1].region if versions else self.region

    def check_kv_auth(self, headers: Any, query: dict[str, str]) -> None:
        challenge = {
            "WWW-Authenticate": (
                f'Bearer authorization="https://login.microsoftonline.com/{self.tenant_id}", '
                f'resource="{self.resource}"'
            )
        }
        auth = headers.get("Authorization") or ""
        if not auth:
            self.calls["challenge"] += 1
            reply = _kv_error(
                401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token."
            )
            reply.headers.update(challenge)
            raise reply
        scheme, _, token = auth.partition(" ")
        claims = self._token_claims(token) if scheme.lower() == "bearer" else None
        now = time.time()
        problem = ""
        if claims is None:
            problem = "AKV10032: Invalid issuer. Expected one of https://sts.windows.net/…"
        elif claims.get("tid") != self.tenant_id:
            problem = "AKV10032: Invalid issuer."
        elif claims.get("aud") != self.resource:
            problem = (
                f"AKV10022: Invalid audience. Expected {self.resource}, found: {claims.get('aud')}."
            )
        elif not claims.get("exp") or claims["exp"] < now:
            problem = "AKV10000: The access token has expired."
        if problem:
            self.calls["unauthorized"] += 1
            reply = _kv_error(401, "Unauthorized", problem)
            reply.headers.update(challenge)
            raise reply
        version = query.get("api-version")
        if version is None:
            raise _kv_error(400, "BadParameter", "The 'api-version' query parameter is missing.")
        if version not in _API_VERSIONS:
            raise _kv_error(
                400, "BadParameter", f"The specified version ({version}) is not recognized."
            )
        if not self.authorized:
            self.calls["forbidden"] += 1
            raise _kv_error(
                403,
                "Forbidden",
                "Caller is not authorized to perform action on resource.\r\n"
                "If role assignments, deny assignments or role definitions were changed recently, "
                f"please observe propagation time.\r\nCaller: appid={claims['appid']};\r\n"  # type: ignore[index]
                "Assignment: (not found)\r\n",
                "ForbiddenByRbac",
            )

    def key_vault(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            params = json.loads(body) if body else {}
        except ValueError:
            raise _kv_error(400, "BadParameter", "The request body is not valid JSON.") from None
        if not isinstance(params, dict):
            raise _kv_error(400, "BadParameter", "The request body is not a JSON object.")
        if (m := _CREATE_PATH.fullmatch(path)) and method == "POST":
            self.calls["create_key"] += 1
            return 200, self._create_from_rest(m["name"], params)
        if (m := _DELETED_PATH.fullmatch(path)) and method == "GET":
            self.calls["get_deleted_key"] += 1
            return 200, self._get_deleted(m["name"])
        m = _KEY_PATH.fullmatch(path)
        if m is None:
            raise _kv_error(404, "NotFound", "The requested resource was not found.")
        name, version, op = m["name"], m["version"] or None, m["op"]
        if op is None and method == "GET":
            self.calls["get_key"] += 1
            with self.lock:
                return 200, self._bundle(self._find(name, version))
        if op is None and method == "PATCH":
            self.calls["update_key"] += 1
            return 200, self._update(name, version, params)
        if op is None and method == "DELETE" and m["version"] is None:
            self.calls["delete_key"] += 1
            return 200, self._delete(name)
        if op is not None and method == "POST":
            self.calls[{"wrapkey": "wrap_key", "unwrapkey": "unwrap_key"}.get(op, op)] += 1
            return 200, self._crypto(name, version, op, params)
        raise _kv_error(405, "MethodNotAllowed", f"The method {method} is not allowed here.")

    # state ------------------------------------------------------------
    def _name_of(self, uri: str) -> str:
        path = urlsplit(uri).path
        return path.split("/")[2]

    def _version_of(self, uri: str) -> str | None:
        parts = urlsplit(uri).path.split("/")
        return parts[3] if len(parts) > 3 and parts[3] else None

    def _versions(self, name: str) -> list[_KeyVersion]:
        versions = self._keys.get(name.lower())
        if not versions:
            raise _kv_error(
                404,
                "KeyNotFound",
                f"A key with (name/id) {name} was not found in this key vault. If you recently "
                "deleted this key you may be able to recover it using the correct recovery "
                "command. For help resolving this issue, please see "
                "https://go.microsoft.com/fwlink/?linkid=2125182",
            )
        return versions

    def _latest(self, name: str) -> _KeyVersion:
        with self.lock:
            return self._versions(name)[-1]

    def _find(self, name: str, version: str | None) -> _KeyVersion:
        versions = self._versions(name)
        if not version:
            return versions[-1]
        for key in versions:
            if key.version == version.lower():
                return key
        raise _kv_error(
            404,
            "KeyNotFound",
            f"A key with (name/id) {name}/{version} was not found in this key vault.",
        )

    def _new_version(self, name: str, kty: str, size: int | None, region: str) -> _KeyVersion:
        if kty in ("RSA", "RSA-HSM"):
            bits = size or 2048
            if bits not in (2048, 3072, 4096):
                raise _kv_error(400, "BadParameter", f"RSA key size {bits} is not supported.")
            key = _KeyVersion(
                name=name,
                version=uuid.uuid4().hex,
                kty=kty,
                region=region,
                private=rsa.generate_private_key(public_exponent=65537, key_size=bits),
                key_ops=list(_RSA_OPS),
            )
        elif kty in ("oct", "oct-HSM"):
            if not self.managed_hsm:
                raise _kv_error(
                    400,
                    "BadParameter",
                    f"Key type '{kty}' is not supported by Key Vault; use a Managed HSM.",
                )
            bits = size or 256
            if bits not in (128, 192, 256):
                raise _kv_error(400, "BadParameter", f"AES key size {bits} is not supported.")
            key = _KeyVersion(
                name=name,
                version=uuid.uuid4().hex,
                kty=kty,
                region=region,
                secret=secrets.token_bytes(bits // 8),
                key_ops=list(_OCT_OPS),
            )
        else:
            raise _kv_error(400, "BadParameter", f"Key type '{kty}' is not supported here.")
        with self.lock:
            if name.lower() in self._deleted:
                raise _kv_error(
                    409,
                    "Conflict",
                    f"Key {name} is currently in a deleted but recoverable state, and its name "
                    "cannot be reused; in this state, the key can only be recovered or purged.",
                    "ObjectIsDeletedButRecoverable",
                )
            self._keys.setdefault(name.lower(), []).append(key)
        return key

    def _create_from_rest(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        key = self._new_version(
            name, str(params.get("kty", "")), params.get("key_size"), self.region
        )
        attrs = params.get("attributes") or {}
        with self.lock:
            if isinstance(params.get("key_ops"), list):
                key.key_ops = [str(op) for op in params["key_ops"]]
            if "enabled" in attrs:
                key.enabled = bool(attrs["enabled"])
            key.nbf, key.exp = attrs.get("nbf"), attrs.get("exp")
            return self._bundle(key)

    def _update(self, name: str, version: str | None, params: dict[str, Any]) -> dict[str, Any]:
        attrs = params.get("attributes") or {}
        with self.lock:
            key = self._find(name, version)
            if "enabled" in attrs:
                key.enabled = bool(attrs["enabled"])
            if "nbf" in attrs:
                key.nbf = attrs["nbf"]
            if "exp" in attrs:
                key.exp = attrs["exp"]
            if isinstance(params.get("key_ops"), list):
                key.key_ops = [str(op) for op in params["key_ops"]]
            key.updated = int(time.time())
            return self._bundle(key)

    def _delete(self, name: str) -> dict[str, Any]:
        with self.lock:
            versions = self._versions(name)
            deleted_at = int(time.time())
            self._deleted[name.lower()] = (deleted_at, self._keys.pop(name.lower()))
            return self._deleted_bundle(name, deleted_at, versions[-1])

    def _get_deleted(self, name: str) -> dict[str, Any]:
        if not self.deleted_keys_readable:
            raise _kv_error(
                403,
                "Forbidden",
                "Caller is not authorized to perform action on resource.\r\n"
                "Action: 'Microsoft.KeyVault/vaults/deletedKeys/read'\r\n",
                "ForbiddenByRbac",
            )
        with self.lock:
            entry = self._deleted.get(name.lower())
            if entry is None:
                raise _kv_error(404, "KeyNotFound", f"Deleted Key not found: {name}")
            return self._deleted_bundle(name, entry[0], entry[1][-1])

    def _deleted_bundle(self, name: str, deleted_at: int, key: _KeyVersion) -> dict[str, Any]:
        bundle = self._bundle(key)
        bundle["recoveryId"] = f"https://{self.vault_host}/deletedkeys/{name}"
        bundle["deletedDate"] = deleted_at
        bundle["scheduledPurgeDate"] = deleted_at + 90 * 86400
        return bundle

    def _bundle(self, key: _KeyVersion) -> dict[str, Any]:
        jwk: dict[str, Any] = {
            "kid": f"https://{self.vault_host}/keys/{key.name}/{key.version}",
            "kty": key.kty,
            "key_ops": list(key.key_ops),
        }
        if key.private is not None:
            numbers = key.private.public_key().public_numbers()
            jwk["n"] = _b64u(_int_bytes(numbers.n))
            jwk["e"] = _b64u(_int_bytes(numbers.e))
        attributes: dict[str, Any] = {
            "enabled": key.enabled,
            "created": key.created,
            "updated": key.updated,
            "recoveryLevel": "CustomizedRecoverable+Purgeable"
            if self.managed_hsm
            else "Recoverable+Purgeable",
            "recoverableDays": 90,
            "exportable": False,
        }
        if key.nbf is not None:
            attributes["nbf"] = key.nbf
        if key.exp is not None:
            attributes["exp"] = key.exp
        return {"key": jwk, "attributes": attributes}

    def _crypto(
        self, name: str, version: str | None, op: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        alg, value = params.get("alg"), params.get("value")
        if not isinstance(alg, str) or not isinstance(value, str):
            raise _kv_error(400, "BadParameter", "Property 'alg' and 'value' are required.")
        try:
            data = _unb64u(value)
        except ValueError:
            raise _kv_error(
                400, "BadParameter", "Property 'value' is not valid base64url."
            ) from None
        operation = {"wrapkey": "wrapKey", "unwrapkey": "unwrapKey"}.get(op, op)
        with self.lock:
            key = self._find(name, version)
        private_op = operation in ("unwrapKey", "decrypt") or key.secret is not None
        if not key.enabled and private_op:
            raise _kv_error(
                403,
                "Forbidden",
                f"Operation {operation} is not allowed on a disabled key.",
                "KeyDisabled",
            )
        now = time.time()
        if operation in ("wrapKey", "encrypt"):
            if key.exp is not None and now >= key.exp:
                raise _kv_error(
                    403,
                    "Forbidden",
                    f"Operation {operation} is not allowed on an expired key.",
                    "KeyExpired",
                )
            if key.nbf is not None and now < key.nbf:
                raise _kv_error(
                    403,
                    "Forbidden",
                    f"Operation {operation} is not allowed on a key that is not yet valid.",
                    "KeyNotYetValid",
                )
        if operation not in key.key_ops:
            raise _kv_error(
                403,
                "Forbidden",
                f"Operation {operation} is not permitted on this key.",
                "KeyOperationForbidden",
            )
        if operation in ("wrapKey", "encrypt"):
            result = self._wrap(key, alg, data)
        else:
            result = self._unwrap(key, alg, data)
        return {
            "kid": f"https://{self.vault_host}/keys/{key.name}/{key.version}",
            "value": _b64u(result),
        }

    def _wrap(self, key: _KeyVersion, alg: str, data: bytes) -> bytes:
        if key.private is not None and alg in _OAEP:
            oaep = padding.OAEP(padding.MGF1(_OAEP[alg]()), _OAEP[alg](), None)
            try:
                return key.private.public_key().encrypt(data, oaep)
            except ValueError:
                raise _kv_error(400, "BadParameter", "The value is too long for the key.") from None
        if key.secret is not None and _KW_BITS.get(alg) == len(key.secret) * 8:
            if len(data) < 16 or len(data) % 8:
                raise _kv_error(
                    400,
                    "BadParameter",
                    "The key to wrap must be a multiple of 8 bytes, at least 16.",
                )
            return aes_key_wrap(key.secret, data)
        raise _kv_error(
            400,
            "BadParameter",
            f"Algorithm {alg} is not supported by a {key.kty} key of this size.",
        )

    def _unwrap(self, key: _KeyVersion, alg: str, data: bytes) -> bytes:
        if key.private is not None and alg in _OAEP:
            oaep = padding.OAEP(padding.MGF1(_OAEP[alg]()), _OAEP[alg](), None)
            try:
                return key.private.decrypt(data, oaep)
            except ValueError:
                raise _kv_error(400, "BadParameter", "The parameter is incorrect.\r\n") from None
        if key.secret is not None and _KW_BITS.get(alg) == len(key.secret) * 8:
            try:
                return aes_key_unwrap(key.secret, data)
            except (InvalidUnwrap, ValueError):
                raise _kv_error(400, "BadParameter", "The parameter is incorrect.\r\n") from None
        raise _kv_error(
            400,
            "BadParameter",
            f"Algorithm {alg} is not supported by a {key.kty} key of this size.",
        )
