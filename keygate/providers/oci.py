"""OCI Vault (Key Management) adapter: the outer wrap under a vault master encryption key.

Key URI: ``oci-kms://CRYPTO-ENDPOINT-HOST/KEY-OCID``, e.g.
``oci-kms://abcd1234-crypto.kms.ap-tokyo-1.oraclecloud.com/ocid1.key.oc1.ap-tokyo-1.abcd1234.aaaa…``.
The host is the vault's *crypto* endpoint (``Encrypt`` / ``Decrypt``); its *management* endpoint
(``GetKey``, used by :meth:`OciVaultAdapter.describe` and to tell a disabled key from a bad
ciphertext) is the same host with ``-crypto.`` replaced by ``-management.``.  The key's region is
the region of the key OCID (short codes such as ``nrt`` are normalised to ``ap-tokyo-1``); it must
equal the region in the endpoint host, and the host's domain must be the OCID realm's domain.

Calls go through the official ``oci`` SDK (``KmsCryptoClient`` / ``KmsManagementClient``) with
``NoneRetryStrategy``, ``NoCircuitBreakerStrategy`` and ``timeout=(connect, read)`` from
:class:`~keygate.providers.base.ProviderOptions`.  ``aad`` is bound as ``associatedData =
{"keygate": base64url(aad)}`` (OCI takes a string map); ``encryptionAlgorithm`` is ``AES_256_GCM``.
:meth:`wrap` returns the service's ciphertext text (base64, as OCI returns it) as ASCII bytes, so
:meth:`unwrap` hands back exactly what the service issued.

Error mapping (OCI's answers are ``{"code", "message"}`` with an HTTP status):

- 401 ``NotAuthenticated`` and 403 → :class:`ProviderAuthFailed`;
- 404 ``NotAuthorizedOrNotFound`` → :class:`ProviderKeyNotFound`.  OCI gives the *same* answer
  for "no such key" and "these credentials may not use it", so the message says both;
- a key that is not ``ENABLED``: the crypto endpoint answers a state error (409, or a 400, or, for
  a deleted key, 404).  Rather than trust message texts, the adapter then reads the key's
  ``lifecycleState`` (``GetKey``) and maps ``DISABLED``/``DISABLING`` →
  :class:`ProviderKeyDisabled`; ``PENDING_DELETION``, ``SCHEDULING_DELETION``, ``DELETING`` and
  ``DELETED`` → :class:`ProviderKeyDestroyed`; transitional states → :class:`ProviderUnavailable`;
- 400 ``InvalidParameter`` on decrypt with an ``ENABLED`` key → :class:`ProviderCiphertextRejected`;
- 429, 5xx, refused/reset connections → :class:`ProviderUnavailable`; timeouts →
  :class:`ProviderTimeout`; any other refusal → :class:`ProviderRejected`.

Messages name the operation, the key URI, the HTTP status, OCI's error code and the
``opc-request-id``; never OCI's free-text message, a credential or the data.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, TypeVar
from urllib.parse import urlsplit

import oci
import oci.auth.signers
import oci.circuit_breaker
import oci.config
import oci.exceptions
import oci.key_management
import oci.retry
import oci.signer
import oci.util
from oci import regions_definitions
from oci._vendor.requests import exceptions as requests_exceptions
from oci.key_management.models import DecryptDataDetails, EncryptDataDetails
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from urllib3 import exceptions as urllib3_exceptions

from keygate.core.errors import ConfigurationError, GatewayError, InvalidRequest
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

__all__ = ["OciVaultAdapter", "OciVaultSettings"]

T = TypeVar("T")

SCHEME: Final = "oci-kms"
_PREFIX: Final = f"{SCHEME}://"
_MAX_URI_LEN: Final = 512
#: the longest ciphertext text keygate stores for one wrap (base64 of OCI's blob)
_MAX_CIPHERTEXT: Final = 2048
_ALGORITHM: Final = "AES_256_GCM"
_AAD_FIELD: Final = "keygate"

_HOST_RE: Final = re.compile(
    r"(?P<vault>[a-z0-9]{1,63})-crypto\.kms\.(?P<region>[a-z]+(?:-[a-z]+)+-[0-9]+)\.(?P<domain>[a-z0-9-]+(?:\.[a-z0-9-]+)+)"
)
#: ``ocid1.key.<realm>.<region>[.<future use>].<unique id>`` (OCI's documented OCID syntax)
_KEY_OCID_RE: Final = re.compile(
    r"ocid1\.key\.(?P<realm>oc[0-9]{1,3})\.(?P<region>[a-z0-9]+(?:-[a-z0-9]+)*)"
    r"(?:\.(?P<future>[a-z0-9]{1,63}))?\.(?P<unique>[a-z0-9]{1,255})"
)
_OCID_RE: Final = re.compile(r"ocid1\.[a-z0-9]+\.[a-z0-9.-]+")

_DISABLED_STATES: Final = frozenset({"DISABLED", "DISABLING"})
_DESTROYED_STATES: Final = frozenset(
    {"PENDING_DELETION", "SCHEDULING_DELETION", "DELETING", "DELETED"}
)
_TRANSIENT_STATES: Final = frozenset(
    {"CREATING", "ENABLING", "UPDATING", "BACKUP_IN_PROGRESS", "RESTORING", "CANCELLING_DELETION"}
)
_LOOPBACK_NAMES: Final = frozenset({"localhost"})


# ---------------------------------------------------------------------------------- settings
class OciVaultSettings(BaseSettings):
    """How keygate reaches OCI Vault (``KEYGATE_OCI_*``).

    Credentials, in order: ``auth=instance_principal`` / ``resource_principal``; else an API
    signing key given directly (``user``, ``tenancy``, ``fingerprint`` and ``key_file`` or
    ``private_key``); else the SDK's config file (``config_file``, default ``~/.oci/config``,
    profile ``profile``, default ``DEFAULT``), exactly as the OCI CLI reads it.
    """

    model_config = SettingsConfigDict(env_prefix="KEYGATE_OCI_", extra="ignore")

    auth: Literal["api_key", "instance_principal", "resource_principal"] = "api_key"
    #: the SDK config file; None = the SDK's default (``~/.oci/config``, then ``$OCI_CONFIG_FILE``)
    config_file: Path | None = None
    profile: str = "DEFAULT"
    #: API signing key given directly (takes precedence over the config file when ``user`` is set)
    user: str | None = None
    tenancy: str | None = None
    fingerprint: str | None = None
    key_file: Path | None = None
    #: the PEM private key itself, instead of ``key_file``
    private_key: SecretStr | None = None
    pass_phrase: SecretStr | None = None
    #: a file holding the private key's pass phrase, read at use
    pass_phrase_file: Path | None = None
    #: region written into the SDK config (the endpoint comes from the key URI, so rarely needed)
    region: str | None = None
    #: send every call (crypto and management) here instead, e.g. ``http://127.0.0.1:PORT``
    #: (a local test server); only loopback addresses may use plain http
    endpoint: str | None = None


# ---------------------------------------------------------------------------------- helpers
def _invalid(problem: str) -> InvalidRequest:
    return InvalidRequest(f"OCI Vault key URI: {problem}")


def _canonical_region(segment: str) -> str | None:
    """The region name for an OCID region segment (``nrt`` → ``ap-tokyo-1``), None if unknown."""
    if segment in regions_definitions.REGION_REALMS:
        return segment
    region = regions_definitions.REGIONS_SHORT_NAMES.get(segment)
    return region if isinstance(region, str) else None


def _check_endpoint(endpoint: str | None) -> str | None:
    """Validate the endpoint override: https anywhere, plain http only on loopback."""
    if endpoint is None or not endpoint.strip():
        return None
    try:
        parts = urlsplit(endpoint.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError("KEYGATE_OCI_ENDPOINT is not a valid URL") from exc
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigurationError("KEYGATE_OCI_ENDPOINT must be an http(s)://host[:port] URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigurationError(
            "KEYGATE_OCI_ENDPOINT must not carry user information, a query or a fragment"
        )
    if parts.path not in ("", "/"):
        raise ConfigurationError("KEYGATE_OCI_ENDPOINT must not have a path")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigurationError(
            "KEYGATE_OCI_ENDPOINT may use plain http only on a loopback address; use https"
        )
    netloc = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{netloc}" + (f":{port}" if port is not None else "")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class _Credentials:
    config: dict[str, Any]
    signer: Any


# ---------------------------------------------------------------------------------- adapter
class OciVaultAdapter(KmsAdapter):
    """OCI Vault master encryption keys (AES-256, HSM-protected) through the ``oci`` SDK."""

    scheme: ClassVar[str] = SCHEME
    mechanism: ClassVar[WrapMechanism] = WrapMechanism.OCI_VAULT
    display_name: ClassVar[str] = "OCI Vault"
    extra: ClassVar[str] = "oci"

    def __init__(self, options: ProviderOptions, settings: OciVaultSettings | None = None) -> None:
        self._options = options
        self._settings = settings if settings is not None else OciVaultSettings()
        self._endpoint = _check_endpoint(self._settings.endpoint)
        self._lock = threading.Lock()
        self._credentials: _Credentials | None = None
        self._crypto: dict[str, oci.key_management.KmsCryptoClient] = {}
        self._management: dict[str, oci.key_management.KmsManagementClient] = {}

    # ------------------------------------------------------------------------------ URIs
    @classmethod
    def parse_uri(cls, uri: str) -> KeyUri:
        if not isinstance(uri, str):
            raise _invalid("must be a string")
        if len(uri) > _MAX_URI_LEN:
            raise _invalid(f"longer than {_MAX_URI_LEN} characters")
        if not uri.isascii():
            raise _invalid("must be ASCII")
        if any(ch.isspace() or not ch.isprintable() for ch in uri):
            raise _invalid("contains whitespace or control characters")
        if uri[: len(_PREFIX)].lower() != _PREFIX:
            raise _invalid(f"must start with {_PREFIX}")
        rest = uri[len(_PREFIX) :]
        for char, what in (
            ("@", "user information ('@')"),
            ("?", "a query ('?')"),
            ("#", "a fragment ('#')"),
            ("%", "percent-encoding ('%')"),
            ("\\", "a backslash"),
            (":", "a port or other ':' text"),
        ):
            if char in rest:
                raise _invalid(f"must not contain {what}")
        host, sep, ocid = rest.partition("/")
        if not sep or not host or not ocid:
            raise _invalid("expected oci-kms://CRYPTO-ENDPOINT-HOST/KEY-OCID")
        if "/" in ocid:
            raise _invalid("expected exactly one path segment: the key OCID")
        host = host.lower()
        m_host = _HOST_RE.fullmatch(host)
        if m_host is None:
            raise _invalid(
                "the host must be a vault crypto endpoint, VAULT-crypto.kms.REGION.DOMAIN"
                " (e.g. abcd1234-crypto.kms.ap-tokyo-1.oraclecloud.com)"
            )
        m_key = _KEY_OCID_RE.fullmatch(ocid)
        if m_key is None:
            if _OCID_RE.fullmatch(ocid) and not ocid.startswith("ocid1.key."):
                raise _invalid("the OCID is not a key OCID (ocid1.key.…)")
            raise _invalid(
                "the path must be a key OCID, ocid1.key.REALM.REGION[.VAULT].UNIQUE-ID (lower case)"
            )
        realm = m_key["realm"]
        region = _canonical_region(m_key["region"])
        if region is None:
            raise _invalid(f"unknown OCI region {m_key['region']!r} in the key OCID")
        host_region = m_host["region"]
        if host_region != region:
            raise _invalid(
                f"the key OCID's region ({region}) differs from the endpoint's ({host_region})"
            )
        region_realm = regions_definitions.REGION_REALMS.get(region)
        if region_realm != realm:
            raise _invalid(f"region {region} is not in realm {realm}")
        domain = regions_definitions.REALMS.get(realm)
        if domain is None or m_host["domain"] != domain:
            raise _invalid(f"keys of realm {realm} are served under {domain}, not another domain")
        canonical = f"{_PREFIX}{host}/{ocid}"
        management_host = host.replace("-crypto.", "-management.", 1)
        return KeyUri(
            scheme=SCHEME,
            uri=canonical,
            region=region,
            parts={
                "key_id": ocid,
                "realm": realm,
                "vault": m_host["vault"],
                "crypto_endpoint": f"https://{host}",
                "management_endpoint": f"https://{management_host}",
            },
        )

    # ------------------------------------------------------------------------------ operations
    def wrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        parsed = self._parsed(key)
        details = EncryptDataDetails(
            key_id=parsed.parts["key_id"],
            plaintext=base64.b64encode(data).decode("ascii"),
            associated_data=self._associated_data(aad),
            encryption_algorithm=_ALGORITHM,
        )
        client = self._crypto_client(parsed)
        response = self._call(parsed, "encrypt", lambda: client.encrypt(details))
        ciphertext = getattr(response.data, "ciphertext", None)
        if (
            not isinstance(ciphertext, str)
            or not ciphertext
            or not ciphertext.isascii()
            or len(ciphertext) > _MAX_CIPHERTEXT
        ):
            raise ProviderRejected(
                f"OCI Vault: encrypt with key {parsed.uri} returned no usable ciphertext"
            )
        return ciphertext.encode("ascii")

    def unwrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        parsed = self._parsed(key)
        try:
            text = data.decode("ascii")
            base64.b64decode(text, validate=True)
        except (UnicodeDecodeError, binascii.Error, ValueError) as exc:
            raise ProviderCiphertextRejected(
                f"OCI Vault: the ciphertext for key {parsed.uri} is not an OCI Vault ciphertext"
            ) from exc
        if not text or len(text) > _MAX_CIPHERTEXT:
            raise ProviderCiphertextRejected(
                f"OCI Vault: the ciphertext for key {parsed.uri} is empty or too long"
            )
        details = DecryptDataDetails(
            key_id=parsed.parts["key_id"],
            ciphertext=text,
            associated_data=self._associated_data(aad),
            encryption_algorithm=_ALGORITHM,
        )
        client = self._crypto_client(parsed)
        response = self._call(parsed, "decrypt", lambda: client.decrypt(details))
        plaintext = getattr(response.data, "plaintext", None)
        unusable = ProviderRejected(
            f"OCI Vault: decrypt with key {parsed.uri} returned no usable plaintext"
        )
        if not isinstance(plaintext, str):
            raise unusable
        try:
            return base64.b64decode(plaintext, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise unusable from exc

    def describe(self, key: KeyUri) -> KeyStatus:
        parsed = self._parsed(key)
        client = self._management_client(parsed)
        response = self._call(parsed, "get_key", lambda: client.get_key(parsed.parts["key_id"]))
        data = response.data
        state = str(getattr(data, "lifecycle_state", "") or "")
        shape = getattr(data, "key_shape", None)
        algorithm = str(getattr(shape, "algorithm", "") or "")
        length = getattr(shape, "length", None)
        if algorithm and isinstance(length, int):
            algorithm = f"{algorithm}_{length * 8}"
        details = {
            name: str(value)
            for name, value in (
                ("protection_mode", getattr(data, "protection_mode", None)),
                ("current_key_version", getattr(data, "current_key_version", None)),
                ("vault_id", getattr(data, "vault_id", None)),
                ("time_of_deletion", getattr(data, "time_of_deletion", None)),
            )
            if value is not None
        }
        return KeyStatus(
            uri=parsed.uri,
            enabled=state == "ENABLED",
            state=state,
            algorithm=algorithm,
            region=parsed.region,
            details=details,
        )

    def close(self) -> None:
        with self._lock:
            clients: list[Any] = [*self._crypto.values(), *self._management.values()]
            self._crypto.clear()
            self._management.clear()
        for client in clients:
            session = getattr(getattr(client, "base_client", None), "session", None)
            if session is not None:
                session.close()

    # ------------------------------------------------------------------------------ internals
    def _parsed(self, key: KeyUri) -> KeyUri:
        if key.scheme != SCHEME:
            raise InvalidRequest(f"OCI Vault cannot use a {key.scheme} key")
        return self.parse_uri(key.uri)

    @staticmethod
    def _associated_data(aad: bytes) -> dict[str, str] | None:
        return {_AAD_FIELD: _b64url(aad)} if aad else None

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "retry_strategy": oci.retry.NoneRetryStrategy(),
            "circuit_breaker_strategy": oci.circuit_breaker.NoCircuitBreakerStrategy(),
            "timeout": (self._options.connect_timeout_s, self._options.read_timeout_s),
        }

    def _crypto_client(self, key: KeyUri) -> oci.key_management.KmsCryptoClient:
        endpoint = self._endpoint or key.parts["crypto_endpoint"]
        with self._lock:
            client = self._crypto.get(endpoint)
            if client is None:
                creds = self._load_credentials(key.region)
                client = oci.key_management.KmsCryptoClient(
                    dict(creds.config), endpoint, signer=creds.signer, **self._client_kwargs()
                )
                self._crypto[endpoint] = client
            return client

    def _management_client(self, key: KeyUri) -> oci.key_management.KmsManagementClient:
        endpoint = self._endpoint or key.parts["management_endpoint"]
        with self._lock:
            client = self._management.get(endpoint)
            if client is None:
                creds = self._load_credentials(key.region)
                client = oci.key_management.KmsManagementClient(
                    dict(creds.config), endpoint, signer=creds.signer, **self._client_kwargs()
                )
                self._management[endpoint] = client
            return client

    def _load_credentials(self, region: str) -> _Credentials:
        """Build the SDK config and signer once (called under the lock)."""
        if self._credentials is None:
            self._credentials = self._build_credentials(region)
        return self._credentials

    def _build_credentials(self, region: str) -> _Credentials:
        s = self._settings
        if s.auth == "resource_principal":
            try:
                signer = oci.auth.signers.get_resource_principals_signer()
            except (oci.exceptions.ClientError, OSError, ValueError, KeyError) as exc:
                raise ConfigurationError(
                    "OCI Vault: no resource principal in this environment"
                    f" (OCI_RESOURCE_PRINCIPAL_* variables; {type(exc).__name__})"
                ) from None
            return _Credentials({"region": s.region or region}, signer)
        if s.auth == "instance_principal":
            try:
                # fetches a certificate and a token from the instance metadata service
                signer = oci.auth.signers.InstancePrincipalsSecurityTokenSigner()
            except Exception as exc:  # noqa: BLE001 - IMDS failures come in many SDK types
                raise ProviderUnavailable(
                    "OCI Vault: could not obtain an instance-principal token from the instance"
                    f" metadata service ({type(exc).__name__})"
                ) from None
            return _Credentials({"region": s.region or region}, signer)
        direct = (s.user, s.tenancy, s.fingerprint, s.key_file, s.private_key)
        if any(value is not None for value in direct):
            missing = [
                name
                for name, value in (
                    ("KEYGATE_OCI_USER", s.user),
                    ("KEYGATE_OCI_TENANCY", s.tenancy),
                    ("KEYGATE_OCI_FINGERPRINT", s.fingerprint),
                    (
                        "KEYGATE_OCI_KEY_FILE or KEYGATE_OCI_PRIVATE_KEY",
                        s.key_file or s.private_key,
                    ),
                )
                if not value
            ]
            if missing:
                raise ConfigurationError(f"OCI Vault: missing {', '.join(missing)}")
            config: dict[str, Any] = {
                "user": s.user,
                "tenancy": s.tenancy,
                "fingerprint": s.fingerprint,
                "region": s.region or region,
            }
            if s.private_key is not None:
                config["key_content"] = s.private_key.get_secret_value()
            else:
                config["key_file"] = str(s.key_file)
        else:
            location = str(s.config_file) if s.config_file else oci.config.DEFAULT_LOCATION
            try:
                config = oci.config.from_file(location, s.profile)
            except oci.exceptions.ConfigFileNotFound as exc:
                raise ConfigurationError(f"OCI Vault: no OCI config file at {location}") from exc
            except oci.exceptions.ProfileNotFound as exc:
                raise ConfigurationError(
                    f"OCI Vault: no profile {s.profile!r} in the OCI config file {location}"
                ) from exc
            except (oci.exceptions.ClientError, ValueError) as exc:
                raise ConfigurationError(
                    f"OCI Vault: the OCI config file {location} (profile {s.profile!r}) is invalid"
                ) from exc
            if s.region or not config.get("region"):
                config["region"] = s.region or region
        pass_phrase = self._pass_phrase()
        if pass_phrase is not None:
            config["pass_phrase"] = pass_phrase
        try:
            oci.config.validate_config(config)
        except (oci.exceptions.InvalidConfig, ValueError) as exc:
            problems = ", ".join(sorted(getattr(exc, "errors", {}) or {})) or "invalid values"
            raise ConfigurationError(f"OCI Vault: invalid API key settings ({problems})") from None
        if oci.util.AUTHENTICATION_TYPE_FIELD_NAME in config:
            # e.g. a config-file profile for instance principals or a session token
            try:
                return _Credentials(config, oci.util.get_signer_from_authentication_type(config))
            except (oci.exceptions.ClientError, OSError, ValueError) as exc:
                raise ConfigurationError(
                    "OCI Vault: cannot use the config profile's authentication type"
                    f" ({type(exc).__name__})"
                ) from None
        try:
            signer = oci.signer.Signer(
                tenancy=config["tenancy"],
                user=config["user"],
                fingerprint=config["fingerprint"],
                private_key_file_location=config.get("key_file"),
                pass_phrase=config.get("pass_phrase"),
                private_key_content=config.get("key_content"),
            )
        except (oci.exceptions.ClientError, OSError, ValueError, TypeError):
            # the SDK's text may quote the file or the key: say only where to look
            raise ConfigurationError(
                "OCI Vault: the API signing key could not be loaded (missing file, not an RSA"
                " private key, or a wrong pass phrase)"
            ) from None
        return _Credentials(config, signer)

    def _pass_phrase(self) -> str | None:
        s = self._settings
        if s.pass_phrase is not None:
            return s.pass_phrase.get_secret_value()
        if s.pass_phrase_file is not None:
            try:
                return s.pass_phrase_file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError:
                raise ConfigurationError(
                    f"OCI Vault: cannot read KEYGATE_OCI_PASS_PHRASE_FILE {s.pass_phrase_file}"
                ) from None
        return None

    # ------------------------------------------------------------------------------ errors
    def _call(self, key: KeyUri, op: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except oci.exceptions.ServiceError as exc:
            raise self._service_error(key, op, exc) from exc
        except (oci.exceptions.ConnectTimeout, requests_exceptions.Timeout) as exc:
            raise ProviderTimeout(f"OCI Vault: {op} with key {key.uri} timed out") from exc
        except (oci.exceptions.RequestException, requests_exceptions.RequestException) as exc:
            if _is_timeout(exc):
                raise ProviderTimeout(f"OCI Vault: {op} with key {key.uri} timed out") from exc
            raise ProviderUnavailable(
                f"OCI Vault: {op} with key {key.uri} failed: endpoint unreachable"
                f" ({type(_inner(exc)).__name__})"
            ) from exc
        except oci.exceptions.ClientError as exc:
            raise ConfigurationError(
                f"OCI Vault: {op} with key {key.uri}: client configuration error"
                f" ({type(exc).__name__})"
            ) from exc

    def _service_error(
        self, key: KeyUri, op: str, exc: oci.exceptions.ServiceError
    ) -> GatewayError:
        status = int(exc.status) if isinstance(exc.status, int) else 0
        code = str(exc.code or "")
        request_id = exc.request_id if isinstance(exc.request_id, str) else None
        info = f"HTTP {status} {code}".strip() + (
            f", opc-request-id {request_id}" if request_id else ""
        )
        where = f"{op} with key {key.uri}"
        if status in (401, 403):
            return ProviderAuthFailed(f"OCI Vault: credentials rejected for {where} ({info})")
        if status == 429 or status >= 500:
            return ProviderUnavailable(f"OCI Vault: {where} failed ({info})")
        crypto = op in ("encrypt", "decrypt")
        if crypto and status in (400, 404, 409):
            state = self._lifecycle_state(key)
            if state in _DISABLED_STATES:
                return ProviderKeyDisabled(f"OCI Vault: key {key.uri} is disabled ({state})")
            if state in _DESTROYED_STATES:
                return ProviderKeyDestroyed(
                    f"OCI Vault: key {key.uri} is deleted or pending deletion ({state})"
                )
            if state in _TRANSIENT_STATES:
                return ProviderUnavailable(
                    f"OCI Vault: key {key.uri} is changing state ({state}); {op} refused ({info})"
                )
            if status == 409:
                return ProviderKeyDisabled(
                    f"OCI Vault: key {key.uri} is not usable in its current state ({info})"
                )
        if status == 404:
            return ProviderKeyNotFound(
                f"OCI Vault: key {key.uri} does not exist, or these credentials may not use it"
                f" (OCI answers NotAuthorizedOrNotFound for both) ({info})"
            )
        if op == "decrypt" and status == 400 and code == "InvalidParameter":
            return ProviderCiphertextRejected(
                f"OCI Vault: key {key.uri} rejected the ciphertext (not made by this key,"
                f" tampered, or different associated data) ({info})"
            )
        return ProviderRejected(f"OCI Vault: {where} refused ({info})")

    def _lifecycle_state(self, key: KeyUri) -> str | None:
        """The key's lifecycleState from the management endpoint, or None when it cannot be read."""
        try:
            client = self._management_client(key)
            response = client.get_key(key.parts["key_id"])
        except Exception:  # noqa: BLE001 - best effort: the caller falls back to the status code
            return None
        state = getattr(response.data, "lifecycle_state", None)
        return state if isinstance(state, str) else None


def _inner(exc: BaseException) -> BaseException:
    """The requests exception the SDK wrapped (``RequestException(e)``), or ``exc`` itself."""
    if exc.args and isinstance(exc.args[0], BaseException):
        return exc.args[0]
    return exc


def _is_timeout(exc: BaseException) -> bool:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(
            current,
            requests_exceptions.Timeout | urllib3_exceptions.TimeoutError | TimeoutError,
        ):
            return True
        todo.extend(arg for arg in current.args if isinstance(arg, BaseException))
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)
    return False
