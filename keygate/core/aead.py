"""The only module that imports ``cryptography.hazmat`` (the pyca recipes/hazmat split).

Suite 0x01 (AES256_GCM_HKDF_SHA256_COMMIT):
- the DEK is 32 uniformly random bytes, used directly as the HKDF pseudo-random key
  (RFC 5869 §3.3: the extract step may be skipped for uniformly random input keys);
- data key  = HKDF-Expand-SHA256(DEK, info="keygate/v1 data key", L=32), the AES-256-GCM key;
- commitment = HKDF-Expand-SHA256(DEK, info="keygate/v1 key commitment", L=32), stored in the
  envelope header and compared in constant time before any decryption (as the AWS Encryption SDK's
  committing suites do), so a ciphertext opens under exactly one DEK.
Both derivations run once per DEK, never per record.
"""

from __future__ import annotations

import hmac
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

__all__ = [
    "AESGCM",
    "COMMITMENT_LEN",
    "DEK_LEN",
    "NONCE_LEN",
    "TAG_LEN",
    "InvalidTag",
    "commitment_matches",
    "derive_data_key",
    "derive_key_commitment",
]

DEK_LEN: Final = 32
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
COMMITMENT_LEN: Final = 32

_DATA_KEY_INFO: Final = b"keygate/v1 data key"
_COMMITMENT_INFO: Final = b"keygate/v1 key commitment"


def _expand(dek: bytes, info: bytes) -> bytes:
    if len(dek) != DEK_LEN:
        raise ValueError("a DEK is 32 bytes")
    return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(dek)


def derive_data_key(dek: bytes) -> AESGCM:
    """The AES-256-GCM instance for ``dek`` (suite 0x01)."""
    return AESGCM(_expand(dek, _DATA_KEY_INFO))


def derive_key_commitment(dek: bytes) -> bytes:
    """The 32-byte key commitment for ``dek`` (suite 0x01)."""
    return _expand(dek, _COMMITMENT_INFO)


def commitment_matches(expected: bytes, actual: bytes) -> bool:
    return hmac.compare_digest(expected, actual)
