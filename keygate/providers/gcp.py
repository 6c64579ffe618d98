"""Google Cloud KMS adapter: the outer wrap with ``Encrypt`` / ``Decrypt`` (google-cloud-kms, gRPC).

Key URIs are Tink's form, naming a CryptoKey (never one of its versions)::

    gcp-kms://projects/my-project/locations/asia-northeast1/keyRings/keygate/cryptoKeys/tenant-a

The location is the region the residency policy checks.  ``Encrypt`` always uses the key's
*primary* version, so a URI that names ``…/cryptoKeyVersions/N`` is refused: a pinned version
could not be rotated, and ``Decrypt`` rejects version names anyway (it finds the version in the
ciphertext).  Ids are checked with Google's rules: project ids 6-30 characters of ``a-z0-9-``
starting with a letter (or a project number, or a legacy ``domain:project`` id), locations
``a-z0-9-``, key ring and key ids 1-63 characters of ``A-Za-z0-9_-``.

The AAD is sent as ``additional_authenticated_data`` (Cloud KMS binds it into the ciphertext and
``Decrypt`` refuses a different one with ``INVALID_ARGUMENT``).

Integrity, as Google recommends (and Tink does): every request carries the CRC32C of its data and
AAD; the adapter requires ``verified_plaintext_crc32c`` and
``verified_additional_authenticated_data_crc32c`` in the ``Encrypt`` answer and checks the
``ciphertext_crc32c`` / ``plaintext_crc32c`` that come back.  A mismatch either way, and KMS's own
``INVALID_ARGUMENT`` "The checksum in field … did not match …", mean the bytes were damaged in
transit: they raise :class:`ProviderUnavailable` (transient, so the guard retries a few times).

Key state: Cloud KMS answers ``FAILED_PRECONDITION`` "… Resource <version> has value DISABLED in
field crypto_key_version.state." when the primary (encrypt) or the ciphertext's version (decrypt)
is not enabled.  The adapter reads the state from that message: ``DISABLED`` (and versions that
are still being generated / imported or failed to be) give :class:`ProviderKeyDisabled`;
``DESTROY_SCHEDULED``, ``DESTROYED`` and the external-destruction states give
:class:`ProviderKeyDestroyed`.  If the message has no state, one ``GetCryptoKey`` explains the
refusal: a purpose other than ``ENCRYPT_DECRYPT`` is :class:`ProviderRejected`; for ``Encrypt``
the primary's state decides; a ``Decrypt`` refusal counts as disabled (the version named inside
the ciphertext is not visible to keygate).

Credentials (``KEYGATE_GCP_*``): ``CREDENTIALS_FILE`` (a service-account key file), else
``ACCESS_TOKEN`` or ``ACCESS_TOKEN_FILE`` (a short-lived OAuth 2 token; the file is read again
before every call, so a sidecar can refresh it), else Application Default Credentials (the
metadata server on GCE/GKE, ``GOOGLE_APPLICATION_CREDENTIALS`` for any credential configuration
such as workload identity federation, gcloud's ADC file).  Service accounts authenticate with
self-signed JWTs (the SDK's default), so they need no token endpoint.

Transport: gRPC over TLS to ``cloudkms.googleapis.com:443`` (``ENDPOINT`` overrides,
``CA_FILE`` replaces the trusted roots).  ``LOCAL_CHANNEL`` selects gRPC *local* channel
credentials instead of TLS, for a loopback endpoint only (tests, a local proxy); the bearer token
is still sent and checked.  Every call has ``retry=None`` (the SDK would otherwise retry
``UNAVAILABLE`` for up to 60 s) and one gRPC deadline of ``connect_timeout_s + read_timeout_s``
(gRPC has a single deadline per call, covering connection and answer); gRPC's transparent
retries are off too, and reconnection backoff is capped at 5 s so a recovered endpoint is used
again quickly.  The SDK's debug logging of request and response payloads is switched off
(its logger is held at INFO): it would log the wrapped bytes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NoReturn, cast

import google.auth
import google.auth.credentials
import google.auth.exceptions
import grpc
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)
from google.oauth2 import service_account
from pydantic import SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from keygate.core.errors import ConfigurationError, InvalidRequest
from keygate.core.model import WrapMechanism
from keygate.providers.base import (
    KeyStatus,
    KeyUri,
    KmsAdapter,
    ProviderAuthFailed,
    ProviderCiphertextRejected,
    ProviderKeyDestroyed,
    ProviderKeyDisabled,
    ProviderKeyNotFound,
    ProviderOptions,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)

__all__ = ["DEFAULT_ENDPOINT", "GcpKmsAdapter", "GcpKmsSettings", "crc32c", "parse_key_uri"]

log = logging.getLogger(__name__)

SCHEME: Final = "gcp-kms"
_NAME: Final = "Google Cloud KMS"
DEFAULT_ENDPOINT: Final = "cloudkms.googleapis.com:443"
_SCOPE: Final = "https://www.googleapis.com/auth/cloud-platform"
_MAX_URI_LEN: Final = 512
_MAX_CIPHERTEXT: Final = 2048
_MAX_TOKEN_FILE: Final = 64 * 1024

# ---------------------------------------------------------------------------------- CRC32C
_CRC32C_POLY: Final = 0x82F63B78  # Castagnoli, reflected


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _CRC32C_POLY if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli, RFC 3720) of ``data``, as Cloud KMS's ``*_crc32c`` fields carry it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------------- URIs
_PROJECT_ID: Final = r"[a-z][a-z0-9-]{4,28}[a-z0-9]"
_DOMAIN: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+"
_PROJECT: Final = re.compile(rf"{_PROJECT_ID}|[1-9][0-9]{{0,19}}|{_DOMAIN}:{_PROJECT_ID}")
_LOCATION: Final = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_RESOURCE_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,63}")
_COLLECTIONS: Final = ("projects", "locations", "keyRings", "cryptoKeys")
_FORM: Final = "gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K"


def _invalid(problem: str) -> InvalidRequest:
    return InvalidRequest(f"invalid gcp-kms key URI: {problem}")


def parse_key_uri(uri: str) -> KeyUri:
    """Validate ``gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K``.

    The message of the :class:`InvalidRequest` names the problem and never repeats the input.
    """
    if not isinstance(uri, str):
        raise _invalid("not a string")
    if len(uri) > _MAX_URI_LEN:
        raise _invalid(f"longer than {_MAX_URI_LEN} characters")
    if not uri.isascii() or not uri.isprintable() or any(c.isspace() for c in uri):
        raise _invalid("only printable ASCII without spaces or control characters is allowed")
    head, sep, path = uri.partition("://")
    if not sep or head.lower() != SCHEME:
        raise _invalid(f"the scheme must be gcp-kms:// (expected {_FORM})")
    if "@" in path:
        raise _invalid("user information (user@ or user:password@) is not allowed")
    if "?" in path or "#" in path:
        raise _invalid("a query or fragment is not allowed")
    if "%" in path or "\\" in path:
        raise _invalid("percent-encoding and backslashes are not allowed")
    segments = path.split("/")
    if any(s in (".", "..") for s in segments):
        raise _invalid("'.' and '..' path segments are not allowed")
    if "" in segments:
        raise _invalid(f"empty path segment (a leading, double or trailing '/'); expected {_FORM}")
    if len(segments) >= 9 and segments[8] == "cryptoKeyVersions":
        raise _invalid(
            "a key version is not allowed: name the CryptoKey (…/cryptoKeys/K); Encrypt uses its "
            "primary version and Decrypt finds the version in the ciphertext"
        )
    if len(segments) != 8 or tuple(segments[0::2]) != _COLLECTIONS:
        raise _invalid(f"expected {_FORM} (collection names are case-sensitive)")
    project, location, ring, key = segments[1::2]
    if not _PROJECT.fullmatch(project):
        raise _invalid(
            "the project must be a project id (6-30 characters of a-z, 0-9 and '-', starting "
            "with a letter, not ending with '-'), a project number or a domain:project id"
        )
    if len(location) > 63 or not _LOCATION.fullmatch(location):
        raise _invalid("the location must be a Cloud KMS location such as asia-northeast1")
    if not _RESOURCE_ID.fullmatch(ring):
        raise _invalid("the key ring id must be 1-63 characters of A-Z, a-z, 0-9, '_' and '-'")
    if not _RESOURCE_ID.fullmatch(key):
        raise _invalid("the key id must be 1-63 characters of A-Z, a-z, 0-9, '_' and '-'")
    name = f"projects/{project}/locations/{location}/keyRings/{ring}/cryptoKeys/{key}"
    return KeyUri(
        scheme=SCHEME,
        uri=f"{SCHEME}://{name}",
        region=location,
        parts={
            "name": name,
            "project": project,
            "location": location,
            "key_ring": ring,
            "crypto_key": key,
        },
    )


# ---------------------------------------------------------------------------------- settings
_HOST_PORT: Final = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class GcpKmsSettings(BaseSettings):
    """Endpoint and credentials (``KEYGATE_GCP_*``); unset means Google's endpoint and ADC."""

    # hide_input_in_errors: a rejected value (an endpoint with user:password@) is never echoed
    model_config = SettingsConfigDict(
        env_prefix="KEYGATE_GCP_", extra="ignore", hide_input_in_errors=True
    )

    #: ``host:port`` of the KMS API (a Private Service Connect name, a test server);
    #: ``None`` = ``cloudkms.googleapis.com:443``
    endpoint: str | None = None
    #: a service-account key file (JSON); other credential types go through ADC
    credentials_file: Path | None = None
    #: a short-lived OAuth 2 access token, or a file holding one (read before every call)
    access_token: SecretStr | None = None
    access_token_file: Path | None = None
    #: PEM file of the CAs that may sign the endpoint's TLS certificate (default: gRPC's roots)
    ca_file: Path | None = None
    #: gRPC local channel credentials instead of TLS: only for a loopback ``endpoint``
    local_channel: bool = False

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _HOST_PORT.fullmatch(value)
        if match is None:
            raise ValueError("endpoint must be host or host:port (no scheme, path or userinfo)")
        port = int(match["port"] or 443)
        if not 0 < port < 65536:
            raise ValueError("endpoint port must be 1-65535")
        return f"{match['host']}:{port}"

    @model_validator(mode="after")
    def _consistent(self) -> GcpKmsSettings:
        given = [
            name
            for name in ("credentials_file", "access_token", "access_token_file")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            names = ", ".join(f"KEYGATE_GCP_{n.upper()}" for n in given)
            raise ValueError(f"set only one credential source, not {names}")
        if self.local_channel:
            host = (self.endpoint or DEFAULT_ENDPOINT).rpartition(":")[0]
            if not _loopback(host):
                raise ValueError("local_channel (no TLS) is allowed only for a loopback endpoint")
            if self.ca_file is not None:
                raise ValueError("ca_file and local_channel exclude each other")
        return self


class _BearerToken(google.auth.credentials.Credentials):
    """An OAuth 2 access token given as such; the adapter replaces it when its file changes."""

    def __init__(self, token: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # google-auth is untyped
        self.token = token

    def refresh(self, request: Any) -> None:  # never called: the token has no expiry
        raise google.auth.exceptions.RefreshError(  # type: ignore[no-untyped-call]
            "a static access token cannot be refreshed"
        )


def _read_token_file(path: Path) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_TOKEN_FILE + 1)
        token = raw.decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(
            f"{_NAME}: cannot read KEYGATE_GCP_ACCESS_TOKEN_FILE {path}"
        ) from exc
    if not token:
        raise ConfigurationError(f"{_NAME}: KEYGATE_GCP_ACCESS_TOKEN_FILE {path} is empty")
    if len(raw) > _MAX_TOKEN_FILE or not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigurationError(
            f"{_NAME}: KEYGATE_GCP_ACCESS_TOKEN_FILE {path} does not hold one access token"
        )
    return token


def _service_account(path: Path) -> google.auth.credentials.Credentials:
    """A service-account key file (other credential types go through ADC)."""
    what = f"{_NAME}: KEYGATE_GCP_CREDENTIALS_FILE {path}"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{what} cannot be read") from exc
    except ValueError as exc:
        raise ConfigurationError(f"{what} is not JSON") from exc
    kind = info.get("type") if isinstance(info, dict) else None
    if kind != "service_account":
        shown = kind if isinstance(kind, str) and kind.isidentifier() and len(kind) <= 40 else "?"
        raise ConfigurationError(
            f"{what} is not a service-account key (type {shown}); point "
            "GOOGLE_APPLICATION_CREDENTIALS at other credential configurations instead"
        )
    try:
        creds = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=[_SCOPE]
        )
    except (ValueError, TypeError, google.auth.exceptions.GoogleAuthError) as exc:
        raise ConfigurationError(f"{what} is not a valid service-account key") from exc
    return cast("google.auth.credentials.Credentials", creds)


# The SDK logs whole request and response payloads (the bytes keygate wraps) at DEBUG, and its
# logger follows the root logger's level: hold it at INFO.
_sdk_logger = logging.getLogger("google.cloud.kms_v1")
if _sdk_logger.level < logging.INFO:
    _sdk_logger.setLevel(logging.INFO)

#: channel arguments that override the SDK's (unbounded message sizes, 120 s reconnect backoff)
_CHANNEL_OPTIONS: Final = {
    "grpc.enable_retries": 0,
    "grpc.max_send_message_length": 1 << 20,
    "grpc.max_receive_message_length": 1 << 20,
    "grpc.initial_reconnect_backoff_ms": 500,
    "grpc.max_reconnect_backoff_ms": 5000,
}


def _create_channel(host: str, **kwargs: Any) -> grpc.Channel:
    options = [o for o in kwargs.pop("options", ()) if o[0] not in _CHANNEL_OPTIONS]
    options.extend(_CHANNEL_OPTIONS.items())
    return KeyManagementServiceGrpcTransport.create_channel(host, options=options, **kwargs)


# ---------------------------------------------------------------------------------- errors
_STATE_IN_MESSAGE: Final = re.compile(
    r"Resource (?P<resource>\S+) has value (?P<state>[A-Z_]+) in field crypto_key_version\.state"
)
_PERMISSION: Final = re.compile(r"Permission '(?P<perm>[A-Za-z0-9._]{1,100})' denied")
_CHECKSUM: Final = re.compile(r"The checksum in field \w+ did not match the data in field \w+")
#: what gRPC says when the endpoint's certificate is untrusted or names another host
_TLS_VERIFY_FAILED: Final = (
    "CERTIFICATE_VERIFY_FAILED",
    "Hostname Verification Check failed",
    "is not in peer certificate",
)
_DESTROYED_STATES: Final = frozenset(
    {
        "DESTROYED",
        "DESTROY_SCHEDULED",
        "PENDING_EXTERNAL_DESTRUCTION",
        "EXTERNAL_DESTRUCTION_FAILED",
    }
)
_TRANSIENT: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


def _state_error(where: str, version: str, state: str) -> Exception:
    """The error for a key version in ``state`` (anything but ENABLED)."""
    if state in _DESTROYED_STATES:
        return ProviderKeyDestroyed(f"{where}: key version {version} is destroyed ({state})")
    return ProviderKeyDisabled(f"{where}: key version {version} is not enabled ({state})")


# ---------------------------------------------------------------------------------- adapter
class GcpKmsAdapter(KmsAdapter):
    """Outer wrap with Cloud KMS ``Encrypt`` / ``Decrypt`` (``ENCRYPT_DECRYPT`` keys)."""

    scheme = SCHEME
    mechanism = WrapMechanism.GCP_KMS
    display_name = _NAME
    extra = "gcp"

    def __init__(self, options: ProviderOptions, settings: GcpKmsSettings | None = None) -> None:
        self._options = options
        self._settings = settings if settings is not None else GcpKmsSettings()
        self._timeout_s = options.connect_timeout_s + options.read_timeout_s
        self._lock = threading.Lock()
        self._client: kms_v1.KeyManagementServiceClient | None = None
        self._token: _BearerToken | None = None

    def __getstate__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} holds credentials and cannot be pickled")

    @classmethod
    def parse_uri(cls, uri: str) -> KeyUri:
        return parse_key_uri(uri)

    # ------------------------------------------------------------------ client
    def _credentials(self) -> google.auth.credentials.Credentials:
        s = self._settings
        if s.credentials_file is not None:
            return _service_account(s.credentials_file)
        if s.access_token is not None:
            return _BearerToken(s.access_token.get_secret_value())
        if s.access_token_file is not None:
            self._token = _BearerToken(_read_token_file(s.access_token_file))
            return self._token
        try:
            creds, _ = google.auth.default(scopes=[_SCOPE])
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise ProviderAuthFailed(
                f"{_NAME}: no credentials: Application Default Credentials were not found; set "
                "KEYGATE_GCP_CREDENTIALS_FILE, KEYGATE_GCP_ACCESS_TOKEN(_FILE) or "
                "GOOGLE_APPLICATION_CREDENTIALS"
            ) from exc
        return creds

    def _channel_credentials(self) -> grpc.ChannelCredentials | None:
        s = self._settings
        if s.local_channel:
            return grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        if s.ca_file is not None:
            try:
                roots = s.ca_file.read_bytes()
            except OSError as exc:
                raise ConfigurationError(
                    f"{_NAME}: cannot read KEYGATE_GCP_CA_FILE {s.ca_file}"
                ) from exc
            return grpc.ssl_channel_credentials(root_certificates=roots)
        return None  # the SDK's default: TLS with gRPC's roots (ALTS on Google's own network)

    def _kms(self) -> kms_v1.KeyManagementServiceClient:
        with self._lock:
            if self._client is None:
                endpoint = self._settings.endpoint or DEFAULT_ENDPOINT
                transport = KeyManagementServiceGrpcTransport(
                    host=endpoint,
                    credentials=self._credentials(),
                    ssl_channel_credentials=self._channel_credentials(),
                    channel=_create_channel,
                    always_use_jwt_access=True,
                )
                self._client = kms_v1.KeyManagementServiceClient(transport=transport)
                log.debug(
                    "Google Cloud KMS client created",
                    extra={"endpoint": endpoint, "local_channel": self._settings.local_channel},
                )
            elif self._token is not None and self._settings.access_token_file is not None:
                self._token.token = _read_token_file(self._settings.access_token_file)
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client, self._token = self._client, None, None
        if client is not None:
            client.transport.close()  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ errors
    @contextlib.contextmanager
    def _map_errors(self, key: KeyUri, op: str) -> Iterator[None]:
        """Turn every SDK / gRPC / google-auth failure into one of base.py's errors."""
        where = f"{_NAME}: {op} with key {key.uri}"
        try:
            yield
        except gexc.GoogleAPICallError as exc:
            raise self._call_error(exc, key, op, where) from exc
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise ProviderAuthFailed(f"{where}: no usable credentials") from exc
        except google.auth.exceptions.TransportError as exc:
            raise ProviderUnavailable(f"{where}: could not reach the token service") from exc
        except google.auth.exceptions.GoogleAuthError as exc:
            raise ProviderAuthFailed(
                f"{where}: credentials refused ({type(exc).__name__})"
            ) from exc
        except grpc.RpcError as exc:  # not seen through the SDK, which wraps them
            raise ProviderUnavailable(f"{where}: gRPC failure ({type(exc).__name__})") from exc

    def _call_error(
        self, exc: gexc.GoogleAPICallError, key: KeyUri, op: str, where: str
    ) -> Exception:
        code = exc.grpc_status_code
        status = code.name if code is not None else str(exc.code)
        message = exc.message or ""
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return ProviderAuthFailed(f"{where}: the credentials were refused ({status})")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            perm = _PERMISSION.search(message)
            what = f"permission {perm['perm']}" if perm else "permission"
            return ProviderAuthFailed(
                f"{where}: {what} denied, or the key does not exist ({status})"
            )
        if code == grpc.StatusCode.NOT_FOUND:
            return ProviderKeyNotFound(
                f"{where}: the key or its key ring does not exist ({status})"
            )
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return self._precondition_error(message, key, op, where)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            if _CHECKSUM.search(message):
                return ProviderUnavailable(
                    f"{where}: the request was corrupted in transit (Cloud KMS checksum mismatch)"
                )
            if op == "decrypt":
                return ProviderCiphertextRejected(
                    f"{where}: the ciphertext was not made by this key, was altered, or the AAD "
                    f"differs ({status})"
                )
            return ProviderRejected(f"{where}: request refused ({status})")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ProviderTimeout(f"{where}: no answer within {self._timeout_s:g} s ({status})")
        if code == grpc.StatusCode.UNAVAILABLE:
            if message.startswith("Getting metadata from plugin failed"):
                return ProviderAuthFailed(f"{where}: the credentials could not produce a token")
            # an untrusted or misnamed certificate (not a handshake that was merely cut short)
            if any(marker in message for marker in _TLS_VERIFY_FAILED):
                return ProviderRejected(f"{where}: TLS verification of the endpoint failed")
            return ProviderUnavailable(f"{where}: endpoint unavailable ({status})")
        if code in _TRANSIENT:
            return ProviderUnavailable(f"{where}: transient failure ({status})")
        return ProviderRejected(f"{where}: request refused ({status})")

    def _precondition_error(self, message: str, key: KeyUri, op: str, where: str) -> Exception:
        """FAILED_PRECONDITION: the state from the message, else from one GetCryptoKey."""
        found = _STATE_IN_MESSAGE.search(message)
        if found is not None and found["state"] != "ENABLED":
            version = found["resource"].rpartition("/")[2]
            return _state_error(where, version, found["state"])
        try:  # same deadline; a failure here leaves the generic answer below
            crypto_key = self._kms().get_crypto_key(
                name=key.parts["name"], retry=None, timeout=self._timeout_s
            )
        except gexc.GoogleAPICallError:
            crypto_key = None
        if crypto_key is not None:
            if crypto_key.purpose != kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT:
                return ProviderRejected(
                    f"{where}: the key's purpose is {crypto_key.purpose.name}, not ENCRYPT_DECRYPT"
                )
            if op == "encrypt":
                if "primary" not in crypto_key:
                    return ProviderKeyDisabled(f"{where}: the key has no primary version")
                state = crypto_key.primary.state.name
                if state != "ENABLED":
                    return _state_error(where, crypto_key.primary.name.rpartition("/")[2], state)
        if op == "decrypt":
            # The ciphertext names its version, which the primary's state does not tell.
            return ProviderKeyDisabled(
                f"{where}: the key version that made this ciphertext is not enabled "
                "(FAILED_PRECONDITION)"
            )
        return ProviderRejected(f"{where}: refused (FAILED_PRECONDITION)")

    # ------------------------------------------------------------------ operations
    def _key(self, key: KeyUri) -> KeyUri:
        """The canonical parse of ``key`` (a KeyUri built elsewhere is checked again)."""
        if key.scheme == SCHEME and key.parts.get("name"):
            return key
        return parse_key_uri(key.uri)

    def wrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        key = self._key(key)
        request = kms_v1.EncryptRequest(
            name=key.parts["name"],
            plaintext=data,
            additional_authenticated_data=aad,
            plaintext_crc32c=crc32c(data),
            additional_authenticated_data_crc32c=crc32c(aad),
        )
        with self._map_errors(key, "encrypt"):
            response = self._kms().encrypt(request=request, retry=None, timeout=self._timeout_s)
        where = f"{_NAME}: encrypt with key {key.uri}"
        if not response.verified_plaintext_crc32c:
            raise ProviderUnavailable(
                f"{where}: Cloud KMS did not verify the plaintext checksum (request corrupted in "
                "transit)"
            )
        if not response.verified_additional_authenticated_data_crc32c:
            raise ProviderUnavailable(
                f"{where}: Cloud KMS did not verify the AAD checksum (request corrupted in transit)"
            )
        ciphertext = bytes(response.ciphertext)
        if response.ciphertext_crc32c != crc32c(ciphertext):
            raise ProviderUnavailable(
                f"{where}: the ciphertext checksum does not match (answer corrupted in transit)"
            )
        if not 0 < len(ciphertext) <= _MAX_CIPHERTEXT:
            raise ProviderRejected(f"{where}: unexpected ciphertext length {len(ciphertext)}")
        return ciphertext

    def unwrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        key = self._key(key)
        request = kms_v1.DecryptRequest(
            name=key.parts["name"],
            ciphertext=data,
            additional_authenticated_data=aad,
            ciphertext_crc32c=crc32c(data),
            additional_authenticated_data_crc32c=crc32c(aad),
        )
        with self._map_errors(key, "decrypt"):
            response = self._kms().decrypt(request=request, retry=None, timeout=self._timeout_s)
        plaintext = bytes(response.plaintext)
        if response.plaintext_crc32c != crc32c(plaintext):
            raise ProviderUnavailable(
                f"{_NAME}: decrypt with key {key.uri}: the plaintext checksum does not match "
                "(answer corrupted in transit)"
            )
        return plaintext

    def describe(self, key: KeyUri) -> KeyStatus:
        key = self._key(key)
        with self._map_errors(key, "describe"):
            crypto_key = self._kms().get_crypto_key(
                name=key.parts["name"], retry=None, timeout=self._timeout_s
            )
        purpose = crypto_key.purpose.name
        if crypto_key.purpose != kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT:
            raise ProviderRejected(
                f"{_NAME}: key {key.uri} has purpose {purpose}; keygate needs ENCRYPT_DECRYPT"
            )
        details = {"purpose": purpose}
        if "primary" not in crypto_key:
            return KeyStatus(
                uri=key.uri, enabled=False, state="NO_PRIMARY", region=key.region, details=details
            )
        primary = crypto_key.primary
        details["primary_version"] = primary.name.rpartition("/")[2]
        details["protection_level"] = primary.protection_level.name
        if "rotation_period" in crypto_key:
            details["rotation_period_s"] = str(int(crypto_key.rotation_period.total_seconds()))
        if "destroy_scheduled_duration" in crypto_key:
            seconds = int(crypto_key.destroy_scheduled_duration.total_seconds())
            details["destroy_scheduled_duration_s"] = str(seconds)
        return KeyStatus(
            uri=key.uri,
            enabled=primary.state == kms_v1.CryptoKeyVersion.CryptoKeyVersionState.ENABLED,
            state=primary.state.name,
            algorithm=primary.algorithm.name,
            region=key.region,
            details=details,
        )
