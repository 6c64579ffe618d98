"""Data keys and the seal/open operations of envelope v1 (Tink KmsEnvelopeAead shape).

A :class:`DataKey` is one unwrapped DEK together with its derived AES-GCM key, its key
commitment and its serialised key header.  It is created once per DEK (new DEK, or a header seen
for the first time) and then seals or opens any number of records without touching the HSM.
"""

from __future__ import annotations

from typing import Any, NoReturn

from keygate.core.aead import (
    COMMITMENT_LEN,
    DEK_LEN,
    NONCE_LEN,
    InvalidTag,
    commitment_matches,
    derive_data_key,
    derive_key_commitment,
)
from keygate.core.errors import DecryptionFailed
from keygate.core.model import AlgorithmSuite, KeyRef
from keygate.core.wire import KeyHeader, WrapLayer, build_header

__all__ = ["DataKey", "inner_wrap_aad"]


def inner_wrap_aad(key_ref: KeyRef) -> bytes:
    """AAD for the HSM wrap of a DEK (when the mechanism takes AAD): binds the key reference."""
    return f"keygate/v1 dek\x00{key_ref.tenant}\x00{key_ref.purpose}\x00{key_ref.version}".encode()


class DataKey:
    """An unwrapped DEK bound to one key header.  Holds secret material: never logged or pickled."""

    __slots__ = (
        "_dek",
        "chain",
        "cipher",
        "commitment",
        "header",
        "header_len",
        "key_ref",
        "suite",
    )

    def __init__(
        self,
        dek: bytes,
        *,
        suite: AlgorithmSuite,
        key_ref: KeyRef,
        chain: tuple[WrapLayer, ...],
        wrapped_dek: bytes,
        commitment: bytes | None = None,
    ) -> None:
        if len(dek) != DEK_LEN:
            raise ValueError("a DEK is 32 bytes")
        own = derive_key_commitment(dek)
        if commitment is not None and not commitment_matches(own, commitment):
            # The header commits to a different DEK: this ciphertext was not made with this key.
            raise DecryptionFailed("key commitment mismatch")
        self._dek = dek
        #: the AES-256-GCM instance under the derived data key (read by the key manager's hot loop)
        self.cipher = derive_data_key(dek)
        self.suite = suite
        self.key_ref = key_ref
        self.chain = chain
        self.commitment = own
        self.header = build_header(suite, key_ref, chain, wrapped_dek, own)
        self.header_len = len(self.header)

    @classmethod
    def from_header(cls, dek: bytes, header: KeyHeader) -> DataKey:
        """The data key for a parsed header; checks the key commitment first."""
        if len(header.commitment) != COMMITMENT_LEN:
            raise DecryptionFailed("bad commitment")
        return cls(
            dek,
            suite=header.suite,
            key_ref=header.key_ref,
            chain=header.chain,
            wrapped_dek=header.wrapped_dek,
            commitment=header.commitment,
        )

    def dek_for_rewrap(self, capability: object) -> bytes:
        """The raw DEK, for wrapping it again under another KEK.  Needs the rewrap capability."""
        if capability is not REWRAP_CAPABILITY:
            raise PermissionError("exporting a DEK needs the rewrap capability")
        return self._dek

    def seal(self, plaintext: bytes, aad: bytes, nonce: bytes) -> bytes:
        """Encrypt one record: header || nonce || ciphertext || tag."""
        return self.header + nonce + self.cipher.encrypt(nonce, plaintext, aad)

    def open(self, envelope: bytes, aad: bytes) -> bytes:
        """Decrypt one record whose header is this key's header (the caller checked that)."""
        h = self.header_len
        try:
            return self.cipher.decrypt(envelope[h : h + NONCE_LEN], envelope[h + NONCE_LEN :], aad)
        except InvalidTag:
            raise DecryptionFailed() from None

    def __repr__(self) -> str:
        return f"DataKey({self.key_ref}, chain={[int(c.mechanism) for c in self.chain]})"

    def __getstate__(self) -> NoReturn:
        raise TypeError("DataKey holds key material and cannot be pickled")

    def __reduce__(self) -> NoReturn:
        raise TypeError("DataKey holds key material and cannot be pickled")

    def __copy__(self) -> Any:
        raise TypeError("DataKey holds key material and cannot be copied")


class _RewrapCapability:
    __slots__ = ()

    def __repr__(self) -> str:
        return "REWRAP_CAPABILITY"


#: Passed to :meth:`DataKey.dek_for_rewrap` by the key manager (Tink ``secret_key_access`` style).
REWRAP_CAPABILITY = _RewrapCapability()
