"""Custodian keys on a PKCS#11 token (ECDSA P-256) and Ed25519 key files."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from custody_support import ACTOR, CHIYODA, Env

from keygate.core.errors import Forbidden, InvalidRequest
from keygate.custody import (
    Ed25519FileSigner,
    Pkcs11Signer,
    approval_message,
    generate_ed25519_file,
    generate_pkcs11_key,
    parse_public_key,
    verify_signature,
)
from keygate.hsm.pkcs11 import Pkcs11Hsm
from keygate.hsm.softhsm import SoftHsmToken


def test_a_custodian_key_on_a_pkcs11_token(
    make_env: Callable[..., Env], make_token: Callable[[str], SoftHsmToken]
) -> None:
    """A P-256 key made on a custodian's own token signs approvals the gateway verifies; a
    second key on the same token is not the custodian's."""
    env = make_env()
    card = make_token("kg-card")
    hsm = Pkcs11Hsm(card.hsm_config())
    try:
        key = generate_pkcs11_key(hsm, "custodian/alice")
        assert key.algorithm == "ecdsa-p256"
        assert hsm.signing_key_exists("custodian/alice")  # on the token, by its label
        with pytest.raises(InvalidRequest, match="already holds"):
            generate_pkcs11_key(hsm, "custodian/alice")
        env.custody.add_custodian(ACTOR, "alice", key.public_key_pem)
        env.enrol("bob")

        signer = Pkcs11Signer(hsm, "custodian/alice")
        assert parse_public_key(signer.public_key_pem()) == key
        req = env.custody.new_request(
            ACTOR, "disable-tenant", {"tenant": CHIYODA}, requester="alice"
        )
        message = approval_message(req, "alice", "approve")
        signature = signer.sign(message)
        assert verify_signature(key, message, signature)
        assert not verify_signature(key, message + b"x", signature)
        assert env.custody.submit(ACTOR, req, signature=signature).approvals == 1

        other = Pkcs11Signer(hsm, "custodian/other")
        generate_pkcs11_key(hsm, "custodian/other")
        forged = other.sign(approval_message(req, "bob", "approve"))
        with pytest.raises(Forbidden):
            env.custody.approve(req.id, "alice", forged)
        with pytest.raises(Forbidden):
            env.custody.approve(req.id, "bob", forged)
        assert env.approve(req, "bob").executed
    finally:
        hsm.close()


def test_ed25519_key_files(tmp_path: Path) -> None:
    """Key files are 0600 PKCS#8 PEM, PBES2-encrypted with a passphrase (OpenSSL reads them),
    never overwritten; a wrong passphrase is a clear error that does not echo it."""
    path = tmp_path / "alice.pem"
    key = generate_ed25519_file(path, b"correct horse")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(InvalidRequest, match="never overwrites"):
        generate_ed25519_file(path, b"other")
    signer = Ed25519FileSigner(path, b"correct horse")
    assert parse_public_key(signer.public_key_pem()) == key
    assert verify_signature(key, b"m", signer.sign(b"m"))
    with pytest.raises(InvalidRequest, match="wrong passphrase") as wrong:
        Ed25519FileSigner(path, b"incorrect horse")
    assert "horse" not in str(wrong.value)
    with pytest.raises(InvalidRequest, match="passphrase-protected"):
        Ed25519FileSigner(path)
    assert "horse" not in repr(signer) and "PRIVATE" not in repr(signer)
    with pytest.raises(TypeError):
        signer.__getstate__()

    openssl = subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-passin", "env:KG_PASS", "-pubout"],
        env={**os.environ, "KG_PASS": "correct horse"},
        capture_output=True,
        text=True,
        check=False,
    )
    if openssl.returncode == 0:  # openssl is optional on the test machine
        assert parse_public_key(openssl.stdout) == key

    plain = tmp_path / "plain.pem"
    generate_ed25519_file(plain, None)
    assert plain.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    with pytest.raises(InvalidRequest, match="has no passphrase"):
        Ed25519FileSigner(plain, b"x")


def test_only_ed25519_and_p256_keys_are_custodian_keys() -> None:
    """RSA and other curves are refused; so is anything that is not a PEM public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    def pem(k: object) -> bytes:
        return k.public_key().public_bytes(  # type: ignore[attr-defined,no-any-return]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    with pytest.raises(InvalidRequest, match="Ed25519 or ECDSA P-256"):
        parse_public_key(pem(rsa.generate_private_key(65537, 2048)))
    with pytest.raises(InvalidRequest, match="Ed25519 or ECDSA P-256"):
        parse_public_key(pem(ec.generate_private_key(ec.SECP384R1())))
    assert parse_public_key(pem(ec.generate_private_key(ec.SECP256R1()))).algorithm == (
        "ecdsa-p256"
    )
    with pytest.raises(InvalidRequest, match="not a PEM PUBLIC KEY"):
        parse_public_key("hello")
