"""HashiCorp Vault / OpenBao transit adapter: the outer wrap with ``transit/encrypt`` (hvac).

Key URIs name the server, the transit mount (one or more path segments) and the key::

    hcvault://vault.example.jp:8200/transit/keys/keygate-tenant-a
    hcvault://vault.example.jp/kms/transit/keys/keygate-tenant-a      (port 8200 implied)
    hcvault://127.0.0.1:8200/transit/keys/dev?tls=false                (plain HTTP: loopback only)

HTTPS is the default; ``?tls=false`` is accepted only for a loopback IP address.  The canonical
form always carries the port, and :attr:`KeyUri.region` is ``host:port``: Vault has no region,
so the residency policy lists the servers (addresses) that may hold keys.  Redirects are not
followed (a standby's redirect would send the token and the data to an address the residency
policy never saw); point keygate at the active node or at a load balancer.

The key should be ``aes256-gcm96``; the AAD goes in ``associated_data`` (AES-GCM additional
data, authenticated, never stored).  The ciphertext is Vault's own text (``vault:vN:…``), returned
as ASCII bytes.

Transit has no "disabled" or "pending deletion" state.  What keygate reports instead:

- :class:`ProviderKeyDisabled`: (a) Vault policy denies keygate's token this key while the token
  itself is valid (a 403 on the key, but ``auth/token/lookup-self`` answers): the custodian's
  kill switch is an explicit ``deny`` on the key's paths; (b) decrypt refused because the
  ciphertext's key version is below the key's ``min_decryption_version`` ("disallowed by policy
  (too old)") and still exists;
- :class:`ProviderKeyDestroyed`: the same refusal for a version that was *trimmed* (below
  ``min_available_version``: its key material is gone for good) — told apart by reading the key;
- :class:`ProviderKeyNotFound`: the key does not exist; a deleted key looks exactly like one that
  never existed (transit keeps no tombstone), so deletion cannot be reported as "destroyed".

Token: ``KEYGATE_VAULT_TOKEN_FILE`` (re-read whenever the file changes: Vault Agent's sink),
else ``KEYGATE_VAULT_TOKEN``, else hvac's standard chain (``VAULT_TOKEN``, ``~/.vault-token``).
requests makes no retries: :mod:`keygate.providers.guard` retries.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import hvac
import hvac.exceptions as hve
import hvac.utils
import requests
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from requests.adapters import HTTPAdapter

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

__all__ = ["VaultSettings", "VaultTransitAdapter"]

T = TypeVar("T")

SCHEME: Final = "hcvault"
DEFAULT_PORT: Final = 8200
_MAX_URI_LEN: Final = 512
_MAX_CIPHERTEXT: Final = 2048
_MAX_MESSAGE: Final = 200
_MAX_NAME: Final = 128

_DNS_LABEL: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PORT: Final = re.compile(r"[1-9][0-9]{0,4}")
_SEGMENT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_KEY_NAME: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_RESERVED_MOUNTS: Final = frozenset({"sys", "auth", "identity", "cubbyhole"})
_CIPHERTEXT: Final = re.compile(r"vault:v([1-9][0-9]{0,9}):[A-Za-z0-9+/]+={0,2}")


# ---------------------------------------------------------------------------------- settings
class VaultSettings(BaseSettings):
    """Token, namespace and CA (``KEYGATE_VAULT_*``); the server address is in the key URI."""

    model_config = SettingsConfigDict(env_prefix="KEYGATE_VAULT_", extra="ignore")

    token: SecretStr | None = None
    #: a file holding the token (Vault Agent's sink); re-read whenever it changes
    token_file: Path | None = None
    #: Vault Enterprise / OpenBao namespace (``X-Vault-Namespace``)
    namespace: str | None = None
    #: CA bundle that signs the servers' certificates (``None`` = the system's)
    ca_bundle: Path | None = None


# ---------------------------------------------------------------------------------- URIs
def _invalid(problem: str) -> InvalidRequest:
    return InvalidRequest(f"invalid hcvault key URI: {problem}")


def _host(text: str) -> tuple[str, bool]:
    """Canonical host text and whether it is a loopback IP address."""
    if text.startswith("["):
        try:
            ip6 = ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            raise _invalid("malformed IPv6 address") from None
        return f"[{ip6.compressed}]", ip6.is_loopback
    if re.fullmatch(r"[0-9.]+", text):
        try:
            ip4 = ipaddress.IPv4Address(text)
        except ValueError:
            raise _invalid("malformed IPv4 address") from None
        return str(ip4), ip4.is_loopback
    host = text.lower()
    labels = host.split(".")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise _invalid("malformed host name")
    return host, False


def parse_key_uri(uri: str) -> KeyUri:
    """Validate an ``hcvault://HOST[:PORT]/MOUNT/keys/NAME[?tls=false]`` URI."""
    if not isinstance(uri, str):
        raise _invalid("not a string")
    if len(uri) > _MAX_URI_LEN:
        raise _invalid(f"longer than {_MAX_URI_LEN} characters")
    if not uri.isascii() or not uri.isprintable() or any(c.isspace() for c in uri):
        raise _invalid("only printable ASCII without spaces is allowed")
    head, sep, rest = uri.partition("://")
    if not sep or head.lower() != SCHEME:
        raise _invalid("the scheme must be hcvault://")
    if "#" in rest or "%" in rest or "\\" in rest:
        raise _invalid("fragments, percent-escapes and backslashes are not allowed")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise _invalid("user information (user@host) is not allowed")
    if not authority or not slash:
        raise _invalid("expected hcvault://HOST[:PORT]/MOUNT/keys/NAME")
    port = DEFAULT_PORT
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise _invalid("unterminated [IPv6] address")
        host_text, port_part = authority[: close + 1], authority[close + 1 :]
    else:
        host_text, colon, digits = authority.partition(":")
        port_part = colon + digits
    if port_part:
        digits = port_part.removeprefix(":")
        if not port_part.startswith(":") or not _PORT.fullmatch(digits) or int(digits) > 65535:
            raise _invalid("the port must be a number from 1 to 65535")
        port = int(digits)
    host, loopback = _host(host_text)
    segments = path.split("/")
    if len(segments) < 3 or segments[-2] != "keys":
        raise _invalid("the path must be MOUNT/keys/NAME")
    mount_segments, name = segments[:-2], segments[-1]
    for segment in mount_segments:
        if not _SEGMENT.fullmatch(segment):
            raise _invalid("each mount path segment must be A-Z a-z 0-9 _ . - (no empty or ..)")
        if segment == "keys":
            raise _invalid("a mount path segment named 'keys' is ambiguous")
    if mount_segments[0] in _RESERVED_MOUNTS:
        raise _invalid(f"{mount_segments[0]}/ is a reserved Vault path, not a transit mount")
    if len(name) > _MAX_NAME or not _KEY_NAME.fullmatch(name):
        raise _invalid("the key name must be A-Z a-z 0-9 _ . - (1-128, not ending in . or -)")
    if query not in ("", "tls=false", "tls=true"):
        raise _invalid("the only query parameter allowed is tls=false")
    tls = query != "tls=false"
    if not tls and not loopback:
        raise _invalid("tls=false is allowed only for a loopback IP address (127.0.0.0/8, [::1])")
    mount = "/".join(mount_segments)
    canonical = f"{SCHEME}://{host}:{port}/{mount}/keys/{name}" + ("" if tls else "?tls=false")
    return KeyUri(
        scheme=SCHEME,
        uri=canonical,
        region=f"{host}:{port}",
        parts={
            "url": f"{'https' if tls else 'http'}://{host}:{port}",
            "mount": mount,
            "name": name,
        },
    )


# ---------------------------------------------------------------------------------- errors
def _short(exc: hve.VaultError) -> str:
    """Vault's own error text, on one line and bounded (it never holds the token or data)."""
    text = "; ".join(str(e) for e in exc.errors) if exc.errors else ""
    return " ".join(text.replace("1 error occurred:", "").split())[:_MAX_MESSAGE]


def _version(data: bytes) -> int:
    match = _CIPHERTEXT.fullmatch(data.decode("ascii", "replace"))
    return int(match.group(1)) if match else 0


# ---------------------------------------------------------------------------------- adapter
class VaultTransitAdapter(KmsAdapter):
    """Outer wrap with Vault / OpenBao transit ``encrypt`` / ``decrypt`` (aes256-gcm96 keys)."""

    scheme = SCHEME
    mechanism = WrapMechanism.VAULT_TRANSIT
    display_name = "Vault transit"
    extra = "vault"

    def __init__(self, options: ProviderOptions, settings: VaultSettings | None = None) -> None:
        self._options = options
        self._settings = settings if settings is not None else VaultSettings()
        self._lock = threading.Lock()
        self._clients: dict[str, hvac.Client] = {}
        self._token_stamp: int | None = None
        self._token: str | None = None

    @classmethod
    def parse_uri(cls, uri: str) -> KeyUri:
        return parse_key_uri(uri)

    # ------------------------------------------------------------------ clients and token
    def _current_token(self) -> str | None:
        """The token: the file's (re-read when it changed), the setting's, or hvac's chain."""
        s = self._settings
        if s.token_file is not None:
            try:
                stamp = s.token_file.stat().st_mtime_ns
                if stamp != self._token_stamp:
                    token = s.token_file.read_text(encoding="utf-8").strip()
                    self._token, self._token_stamp = token or None, stamp
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigurationError(
                    f"Vault transit: cannot read KEYGATE_VAULT_TOKEN_FILE {s.token_file}"
                ) from exc
            return self._token
        if s.token is not None:
            return s.token.get_secret_value()
        from_env: str | None = hvac.utils.get_token_from_env()
        return from_env

    def _client(self, key: KeyUri) -> hvac.Client:
        url = key.parts["url"]
        with self._lock:
            token = self._current_token()
            client = self._clients.get(url)
            if client is None:
                session = requests.Session()
                session.mount("https://", HTTPAdapter(max_retries=0))
                session.mount("http://", HTTPAdapter(max_retries=0))
                ca = self._settings.ca_bundle
                session.verify = str(ca) if ca is not None else True
                client = hvac.Client(
                    url=url,
                    token=token,
                    verify=session.verify,
                    timeout=(self._options.connect_timeout_s, self._options.read_timeout_s),
                    namespace=self._settings.namespace,
                    allow_redirects=False,
                    session=session,
                )
                self._clients[url] = client
            elif client.token != token:
                client.token = token
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.adapter.close()

    # ------------------------------------------------------------------ calls and errors
    def _call(self, key: KeyUri, op: str, fn: Callable[[hvac.Client], T], data: bytes = b"") -> T:
        """Run one hvac call; every failure becomes one of :mod:`keygate.providers.base`'s."""
        where = f"Vault transit: {op} with key {key.uri}"
        client = self._client(key)
        try:
            result = fn(client)
        except hve.VaultError as exc:
            raise self._vault_error(key, op, exc, client, data) from exc
        except requests.exceptions.Timeout as exc:
            raise ProviderTimeout(f"{where}: timed out ({type(exc).__name__})") from exc
        except requests.exceptions.SSLError as exc:
            raise ProviderRejected(f"{where}: TLS verification of the server failed") from exc
        except requests.exceptions.RequestException as exc:
            raise ProviderUnavailable(
                f"{where}: server unreachable ({type(exc).__name__})"
            ) from exc
        if not isinstance(result, dict):
            status = getattr(result, "status_code", 0)
            if 300 <= status < 400:
                raise ProviderUnavailable(
                    f"{where}: the server redirected (HTTP {status}); keygate does not follow "
                    "redirects: address the active node or a load balancer"
                )
            raise ProviderRejected(f"{where}: unexpected answer (HTTP {status})")
        return result

    def _vault_error(
        self, key: KeyUri, op: str, exc: hve.VaultError, client: hvac.Client, data: bytes
    ) -> Exception:
        where = f"Vault transit: {op} with key {key.uri}"
        message = _short(exc)
        lower = message.lower()
        if isinstance(exc, hve.Unauthorized | hve.Forbidden):
            if op == "encrypt" and self._key_missing(key, client):
                # with only the "update" capability, encrypting under a missing key is a 403
                return ProviderKeyNotFound(f"Vault transit: key {key.uri} does not exist")
            if self._token_valid(client):
                return ProviderKeyDisabled(
                    f"Vault transit: key {key.uri} is disabled for keygate: Vault policy denies "
                    f"{op} to its (valid) token"
                )
            return ProviderAuthFailed(f"{where}: permission denied (token refused)")
        if isinstance(exc, hve.InvalidPath):
            return ProviderKeyNotFound(
                f"Vault transit: key {key.uri} (or its mount) does not exist"
            )
        if isinstance(exc, hve.RateLimitExceeded):
            return ProviderUnavailable(f"{where}: rate limited (429)")
        if isinstance(
            exc, hve.InternalServerError | hve.VaultDown | hve.BadGateway | hve.VaultNotInitialized
        ):
            return ProviderUnavailable(f"{where}: server error ({type(exc).__name__}: {message})")
        if isinstance(exc, hve.InvalidRequest):
            if "key not found" in lower:
                return ProviderKeyNotFound(f"Vault transit: key {key.uri} does not exist")
            if "disallowed by policy" in lower:
                return self._too_old(key, client, data)
            if op == "decrypt" and (
                "cipher" in lower or "authentication failed" in lower or "decode" in lower
            ):
                return ProviderCiphertextRejected(
                    f"{where}: the ciphertext was refused ({message}): not made by this key, "
                    "tampered, or the AAD differs"
                )
        return ProviderRejected(f"{where}: refused ({type(exc).__name__}: {message})")

    @staticmethod
    def _key_missing(key: KeyUri, client: hvac.Client) -> bool:
        try:
            client.secrets.transit.read_key(key.parts["name"], mount_point=key.parts["mount"])
        except hve.InvalidPath:
            return True
        except (hve.VaultError, requests.exceptions.RequestException):
            return False
        return False

    @staticmethod
    def _token_valid(client: hvac.Client) -> bool:
        """Whether the token itself is good (so a 403 on the key is the policy's doing)."""
        try:
            client.auth.token.lookup_self()
        except (hve.VaultError, requests.exceptions.RequestException):
            return False
        return True

    @staticmethod
    def _too_old(key: KeyUri, client: hvac.Client, data: bytes) -> Exception:
        """Tell a trimmed (destroyed) key version from one below min_decryption_version."""
        version = _version(data)
        try:
            info = client.secrets.transit.read_key(
                key.parts["name"], mount_point=key.parts["mount"]
            )["data"]
            min_available = int(info.get("min_available_version") or 0)
        except (hve.VaultError, requests.exceptions.RequestException, KeyError, TypeError):
            min_available = 0
        if version and version < min_available:
            return ProviderKeyDestroyed(
                f"Vault transit: version v{version} of key {key.uri} is destroyed (trimmed)"
            )
        return ProviderKeyDisabled(
            f"Vault transit: key {key.uri} is disabled for this ciphertext's version "
            "(below min_decryption_version)"
        )

    # ------------------------------------------------------------------ operations
    def _own(self, key: KeyUri) -> KeyUri:
        return parse_key_uri(key.uri)

    def wrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        key = self._own(key)
        plaintext = base64.b64encode(data).decode()
        associated = base64.b64encode(aad).decode() if aad else None
        resp = self._call(
            key,
            "encrypt",
            lambda c: c.secrets.transit.encrypt_data(
                key.parts["name"],
                plaintext=plaintext,
                associated_data=associated,
                mount_point=key.parts["mount"],
            ),
        )
        text = resp.get("data", {}).get("ciphertext")
        if not isinstance(text, str) or not _CIPHERTEXT.fullmatch(text):
            raise ProviderRejected(f"Vault transit: encrypt with key {key.uri}: no ciphertext")
        out = text.encode("ascii")
        if len(out) > _MAX_CIPHERTEXT:
            raise ProviderRejected(
                f"Vault transit: encrypt with key {key.uri} returned {len(out)} bytes "
                f"(more than {_MAX_CIPHERTEXT})"
            )
        return out

    def unwrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        key = self._own(key)
        if len(data) > _MAX_CIPHERTEXT or not _version(data):
            raise ProviderCiphertextRejected(
                f"Vault transit: decrypt with key {key.uri}: not a transit ciphertext"
            )
        ciphertext = data.decode("ascii")
        associated = base64.b64encode(aad).decode() if aad else None
        resp = self._call(
            key,
            "decrypt",
            lambda c: c.secrets.transit.decrypt_data(
                key.parts["name"],
                ciphertext=ciphertext,
                associated_data=associated,
                mount_point=key.parts["mount"],
            ),
            data,
        )
        try:
            return base64.b64decode(resp["data"]["plaintext"] or "", validate=True)
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ProviderRejected(
                f"Vault transit: decrypt with key {key.uri}: malformed answer"
            ) from exc

    def describe(self, key: KeyUri) -> KeyStatus:
        key = self._own(key)
        try:
            resp = self._call(
                key,
                "read key",
                lambda c: c.secrets.transit.read_key(
                    key.parts["name"], mount_point=key.parts["mount"]
                ),
            )
        except ProviderKeyDisabled:
            return KeyStatus(key.uri, enabled=False, state="denied-by-policy", region=key.region)
        info: dict[str, Any] = resp.get("data") or {}
        usable = bool(info.get("supports_encryption")) and bool(info.get("supports_decryption"))
        fields = (
            "latest_version",
            "min_decryption_version",
            "min_encryption_version",
            "min_available_version",
            "deletion_allowed",
            "exportable",
            "derived",
        )
        return KeyStatus(
            uri=key.uri,
            enabled=usable,
            state="active" if usable else "no-encryption",
            algorithm=str(info.get("type", "")),
            region=key.region,
            details={f: str(info[f]).lower() for f in fields if f in info},
        )
