"""The exception tree.  Every error keygate raises carries a stable ``code``.

Messages name key references, providers, operations and request ids; never plaintext, DEKs, PINs,
tokens or credentials.  The API maps ``code`` to an HTTP status in one table (``api/errors.py``);
the CLI maps it to an exit code.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfigurationError",
    "DecryptionFailed",
    "Forbidden",
    "GatewayError",
    "InvalidRequest",
    "InvalidTenant",
    "KeyDestroyed",
    "KeyNotUsable",
    "NotFound",
    "PayloadTooLarge",
    "PolicyDenied",
    "ProviderError",
    "ProviderRejected",
    "ProviderUnavailable",
    "Unauthenticated",
    "Unavailable",
    "ValidationFailed",
]


class GatewayError(Exception):
    """Base of every error keygate raises on purpose."""

    code: ClassVar[str] = "INTERNAL"
    #: a short, fixed, human title (problem+json ``title``)
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.retry_after = retry_after


class InvalidRequest(GatewayError):
    code = "INVALID_REQUEST"
    title = "Invalid request"


class InvalidTenant(InvalidRequest):
    code = "INVALID_TENANT"
    title = "Invalid tenant"


class PayloadTooLarge(InvalidRequest):
    code = "PAYLOAD_TOO_LARGE"
    title = "Payload too large"


class ValidationFailed(InvalidRequest):
    """A record field fails its policy validation; ``detail`` names the field, never its value."""

    code = "VALIDATION_FAILED"
    title = "Validation failed"


class Unauthenticated(GatewayError):
    code = "UNAUTHENTICATED"
    title = "Unauthenticated"


class Forbidden(GatewayError):
    code = "FORBIDDEN"
    title = "Forbidden"


class PolicyDenied(Forbidden):
    """Tenant scope, residency or sovereignty policy refused the call; the reason goes to audit."""


class NotFound(GatewayError):
    code = "NOT_FOUND"
    title = "Not found"


class KeyNotUsable(GatewayError):
    """The key version is disabled, or decrypt-only and the call would encrypt."""

    code = "KEY_NOT_USABLE"
    title = "Key not usable"


class KeyDestroyed(GatewayError):
    code = "KEY_DESTROYED"
    title = "Key destroyed"


class DecryptionFailed(GatewayError):
    """Opaque on purpose: a bad tag, a bad header and a wrong key look the same from outside."""

    code = "DECRYPTION_FAILED"
    title = "Decryption failed"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or "the ciphertext could not be decrypted")


class Unavailable(GatewayError):
    """HSM, provider, registry or audit trail unavailable; retryable."""

    code = "UNAVAILABLE"
    title = "Service unavailable"


class ProviderError(Unavailable):
    """A key provider (HSM or cloud KMS) failed; the cause is chained."""


class ProviderUnavailable(ProviderError):
    """Retryable: timeouts, 5xx, token removed."""


class ProviderRejected(ProviderError):
    """Not retryable: authentication, permission, wrong key type."""


class ConfigurationError(GatewayError):
    code = "CONFIGURATION"
    title = "Configuration error"
