"""The one small interface every cloud KMS adapter implements, and what they share.

A provider adapter wraps and unwraps *bytes* under one provider key named by a URI.  keygate only
ever hands it a DEK that the HSM has already wrapped (the inner wrap): the provider never sees a
DEK, a record or a plaintext.  The adapter:

- parses and validates its key URIs (:meth:`KmsAdapter.parse_uri`), naming the region or zone the
  key lives in, so the residency policy can refuse anything outside Japan;
- calls the provider's official SDK (or, for Sakura Cloud, its REST API through httpx) with the
  connect/read timeout of :class:`ProviderOptions` and **no retries of its own** — retries with
  backoff are done once, for every provider, by :class:`keygate.providers.guard.GuardedProvider`;
- maps every SDK failure to one of the errors below, with a message that names the provider, the
  key URI and the reason, never a credential, a token or the bytes it was given.

Error mapping every adapter follows (the guard retries only the first two):

=================================  ===========================================================
:class:`ProviderTimeout`           the call timed out (connect or read)
:class:`ProviderUnavailable`       connection refused/reset, DNS, HTTP 5xx, 429/throttling
:class:`ProviderAuthFailed`        wrong or expired credentials, signature rejected, 401/403
:class:`ProviderKeyNotFound`       the key (or its vault/ring) does not exist
:class:`ProviderKeyDisabled`       the key or its primary version is disabled
:class:`ProviderKeyDestroyed`      the key is destroyed, deleted or pending deletion
:class:`ProviderCiphertextRejected`  unwrap refused the input: not made by this key, tampered,
                                   or the AAD differs (a foreign ciphertext)
:class:`ProviderRejected`          any other permanent refusal (wrong key type or usage, 400)
=================================  ===========================================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from keygate.core.errors import (
    DecryptionFailed,
    KeyDestroyed,
    KeyNotUsable,
    ProviderRejected,
    ProviderUnavailable,
)
from keygate.core.model import WrapMechanism

__all__ = [
    "KeyStatus",
    "KeyUri",
    "KmsAdapter",
    "ProviderAuthFailed",
    "ProviderCiphertextRejected",
    "ProviderKeyDestroyed",
    "ProviderKeyDisabled",
    "ProviderKeyNotFound",
    "ProviderOptions",
    "ProviderRejected",
    "ProviderTimeout",
    "ProviderUnavailable",
    "outer_wrap_aad",
]


# ---------------------------------------------------------------------------------- errors
class ProviderTimeout(ProviderUnavailable):
    """The provider did not answer within the configured timeout (retryable)."""

    reason: ClassVar[str] = "provider-timeout"


class ProviderAuthFailed(ProviderRejected):
    """The provider refused keygate's credentials (not retryable)."""

    reason: ClassVar[str] = "provider-credentials"


class ProviderKeyNotFound(ProviderRejected):
    """The provider key does not exist (or keygate may not see it)."""

    reason: ClassVar[str] = "provider-key-not-found"


class ProviderKeyDisabled(KeyNotUsable):
    """The provider key is disabled at the provider: 409 KEY_NOT_USABLE."""

    reason: ClassVar[str] = "provider-key-disabled"


class ProviderKeyDestroyed(KeyDestroyed):
    """The provider key is destroyed or pending deletion: 410 KEY_DESTROYED."""

    reason: ClassVar[str] = "provider-key-destroyed"


class ProviderCiphertextRejected(DecryptionFailed):
    """The provider would not unwrap the input: a foreign or tampered ciphertext (422)."""

    reason: ClassVar[str] = "provider-ciphertext-rejected"


# ---------------------------------------------------------------------------------- values
@dataclass(frozen=True, slots=True)
class KeyUri:
    """A parsed provider key URI.

    ``uri`` is the canonical text (what the envelope's wrap layer stores as its key id and what
    the registry keeps); ``region`` is the provider's region / location / zone the key lives in
    (for Vault/OpenBao: ``host:port`` of the server), which the residency policy checks;
    ``parts`` holds whatever the adapter parsed out of it (key name, vault URL, …).
    """

    scheme: str
    uri: str
    region: str
    parts: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """What :meth:`KmsAdapter.describe` learnt about a key (``keygate provider test`` prints it)."""

    uri: str
    enabled: bool
    #: provider's own words for the key state (``Enabled``, ``ENABLED``, ``active``, …)
    state: str
    #: the key's algorithm / spec as the provider names it, when it says
    algorithm: str = ""
    #: region / location the provider reports for the key, when it does
    region: str = ""
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProviderOptions:
    """Settings every adapter honours (``KEYGATE_PROVIDER_*``)."""

    #: connect timeout and read timeout of one call, seconds
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    #: retries of transient failures (timeouts, 5xx, throttling) by the guard; 0 disables
    retries: int = 3
    #: first backoff, doubled per retry, with full jitter, capped at ``backoff_max_s``
    backoff_s: float = 0.2
    backoff_max_s: float = 2.0
    #: after a transient failure that outlived its retries, the provider counts as down and calls
    #: fail fast (503) for this long before one is let through again (half-open)
    down_for_s: float = 5.0


# ---------------------------------------------------------------------------------- adapter
class KmsAdapter(ABC):
    """One cloud KMS.  Thread-safe: one instance serves every key URI of its scheme."""

    #: URI scheme, e.g. ``aws-kms``
    scheme: ClassVar[str]
    #: the wire id written into the envelope's wrap layer
    mechanism: ClassVar[WrapMechanism]
    #: human name for messages: ``AWS KMS``, ``Google Cloud KMS``, …
    display_name: ClassVar[str]
    #: the pip extra that installs the SDK
    extra: ClassVar[str]

    @classmethod
    @abstractmethod
    def parse_uri(cls, uri: str) -> KeyUri:
        """Validate and parse a key URI of this scheme; ``InvalidRequest`` names what is wrong."""

    @abstractmethod
    def wrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        """Encrypt ``data`` (an HSM-wrapped DEK, ≤ 256 bytes) under the provider key.

        ``aad`` is bound where the provider supports it (encryption context, associated data);
        providers without AAD (RSA-OAEP key wrap) ignore it.  Returns the provider's ciphertext,
        as opaque bytes (≤ 2048).
        """

    @abstractmethod
    def unwrap(self, key: KeyUri, data: bytes, *, aad: bytes) -> bytes:
        """Decrypt what :meth:`wrap` returned, with the same ``aad``."""

    @abstractmethod
    def describe(self, key: KeyUri) -> KeyStatus:
        """Read the key's metadata (exists, enabled, algorithm) without wrapping anything."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and connection pools."""


def outer_wrap_aad(tenant: str, purpose: str, version: int) -> bytes:
    """AAD of the provider wrap: binds the wrapped DEK to its key reference at the provider too."""
    return f"keygate/v1 outer\x00{tenant}\x00{purpose}\x00{version}".encode()
