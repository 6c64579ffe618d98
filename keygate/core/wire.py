"""Envelope v1: the binary layout and its text form.  Every length is bounded.

Binary layout (integers big-endian; see docs/envelope.md for the full description):

    off  size  field
    0    1     format version, 0x01
    1    1     algorithm suite (AlgorithmSuite), 0x01
    2    2     H, the header length in bytes (offset of the nonce)
    4    1+n   tenant: length (1..64) then ASCII
         1+n   purpose: length (1..64) then ASCII
         4     KEK version (1..2^31-1)
         1     wrap chain length C (1..3), innermost layer first
         C×    layer: 1 byte mechanism (WrapMechanism), 2+n key id (0..512 bytes; empty for
               the HSM layer, whose KEK the tenant/purpose/version names; the key URI otherwise)
         2+n   wrapped DEK: length (1..2048) then the output of the outermost layer
         32    DEK key commitment
         0..2  zero padding, so that H is a multiple of 3
    H    12    nonce
    H+12 n+16  AES-256-GCM ciphertext and tag

The text form is ``kg1.`` followed by unpadded base64url of those bytes.  Because H is a multiple
of 3, the first 4·H/3 characters encode the header and the rest encode the nonce, ciphertext and
tag on their own: a text envelope can be rewrapped by replacing its header characters, without
decoding or re-encoding the data part.

Rewrap replaces bytes 0..H-1 only; the nonce, ciphertext and tag are never touched.
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass, field
from typing import Final

from keygate.core.aead import COMMITMENT_LEN, NONCE_LEN, TAG_LEN
from keygate.core.errors import DecryptionFailed, InvalidRequest
from keygate.core.model import (
    MAX_PURPOSE_LEN,
    MAX_TENANT_LEN,
    AlgorithmSuite,
    KeyRef,
    WrapMechanism,
)

__all__ = [
    "FORMAT_VERSION",
    "MAX_CHAIN_LEN",
    "MAX_ENVELOPE_LEN",
    "MAX_HEADER_LEN",
    "MAX_KEY_ID_LEN",
    "MAX_PLAINTEXT_LEN",
    "MAX_WRAPPED_LEN",
    "MIN_ENVELOPE_LEN",
    "TEXT_PREFIX",
    "KeyHeader",
    "WrapLayer",
    "build_header",
    "from_text",
    "parse_header",
    "split_text_header",
    "to_text",
]

FORMAT_VERSION: Final = 0x01
TEXT_PREFIX: Final = "kg1."
MAX_CHAIN_LEN: Final = 3
MAX_KEY_ID_LEN: Final = 512
MAX_WRAPPED_LEN: Final = 2048
MAX_HEADER_LEN: Final = 8192
#: a hard bound of the format; the service applies its own, smaller limit (64 KiB by default)
MAX_PLAINTEXT_LEN: Final = 1 << 20
_MIN_HEADER_LEN: Final = 4 + 2 + 2 + 4 + 1 + 3 + 2 + 1 + COMMITMENT_LEN
MIN_ENVELOPE_LEN: Final = _MIN_HEADER_LEN + NONCE_LEN + TAG_LEN
MAX_ENVELOPE_LEN: Final = MAX_HEADER_LEN + NONCE_LEN + MAX_PLAINTEXT_LEN + TAG_LEN
_MAX_TEXT_LEN: Final = len(TEXT_PREFIX) + (MAX_ENVELOPE_LEN * 4 + 2) // 3

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_VERSION_SUITE_LEN: Final = struct.Struct(">BBH")
_KNOWN_SUITES: Final = frozenset(int(s) for s in AlgorithmSuite)
_KNOWN_MECHANISMS: Final = frozenset(int(m) for m in WrapMechanism)


@dataclass(frozen=True, slots=True)
class WrapLayer:
    """One layer of the wrap chain.  ``key_id`` is empty for the HSM layer."""

    mechanism: WrapMechanism
    key_id: bytes = b""


@dataclass(frozen=True, slots=True)
class KeyHeader:
    """Everything before the nonce: which KEK, how the DEK is wrapped, and its commitment."""

    suite: AlgorithmSuite
    key_ref: KeyRef
    chain: tuple[WrapLayer, ...]
    wrapped_dek: bytes = field(repr=False)
    commitment: bytes = field(repr=False)
    length: int = 0


def _ascii_field(value: str, what: str, limit: int) -> bytes:
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} must be ASCII") from None
    if not 1 <= len(raw) <= limit or b"\x00" in raw:
        raise InvalidRequest(f"{what} must be 1..{limit} ASCII characters")
    return raw


def build_header(
    suite: AlgorithmSuite,
    key_ref: KeyRef,
    chain: tuple[WrapLayer, ...],
    wrapped_dek: bytes,
    commitment: bytes,
) -> bytes:
    """Serialise a key header.  Raises InvalidRequest/ValueError when a field is out of bounds."""
    tenant = _ascii_field(key_ref.tenant, "tenant", MAX_TENANT_LEN)
    purpose = _ascii_field(key_ref.purpose, "purpose", MAX_PURPOSE_LEN)
    if not 1 <= key_ref.version < 2**31:
        raise ValueError("KEK version out of range")
    _check_chain(chain)
    if not 1 <= len(wrapped_dek) <= MAX_WRAPPED_LEN:
        raise ValueError("wrapped DEK length out of range")
    if len(commitment) != COMMITMENT_LEN:
        raise ValueError("commitment must be 32 bytes")
    parts = [
        bytes((len(tenant),)),
        tenant,
        bytes((len(purpose),)),
        purpose,
        _U32.pack(key_ref.version),
        bytes((len(chain),)),
    ]
    for layer in chain:
        parts += [bytes((int(layer.mechanism),)), _U16.pack(len(layer.key_id)), layer.key_id]
    parts += [_U16.pack(len(wrapped_dek)), wrapped_dek, commitment]
    unpadded = 4 + sum(len(p) for p in parts)
    parts.append(b"\x00" * (-unpadded % 3))
    body = b"".join(parts)
    length = 4 + len(body)
    if length > MAX_HEADER_LEN:
        raise ValueError("header too long")
    return _VERSION_SUITE_LEN.pack(FORMAT_VERSION, int(suite), length) + body


def _check_chain(chain: tuple[WrapLayer, ...]) -> None:
    if not 1 <= len(chain) <= MAX_CHAIN_LEN:
        raise ValueError("wrap chain must have 1..3 layers")
    for i, layer in enumerate(chain):
        if (i == 0) != layer.mechanism.is_hsm:
            raise ValueError("the innermost layer, and only it, is the HSM")
        if layer.mechanism.is_hsm and layer.key_id:
            raise ValueError("the HSM layer carries no key id")
        if not layer.mechanism.is_hsm and not 1 <= len(layer.key_id) <= MAX_KEY_ID_LEN:
            raise ValueError("provider key id length out of range")


def split_text_header(text: str) -> tuple[str, int] | None:
    """The header characters of a text envelope and the offset where its data part starts, or
    None when the text cannot be a keygate v1 envelope.  Only the first 8 characters are decoded;
    the header characters themselves are validated by whoever looks them up."""
    if text.__class__ is not str or not text.startswith(TEXT_PREFIX) or len(text) > _MAX_TEXT_LEN:
        return None
    try:
        first = binascii.a2b_base64(
            text[4:12].encode("ascii").translate(_FROM_URLSAFE), strict_mode=True
        )
    except (binascii.Error, UnicodeEncodeError):
        return None
    if len(first) != 6 or first[0] != FORMAT_VERSION:
        return None
    h = first[2] << 8 | first[3]
    if h % 3 or h < _MIN_HEADER_LEN or h > MAX_HEADER_LEN:
        return None
    end = 4 + h // 3 * 4
    if len(text) < end + (NONCE_LEN + TAG_LEN) * 4 // 3:
        return None
    return text[4:end], end


def header_length(envelope: bytes) -> int:
    """Cheap first check of an envelope: version, suite and a header length that fits.

    Returns H.  Raises DecryptionFailed for anything else.
    """
    if len(envelope) < MIN_ENVELOPE_LEN:
        raise DecryptionFailed("envelope too short")
    version, suite, length = _VERSION_SUITE_LEN.unpack_from(envelope)
    if version != FORMAT_VERSION or suite not in _KNOWN_SUITES:
        raise DecryptionFailed("unknown envelope version or suite")
    if not _MIN_HEADER_LEN <= length <= MAX_HEADER_LEN or length + NONCE_LEN + TAG_LEN > len(
        envelope
    ):
        raise DecryptionFailed("bad header length")
    if len(envelope) - length - NONCE_LEN - TAG_LEN > MAX_PLAINTEXT_LEN:
        raise DecryptionFailed("envelope too long")
    return int(length)


def parse_header(envelope: bytes) -> KeyHeader:
    """Parse and fully validate the key header of a binary envelope.

    Every length is checked against its bound and against the header length before it is used;
    the fields must fill the header exactly.  Any problem raises DecryptionFailed (opaque).
    """
    end = header_length(envelope)
    pos = 4
    try:
        tenant, pos = _read_short_ascii(envelope, pos, end, MAX_TENANT_LEN)
        purpose, pos = _read_short_ascii(envelope, pos, end, MAX_PURPOSE_LEN)
        _need(pos + 5, end)
        (version,) = _U32.unpack_from(envelope, pos)
        pos += 4
        if not 1 <= version < 2**31:
            raise DecryptionFailed("bad key version")
        n_layers = envelope[pos]
        pos += 1
        if not 1 <= n_layers <= MAX_CHAIN_LEN:
            raise DecryptionFailed("bad wrap chain length")
        chain: list[WrapLayer] = []
        for _ in range(n_layers):
            _need(pos + 3, end)
            mech_id = envelope[pos]
            if mech_id not in _KNOWN_MECHANISMS:
                raise DecryptionFailed("unknown wrap mechanism")
            (key_id_len,) = _U16.unpack_from(envelope, pos + 1)
            pos += 3
            if key_id_len > MAX_KEY_ID_LEN:
                raise DecryptionFailed("key id too long")
            _need(pos + key_id_len, end)
            chain.append(WrapLayer(WrapMechanism(mech_id), bytes(envelope[pos : pos + key_id_len])))
            pos += key_id_len
        try:
            _check_chain(tuple(chain))
        except ValueError:
            raise DecryptionFailed("bad wrap chain") from None
        _need(pos + 2, end)
        (wrapped_len,) = _U16.unpack_from(envelope, pos)
        pos += 2
        if not 1 <= wrapped_len <= MAX_WRAPPED_LEN:
            raise DecryptionFailed("bad wrapped DEK length")
        _need(pos + wrapped_len + COMMITMENT_LEN, end)
        wrapped = bytes(envelope[pos : pos + wrapped_len])
        pos += wrapped_len
        commitment = bytes(envelope[pos : pos + COMMITMENT_LEN])
        pos += COMMITMENT_LEN
        # Zero padding to a multiple of 3 bytes: exactly as much as needed, nothing else.
        if end % 3 or end - pos != -pos % 3 or any(envelope[pos:end]):
            raise DecryptionFailed("bad header padding")
    except (IndexError, struct.error):
        raise DecryptionFailed("truncated header") from None
    return KeyHeader(
        suite=AlgorithmSuite(envelope[1]),
        key_ref=KeyRef(tenant, purpose, version),
        chain=tuple(chain),
        wrapped_dek=wrapped,
        commitment=commitment,
        length=end,
    )


def _need(pos: int, end: int) -> None:
    if pos > end:
        raise DecryptionFailed("truncated header")


def _read_short_ascii(buf: bytes, pos: int, end: int, limit: int) -> tuple[str, int]:
    _need(pos + 1, end)
    n = buf[pos]
    if not 1 <= n <= limit:
        raise DecryptionFailed("bad field length")
    _need(pos + 1 + n, end)
    raw = bytes(buf[pos + 1 : pos + 1 + n])
    if not raw.isascii() or b"\x00" in raw:
        raise DecryptionFailed("bad field encoding")
    return raw.decode("ascii"), pos + 1 + n


_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")


def to_text(envelope: bytes) -> str:
    """The text form: ``kg1.`` + unpadded base64url."""
    b64 = binascii.b2a_base64(envelope, newline=False).translate(_TO_URLSAFE).rstrip(b"=")
    return TEXT_PREFIX + b64.decode("ascii")


def from_text(text: str) -> bytes:
    """Decode the text form strictly.  Raises DecryptionFailed for anything malformed."""
    if text.__class__ is not str or not text.startswith(TEXT_PREFIX):
        raise DecryptionFailed("not a keygate v1 envelope")
    if len(text) > _MAX_TEXT_LEN:
        raise DecryptionFailed("envelope too long")
    body = text[len(TEXT_PREFIX) :]
    if not body.isascii() or "+" in body or "/" in body or "=" in body:
        raise DecryptionFailed("bad envelope encoding")
    raw = body.encode("ascii").translate(_FROM_URLSAFE)
    pad = -len(raw) % 4
    if pad == 3:
        raise DecryptionFailed("bad envelope encoding")
    try:
        decoded = binascii.a2b_base64(raw + b"=" * pad, strict_mode=True)
    except binascii.Error:
        raise DecryptionFailed("bad envelope encoding") from None
    # strict_mode rejects non-alphabet characters; also reject non-canonical trailing bits so
    # each envelope has exactly one text form.
    if to_text(decoded) != text:
        raise DecryptionFailed("bad envelope encoding")
    return decoded
