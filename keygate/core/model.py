"""Value objects and wire identifiers shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final, NewType

__all__ = [
    "MAX_CONTEXT_KEY_LEN",
    "MAX_CONTEXT_PAIRS",
    "MAX_CONTEXT_VALUE_LEN",
    "MAX_PURPOSE_LEN",
    "MAX_TENANT_LEN",
    "AlgorithmSuite",
    "KeyRef",
    "KeyState",
    "Purpose",
    "TenantId",
    "WrapMechanism",
]

TenantId = NewType("TenantId", str)
Purpose = NewType("Purpose", str)

MAX_TENANT_LEN: Final = 64
MAX_PURPOSE_LEN: Final = 64
MAX_CONTEXT_PAIRS: Final = 32
MAX_CONTEXT_KEY_LEN: Final = 64
MAX_CONTEXT_VALUE_LEN: Final = 1024


class AlgorithmSuite(IntEnum):
    """Stable numeric suite identifiers written into every envelope."""

    #: AES-256-GCM under a data key derived from the DEK with HKDF-SHA256, 96-bit random nonce,
    #: 128-bit tag, HMAC-SHA256 key commitment to the DEK.
    AES256_GCM_HKDF_SHA256_COMMIT = 0x01


class WrapMechanism(IntEnum):
    """How a DEK was wrapped.  Values are written into the envelope's wrap chain."""

    #: PKCS#11 CKM_AES_GCM (C_Encrypt) under the KEK: 12-byte nonce || ciphertext || 16-byte tag,
    #: with the key reference bound as AAD.
    HSM_AES_GCM = 0x01
    #: PKCS#11 CKM_AES_KEY_WRAP, RFC 3394.
    HSM_AES_KW = 0x02
    #: PKCS#11 CKM_AES_KEY_WRAP_PAD as RFC 5649 (SoftHSM's implementation).
    HSM_AES_KWP = 0x03
    # Outer layers: a cloud KMS wraps the already HSM-wrapped DEK (reserved wire ids).
    AWS_KMS = 0x10
    GCP_KMS = 0x11
    AZURE_KEY_VAULT = 0x12
    OCI_VAULT = 0x13
    SAKURA_KMS = 0x14
    VAULT_TRANSIT = 0x15

    @property
    def is_hsm(self) -> bool:
        return self < 0x10


class KeyState(StrEnum):
    ACTIVE = "active"
    DECRYPT_ONLY = "decrypt-only"
    DISABLED = "disabled"
    DESTROYED = "destroyed"

    @property
    def can_encrypt(self) -> bool:
        return self is KeyState.ACTIVE

    @property
    def can_decrypt(self) -> bool:
        return self in (KeyState.ACTIVE, KeyState.DECRYPT_ONLY)


@dataclass(frozen=True, slots=True)
class KeyRef:
    """Names one KEK version: tenant × purpose × version."""

    tenant: str
    purpose: str
    version: int

    def __str__(self) -> str:
        return f"{self.tenant}/{self.purpose}/v{self.version}"
