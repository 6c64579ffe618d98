"""A local Cloud KMS: an in-process gRPC server for ``google.cloud.kms.v1.KeyManagementService``.

No emulator of Cloud KMS exists on PyPI or npm, and google-cloud-kms ships no generated servicer,
so :class:`FakeGcpKmsServer` registers the real service name with handlers whose
(de)serializers are the SDK's own proto-plus classes.  The real ``KeyManagementServiceClient``
talks to it over real gRPC (HTTP/2, protobuf), over TLS with a throwaway CA (default) or over
gRPC local channel credentials (``tls=False``).

What it reproduces:

- ``CreateKeyRing``, ``CreateCryptoKey`` (first version, unless skipped), ``GetCryptoKey``,
  ``CreateCryptoKeyVersion``, ``UpdateCryptoKeyPrimaryVersion``, ``UpdateCryptoKeyVersion``
  (``state`` ENABLED / DISABLED only), ``DestroyCryptoKeyVersion`` (→ ``DESTROY_SCHEDULED``),
  ``Encrypt`` (key or version name) and ``Decrypt`` (key name only: a version name gets
  "… is not a valid resource type for this request.");
- AES-256-GCM per key version, the request's AAD bound; the ciphertext names its version, so a
  rotated key still decrypts old ciphertexts (``used_primary`` is reported);
- the CRC32C protocol both ways: ``*_crc32c`` of requests checked ("The checksum in field
  plaintext_crc32c did not match the data in field plaintext.", ``INVALID_ARGUMENT``),
  ``verified_*`` flags, ``ciphertext_crc32c`` / ``plaintext_crc32c`` in answers;
- key state: a version that is not ENABLED gives ``FAILED_PRECONDITION`` "The request cannot be
  fulfilled. Resource <version> has value DISABLED in field crypto_key_version.state."; a foreign
  or altered ciphertext or a wrong AAD gives ``INVALID_ARGUMENT`` "Decryption failed: verify that
  'name' refers to the correct CryptoKey."; a missing key ``NOT_FOUND``;
- authentication from the ``authorization: Bearer …`` metadata: an access token (:attr:`token`,
  or one from :meth:`add_token`) or a service account's self-signed JWT (RS256, checked with the
  public key of a file made by :meth:`service_account_file`); anything else is
  ``UNAUTHENTICATED`` with Google's message; a caller without the IAM permission the method needs
  gets ``PERMISSION_DENIED`` "Permission '…' denied on resource '…' (or it may not exist).".

Where it differs from Cloud KMS: the ciphertext format is its own (version, nonce, GCM); IAM is a
set of permissions per caller, not policies on resources; destroyed versions never reach
``DESTROYED`` by themselves (``destroy_key(..., scheduled=False)`` does it at once); a key without
a primary version, a wrong purpose and a CryptoKey-level ``NOT_FOUND`` have messages shaped like
Google's but not verified against it; no long-running operations, listing, IAM methods, import,
asymmetric or MAC keys, rotation schedules or quotas.

Faults (:meth:`fault`): ``"down"`` stops the server (connections are refused; ``fault(None)``
starts it again on the same port), ``"slow"`` answers after :attr:`slow_s` seconds, ``"error"``
answers ``UNAVAILABLE`` "The service is currently unavailable.", ``"throttle"``
``RESOURCE_EXHAUSTED``, ``"crc-request"`` refuses every request's checksum, ``"crc-response"``
sends wrong ``ciphertext_crc32c`` / ``plaintext_crc32c``, ``"crc-unverified"`` leaves the
``verified_*`` flags false.  ``terse_errors = True`` drops the state from ``FAILED_PRECONDITION``
messages (to exercise an adapter's fallback).
"""

from __future__ import annotations

import base64
import datetime
import hmac
import ipaddress
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.cloud import kms_v1
from pydantic import SecretStr

from keygate.providers.gcp import GcpKmsSettings, crc32c, parse_key_uri

__all__ = ["ALL_PERMISSIONS", "ENCRYPTER_DECRYPTER", "FAULT_MODES", "FakeGcpKmsServer"]

SERVICE: Final = "google.cloud.kms.v1.KeyManagementService"
FAULT_MODES: Final = frozenset(
    {"down", "slow", "error", "throttle", "crc-request", "crc-response", "crc-unverified"}
)
#: what roles/cloudkms.cryptoKeyEncrypterDecrypter grants on a key (for these methods)
ENCRYPTER_DECRYPTER: Final = frozenset(
    {"cloudkms.cryptoKeyVersions.useToEncrypt", "cloudkms.cryptoKeyVersions.useToDecrypt"}
)
ALL_PERMISSIONS: Final = ENCRYPTER_DECRYPTER | {
    "cloudkms.cryptoKeys.get",
    "cloudkms.keyRings.create",
    "cloudkms.cryptoKeys.create",
    "cloudkms.cryptoKeys.update",
    "cloudkms.cryptoKeyVersions.create",
    "cloudkms.cryptoKeyVersions.update",
    "cloudkms.cryptoKeyVersions.destroy",
}
_SCOPE: Final = "https://www.googleapis.com/auth/cloud-platform"
_UNAUTHENTICATED: Final = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
    "or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_DECRYPTION_FAILED: Final = "Decryption failed: verify that 'name' refers to the correct CryptoKey."
_MAX_DATA: Final = 64 * 1024
_DEFAULT_DESTROY_S: Final = 30 * 24 * 3600
_KEY_NAME: Final = re.compile(r"(projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+)")
_VERSION_NAME: Final = re.compile(rf"{_KEY_NAME.pattern}/cryptoKeyVersions/([1-9][0-9]*)")
_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,63}")

State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
Purpose = kms_v1.CryptoKey.CryptoKeyPurpose


class _Abort(Exception):
    """Ends a handler with a gRPC status (control flow inside the server only)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# proto-plus enum members are typed as plain ints, hence ``Any`` for the enum fields below
@dataclass
class _Version:
    number: int
    material: bytes
    protection_level: Any
    state: Any = State.ENABLED
    created: float = field(default_factory=time.time)
    destroy_time: float | None = None


@dataclass
class _Key:
    name: str
    purpose: Any
    protection_level: Any
    versions: dict[int, _Version] = field(default_factory=dict)
    primary: int | None = None
    created: float = field(default_factory=time.time)


def _ts(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


def _make_certificates(directory: Path) -> tuple[bytes, bytes, Path]:
    """An EC P-256 CA and a leaf for localhost / 127.0.0.1: (leaf key PEM, leaf PEM, ca.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keygate test CA (gcp-kms)")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = directory / "ca.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, leaf.public_bytes(serialization.Encoding.PEM), ca_pem


def _b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeGcpKmsServer:
    """Cloud KMS over gRPC on 127.0.0.1 (a free port); a context manager."""

    scheme = "gcp-kms"

    def __init__(
        self,
        *,
        tls: bool = True,
        project: str = "keygate-test",
        location: str = "asia-northeast1",
        key_ring: str = "keygate",
        slow_s: float = 2.0,
    ) -> None:
        self.tls = tls
        self.project = project
        self.location = location
        self.key_ring = key_ring
        #: seconds a "slow" answer is held back
        self.slow_s = slow_s
        #: drop the version and state from FAILED_PRECONDITION messages
        self.terse_errors = False
        #: the access token :meth:`settings` uses (holds every permission)
        self.token = secrets.token_urlsafe(24)
        #: raw request messages as they arrived (after TLS), in order
        self.received: list[bytes] = []
        #: calls per method, snake_case (``encrypt``, ``get_crypto_key``, …)
        self.calls: Counter[str] = Counter()
        self.port = 0
        self.ca_file: Path | None = None
        self._grants: dict[str, frozenset[str]] = {self.token: ALL_PERMISSIONS}
        self._service_accounts: dict[str, tuple[str, rsa.RSAPublicKey, frozenset[str]]] = {}
        self._rings: set[str] = set()
        self._keys: dict[str, _Key] = {}
        self._mode: str | None = None
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._server: grpc.Server | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._tls_pair: tuple[bytes, bytes] | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> FakeGcpKmsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="keygate-gcp-kms-")
            if self.tls:
                key_pem, cert_pem, self.ca_file = _make_certificates(Path(self._tmp.name))
                self._tls_pair = (key_pem, cert_pem)
        self._serve()

    def _serve(self) -> None:
        self._wake.clear()
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fake-gcp-kms")
        server = grpc.server(self._pool)
        server.add_generic_rpc_handlers((self._handlers(),))
        if self._tls_pair is not None:
            creds = grpc.ssl_server_credentials([self._tls_pair])
        else:
            creds = grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        port = server.add_secure_port(f"127.0.0.1:{self.port}", creds)
        if port == 0:
            raise RuntimeError(f"cannot bind 127.0.0.1:{self.port}")
        self.port = port
        server.start()
        self._server = server

    def _halt(self) -> None:
        self._wake.set()  # wakes "slow" handlers
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=None).wait(5)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        self._halt()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ settings for clients
    def settings(self, *, token: str | None = None) -> GcpKmsSettings:
        """Valid credentials (or ``token``) for this server, with its CA or local credentials."""
        return GcpKmsSettings(
            endpoint=self.endpoint,
            access_token=SecretStr(token if token is not None else self.token),
            ca_file=self.ca_file,
            local_channel=not self.tls,
        )

    def bad_settings(self) -> GcpKmsSettings:
        """This server, with an access token it never issued."""
        return self.settings(token=secrets.token_urlsafe(24))

    def env(self) -> dict[str, str]:
        env = {
            "KEYGATE_GCP_ENDPOINT": self.endpoint,
            "KEYGATE_GCP_ACCESS_TOKEN": self.token,
        }
        if self.ca_file is not None:
            env["KEYGATE_GCP_CA_FILE"] = str(self.ca_file)
        else:
            env["KEYGATE_GCP_LOCAL_CHANNEL"] = "true"
        return env

    def add_token(self, permissions: Iterable[str] = ALL_PERMISSIONS) -> str:
        """A new access token that holds exactly ``permissions``."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._grants[token] = frozenset(permissions)
        return token

    def service_account_file(
        self, path: Path, *, permissions: Iterable[str] = ALL_PERMISSIONS, register: bool = True
    ) -> Path:
        """Write a service-account key file whose self-signed JWTs this server accepts.

        With ``register=False`` the server does not know the key (a revoked or foreign account).
        """
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        email = f"keygate-{secrets.token_hex(4)}@{self.project}.iam.gserviceaccount.com"
        info = {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": key_id,
            "private_key": key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
            "client_email": email,
            "client_id": str(secrets.randbelow(10**20)),
            # never contacted (self-signed JWTs); if it were, it is this server, not Google
            "token_uri": f"https://127.0.0.1:{self.port}/token",
        }
        path.write_text(json.dumps(info))
        path.chmod(0o600)
        if register:
            with self._lock:
                self._service_accounts[key_id] = (email, key.public_key(), frozenset(permissions))
        return path

    # ------------------------------------------------------------------ keys (admin helpers)
    def _ring_name(self, location: str | None) -> str:
        location = location or self.location
        return f"projects/{self.project}/locations/{location}/keyRings/{self.key_ring}"

    def create_key(
        self,
        name: str,
        *,
        region: str | None = None,
        purpose: str = "ENCRYPT_DECRYPT",
        protection_level: str = "HSM",
    ) -> str:
        """Create a key (and its key ring) with version 1 as primary; return its key URI."""
        if not _ID.fullmatch(name):
            raise ValueError("key ids are 1-63 characters of A-Za-z0-9_-")
        ring = self._ring_name(region)
        key_name = f"{ring}/cryptoKeys/{name}"
        with self._lock:
            self._rings.add(ring)
            if key_name in self._keys:
                raise ValueError(f"{key_name} exists")
            key = _Key(
                key_name,
                getattr(kms_v1.CryptoKey.CryptoKeyPurpose, purpose),
                getattr(kms_v1.ProtectionLevel, protection_level),
            )
            self._keys[key_name] = key
            self._new_version(key, make_primary=True)
        return f"{self.scheme}://{key_name}"

    def _new_version(self, key: _Key, *, make_primary: bool) -> _Version:
        number = max(key.versions, default=0) + 1
        version = _Version(number, AESGCM.generate_key(256), key.protection_level)
        key.versions[number] = version
        if make_primary and key.purpose == Purpose.ENCRYPT_DECRYPT:
            key.primary = number
        return version

    def _key_of(self, uri: str) -> _Key:
        name = parse_key_uri(uri).parts["name"]
        with self._lock:
            return self._keys[name]

    def rotate_key(self, uri: str) -> int:
        """A new version, made primary; returns its number."""
        with self._lock:
            return self._new_version(self._key_of(uri), make_primary=True).number

    def _primary(self, uri: str) -> _Version:
        key = self._key_of(uri)
        if key.primary is None:
            raise ValueError("the key has no primary version")
        return key.versions[key.primary]

    def set_key_enabled(self, uri: str, enabled: bool) -> None:
        """Enable or disable the primary version (what a KMS admin does to stop a key)."""
        with self._lock:
            version = self._primary(uri)
            if version.state not in (State.ENABLED, State.DISABLED):
                raise ValueError(f"version is {version.state.name}")
            version.state = State.ENABLED if enabled else State.DISABLED

    def destroy_key(self, uri: str, *, scheduled: bool = True) -> None:
        """Schedule the primary version's destruction (``DESTROYED`` at once if not scheduled)."""
        with self._lock:
            version = self._primary(uri)
            version.state = State.DESTROY_SCHEDULED if scheduled else State.DESTROYED
            version.destroy_time = time.time() + (_DEFAULT_DESTROY_S if scheduled else 0)
            if not scheduled:
                version.material = b""

    def fault(self, mode: str | None) -> None:
        if mode is not None and mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}")
        with self._lock:
            previous, self._mode = self._mode, mode
        if mode == "down" and previous != "down":
            self._halt()
        elif mode != "down" and previous == "down":
            self._serve()

    # ------------------------------------------------------------------ gRPC plumbing
    def _handlers(self) -> grpc.GenericRpcHandler:
        methods: dict[str, tuple[Any, Any, Callable[[Any, str], Any], str]] = {
            "CreateKeyRing": (
                kms_v1.CreateKeyRingRequest,
                kms_v1.KeyRing,
                self._create_key_ring,
                "cloudkms.keyRings.create",
            ),
            "CreateCryptoKey": (
                kms_v1.CreateCryptoKeyRequest,
                kms_v1.CryptoKey,
                self._create_crypto_key,
                "cloudkms.cryptoKeys.create",
            ),
            "GetCryptoKey": (
                kms_v1.GetCryptoKeyRequest,
                kms_v1.CryptoKey,
                self._get_crypto_key,
                "cloudkms.cryptoKeys.get",
            ),
            "CreateCryptoKeyVersion": (
                kms_v1.CreateCryptoKeyVersionRequest,
                kms_v1.CryptoKeyVersion,
                self._create_crypto_key_version,
                "cloudkms.cryptoKeyVersions.create",
            ),
            "UpdateCryptoKeyPrimaryVersion": (
                kms_v1.UpdateCryptoKeyPrimaryVersionRequest,
                kms_v1.CryptoKey,
                self._update_primary,
                "cloudkms.cryptoKeys.update",
            ),
            "UpdateCryptoKeyVersion": (
                kms_v1.UpdateCryptoKeyVersionRequest,
                kms_v1.CryptoKeyVersion,
                self._update_crypto_key_version,
                "cloudkms.cryptoKeyVersions.update",
            ),
            "DestroyCryptoKeyVersion": (
                kms_v1.DestroyCryptoKeyVersionRequest,
                kms_v1.CryptoKeyVersion,
                self._destroy_crypto_key_version,
                "cloudkms.cryptoKeyVersions.destroy",
            ),
            "Encrypt": (
                kms_v1.EncryptRequest,
                kms_v1.EncryptResponse,
                self._encrypt,
                "cloudkms.cryptoKeyVersions.useToEncrypt",
            ),
            "Decrypt": (
                kms_v1.DecryptRequest,
                kms_v1.DecryptResponse,
                self._decrypt,
                "cloudkms.cryptoKeyVersions.useToDecrypt",
            ),
        }
        handlers = {
            method: grpc.unary_unary_rpc_method_handler(
                self._rpc(method, impl, permission),
                request_deserializer=self._recording(req_cls),
                response_serializer=resp_cls.serialize,
            )
            for method, (req_cls, resp_cls, impl, permission) in methods.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _recording(self, cls: Any) -> Callable[[bytes], Any]:
        def deserialize(raw: bytes) -> Any:
            self.received.append(bytes(raw))
            return cls.deserialize(raw)

        return deserialize

    def _rpc(
        self, method: str, impl: Callable[[Any, str], Any], permission: str
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        op = re.sub(r"(?<!^)(?=[A-Z])", "_", method).lower()

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            with self._lock:
                self.calls[op] += 1
                mode = self._mode
            if mode == "slow":
                self._wake.wait(self.slow_s)
            elif mode == "error":
                context.abort(grpc.StatusCode.UNAVAILABLE, "The service is currently unavailable.")
            elif mode == "throttle":
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "Quota exceeded for quota metric 'Cryptographic requests' and limit "
                    "'Cryptographic requests per minute' of service 'cloudkms.googleapis.com'.",
                )
            try:
                self._authorize(dict(context.invocation_metadata()), permission, request)
                with self._lock:
                    return impl(request, mode or "")
            except _Abort as abort:
                context.abort(abort.code, abort.message)

        return handle

    def _authorize(self, metadata: dict[str, Any], permission: str, request: Any) -> None:
        granted = self._authenticate(metadata)
        if permission not in granted:
            resource = getattr(request, "name", "") or getattr(request, "parent", "")
            if isinstance(request, kms_v1.UpdateCryptoKeyVersionRequest):
                resource = request.crypto_key_version.name
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Permission '{permission}' denied on resource '{resource}' (or it may not exist).",
            )

    def _authenticate(self, metadata: dict[str, Any]) -> frozenset[str]:
        value = metadata.get("authorization", "")
        scheme, _, token = str(value).partition(" ")
        if scheme.lower() == "bearer" and token:
            for known, granted in list(self._grants.items()):
                if hmac.compare_digest(token.encode(), known.encode()):
                    return granted
            granted_sa = self._verify_jwt(token)
            if granted_sa is not None:
                return granted_sa
        raise _Abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    def _verify_jwt(self, token: str) -> frozenset[str] | None:
        """The permissions of a service account's valid self-signed JWT, else ``None``."""
        parts = token.split(".")
        if len(parts) != 3:
            return None
        try:
            header = json.loads(_b64u_decode(parts[0]))
            claims = json.loads(_b64u_decode(parts[1]))
            signature = _b64u_decode(parts[2])
        except ValueError:
            return None
        account = self._service_accounts.get(str(header.get("kid")))
        if header.get("alg") != "RS256" or account is None:
            return None
        email, public_key, granted = account
        try:
            public_key.verify(
                signature,
                f"{parts[0]}.{parts[1]}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return None
        now = time.time()
        if claims.get("iss") != email or claims.get("sub") != email:
            return None
        if not float(claims.get("iat", 0)) - 60 <= now < float(claims.get("exp", 0)):
            return None
        audience_ok = str(claims.get("aud", "")).startswith("https://cloudkms.googleapis.com")
        if not audience_ok and _SCOPE not in str(claims.get("scope", "")).split():
            return None
        return granted

    # ------------------------------------------------------------------ resources
    def _find_key(self, name: str) -> _Key:
        key = self._keys.get(name)
        if key is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"CryptoKey {name} not found.")
        return key

    def _version_proto(self, key: _Key, version: _Version) -> kms_v1.CryptoKeyVersion:
        algorithm = (
            kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION
            if key.purpose == Purpose.ENCRYPT_DECRYPT
            else kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm.EC_SIGN_P256_SHA256
        )
        proto = kms_v1.CryptoKeyVersion(
            name=f"{key.name}/cryptoKeyVersions/{version.number}",
            state=version.state,
            protection_level=version.protection_level,
            algorithm=algorithm,
            create_time=_ts(version.created),
            generate_time=_ts(version.created),
        )
        if version.destroy_time is not None:
            proto.destroy_time = _ts(version.destroy_time)
        return proto

    def _key_proto(self, key: _Key) -> kms_v1.CryptoKey:
        proto = kms_v1.CryptoKey(
            name=key.name,
            purpose=key.purpose,
            create_time=_ts(key.created),
            version_template=kms_v1.CryptoKeyVersionTemplate(
                protection_level=key.protection_level,
                algorithm=self._version_proto(
                    key, _Version(0, b"", key.protection_level)
                ).algorithm,
            ),
            destroy_scheduled_duration=datetime.timedelta(seconds=_DEFAULT_DESTROY_S),
        )
        if key.primary is not None:
            proto.primary = self._version_proto(key, key.versions[key.primary])
        return proto

    def _version_of(self, name: str) -> tuple[_Key, _Version]:
        match = _VERSION_NAME.fullmatch(name)
        if match is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is not a valid resource name.")
        key = self._find_key(match[1])
        version = key.versions.get(int(match[2]))
        if version is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"CryptoKeyVersion {name} not found.")
        return key, version

    def _state_refusal(self, key: _Key, version: _Version) -> _Abort:
        if self.terse_errors:
            return _Abort(grpc.StatusCode.FAILED_PRECONDITION, "The request cannot be fulfilled.")
        return _Abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"The request cannot be fulfilled. Resource {key.name}/cryptoKeyVersions/"
            f"{version.number} has value {version.state.name} in field crypto_key_version.state.",
        )

    def _create_key_ring(self, req: kms_v1.CreateKeyRingRequest, _mode: str) -> kms_v1.KeyRing:
        if not _ID.fullmatch(req.key_ring_id):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "Invalid key_ring_id.")
        name = f"{req.parent}/keyRings/{req.key_ring_id}"
        if name in self._rings:
            raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"KeyRing {name} already exists.")
        self._rings.add(name)
        return kms_v1.KeyRing(name=name, create_time=_ts(time.time()))

    def _create_crypto_key(
        self, req: kms_v1.CreateCryptoKeyRequest, _mode: str
    ) -> kms_v1.CryptoKey:
        if req.parent not in self._rings:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"KeyRing {req.parent} not found.")
        if not _ID.fullmatch(req.crypto_key_id):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "Invalid crypto_key_id.")
        if req.crypto_key.purpose == Purpose.CRYPTO_KEY_PURPOSE_UNSPECIFIED:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "crypto_key.purpose is required.")
        name = f"{req.parent}/cryptoKeys/{req.crypto_key_id}"
        if name in self._keys:
            raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"CryptoKey {name} already exists.")
        level: Any = req.crypto_key.version_template.protection_level
        if level == kms_v1.ProtectionLevel.PROTECTION_LEVEL_UNSPECIFIED:
            level = kms_v1.ProtectionLevel.SOFTWARE
        key = _Key(name, req.crypto_key.purpose, level)
        self._keys[name] = key
        if not req.skip_initial_version_creation:
            self._new_version(key, make_primary=True)
        return self._key_proto(key)

    def _get_crypto_key(self, req: kms_v1.GetCryptoKeyRequest, _mode: str) -> kms_v1.CryptoKey:
        return self._key_proto(self._find_key(req.name))

    def _create_crypto_key_version(
        self, req: kms_v1.CreateCryptoKeyVersionRequest, _mode: str
    ) -> kms_v1.CryptoKeyVersion:
        key = self._find_key(req.parent)
        return self._version_proto(key, self._new_version(key, make_primary=False))

    def _update_primary(
        self, req: kms_v1.UpdateCryptoKeyPrimaryVersionRequest, _mode: str
    ) -> kms_v1.CryptoKey:
        key, version = self._version_of(f"{req.name}/cryptoKeyVersions/{req.crypto_key_version_id}")
        if version.state != State.ENABLED:
            raise self._state_refusal(key, version)
        key.primary = version.number
        return self._key_proto(key)

    def _update_crypto_key_version(
        self, req: kms_v1.UpdateCryptoKeyVersionRequest, _mode: str
    ) -> kms_v1.CryptoKeyVersion:
        key, version = self._version_of(req.crypto_key_version.name)
        if list(req.update_mask.paths) != ["state"]:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "Only 'state' may be updated here.")
        new = req.crypto_key_version.state
        if new not in (State.ENABLED, State.DISABLED):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Value {new.name} is not allowed in field crypto_key_version.state.",
            )
        if version.state not in (State.ENABLED, State.DISABLED):
            raise self._state_refusal(key, version)
        version.state = new
        return self._version_proto(key, version)

    def _destroy_crypto_key_version(
        self, req: kms_v1.DestroyCryptoKeyVersionRequest, _mode: str
    ) -> kms_v1.CryptoKeyVersion:
        key, version = self._version_of(req.name)
        if version.state not in (State.ENABLED, State.DISABLED):
            raise self._state_refusal(key, version)
        version.state = State.DESTROY_SCHEDULED
        version.destroy_time = time.time() + _DEFAULT_DESTROY_S
        return self._version_proto(key, version)

    @staticmethod
    def _check_crc(
        mode: str, data: bytes, crc: int | None, crc_field: str, data_field: str
    ) -> bool:
        """True if a checksum came and matched; INVALID_ARGUMENT if it came and did not."""
        if crc is None:
            return False
        if mode == "crc-request" or crc != crc32c(data):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The checksum in field {crc_field} did not match the data in field {data_field}.",
            )
        return mode != "crc-unverified"

    def _encrypt(self, req: kms_v1.EncryptRequest, mode: str) -> kms_v1.EncryptResponse:
        if _VERSION_NAME.fullmatch(req.name):
            key, version = self._version_of(req.name)
        else:
            if not _KEY_NAME.fullmatch(req.name):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{req.name} is not a valid resource type for this request.",
                )
            key = self._find_key(req.name)
            if key.purpose != Purpose.ENCRYPT_DECRYPT:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"The request cannot be fulfilled. Resource {key.name} has value "
                    f"{key.purpose.name} in field crypto_key.purpose.",
                )
            if key.primary is None:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"The request cannot be fulfilled. CryptoKey {key.name} has no primary "
                    "CryptoKeyVersion.",
                )
            version = key.versions[key.primary]
        plaintext = bytes(req.plaintext)
        aad = bytes(req.additional_authenticated_data)
        if not plaintext or len(plaintext) > _MAX_DATA or len(aad) > _MAX_DATA:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "The plaintext must be 1 to 65536 bytes and the additional authenticated data at "
                "most 65536 bytes.",
            )
        verified_plaintext = self._check_crc(
            mode, plaintext, req.plaintext_crc32c, "plaintext_crc32c", "plaintext"
        )
        verified_aad = self._check_crc(
            mode,
            aad,
            req.additional_authenticated_data_crc32c,
            "additional_authenticated_data_crc32c",
            "additional_authenticated_data",
        )
        if version.state != State.ENABLED:
            raise self._state_refusal(key, version)
        nonce = os.urandom(12)
        ciphertext = (
            version.number.to_bytes(4, "big")
            + nonce
            + AESGCM(version.material).encrypt(nonce, plaintext, aad)
        )
        return kms_v1.EncryptResponse(
            name=f"{key.name}/cryptoKeyVersions/{version.number}",
            ciphertext=ciphertext,
            ciphertext_crc32c=crc32c(ciphertext) ^ (1 if mode == "crc-response" else 0),
            verified_plaintext_crc32c=verified_plaintext,
            verified_additional_authenticated_data_crc32c=verified_aad,
            protection_level=version.protection_level,
        )

    def _decrypt(self, req: kms_v1.DecryptRequest, mode: str) -> kms_v1.DecryptResponse:
        if not _KEY_NAME.fullmatch(req.name):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{req.name} is not a valid resource type for this request.",
            )
        key = self._find_key(req.name)
        if key.purpose != Purpose.ENCRYPT_DECRYPT:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"The request cannot be fulfilled. Resource {key.name} has value "
                f"{key.purpose.name} in field crypto_key.purpose.",
            )
        ciphertext = bytes(req.ciphertext)
        aad = bytes(req.additional_authenticated_data)
        if not ciphertext or len(ciphertext) > _MAX_DATA + 1024 or len(aad) > _MAX_DATA:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, _DECRYPTION_FAILED)
        self._check_crc(mode, ciphertext, req.ciphertext_crc32c, "ciphertext_crc32c", "ciphertext")
        self._check_crc(
            mode,
            aad,
            req.additional_authenticated_data_crc32c,
            "additional_authenticated_data_crc32c",
            "additional_authenticated_data",
        )
        version = (
            key.versions.get(int.from_bytes(ciphertext[:4], "big"))
            if len(ciphertext) > 32
            else None
        )
        if version is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, _DECRYPTION_FAILED)
        if version.state != State.ENABLED:
            raise self._state_refusal(key, version)
        try:
            plaintext = AESGCM(version.material).decrypt(ciphertext[4:16], ciphertext[16:], aad)
        except InvalidTag:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, _DECRYPTION_FAILED) from None
        return kms_v1.DecryptResponse(
            plaintext=plaintext,
            plaintext_crc32c=crc32c(plaintext) ^ (1 if mode == "crc-response" else 0),
            used_primary=version.number == key.primary,
            protection_level=version.protection_level,
        )
