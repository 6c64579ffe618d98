"""Azure Key Vault and Managed HSM adapter: the outer wrap with ``wrapkey`` / ``unwrapkey``.

Key URIs name the vault (or Managed HSM) host, the key and, optionally, the key version, and must
**declare the region** the vault lives in::

    azure-kv://VAULT.vault.azure.net/keys/NAME?region=japaneast
    azure-kv://VAULT.vault.azure.net/keys/NAME/0123456789abcdef0123456789abcdef?region=japaneast
    azure-kv://HSM.managedhsm.azure.net/keys/NAME?region=japanwest

A vault's host name says nothing about its location and Key Vault has no data-plane call that
returns it, so the custodian states it with ``?region=`` (required; the residency policy checks
it).  Every Key Vault and Managed HSM response does carry the serving region in the
``x-ms-keyvault-region`` header, though: when it is present and differs from the declared region,
the adapter refuses the key (:class:`ProviderRejected`) instead of trusting the declaration.  Only
the public cloud's ``vault.azure.net`` and ``managedhsm.azure.net`` are accepted (no sovereign
clouds, no custom domains).

Algorithms, chosen from the key's type (read with ``GET /keys/{name}/{version}`` before each
wrap, which also refuses a disabled, expired or not-yet-valid key):

- ``RSA`` / ``RSA-HSM`` (Key Vault Standard/Premium, Managed HSM): ``RSA-OAEP-256``;
- ``oct-HSM`` (Managed HSM, AES-256 only): ``A256KW`` (RFC 3394) over the input framed as a
  2-byte length, the bytes, zero padding to a multiple of 8 (A256KW takes only multiples of 8
  bytes, the HSM-wrapped DEK is usually 60); the frame is inside the wrap, so it is authenticated.

**Every wrap and unwrap runs in the service.**  The SDK's ``CryptographyClient`` would wrap with
RSA keys locally with the downloaded public key (the vault would never see the wrap and would not
refuse a disabled key), and with ``oct-HSM`` keys it silently wraps *and unwraps* locally with a
random key (azure-keyvault-keys 4.11.3: the key bundle has no ``k``, ``SymmetricKey`` fills it
with ``os.urandom(32)``), which no other client can ever unwrap.  So the adapter calls the REST
operations ``POST /keys/{name}/{version}/wrapkey`` and ``…/unwrapkey`` through
:meth:`KeyClient.send_request`: the SDK's own pipeline (challenge authentication, TLS, logging
with redaction, user agent), with no local cryptography at all.

The ciphertext returned by :meth:`AzureKeyVaultAdapter.wrap` is a small frame: format byte
``0x01``, algorithm byte (``1`` RSA-OAEP-256, ``2`` A256KW-framed), the length and the ASCII text
of the key version that wrapped, then Key Vault's result.  So a URI without a version keeps
working after the key is rotated (unwrap uses the version recorded at wrap time), and a frame from
another key or key version is refused as a foreign ciphertext.

``aad`` is **ignored**: Key Vault's wrap operations take no associated data.  The inner (HSM)
wrap binds it.

Errors: 401, 403 without a key-state reason and Entra ID refusals → :class:`ProviderAuthFailed`;
403 ``KeyDisabled`` / ``KeyExpired`` / ``KeyNotYetValid`` → :class:`ProviderKeyDisabled`; 404 →
``GET /deletedkeys/{name}``: a soft-deleted key → :class:`ProviderKeyDestroyed`, else (never
existed, purged, or the deleted-key read is not permitted) :class:`ProviderKeyNotFound`; 400
``BadParameter`` on unwrap → :class:`ProviderCiphertextRejected`; 429, 5xx, connection failures →
:class:`ProviderUnavailable`; connect/read timeouts → :class:`ProviderTimeout`.

Credentials: ``ClientSecretCredential`` when ``KEYGATE_AZURE_CLIENT_ID`` and a client secret
(``…_CLIENT_SECRET`` or ``…_CLIENT_SECRET_FILE``) are set (``…_TENANT_ID`` required), else
``DefaultAzureCredential`` (environment, workload identity, managed identity — user-assigned when
``…_CLIENT_ID`` is set —, Azure CLI, …).  SDK retries are off (``retry_total=0``) in both the
Key Vault and the token pipelines: :mod:`keygate.providers.guard` retries.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

from azure.core.credentials import AccessToken, TokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline import PipelineResponse
from azure.core.rest import HttpRequest, HttpResponse
from azure.identity import ClientSecretCredential, DefaultAzureCredential
from azure.keyvault.keys import KeyClient
from pydantic import SecretStr, field_validator
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

__all__ = ["AzureKeyVaultAdapter", "AzureKeyVaultSettings"]

SCHEME: Final = "azure-kv"
_NAME: Final = "Azure Key Vault"
_MAX_URI_LEN: Final = 512
_MAX_DATA: Final = 256
_MAX_CIPHERTEXT: Final = 2048
_VAULT_SUFFIXES: Final = {"vault.azure.net": "vault", "managedhsm.azure.net": "managedhsm"}
#: Key Vault and Managed HSM names: 3-24 characters, letters, digits and single hyphens,
#: starting with a letter and ending with a letter or digit
_VAULT_NAME: Final = re.compile(r"[a-z][a-z0-9-]{1,22}[a-z0-9]")
_KEY_NAME: Final = re.compile(r"[0-9A-Za-z-]{1,127}")
_KEY_VERSION: Final = re.compile(r"[0-9a-f]{32}")
_REGION: Final = re.compile(r"[a-z][a-z0-9]{2,39}")
#: authority hosts azure-identity knows; any other one needs instance discovery switched off
_KNOWN_AUTHORITIES: Final = frozenset({"login.microsoftonline.com"})

_FORMAT: Final = 0x01
_ALG_RSA_OAEP_256: Final = 0x01
_ALG_A256KW_FRAMED: Final = 0x02
_ALGORITHMS: Final = {_ALG_RSA_OAEP_256: "RSA-OAEP-256", _ALG_A256KW_FRAMED: "A256KW"}
_VALIDITY_INNER: Final = frozenset({"KeyExpired", "KeyNotYetValid"})


# ---------------------------------------------------------------------------------- settings
class AzureKeyVaultSettings(BaseSettings):
    """Credentials and endpoint overrides (``KEYGATE_AZURE_*``); unset means Azure's defaults."""

    model_config = SettingsConfigDict(env_prefix="KEYGATE_AZURE_", extra="ignore")

    #: Microsoft Entra tenant (directory) id of the service principal
    tenant_id: str | None = None
    #: application (client) id; with a secret: a service principal, without: the client id of a
    #: user-assigned managed identity / workload identity for DefaultAzureCredential
    client_id: str | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    #: Microsoft Entra authority host (default: azure-identity's, login.microsoftonline.com)
    authority_host: str | None = None
    #: send every vault host to this https URL instead (a private endpoint proxy, a test server);
    #: the challenge-resource check is off then, since the host no longer names the vault
    endpoint: str | None = None
    #: CA bundle to verify Key Vault and Entra ID with (default: the system's / certifi's)
    ca_bundle: Path | None = None

    @field_validator("endpoint", "authority_host")
    @classmethod
    def _https_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("must be an https:// URL (Key Vault tokens are never sent in clear)")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("must not carry credentials, a query or a fragment")
        return value.rstrip("/")


def _read_secret(value: SecretStr | None, path: Path | None) -> str | None:
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(
                f"{_NAME}: cannot read KEYGATE_AZURE_CLIENT_SECRET_FILE {path}"
            ) from exc
        if not text:
            raise ConfigurationError(f"{_NAME}: KEYGATE_AZURE_CLIENT_SECRET_FILE {path} is empty")
        return text
    return value.get_secret_value() if value is not None else None


# ---------------------------------------------------------------------------------- URIs
def _invalid(problem: str) -> InvalidRequest:
    return InvalidRequest(f"invalid azure-kv key URI: {problem}")


def parse_key_uri(uri: str) -> KeyUri:
    """Validate an ``azure-kv://`` URI; :class:`InvalidRequest` names the problem.

    The raw text is never echoed (it could hold a pasted credential); messages name the part.
    """
    if not isinstance(uri, str):
        raise _invalid("not a string")
    if len(uri) > _MAX_URI_LEN:
        raise _invalid(f"longer than {_MAX_URI_LEN} characters")
    if not uri.isascii() or not uri.isprintable() or any(c.isspace() for c in uri):
        raise _invalid("only printable ASCII without spaces is allowed")
    head, sep, rest = uri.partition("://")
    if not sep or head.lower() != SCHEME:
        raise _invalid("the scheme must be azure-kv://")
    if "#" in rest:
        raise _invalid("a fragment (#…) is not allowed")
    if "%" in rest:
        raise _invalid("percent-encoding is not allowed")
    if "\\" in rest:
        raise _invalid("backslashes are not allowed")
    body, qmark, query = rest.partition("?")
    host, slash, path = body.partition("/")
    if "@" in host:
        raise _invalid("user information (…@) is not allowed in the host")
    if ":" in host:
        raise _invalid("a port is not allowed; vault hosts are plain DNS names")
    host = host.lower()
    label, dot, suffix = host.partition(".")
    kind = _VAULT_SUFFIXES.get(suffix)
    if not dot or kind is None:
        raise _invalid(
            "the host must be VAULT.vault.azure.net or HSM.managedhsm.azure.net "
            "(sovereign clouds and custom domains are not supported)"
        )
    if not _VAULT_NAME.fullmatch(label) or "--" in label:
        raise _invalid(
            "the vault name must be 3-24 letters, digits and single hyphens, starting with a "
            "letter and ending with a letter or digit"
        )
    if not slash:
        raise _invalid("expected a path /keys/NAME or /keys/NAME/VERSION")
    segments = path.split("/")
    if ".." in segments or "." in segments:
        raise _invalid("dot segments (. and ..) are not allowed in the path")
    if segments[0] != "keys" or len(segments) not in (2, 3) or "" in segments:
        raise _invalid("expected a path /keys/NAME or /keys/NAME/VERSION (no trailing slash)")
    name = segments[1]
    if not _KEY_NAME.fullmatch(name):
        raise _invalid("the key name must be 1-127 letters, digits and hyphens")
    version = segments[2].lower() if len(segments) == 3 else ""
    if version and not _KEY_VERSION.fullmatch(version):
        raise _invalid("the key version must be 32 hexadecimal digits")
    if not qmark or not query:
        raise _invalid(
            "the vault's region must be declared with ?region=REGION (e.g. ?region=japaneast): "
            "Key Vault URIs do not say where a vault lives"
        )
    params = query.split("&")
    names = [p.partition("=")[0].lower() for p in params]
    if names.count("region") > 1:
        raise _invalid("region is given more than once")
    unknown = sorted(set(names) - {"region"})
    if unknown or len(params) != 1:
        raise _invalid("the only query parameter allowed is region")
    region = params[0].partition("=")[2].lower()
    if not _REGION.fullmatch(region):
        raise _invalid(
            "the region must be an Azure region name such as japaneast or japanwest "
            "(lower-case letters and digits, no spaces)"
        )
    canonical = f"{SCHEME}://{host}/keys/{name}"
    if version:
        canonical += f"/{version}"
    canonical += f"?region={region}"
    return KeyUri(
        scheme=SCHEME,
        uri=canonical,
        region=region,
        parts={
            "host": host,
            "kind": kind,
            "vault_url": f"https://{host}",
            "name": name,
            "version": version,
        },
    )


# ---------------------------------------------------------------------------------- helpers
def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64u(text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError("not a string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _pad_for_kw(data: bytes) -> bytes:
    framed = len(data).to_bytes(2, "big") + data
    framed += b"\x00" * (-len(framed) % 8)
    return framed.ljust(16, b"\x00")


def _unpad_for_kw(framed: bytes) -> bytes | None:
    if len(framed) < 16 or len(framed) % 8:
        return None
    length = int.from_bytes(framed[:2], "big")
    if len(framed) != max(16, (2 + length + 7) // 8 * 8):
        return None
    if any(framed[2 + length :]):
        return None
    return framed[2 : 2 + length]


def _frame(alg: int, version: str, result: bytes) -> bytes:
    ver = version.encode("ascii")
    return bytes((_FORMAT, alg, len(ver))) + ver + result


def _unframe(blob: bytes) -> tuple[int, str, bytes] | None:
    if len(blob) < 4 or blob[0] != _FORMAT or blob[1] not in _ALGORITHMS:
        return None
    n = blob[2]
    version = blob[3 : 3 + n]
    result = blob[3 + n :]
    try:
        text = version.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not _KEY_VERSION.fullmatch(text) or not result:
        return None
    return blob[1], text, result


def _kid_version(kid: object) -> str:
    """The version of a key id ``https://HOST/keys/NAME/VERSION``; '' if it has none."""
    if not isinstance(kid, str):
        return ""
    parts = urlsplit(kid).path.split("/")
    if len(parts) == 4 and parts[1] == "keys" and _KEY_VERSION.fullmatch(parts[3].lower()):
        return parts[3].lower()
    return ""


def _error_fields(response: HttpResponse) -> tuple[str, str, str]:
    """(code, inner code, message) of a Key Vault error body; '' where absent."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError, TypeError):
        return "", "", ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", "", ""
    inner = error.get("innererror") or error.get("innerError")
    inner_code = inner.get("code", "") if isinstance(inner, dict) else ""
    code, message = error.get("code", ""), error.get("message", "")
    return (
        code if isinstance(code, str) else "",
        inner_code if isinstance(inner_code, str) else "",
        message if isinstance(message, str) else "",
    )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After", "")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _section(bundle: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = bundle.get(name)
    return value if isinstance(value, dict) else {}


def _causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


_AADSTS: Final = re.compile(r"AADSTS\d{4,8}")


class _SerializedCredential:
    """One token request at a time: the first caller fetches, the others get the cached token.

    Each Key Vault client's challenge policy asks its credential for a token when it has none, and
    nothing in azure-core or MSAL stops a burst of threads from all asking Entra ID at once.
    """

    def __init__(self, inner: TokenCredential, wait_s: float) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        #: how long a caller waits for another's request before asking on its own (an Entra ID
        #: outage must not queue every caller behind the others' timeouts)
        self._wait_s = wait_s

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        locked = self._lock.acquire(timeout=self._wait_s)
        try:
            return self._inner.get_token(
                *scopes, claims=claims, tenant_id=tenant_id, enable_cae=enable_cae, **kwargs
            )
        finally:
            if locked:
                self._lock.release()

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if callable(close):
            close()


# ---------------------------------------------------------------------------------- adapter
class AzureKeyVaultAdapter(KmsAdapter):
    """Outer wrap under an Azure Key Vault or Managed HSM key (one instance, many keys)."""

    scheme = SCHEME
    mechanism = WrapMechanism.AZURE_KEY_VAULT
    display_name = _NAME
    extra = "azure"

    def __init__(
        self,
        options: ProviderOptions,
        settings: AzureKeyVaultSettings | None = None,
        *,
        credential: TokenCredential | None = None,
    ) -> None:
        self._options = options
        self._settings = settings if settings is not None else AzureKeyVaultSettings()
        s = self._settings
        if s.client_secret is not None and s.client_secret_file is not None:
            raise ConfigurationError(
                f"{_NAME}: set KEYGATE_AZURE_CLIENT_SECRET or KEYGATE_AZURE_CLIENT_SECRET_FILE, "
                "not both"
            )
        has_secret = s.client_secret is not None or s.client_secret_file is not None
        if has_secret and not (s.client_id and s.tenant_id):
            raise ConfigurationError(
                f"{_NAME}: a client secret needs KEYGATE_AZURE_CLIENT_ID and "
                "KEYGATE_AZURE_TENANT_ID"
            )
        self._credential: TokenCredential | None = (
            _SerializedCredential(credential, self._token_wait_s) if credential else None
        )
        self._owns_credential = credential is None
        self._clients: dict[str, KeyClient] = {}
        self._lock = threading.Lock()
        #: HTTP status of the last Entra ID answer in this thread (azure-identity does not keep
        #: it on every error it raises: an outage must not look like refused credentials)
        self._entra = threading.local()

    @property
    def _token_wait_s(self) -> float:
        return self._options.connect_timeout_s + self._options.read_timeout_s

    # -- URIs -------------------------------------------------------------------------------
    @classmethod
    def parse_uri(cls, uri: str) -> KeyUri:
        return parse_key_uri(uri)

    # -- clients ----------------------------------------------------------------------------
    def _transport_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "retry_total": 0,
            "connection_timeout": self._options.connect_timeout_s,
            "read_timeout": self._options.read_timeout_s,
        }
        if self._settings.ca_bundle is not None:
            kwargs["connection_verify"] = str(self._settings.ca_bundle)
        return kwargs

    def _build_credential(self) -> TokenCredential:
        s = self._settings
        kwargs = self._transport_kwargs()
        kwargs["raw_response_hook"] = self._on_entra_response
        if s.authority_host:
            kwargs["authority"] = s.authority_host
            if (urlsplit(s.authority_host).hostname or "") not in _KNOWN_AUTHORITIES:
                kwargs["disable_instance_discovery"] = True
        secret = _read_secret(s.client_secret, s.client_secret_file)
        if s.client_id and secret and s.tenant_id:
            return ClientSecretCredential(s.tenant_id, s.client_id, secret, **kwargs)
        if s.client_id:
            kwargs["managed_identity_client_id"] = s.client_id
            kwargs["workload_identity_client_id"] = s.client_id
        if s.tenant_id:
            kwargs["workload_identity_tenant_id"] = s.tenant_id
        return DefaultAzureCredential(**kwargs)

    def _on_entra_response(self, response: PipelineResponse[Any, Any]) -> None:
        self._entra.status = response.http_response.status_code

    def _client_for(self, key: KeyUri) -> KeyClient:
        base = self._settings.endpoint or key.parts["vault_url"]
        with self._lock:
            client = self._clients.get(base)
            if client is not None:
                return client
            if self._credential is None:
                self._credential = _SerializedCredential(
                    self._build_credential(), self._token_wait_s
                )
            client = KeyClient(
                base,
                self._credential,
                verify_challenge_resource=self._settings.endpoint is None,
                **self._transport_kwargs(),
            )
            self._clients[base] = client
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
            credential = self._credential if self._owns_credential else None
            if self._owns_credential:
                self._credential = None
        for client in clients:
            client.close()
        close = getattr(credential, "close", None)
        if callable(close):
            close()

    # -- calls ------------------------------------------------------------------------------
    def _check(self, key: KeyUri) -> KeyUri:
        # Parsed again, so the parts used for the call are those of the canonical URI.
        return parse_key_uri(key.uri)

    def _send(
        self, key: KeyUri, what: str, method: str, path: str, body: dict[str, str] | None = None
    ) -> HttpResponse:
        request = (
            HttpRequest(method, path, json=body) if body is not None else HttpRequest(method, path)
        )
        self._entra.status = 0
        try:
            return self._client_for(key).send_request(request)
        except ClientAuthenticationError as exc:
            self._raise_for_credential(key, what, exc)
        except ServiceRequestTimeoutError as exc:
            raise ProviderTimeout(f"{_NAME}: {what} {key.uri}: connect timed out") from exc
        except ServiceResponseTimeoutError as exc:
            raise ProviderTimeout(f"{_NAME}: {what} {key.uri}: read timed out") from exc
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise ProviderUnavailable(
                f"{_NAME}: {what} {key.uri}: the vault could not be reached ({type(exc).__name__})"
            ) from exc
        except AzureError as exc:
            raise ProviderRejected(
                f"{_NAME}: {what} {key.uri} failed ({type(exc).__name__})"
            ) from exc
        except ValueError as exc:  # the SDK's challenge checks
            raise ProviderAuthFailed(
                f"{_NAME}: {what} {key.uri}: the vault's authentication challenge was refused"
            ) from exc

    def _raise_for_credential(
        self, key: KeyUri, what: str, exc: ClientAuthenticationError
    ) -> NoReturn:
        """A token could not be obtained: an outage of Entra ID, or refused credentials."""
        chain = _causes(exc)
        if any(
            isinstance(c, (ServiceRequestTimeoutError, ServiceResponseTimeoutError)) for c in chain
        ):
            raise ProviderTimeout(
                f"{_NAME}: {what} {key.uri}: Microsoft Entra ID timed out"
            ) from exc
        status = exc.status_code or getattr(self._entra, "status", 0) or 0
        if (
            status == 429
            or status >= 500
            or any(isinstance(c, (ServiceRequestError, ServiceResponseError)) for c in chain[1:])
        ):
            raise ProviderUnavailable(
                f"{_NAME}: {what} {key.uri}: Microsoft Entra ID is unavailable"
                + (f" (HTTP {status})" if status else "")
            ) from exc
        found = _AADSTS.search(str(exc.message or ""))
        detail = f" ({found.group(0)})" if found else ""
        raise ProviderAuthFailed(
            f"{_NAME}: {what} {key.uri}: Microsoft Entra ID refused keygate's credentials{detail}"
        ) from exc

    def _check_region(self, key: KeyUri, response: HttpResponse) -> None:
        reported = (response.headers.get("x-ms-keyvault-region") or "").replace(" ", "").lower()
        if reported and reported != key.region:
            raise ProviderRejected(
                f"{_NAME}: key {key.uri} declares region {key.region} but the vault reports "
                f"{reported}; correct the key URI's ?region="
            )

    def _raise_for_status(self, key: KeyUri, what: str, response: HttpResponse) -> NoReturn:
        status = response.status_code
        code, inner, message = _error_fields(response)
        reason = "/".join(c for c in (code, inner) if c) or f"HTTP {status}"
        if status == 401:
            raise ProviderAuthFailed(
                f"{_NAME}: {what} {key.uri}: the vault refused keygate's token ({reason})"
            )
        if status == 403:
            lowered = message.lower()
            if inner in _VALIDITY_INNER or "expired key" in lowered or "not yet valid" in lowered:
                raise ProviderKeyDisabled(
                    f"{_NAME}: key {key.uri} is outside its validity period ({reason})"
                )
            if inner == "KeyDisabled" or "disabled key" in lowered:
                raise ProviderKeyDisabled(f"{_NAME}: key {key.uri} is disabled ({reason})")
            raise ProviderAuthFailed(
                f"{_NAME}: {what} {key.uri}: keygate's principal is not allowed ({reason})"
            )
        if status == 404:
            self._raise_missing(key, what)
        if status == 429 or status >= 500:
            raise ProviderUnavailable(
                f"{_NAME}: {what} {key.uri}: the vault is unavailable ({reason})",
                retry_after=_retry_after(response.headers),
            )
        if status == 400 and what == "unwrap" and code == "BadParameter":
            raise ProviderCiphertextRejected(
                f"{_NAME}: key {key.uri} refused to unwrap the ciphertext ({reason})"
            )
        raise ProviderRejected(f"{_NAME}: {what} {key.uri} was refused ({reason})")

    def _raise_missing(self, key: KeyUri, what: str) -> NoReturn:
        """404: a soft-deleted key (``GET /deletedkeys/{name}`` answers) or no key at all."""
        name = key.parts["name"]
        try:
            response = self._client_for(key).send_request(
                HttpRequest("GET", f"/deletedkeys/{name}")
            )
        except (AzureError, ValueError):
            response = None
        if response is not None and response.status_code == 200:
            raise ProviderKeyDestroyed(
                f"{_NAME}: key {key.uri} is deleted (recoverable until it is purged)"
            )
        raise ProviderKeyNotFound(
            f"{_NAME}: {what} {key.uri}: no such key (or keygate may not see it)"
        )

    def _json(self, key: KeyUri, what: str, response: HttpResponse) -> dict[str, Any]:
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError, TypeError) as exc:
            raise ProviderUnavailable(
                f"{_NAME}: {what} {key.uri}: the vault's answer is not JSON"
            ) from exc
        if not isinstance(body, dict):
            raise ProviderUnavailable(f"{_NAME}: {what} {key.uri}: unexpected answer")
        return body

    def _get_key(self, key: KeyUri, what: str) -> tuple[dict[str, Any], HttpResponse]:
        path = f"/keys/{key.parts['name']}/{key.parts['version']}"
        response = self._send(key, what, "GET", path)
        if response.status_code != 200:
            self._raise_for_status(key, what, response)
        self._check_region(key, response)
        return self._json(key, what, response), response

    # -- the interface ----------------------------------------------------------------------
    def wrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        """Wrap ``data`` in the vault under the key's current (or named) version; ``aad`` unused."""
        del aad  # Key Vault's wrap has no associated data; the inner HSM wrap binds it
        key = self._check(key)
        if not 0 < len(data) <= _MAX_DATA:
            raise InvalidRequest(f"{_NAME}: wrap takes 1 to {_MAX_DATA} bytes, got {len(data)}")
        bundle, _ = self._get_key(key, "wrap")
        jwk, attributes = _section(bundle, "key"), _section(bundle, "attributes")
        version = _kid_version(jwk.get("kid"))
        if not version:
            raise ProviderUnavailable(f"{_NAME}: wrap {key.uri}: the key bundle has no key id")
        self._refuse_unusable(key, attributes)
        kty = str(jwk.get("kty", ""))
        ops = jwk.get("key_ops")
        if isinstance(ops, list) and "wrapKey" not in ops:
            raise ProviderRejected(f"{_NAME}: key {key.uri} does not permit wrapKey")
        if kty in ("RSA", "RSA-HSM"):
            alg = _ALG_RSA_OAEP_256
            try:
                modulus = len(_unb64u(jwk.get("n")).lstrip(b"\x00"))
            except (ValueError, TypeError, binascii.Error):
                modulus = 0
            if modulus and len(data) > modulus - 66:
                raise ProviderRejected(
                    f"{_NAME}: key {key.uri} ({modulus * 8}-bit RSA) can wrap at most "
                    f"{modulus - 66} bytes with RSA-OAEP-256; use a 3072-bit key"
                )
            payload = data
        elif kty in ("oct", "oct-HSM"):
            alg = _ALG_A256KW_FRAMED
            payload = _pad_for_kw(data)
        else:
            raise ProviderRejected(
                f"{_NAME}: key {key.uri} has type {kty or 'unknown'}; RSA, RSA-HSM or oct-HSM "
                "keys are needed"
            )
        path = f"/keys/{key.parts['name']}/{version}/wrapkey"
        response = self._send(
            key, "wrap", "POST", path, {"alg": _ALGORITHMS[alg], "value": _b64u(payload)}
        )
        if response.status_code != 200:
            self._raise_for_status(key, "wrap", response)
        self._check_region(key, response)
        result = self._json(key, "wrap", response)
        try:
            wrapped = _unb64u(result.get("value"))
        except (ValueError, TypeError, binascii.Error) as exc:
            raise ProviderUnavailable(f"{_NAME}: wrap {key.uri}: malformed answer") from exc
        if _kid_version(result.get("kid")) not in ("", version) or not wrapped:
            raise ProviderUnavailable(f"{_NAME}: wrap {key.uri}: the answer names another key")
        blob = _frame(alg, version, wrapped)
        if len(blob) > _MAX_CIPHERTEXT:
            raise ProviderRejected(f"{_NAME}: key {key.uri}: ciphertext longer than 2048 bytes")
        return blob

    def _refuse_unusable(self, key: KeyUri, attributes: Mapping[str, Any]) -> None:
        if attributes.get("enabled") is False:
            raise ProviderKeyDisabled(f"{_NAME}: key {key.uri} is disabled")
        now = time.time()
        exp, nbf = attributes.get("exp"), attributes.get("nbf")
        if isinstance(exp, (int, float)) and now >= exp:
            raise ProviderKeyDisabled(f"{_NAME}: key {key.uri} has expired")
        if isinstance(nbf, (int, float)) and now < nbf:
            raise ProviderKeyDisabled(f"{_NAME}: key {key.uri} is not valid yet")

    def unwrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        """Unwrap in the vault, with the key version recorded in ``data``; ``aad`` unused."""
        del aad
        key = self._check(key)
        parsed = _unframe(data) if len(data) <= _MAX_CIPHERTEXT else None
        if parsed is None:
            raise ProviderCiphertextRejected(
                f"{_NAME}: key {key.uri}: not a ciphertext of this adapter"
            )
        alg, version, wrapped = parsed
        wanted = key.parts["version"]
        if wanted and version != wanted:
            raise ProviderCiphertextRejected(
                f"{_NAME}: key {key.uri}: the ciphertext was made under another key version"
            )
        path = f"/keys/{key.parts['name']}/{version}/unwrapkey"
        response = self._send(
            key, "unwrap", "POST", path, {"alg": _ALGORITHMS[alg], "value": _b64u(wrapped)}
        )
        if response.status_code == 404 and not wanted:
            # The key may exist but not this version: a ciphertext of another key.
            probe = self._send(key, "unwrap", "GET", f"/keys/{key.parts['name']}/")
            if probe.status_code == 200:
                raise ProviderCiphertextRejected(
                    f"{_NAME}: key {key.uri}: the ciphertext was made under another key"
                )
        if response.status_code != 200:
            self._raise_for_status(key, "unwrap", response)
        self._check_region(key, response)
        result = self._json(key, "unwrap", response)
        try:
            plain = _unb64u(result.get("value"))
        except (ValueError, TypeError, binascii.Error) as exc:
            raise ProviderUnavailable(f"{_NAME}: unwrap {key.uri}: malformed answer") from exc
        if alg == _ALG_A256KW_FRAMED:
            unpadded = _unpad_for_kw(plain)
            if unpadded is None:
                raise ProviderCiphertextRejected(
                    f"{_NAME}: key {key.uri}: the unwrapped frame is malformed"
                )
            return unpadded
        return plain

    def describe(self, key: KeyUri) -> KeyStatus:
        """``GET /keys/{name}/{version}``; a soft-deleted key is reported, not raised."""
        key = self._check(key)
        try:
            bundle, response = self._get_key(key, "describe")
        except ProviderKeyDestroyed:
            return KeyStatus(
                uri=key.uri,
                enabled=False,
                state="Deleted",
                region=key.region,
                details={"declared_region": key.region},
            )
        jwk, attributes = _section(bundle, "key"), _section(bundle, "attributes")
        kty = str(jwk.get("kty", ""))
        algorithm = kty
        wrap_alg = ""
        if kty in ("RSA", "RSA-HSM"):
            wrap_alg = "RSA-OAEP-256"
            try:
                bits = len(_unb64u(jwk.get("n")).lstrip(b"\x00")) * 8
            except (ValueError, TypeError, binascii.Error):
                bits = 0
            if bits:
                algorithm = f"{kty} {bits}"
        elif kty in ("oct", "oct-HSM"):
            wrap_alg = "A256KW"
        try:
            self._refuse_unusable(key, attributes)
            state, enabled = "Enabled", True
        except ProviderKeyDisabled as exc:
            enabled = False
            state = (
                "Disabled"
                if attributes.get("enabled") is False
                else ("Expired" if "expired" in exc.detail else "NotYetValid")
            )
        reported = (response.headers.get("x-ms-keyvault-region") or "").lower()
        ops = jwk.get("key_ops")
        details = {
            "version": _kid_version(jwk.get("kid")),
            "key_type": kty,
            "wrap_algorithm": wrap_alg,
            "key_ops": ",".join(str(o) for o in ops) if isinstance(ops, list) else "",
            "recovery_level": str(attributes.get("recoveryLevel", "")),
            "declared_region": key.region,
            "reported_region": reported,
        }
        return KeyStatus(
            uri=key.uri,
            enabled=enabled,
            state=state,
            algorithm=algorithm,
            region=reported or key.region,
            details=details,
        )
