"""AWS KMS adapter: the outer wrap with ``Encrypt`` / ``Decrypt`` under a symmetric KMS key (boto3).

Key URIs name the key (or an alias) by its ARN; the region the residency policy checks is the
ARN's own, and calls go to that region::

    aws-kms://arn:aws:kms:ap-northeast-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab
    aws-kms://arn:aws:kms:ap-northeast-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab
    aws-kms://arn:aws:kms:ap-northeast-3:111122223333:alias/keygate-tenant-a

Only the commercial partition (``arn:aws:``) is accepted.  The AAD is bound as the encryption
context ``{"keygate:aad": base64url(aad)}`` (KMS authenticates it and logs it in CloudTrail; an
empty AAD sends no context).  ``Decrypt`` always names the key (``KeyId``), so KMS refuses a
ciphertext made under another key instead of silently using whichever key made it.

Credentials: explicit ``KEYGATE_AWS_ACCESS_KEY_ID`` / ``…SECRET_ACCESS_KEY[_FILE]`` /
``…SESSION_TOKEN[_FILE]``, else ``KEYGATE_AWS_PROFILE``, else boto3's standard chain (environment,
shared config, SSO, web identity, ECS / EC2 instance roles).  botocore's own retries are off
(``total_max_attempts=1``): :mod:`keygate.providers.guard` retries.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bce
from botocore.config import Config
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

__all__ = ["AAD_CONTEXT_KEY", "AwsKmsAdapter", "AwsKmsSettings"]

SCHEME: Final = "aws-kms"
#: the encryption-context key that carries the AAD (base64url)
AAD_CONTEXT_KEY: Final = "keygate:aad"
_MAX_URI_LEN: Final = 512
_MAX_CIPHERTEXT: Final = 2048
_MAX_MESSAGE: Final = 200

_REGION: Final = re.compile(r"[a-z]{2}-[a-z]+-[1-9][0-9]?")
_ACCOUNT: Final = re.compile(r"[0-9]{12}")
_KEY_ID: Final = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32}"
)
_ALIAS: Final = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
_MAX_ALIAS_LEN: Final = 250  # KMS: "alias/" + name ≤ 256
#: partitions other than ``aws``, named by their regions' prefixes
_OTHER_PARTITIONS: Final = {"cn-": "aws-cn"}

_AUTH_CODES: Final = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "AccessDeniedException",
        "AccessDenied",
        "ExpiredTokenException",
        "ExpiredToken",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "RequestExpired",
        "NotAuthorized",
    }
)
_THROTTLE_CODES: Final = frozenset(
    {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"}
)
_UNAVAILABLE_CODES: Final = frozenset(
    {
        "KMSInternalException",
        "KeyUnavailableException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "InternalError",
    }
)
_CREDENTIAL_ERRORS: Final = (
    bce.NoCredentialsError,
    bce.PartialCredentialsError,
    bce.CredentialRetrievalError,
    bce.TokenRetrievalError,
    bce.SSOError,
)


# ---------------------------------------------------------------------------------- settings
class AwsKmsSettings(BaseSettings):
    """Endpoint and credentials (``KEYGATE_AWS_*``); unset means boto3's own defaults."""

    model_config = SettingsConfigDict(env_prefix="KEYGATE_AWS_", extra="ignore")

    #: endpoint override (a VPC endpoint, a test server); ``None`` = the region's KMS endpoint
    endpoint_url: str | None = None
    #: static credentials; when unset, ``profile`` or boto3's standard credential chain is used
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    secret_access_key_file: Path | None = None
    session_token: SecretStr | None = None
    session_token_file: Path | None = None
    #: a profile of the shared AWS config files
    profile: str | None = None
    #: CA bundle to verify the endpoint with (``None`` = botocore's default)
    ca_bundle: Path | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _https_or_loopback(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("endpoint_url must be an https:// URL")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("endpoint_url must not carry credentials, a query or a fragment")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("endpoint_url may be plain http:// only on a loopback address")
        return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_secret(value: SecretStr | None, path: Path | None, name: str) -> str | None:
    """The secret from its setting or, if given, its file (read now, stripped)."""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"AWS KMS: cannot read {name}_FILE {path}") from exc
        if not text:
            raise ConfigurationError(f"AWS KMS: {name}_FILE {path} is empty")
        return text
    return value.get_secret_value() if value is not None else None


# ---------------------------------------------------------------------------------- URIs
def _invalid(problem: str) -> InvalidRequest:
    return InvalidRequest(f"invalid aws-kms key URI: {problem}")


def parse_key_uri(uri: str) -> KeyUri:
    """Validate an ``aws-kms://arn:aws:kms:…`` URI; :class:`InvalidRequest` names the problem."""
    if not isinstance(uri, str):
        raise _invalid("not a string")
    if len(uri) > _MAX_URI_LEN:
        raise _invalid(f"longer than {_MAX_URI_LEN} characters")
    if not uri.isascii() or not uri.isprintable() or any(c.isspace() for c in uri):
        raise _invalid("only printable ASCII without spaces is allowed")
    head, sep, arn = uri.partition("://")
    if not sep or head.lower() != SCHEME:
        raise _invalid("the scheme must be aws-kms://")
    fields = arn.split(":")
    if len(fields) != 6 or fields[0] != "arn":
        raise _invalid("expected aws-kms://arn:aws:kms:REGION:ACCOUNT:key/ID or …:alias/NAME")
    _, partition, service, region, account, resource = fields
    if partition != "aws":
        raise _invalid(f"partition {partition!r} is not supported (only 'aws')")
    if service != "kms":
        raise _invalid(f"the ARN names service {service!r}, not 'kms'")
    if not _REGION.fullmatch(region):
        raise _invalid(f"malformed region {region!r}")
    for prefix, other in _OTHER_PARTITIONS.items():
        if region.startswith(prefix):
            raise _invalid(f"region {region!r} belongs to partition {other}, not aws")
    if not _ACCOUNT.fullmatch(account):
        raise _invalid("the account must be 12 digits")
    kind, slash, name = resource.partition("/")
    if not slash or kind not in ("key", "alias"):
        raise _invalid("the resource must be key/KEY-ID or alias/NAME")
    if kind == "key" and not _KEY_ID.fullmatch(name):
        raise _invalid("the key id must be a lower-case UUID or mrk- followed by 32 hex digits")
    if kind == "alias":
        if not name or len(name) > _MAX_ALIAS_LEN or not _ALIAS.fullmatch(name):
            raise _invalid("the alias name must be 1-250 of A-Z a-z 0-9 / _ - (no empty segment)")
        if name.lower().startswith("aws/"):
            raise _invalid("alias/aws/… names an AWS managed key, which keygate cannot use")
    return KeyUri(
        scheme=SCHEME,
        uri=f"{SCHEME}://{arn}",
        region=region,
        parts={"arn": arn, "account": account, "kind": kind, "id": name, "partition": partition},
    )


# ---------------------------------------------------------------------------------- errors
def _short(text: object) -> str:
    """A provider message, on one line and bounded (KMS messages never hold secrets or data)."""
    return " ".join(str(text).split())[:_MAX_MESSAGE]


def _client_error(key: KeyUri, op: str, exc: bce.ClientError) -> Exception:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = _short(error.get("Message", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    where = f"AWS KMS: {op} with key {key.uri}"
    if code == "DisabledException":
        return ProviderKeyDisabled(f"AWS KMS: key {key.uri} is disabled")
    if code == "KMSInvalidStateException":
        if "pending deletion" in message.lower() or "pendingdeletion" in message.lower():
            return ProviderKeyDestroyed(f"AWS KMS: key {key.uri} is pending deletion")
        return ProviderKeyDisabled(f"AWS KMS: key {key.uri} is not usable now ({message})")
    if code == "NotFoundException":
        return ProviderKeyNotFound(f"AWS KMS: key {key.uri} does not exist ({message})")
    if code in ("InvalidCiphertextException", "IncorrectKeyException"):
        return ProviderCiphertextRejected(
            f"{where}: the ciphertext was refused ({code}): not made by this key, tampered, "
            "or the AAD differs"
        )
    if code in _AUTH_CODES or status in (401, 403):
        return ProviderAuthFailed(f"{where}: credentials refused ({code}: {message})")
    if code in _THROTTLE_CODES or status == 429:
        return ProviderUnavailable(f"{where}: throttled ({code})")
    if code == "DependencyTimeoutException":
        return ProviderTimeout(f"{where}: KMS timed out internally ({code})")
    if code in _UNAVAILABLE_CODES or status >= 500:
        return ProviderUnavailable(f"{where}: service error {status} ({code}: {message})")
    return ProviderRejected(f"{where}: refused ({code}: {message})")


@contextlib.contextmanager
def _map_errors(key: KeyUri, op: str) -> Iterator[None]:
    """Turn every botocore failure into one of :mod:`keygate.providers.base`'s errors."""
    where = f"AWS KMS: {op} with key {key.uri}"
    try:
        yield
    except bce.ClientError as exc:
        raise _client_error(key, op, exc) from exc
    except (bce.ConnectTimeoutError, bce.ReadTimeoutError) as exc:
        raise ProviderTimeout(f"{where}: timed out ({type(exc).__name__})") from exc
    except bce.SSLError as exc:
        raise ProviderRejected(f"{where}: TLS verification of the endpoint failed") from exc
    except (bce.ConnectionError, bce.HTTPClientError) as exc:
        raise ProviderUnavailable(f"{where}: endpoint unreachable ({type(exc).__name__})") from exc
    except _CREDENTIAL_ERRORS as exc:
        raise ProviderAuthFailed(f"{where}: no usable credentials ({type(exc).__name__})") from exc
    except bce.BotoCoreError as exc:
        raise ProviderRejected(f"{where}: {type(exc).__name__}") from exc


# ---------------------------------------------------------------------------------- adapter
class AwsKmsAdapter(KmsAdapter):
    """Outer wrap with AWS KMS ``Encrypt`` / ``Decrypt`` (symmetric ``SYMMETRIC_DEFAULT`` keys)."""

    scheme = SCHEME
    mechanism = WrapMechanism.AWS_KMS
    display_name = "AWS KMS"
    extra = "aws"

    def __init__(self, options: ProviderOptions, settings: AwsKmsSettings | None = None) -> None:
        self._options = options
        self._settings = settings if settings is not None else AwsKmsSettings()
        self._lock = threading.Lock()
        self._session: boto3.session.Session | None = None
        self._clients: dict[str, Any] = {}

    @classmethod
    def parse_uri(cls, uri: str) -> KeyUri:
        return parse_key_uri(uri)

    # ------------------------------------------------------------------ clients
    def _make_session(self) -> boto3.session.Session:
        s = self._settings
        secret = _read_secret(
            s.secret_access_key, s.secret_access_key_file, "KEYGATE_AWS_SECRET_ACCESS_KEY"
        )
        token = _read_secret(s.session_token, s.session_token_file, "KEYGATE_AWS_SESSION_TOKEN")
        if s.access_key_id:
            if not secret:
                raise ConfigurationError(
                    "AWS KMS: KEYGATE_AWS_ACCESS_KEY_ID is set without "
                    "KEYGATE_AWS_SECRET_ACCESS_KEY (or _FILE)"
                )
            return boto3.session.Session(
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=secret,
                aws_session_token=token,
            )
        if secret or token:
            raise ConfigurationError(
                "AWS KMS: a secret access key or session token is set without "
                "KEYGATE_AWS_ACCESS_KEY_ID"
            )
        try:
            return boto3.session.Session(profile_name=s.profile)
        except bce.ProfileNotFound as exc:
            raise ConfigurationError(f"AWS KMS: profile {s.profile!r} not found") from exc

    def _client(self, region: str) -> Any:
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                if self._session is None:
                    self._session = self._make_session()
                s = self._settings
                config = Config(
                    connect_timeout=self._options.connect_timeout_s,
                    read_timeout=self._options.read_timeout_s,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                )
                client = self._session.client(
                    "kms",
                    region_name=region,
                    endpoint_url=s.endpoint_url,
                    verify=str(s.ca_bundle) if s.ca_bundle is not None else None,
                    config=config,
                )
                self._clients[region] = client
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    # ------------------------------------------------------------------ operations
    def _own(self, key: KeyUri) -> KeyUri:
        """Re-validate a KeyUri built elsewhere (its canonical text is the source of truth)."""
        return parse_key_uri(key.uri)

    @staticmethod
    def _context(aad: bytes) -> dict[str, Any]:
        if not aad:
            return {}
        return {"EncryptionContext": {AAD_CONTEXT_KEY: base64.urlsafe_b64encode(aad).decode()}}

    def wrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        key = self._own(key)
        with _map_errors(key, "Encrypt"):
            resp = self._client(key.region).encrypt(
                KeyId=key.parts["arn"], Plaintext=data, **self._context(aad)
            )
        blob = bytes(resp["CiphertextBlob"])
        if len(blob) > _MAX_CIPHERTEXT:
            raise ProviderRejected(
                f"AWS KMS: Encrypt with key {key.uri} returned {len(blob)} bytes "
                f"(more than {_MAX_CIPHERTEXT})"
            )
        return blob

    def unwrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        key = self._own(key)
        if not data:
            raise ProviderCiphertextRejected(f"AWS KMS: Decrypt with key {key.uri}: empty input")
        with _map_errors(key, "Decrypt"):
            resp = self._client(key.region).decrypt(
                KeyId=key.parts["arn"], CiphertextBlob=data, **self._context(aad)
            )
        if key.parts["kind"] == "key" and resp.get("KeyId") != key.parts["arn"]:
            raise ProviderCiphertextRejected(
                f"AWS KMS: Decrypt with key {key.uri} answered for another key"
            )
        return bytes(resp["Plaintext"])

    def describe(self, key: KeyUri) -> KeyStatus:
        key = self._own(key)
        with _map_errors(key, "DescribeKey"):
            meta = self._client(key.region).describe_key(KeyId=key.parts["arn"])["KeyMetadata"]
        state = str(meta.get("KeyState", ""))
        arn = str(meta.get("Arn", ""))
        details = {
            "arn": arn,
            "key_id": str(meta.get("KeyId", "")),
            "key_usage": str(meta.get("KeyUsage", "")),
            "key_manager": str(meta.get("KeyManager", "")),
            "origin": str(meta.get("Origin", "")),
            "multi_region": str(bool(meta.get("MultiRegion", False))).lower(),
        }
        if meta.get("DeletionDate"):
            details["deletion_date"] = str(meta["DeletionDate"])
        return KeyStatus(
            uri=key.uri,
            enabled=bool(meta.get("Enabled")) and state == "Enabled",
            state=state,
            algorithm=str(meta.get("KeySpec", "")),
            region=arn.split(":")[3] if arn.count(":") >= 5 else "",
            details=details,
        )
