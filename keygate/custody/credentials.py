"""Custodian credentials: Ed25519 key files and ECDSA P-256 keys on a PKCS#11 token.

A custodian is registered by a public key (PEM ``PUBLIC KEY``, SubjectPublicKeyInfo) and named
by its fingerprint, the SHA-256 (hex) of the SubjectPublicKeyInfo DER.  Two kinds of private key
sign approvals:

``ed25519`` — a key file
    PKCS#8 PEM, written 0600 and refused if the file exists.  With a passphrase it is an
    ``ENCRYPTED PRIVATE KEY`` (PBES2: PBKDF2-HMAC-SHA256 with :data:`PBKDF2_ITERATIONS`
    iterations and a random 16-byte salt, AES-256-CBC), which OpenSSL and ``cryptography`` read
    as they are (``openssl pkey -in FILE``).  keygate writes the PBES2 structure itself because
    ``cryptography``'s ``BestAvailableEncryption`` uses only 2048 PBKDF2 iterations for PKCS#8.
``ecdsa-p256`` — a key pair on a PKCS#11 token (a custodian's smart card or HSM partition)
    Generated on the token (sensitive, never extractable) through
    :class:`keygate.hsm.pkcs11.Pkcs11Hsm`; signs ECDSA P-256 / SHA-256, DER-encoded.

Passphrases, PINs and private keys are never put into an error message, a log line or the audit
trail; signer objects refuse to be pickled and print no key material.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from keygate.core.errors import InvalidRequest

__all__ = [
    "ALGORITHMS",
    "PBKDF2_ITERATIONS",
    "CustodianKey",
    "Ed25519FileSigner",
    "Pkcs11Signer",
    "Signer",
    "fingerprint",
    "generate_ed25519_file",
    "generate_pkcs11_key",
    "key_file_is_encrypted",
    "parse_public_key",
    "verify_signature",
    "write_new_file",
]

#: the custodian key kinds keygate accepts
ALGORITHMS: Final = frozenset({"ed25519", "ecdsa-p256"})
#: PBKDF2-HMAC-SHA256 iterations protecting a key file's passphrase (OWASP 2023: 600,000)
PBKDF2_ITERATIONS: Final = 600_000
_MAX_PEM: Final = 4096

# DER of the object identifiers in an EncryptedPrivateKeyInfo (RFC 8018, RFC 5958)
_OID_PBES2: Final = bytes.fromhex("06092a864886f70d01050d")  # 1.2.840.113549.1.5.13
_OID_PBKDF2: Final = bytes.fromhex("06092a864886f70d01050c")  # 1.2.840.113549.1.5.12
_OID_HMAC_SHA256: Final = bytes.fromhex("06082a864886f70d0209")  # 1.2.840.113549.2.9
_OID_AES256_CBC: Final = bytes.fromhex("060960864801650304012a")  # 2.16.840.1.101.3.4.1.42
_NULL: Final = b"\x05\x00"


@dataclass(frozen=True, slots=True)
class CustodianKey:
    """A custodian's registered public key."""

    algorithm: str
    #: PEM ``PUBLIC KEY`` as keygate re-encodes it (normalised)
    public_key_pem: str
    #: SHA-256 (hex) of the SubjectPublicKeyInfo DER
    fingerprint: str


def fingerprint(spki_der: bytes) -> str:
    return hashlib.sha256(spki_der).hexdigest()


def _load_public(pem: bytes | str) -> Any:
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    if len(data) > _MAX_PEM:
        raise InvalidRequest("the custodian public key is too long for a PEM public key")
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidRequest(
            "the custodian public key is not a PEM PUBLIC KEY (SubjectPublicKeyInfo)"
        ) from None


def parse_public_key(pem: bytes | str) -> CustodianKey:
    """Check and normalise a custodian public key: Ed25519 or ECDSA P-256 only."""
    key = _load_public(pem)
    if isinstance(key, ed25519.Ed25519PublicKey):
        algorithm = "ed25519"
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        algorithm = "ecdsa-p256"
    else:
        raise InvalidRequest("a custodian key must be Ed25519 or ECDSA P-256")
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    text = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    return CustodianKey(algorithm, text, fingerprint(der))


def verify_signature(key: CustodianKey, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``key``'s signature over ``message`` (never raises for bad
    signatures or malformed input)."""
    checked: object = signature
    if not isinstance(checked, bytes) or not 0 < len(checked) <= 256:
        return False
    try:
        public = serialization.load_pem_public_key(key.public_key_pem.encode("ascii"))
        if key.algorithm == "ed25519" and isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, message)
            return True
        if key.algorithm == "ecdsa-p256" and isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            return True
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return False


class Signer(Protocol):
    """Something that signs approvals for one custodian key."""

    algorithm: str

    def public_key_pem(self) -> str: ...
    def sign(self, message: bytes) -> bytes: ...


# -- Ed25519 key files -------------------------------------------------------------------------


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_int(value: int) -> bytes:
    raw = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return _der(0x02, raw)


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def _encrypt_pkcs8(pkcs8_der: bytes, passphrase: bytes, iterations: int) -> bytes:
    """An EncryptedPrivateKeyInfo (PBES2 / PBKDF2-HMAC-SHA256 / AES-256-CBC), DER."""
    salt = secrets.token_bytes(16)
    iv = secrets.token_bytes(16)
    kek = PBKDF2HMAC(hashes.SHA256(), 32, salt, iterations).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(pkcs8_der) + padder.finalize()
    encryptor = Cipher(algorithms.AES(kek), modes.CBC(iv)).encryptor()
    encrypted = encryptor.update(padded) + encryptor.finalize()
    kdf = _seq(
        _OID_PBKDF2,
        _seq(_der(0x04, salt), _der_int(iterations), _seq(_OID_HMAC_SHA256, _NULL)),
    )
    scheme = _seq(_OID_AES256_CBC, _der(0x04, iv))
    return _seq(_seq(_OID_PBES2, _seq(kdf, scheme)), _der(0x04, encrypted))


def _pem(label: str, der: bytes) -> bytes:
    body = base64.b64encode(der).decode("ascii")
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n".encode("ascii")


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600; refuse if it exists (never overwrite a key)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise InvalidRequest(f"{path} exists; keygate never overwrites a key file") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "wb") as stream:
            fd = -1
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    finally:
        if fd >= 0:
            os.close(fd)


def generate_ed25519_file(
    path: Path, passphrase: bytes | None, *, iterations: int = PBKDF2_ITERATIONS
) -> CustodianKey:
    """Generate an Ed25519 key, write it to ``path`` (0600, PKCS#8 PEM, encrypted when a
    passphrase is given) and return its public key."""
    if passphrase is not None and not passphrase:
        raise InvalidRequest("the passphrase is empty")
    private = ed25519.Ed25519PrivateKey.generate()
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if passphrase is None:
        data = _pem("PRIVATE KEY", der)
    else:
        data = _pem("ENCRYPTED PRIVATE KEY", _encrypt_pkcs8(der, passphrase, iterations))
    write_new_file(path, data)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return parse_public_key(pem)


def key_file_is_encrypted(path: Path) -> bool:
    """Whether a key file holds an ``ENCRYPTED PRIVATE KEY`` (needs a passphrase)."""
    try:
        head = path.read_bytes()[:64]
    except OSError as exc:
        raise InvalidRequest(f"cannot read the custodian key file {path}: {exc.strerror}") from None
    return b"ENCRYPTED" in head


class Ed25519FileSigner:
    """Signs with an Ed25519 private key read from a PEM file."""

    algorithm = "ed25519"

    def __init__(self, path: Path, passphrase: bytes | None = None) -> None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidRequest(
                f"cannot read the custodian key file {path}: {exc.strerror}"
            ) from None
        try:
            key = serialization.load_pem_private_key(data, password=passphrase or None)
        except TypeError:
            # cryptography: a passphrase for a plain key, or none for an encrypted one
            need = b"ENCRYPTED" in data[:64]
            raise InvalidRequest(
                f"the custodian key file {path} "
                + ("is passphrase-protected: give its passphrase" if need else "has no passphrase")
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            raise InvalidRequest(
                f"cannot open the custodian key file {path}: wrong passphrase, or not a PEM "
                "private key"
            ) from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise InvalidRequest(f"the custodian key file {path} does not hold an Ed25519 key")
        self._key = key
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Ed25519FileSigner({str(self.path)!r})"

    def __getstate__(self) -> NoReturn:
        raise TypeError("a custodian signer holds a private key and cannot be pickled")

    def public_key_pem(self) -> str:
        return (
            self._key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


# -- PKCS#11 -----------------------------------------------------------------------------------


class _TokenSigner(Protocol):
    def create_signing_key(self, label: str) -> None: ...
    def signing_key_exists(self, label: str) -> bool: ...
    def sign(self, label: str, data: bytes) -> bytes: ...
    def public_key_pem(self, label: str) -> bytes: ...


def generate_pkcs11_key(hsm: _TokenSigner, label: str) -> CustodianKey:
    """Generate an ECDSA P-256 key pair labelled ``label`` on the token; its public key."""
    if hsm.signing_key_exists(label):
        raise InvalidRequest(f"the token already holds a signing key labelled {label!r}")
    hsm.create_signing_key(label)
    return parse_public_key(hsm.public_key_pem(label))


class Pkcs11Signer:
    """Signs with the ECDSA P-256 key labelled ``label`` on a PKCS#11 token (the private key
    never leaves the token)."""

    algorithm = "ecdsa-p256"

    def __init__(self, hsm: _TokenSigner, label: str) -> None:
        self._hsm = hsm
        self.label = label

    def __repr__(self) -> str:
        return f"Pkcs11Signer(label={self.label!r})"

    def __getstate__(self) -> NoReturn:
        raise TypeError("a custodian signer holds an HSM session and cannot be pickled")

    def public_key_pem(self) -> str:
        if not self._hsm.signing_key_exists(self.label):
            raise InvalidRequest(f"the token holds no signing key labelled {self.label!r}")
        return parse_public_key(self._hsm.public_key_pem(self.label)).public_key_pem

    def sign(self, message: bytes) -> bytes:
        return self._hsm.sign(self.label, message)
