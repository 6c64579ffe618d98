"""Sakura Cloud KMS (さくらのクラウド KMS): the outer wrap through the KMS REST API, with httpx.

Written from the service's OpenAPI document (``KMS API`` 1.0.0, OpenAPI 3.0.3): there is no
official Python SDK.  What this adapter uses of it:

- servers ``https://secure.sakura.ad.jp/cloud/zone/{is1a,is1b,tk1a,tk1b}/api/cloud/1.1``: the
  zone is part of the base URL, and a key lives in the zone it was created in;
- HTTP Basic authentication: the API key's *access token* as the user name and its *access token
  secret* as the password (``securitySchemes.basicAuth``);
- ``POST /kms/keys/{resource_id}/encrypt`` with ``{"Key": {"Plain": <base64>, "Algo":
  "aes-256-gcm"}}`` answering ``{"Key": {"Cipher": <string>}}``;
- ``POST /kms/keys/{resource_id}/decrypt`` with ``{"Key": {"Cipher": <string>}}`` answering
  ``{"Key": {"Plain": <base64>}}`` (the request has no ``Algo``: the service reads it from the
  ciphertext);
- ``GET /kms/keys/{resource_id}`` (:meth:`SakuraKmsAdapter.describe`): ``{"Key": {..., "Status":
  "active" | "restricted" | "suspended" | "pending_destruction", "LatestVersion": n}}``.

**No AAD.**  The spec's ``KeyPlain`` has no additional-data field, so Sakura Cloud KMS binds
nothing but the key to a ciphertext: ``aad`` is accepted and ignored, like an RSA-OAEP key wrap
(the inner HSM wrap still binds the key reference).

**Errors.**  The spec defines no error responses except ``403 Key is not available for rotation``
on ``/rotate``; so a 400/403/409/422 from encrypt or decrypt may mean a refused key state as well
as bad input or a missing permission.  The adapter then reads the key (one ``GET``, never a retry
of the operation) and reports ``suspended`` as :class:`ProviderKeyDisabled`, ``pending_destruction``
as :class:`ProviderKeyDestroyed` and ``restricted`` (decrypt-only) as disabled for encrypt; when
the key is usable, or cannot be read, the status alone decides (403 → permission, 400 on decrypt →
foreign ciphertext).  A key destroyed for good answers 404 like a key that never existed:
:class:`ProviderKeyNotFound`.

Retries: none here (httpx's transport makes none by default); :class:`GuardedProvider` retries.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import re
import ssl
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Final, NoReturn
from urllib.parse import urlsplit

import httpx
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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

__all__ = [
    "ALGORITHM",
    "DEFAULT_ENDPOINT",
    "SPEC_ZONES",
    "SakuraKmsAdapter",
    "SakuraKmsSettings",
]

log = logging.getLogger(__name__)

NAME: Final = "Sakura Cloud KMS"
#: the spec's server URL, with the zone as a placeholder
DEFAULT_ENDPOINT: Final = "https://secure.sakura.ad.jp/cloud/zone/{zone}/api/cloud/1.1"
#: the zones the spec lists (石狩第1/第2, 東京第1/第2); parse_uri accepts any zone-shaped name and
#: leaves the decision to the residency policy
SPEC_ZONES: Final = ("is1a", "is1b", "tk1a", "tk1b")
#: ``KeyEncryptAlgoEnum``: the spec's default; the only one keygate uses
ALGORITHM: Final = "aes-256-gcm"

_MAX_URI: Final = 512
_ZONE: Final = re.compile(r"[a-z]{2}[0-9][a-z]")
#: Sakura Cloud resource ids are 12-digit numbers (the spec's example: "110000000000")
_RESOURCE_ID: Final = re.compile(r"[0-9]{12}")
#: what a provider ciphertext may be (the wrap contract) and a bound on any response body
_MAX_CIPHERTEXT: Final = 2048
_MAX_RESPONSE: Final = 64 * 1024
_PRINTABLE_ASCII: Final = re.compile(rb"[\x21-\x7e]+")
_ERROR_CODE: Final = re.compile(r"[a-z0-9_]{1,64}")


# ---------------------------------------------------------------------------------- settings
class SakuraKmsSettings(BaseSettings):
    """Credentials and endpoint (``KEYGATE_SAKURA_*``).

    The API key may also come from Sakura's usual ``SAKURACLOUD_ACCESS_TOKEN`` and
    ``SAKURACLOUD_ACCESS_TOKEN_SECRET`` (used only when the ``KEYGATE_SAKURA_`` names are unset).
    A ``*_file`` setting wins over the value and is read at every call, so a rotated key is
    picked up without a restart.
    """

    model_config = SettingsConfigDict(
        env_prefix="KEYGATE_SAKURA_", extra="ignore", populate_by_name=True
    )

    access_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("KEYGATE_SAKURA_ACCESS_TOKEN", "SAKURACLOUD_ACCESS_TOKEN"),
    )
    access_token_file: Path | None = None
    access_token_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "KEYGATE_SAKURA_ACCESS_TOKEN_SECRET", "SAKURACLOUD_ACCESS_TOKEN_SECRET"
        ),
    )
    access_token_secret_file: Path | None = None
    #: base URL with a ``{zone}`` placeholder; plain ``http`` only for loopback (test servers)
    endpoint: str = DEFAULT_ENDPOINT
    #: PEM bundle of the CAs to trust instead of the system's
    ca_bundle: Path | None = None


def _read_secret(path: Path | None, value: SecretStr | None, what: str, names: str) -> str:
    if path is not None:
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"{NAME}: cannot read the {what} file ({path}): {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigurationError(f"{NAME}: the {what} file ({path}) is not UTF-8") from None
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        if not text:
            raise ConfigurationError(f"{NAME}: the {what} file ({path}) is empty")
    elif value is not None and value.get_secret_value():
        text = value.get_secret_value()
    else:
        raise ConfigurationError(f"{NAME}: no {what} configured: set {names}")
    if any(not c.isprintable() or c.isspace() for c in text):
        raise ConfigurationError(f"{NAME}: the {what} contains whitespace or control characters")
    return text


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_endpoint(template: str) -> str:
    """Validate the endpoint template; messages never echo it (it might hold user info)."""
    if template.count("{zone}") != 1:
        raise ConfigurationError(
            f"{NAME}: KEYGATE_SAKURA_ENDPOINT must contain the placeholder {{zone}} exactly once"
        )
    try:
        parts = urlsplit(template.replace("{zone}", "is1a"))
        host = parts.hostname
        _ = parts.port
    except ValueError:
        raise ConfigurationError(f"{NAME}: KEYGATE_SAKURA_ENDPOINT is not a valid URL") from None
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ConfigurationError(f"{NAME}: KEYGATE_SAKURA_ENDPOINT must not contain user info")
    if parts.query or parts.fragment or not host:
        raise ConfigurationError(
            f"{NAME}: KEYGATE_SAKURA_ENDPOINT must be scheme://host[:port]/path, "
            "with no query or fragment"
        )
    if parts.scheme == "http":
        if not _is_loopback(host):
            raise ConfigurationError(
                f"{NAME}: KEYGATE_SAKURA_ENDPOINT may use plain http only for a loopback host"
            )
    elif parts.scheme != "https":
        raise ConfigurationError(f"{NAME}: KEYGATE_SAKURA_ENDPOINT must be an https URL")
    return template.rstrip("/")


# ---------------------------------------------------------------------------------- adapter
class SakuraKmsAdapter(KmsAdapter):
    """Sakura Cloud KMS keys, ``sakura-kms://ZONE/RESOURCE-ID``; one httpx client for all."""

    scheme: ClassVar[str] = "sakura-kms"
    mechanism: ClassVar[WrapMechanism] = WrapMechanism.SAKURA_KMS
    display_name: ClassVar[str] = NAME
    extra: ClassVar[str] = "sakura"

    def __init__(self, options: ProviderOptions, settings: SakuraKmsSettings | None = None) -> None:
        self._options = options
        self._settings = settings if settings is not None else SakuraKmsSettings()
        self._endpoint = _check_endpoint(self._settings.endpoint)
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None

    def __getstate__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} holds credentials and cannot be pickled")

    # ------------------------------------------------------------------------- URIs
    @classmethod
    def parse_uri(cls, uri: str) -> KeyUri:
        """``sakura-kms://ZONE/RESOURCE-ID``: zone ``[a-z]{2}[0-9][a-z]``, a 12-digit id.

        Scheme and zone are case-insensitive and written in lower case in the canonical form.
        Messages name the problem, never the input (a URI with user info may carry a secret).
        """

        def bad(problem: str) -> InvalidRequest:
            return InvalidRequest(
                f"{NAME}: invalid key URI: {problem} (expected sakura-kms://ZONE/RESOURCE-ID, "
                "e.g. sakura-kms://is1a/110000000000)"
            )

        if not isinstance(uri, str):
            raise bad("not a string")
        if len(uri) > _MAX_URI:
            raise bad(f"longer than {_MAX_URI} characters")
        if not uri.isascii():
            raise bad("contains non-ASCII characters")
        if any(not c.isprintable() or c.isspace() for c in uri):
            raise bad("contains whitespace or control characters")
        head, sep, rest = uri.partition("://")
        if not sep or head.lower() != cls.scheme:
            raise bad("not a sakura-kms:// URI")
        for char, what in (
            ("@", "user information"),
            (":", "a port or a colon"),
            ("?", "a query"),
            ("#", "a fragment"),
            ("%", "percent-encoding"),
            ("\\", "a backslash"),
        ):
            if char in rest:
                raise bad(f"contains {what}")
        segments = rest.split("/")
        if any(s in {".", ".."} for s in segments):
            raise bad("contains a dot segment")
        if len(segments) != 2:
            raise bad("must have exactly a zone and a resource id")
        zone, resource_id = segments[0].lower(), segments[1]
        if not _ZONE.fullmatch(zone):
            raise bad("the zone must be two letters, a digit and a letter (is1a, tk1b, …)")
        if not _RESOURCE_ID.fullmatch(resource_id):
            raise bad("the resource id must be a 12-digit number")
        return KeyUri(
            scheme=cls.scheme,
            uri=f"{cls.scheme}://{zone}/{resource_id}",
            region=zone,
            parts={"zone": zone, "resource_id": resource_id},
        )

    # ------------------------------------------------------------------------- operations
    def wrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        """``POST …/encrypt`` with ``aes-256-gcm``; ``aad`` is ignored (Sakura binds none)."""
        del aad  # the spec has no additional-data field
        k = self.parse_uri(key.uri)
        body = {"Key": {"Plain": base64.b64encode(bytes(data)).decode("ascii"), "Algo": ALGORITHM}}
        cipher = _field(self._call("encrypt", k, "POST", "/encrypt", body), "Cipher", k, "encrypt")
        raw = cipher.encode("utf-8")
        if not _PRINTABLE_ASCII.fullmatch(raw):
            raise ProviderRejected(f"{NAME}: the ciphertext for key {k.uri} is not printable ASCII")
        if len(raw) > _MAX_CIPHERTEXT:
            raise ProviderRejected(
                f"{NAME}: the ciphertext for key {k.uri} is longer than {_MAX_CIPHERTEXT} bytes"
            )
        return raw

    def unwrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        """``POST …/decrypt``; ``aad`` is ignored (Sakura binds none)."""
        del aad
        k = self.parse_uri(key.uri)
        data = bytes(data)
        if len(data) > _MAX_CIPHERTEXT or not _PRINTABLE_ASCII.fullmatch(data):
            # never produced by wrap(): not worth a call
            raise ProviderCiphertextRejected(
                f"{NAME}: the input is not a ciphertext of key {k.uri}"
            )
        body = {"Key": {"Cipher": data.decode("ascii")}}
        plain = _field(self._call("decrypt", k, "POST", "/decrypt", body), "Plain", k, "decrypt")
        try:
            return base64.b64decode(plain, validate=True)
        except (binascii.Error, ValueError):
            raise ProviderRejected(
                f"{NAME}: malformed decrypt response for key {k.uri} (Plain is not base64)"
            ) from None

    def describe(self, key: KeyUri) -> KeyStatus:
        """``GET /kms/keys/{resource_id}`` in the key's zone."""
        k = self.parse_uri(key.uri)
        found = _key_object(self._call("get", k, "GET", "", None), k, "get")
        status = found.get("Status")
        if not isinstance(status, str):
            raise ProviderRejected(f"{NAME}: malformed key metadata for {k.uri} (no Status)")
        details = {
            name: str(found[field])
            for name, field in (
                ("name", "Name"),
                ("key_origin", "KeyOrigin"),
                ("latest_version", "LatestVersion"),
                ("service_class", "ServiceClass"),
                ("created_at", "CreatedAt"),
                ("modified_at", "ModifiedAt"),
            )
            if found.get(field) is not None
        }
        # The spec's Key has no algorithm (every algorithm it offers is AES-256) and no zone; the
        # zone is the one whose endpoint answered for the key, since keys live in one zone.
        return KeyStatus(
            uri=k.uri,
            enabled=status == "active",
            state=status,
            algorithm="",
            region=k.region,
            details=details,
        )

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # ------------------------------------------------------------------------- HTTP
    def _http(self) -> httpx.Client:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = httpx.Client(
                        timeout=httpx.Timeout(
                            connect=self._options.connect_timeout_s,
                            read=self._options.read_timeout_s,
                            write=self._options.read_timeout_s,
                            pool=self._options.connect_timeout_s,
                        ),
                        verify=self._ssl_context(),
                        follow_redirects=False,
                        headers={"Accept": "application/json", "User-Agent": "keygate"},
                    )
                client = self._client
        return client

    def _ssl_context(self) -> ssl.SSLContext:
        """The system's CAs (not certifi's), or the configured bundle."""
        bundle = self._settings.ca_bundle
        try:
            if bundle is not None:
                return ssl.create_default_context(cafile=str(bundle))
            return ssl.create_default_context()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"{NAME}: cannot load the CA bundle ({bundle}): {type(exc).__name__}"
            ) from None

    def _auth(self) -> httpx.BasicAuth:
        s = self._settings
        token = _read_secret(
            s.access_token_file,
            s.access_token,
            "API access token",
            "KEYGATE_SAKURA_ACCESS_TOKEN_FILE or KEYGATE_SAKURA_ACCESS_TOKEN "
            "(or SAKURACLOUD_ACCESS_TOKEN)",
        )
        if ":" in token:
            raise ConfigurationError(f"{NAME}: the API access token must not contain ':'")
        secret = _read_secret(
            s.access_token_secret_file,
            s.access_token_secret,
            "API access token secret",
            "KEYGATE_SAKURA_ACCESS_TOKEN_SECRET_FILE or KEYGATE_SAKURA_ACCESS_TOKEN_SECRET "
            "(or SAKURACLOUD_ACCESS_TOKEN_SECRET)",
        )
        return httpx.BasicAuth(token, secret)

    def _send(
        self, op: str, k: KeyUri, method: str, suffix: str, body: dict[str, Any] | None
    ) -> tuple[int, Any, httpx.Headers]:
        """One exchange: (status, JSON body or None, headers); transport errors mapped."""
        url = f"{self._endpoint.replace('{zone}', k.region)}/kms/keys/{k.parts['resource_id']}"
        content = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {} if content is None else {"Content-Type": "application/json"}
        auth = self._auth()
        client = self._http()
        started = time.monotonic()
        try:
            request = client.build_request(method, url + suffix, content=content, headers=headers)
            response = client.send(request, auth=auth, stream=True)
            try:
                raw = bytearray()
                for chunk in response.iter_bytes():
                    raw += chunk
                    if len(raw) > _MAX_RESPONSE:
                        raise ProviderRejected(
                            f"{NAME}: {op} response for key {k.uri} exceeds {_MAX_RESPONSE} bytes"
                        )
            finally:
                response.close()
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(
                f"{NAME}: {op} for key {k.uri} timed out ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            if _is_certificate_error(exc):
                raise ProviderRejected(
                    f"{NAME}: {op} for key {k.uri}: the server's TLS certificate was not "
                    "trusted (set KEYGATE_SAKURA_CA_BUNDLE?)"
                ) from exc
            raise ProviderUnavailable(
                f"{NAME}: {op} for key {k.uri} failed: cannot reach the service "
                f"({type(exc).__name__})"
            ) from exc
        status = response.status_code
        log.debug("%s %s %s -> %d in %.3fs", NAME, op, k.uri, status, time.monotonic() - started)
        payload: Any = None
        if raw:
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = None
        return status, payload, response.headers

    def _call(
        self, op: str, k: KeyUri, method: str, suffix: str, body: dict[str, Any] | None
    ) -> Any:
        status, payload, headers = self._send(op, k, method, suffix, body)
        if status == 200:
            return payload
        raise self._error(op, k, status, payload, headers)

    def _error(
        self, op: str, k: KeyUri, status: int, payload: Any, headers: httpx.Headers
    ) -> GatewayError:
        code = ""
        if isinstance(payload, dict):
            error_code = payload.get("error_code")
            if isinstance(error_code, str) and _ERROR_CODE.fullmatch(error_code):
                code = f", {error_code}"
        what = f"{NAME}: {op} with key {k.uri} refused (HTTP {status}{code})"
        if status == 401:
            return ProviderAuthFailed(f"{what}: the API key was not accepted")
        if status == 404:
            return ProviderKeyNotFound(f"{NAME}: key {k.uri} not found in zone {k.region}")
        if status == 429 or status >= 500:
            return ProviderUnavailable(
                f"{NAME}: {op} with key {k.uri} failed (HTTP {status}{code})",
                retry_after=_retry_after(headers),
            )
        if op in {"encrypt", "decrypt"} and status in {400, 403, 409, 422}:
            state = self._key_state(k)
            if state == "suspended":
                return ProviderKeyDisabled(f"{NAME}: key {k.uri} is suspended (disabled)")
            if state == "pending_destruction":
                return ProviderKeyDestroyed(f"{NAME}: key {k.uri} is pending destruction")
            if state == "restricted" and op == "encrypt":
                return ProviderKeyDisabled(
                    f"{NAME}: key {k.uri} is restricted (decrypt only); it cannot encrypt"
                )
        if status == 403:
            return ProviderAuthFailed(f"{what}: the API key lacks the permission")
        if op == "decrypt" and status in {400, 422}:
            return ProviderCiphertextRejected(
                f"{NAME}: key {k.uri} would not decrypt the input (HTTP {status}{code})"
            )
        return ProviderRejected(what)

    def _key_state(self, k: KeyUri) -> str | None:
        """The key's ``Status`` after a refused encrypt/decrypt; ``None`` if it cannot be read."""
        try:
            status, payload, _ = self._send("get", k, "GET", "", None)
        except GatewayError:
            return None
        if status != 200 or not isinstance(payload, dict):
            return None
        found = payload.get("Key")
        state = found.get("Status") if isinstance(found, dict) else None
        return state if isinstance(state, str) else None


# ---------------------------------------------------------------------------------- helpers
def _key_object(payload: Any, k: KeyUri, op: str) -> dict[str, Any]:
    found = payload.get("Key") if isinstance(payload, dict) else None
    if not isinstance(found, dict):
        raise ProviderRejected(f"{NAME}: malformed {op} response for key {k.uri} (no Key)")
    key_id = found.get("ID")
    if key_id is not None and key_id != k.parts["resource_id"]:
        raise ProviderRejected(f"{NAME}: {op} for key {k.uri} answered for another key")
    return found


def _field(payload: Any, name: str, k: KeyUri, op: str) -> str:
    value = _key_object(payload, k, op).get(name)
    if not isinstance(value, str):
        raise ProviderRejected(f"{NAME}: malformed {op} response for key {k.uri} (no Key.{name})")
    return value


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
