"""The audit trail's HSM keys: ECDSA P-256 checkpoint signing and the record-id HMAC key."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterator

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pkcs11 import Attribute, ObjectClass

from keygate.audit.pseudonym import record_ref_input
from keygate.core.errors import ProviderRejected
from keygate.hsm import Pkcs11Hsm, SoftHsmToken


@pytest.fixture(scope="module")
def hsm(audit_token: SoftHsmToken) -> Iterator[Pkcs11Hsm]:
    """An adapter on this module's token."""
    adapter = Pkcs11Hsm(audit_token.hsm_config())
    yield adapter
    adapter.close()


def _label(kind: str) -> str:
    return f"kg/test-{kind}-{uuid.uuid4().hex[:8]}"


def test_signature_verifies_with_cryptography(hsm: Pkcs11Hsm) -> None:
    """`sign` returns a DER ECDSA-SHA256 signature that verifies with the printed PEM."""
    label = _label("signing")
    hsm.create_signing_key(label)
    assert hsm.signing_key_exists(label)
    key = load_pem_public_key(hsm.public_key_pem(label))
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    signature = hsm.sign(label, "監査 checkpoint".encode())
    key.verify(signature, "監査 checkpoint".encode(), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.verify(signature, b"something else", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(ProviderRejected):
        hsm.create_signing_key(label)  # never a second key under one label


def test_audit_keys_are_not_extractable(hsm: Pkcs11Hsm, audit_token: SoftHsmToken) -> None:
    """The signing private key and the HMAC key are sensitive and not extractable."""
    signing, mac = _label("signing"), _label("hmac")
    hsm.create_signing_key(signing)
    hsm.create_hmac_key(mac)
    lib = pkcs11.lib(audit_token.module_path)
    # Under the adapter's module lock (one thread in the token at a time); the session inherits
    # the adapter's login.
    with hsm._module.lock, lib.get_token(token_label=audit_token.label).open() as s:
        for cls, label in ((ObjectClass.PRIVATE_KEY, signing), (ObjectClass.SECRET_KEY, mac)):
            key = s.get_key(object_class=cls, label=label)
            assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                key[Attribute.VALUE]


def test_hmac_is_deterministic_and_tenant_bound(hsm: Pkcs11Hsm) -> None:
    """The pseudonym HMAC is stable for one input and differs across tenants and keys."""
    label, other = _label("hmac"), _label("hmac")
    hsm.create_hmac_key(label)
    hsm.create_hmac_key(other)
    data = record_ref_input("131016", "R-000123")
    assert data == b"131016\x00R-000123"
    first = hsm.hmac_sha256(label, data)
    assert len(first) == 32 and first == hsm.hmac_sha256(label, data)
    assert first != hsm.hmac_sha256(label, record_ref_input("011002", "R-000123"))
    assert first != hsm.hmac_sha256(other, data)
    assert first != hmac.new(b"", data, hashlib.sha256).digest()
    with pytest.raises(ValueError, match="NUL"):
        record_ref_input("131016", "R\x00")
