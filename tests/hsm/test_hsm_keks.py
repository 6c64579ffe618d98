"""KEK creation, attributes, lookup and destruction (crypto-shredding), across processes too."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

import keygate.hsm
from keygate.core.errors import ProviderRejected
from keygate.core.model import WrapMechanism
from keygate.hsm import Pkcs11Hsm, SoftHsmToken, kek_id

#: The repository root, so a child interpreter imports this checkout even when not installed.
REPO_ROOT = str(Path(keygate.hsm.__file__).resolve().parents[2])

pytestmark = pytest.mark.hsm


def _find(session: Any, label: str) -> Any:
    return session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)


def test_kek_attributes(raw_session: Callable[[], Any], kek: str) -> None:
    """A KEK is a private, sensitive, never-extractable AES-256 token key for wrapping only."""
    with raw_session() as session:
        key = _find(session, kek)
        assert key.key_type is KeyType.AES
        assert key[Attribute.VALUE_LEN] == 32
        assert key[Attribute.ID] == kek_id(kek)
        expected = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.ALWAYS_SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.NEVER_EXTRACTABLE: True,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.WRAP: True,
            Attribute.UNWRAP: True,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.DERIVE: False,
        }
        assert {attr: key[attr] for attr in expected} == expected


def test_kek_value_cannot_be_read(raw_session: Callable[[], Any], kek: str) -> None:
    """Reading CKA_VALUE of a KEK is refused by the token (CKR_ATTRIBUTE_SENSITIVE)."""
    with raw_session() as session, pytest.raises(pkcs11.AttributeSensitive):
        _ = _find(session, kek)[Attribute.VALUE]


def test_kek_cannot_be_wrapped_out(raw_session: Callable[[], Any], kek: str) -> None:
    """Wrapping a KEK under another key is refused (CKR_KEY_UNEXTRACTABLE)."""
    with raw_session() as session:
        exporter = session.generate_key(KeyType.AES, 256, store=False)
        try:
            with pytest.raises(pkcs11.KeyUnextractable):
                exporter.wrap_key(_find(session, kek), mechanism=Mechanism.AES_KEY_WRAP)
        finally:
            exporter.destroy()


def test_kek_lifecycle(hsm: Pkcs11Hsm) -> None:
    """kek_exists follows create_kek and destroy_kek; a destroyed KEK cannot wrap or unwrap."""
    label = f"test-life-{uuid.uuid4().hex[:12]}"
    assert not hsm.kek_exists(label)
    hsm.create_kek(label)
    assert hsm.kek_exists(label)
    dek = os.urandom(32)
    mechanism, blob = hsm.wrap_dek(label, dek, aad=b"")
    hsm.destroy_kek(label)
    assert not hsm.kek_exists(label)
    with pytest.raises(ProviderRejected, match=label):
        hsm.unwrap_dek(label, mechanism, blob, aad=b"")
    with pytest.raises(ProviderRejected, match=label):
        hsm.wrap_dek(label, dek, aad=b"")


def test_keks_persist_across_adapters(
    hsm: Pkcs11Hsm, adapters: Callable[..., Pkcs11Hsm], kek: str
) -> None:
    """A blob wrapped by one adapter unwraps through another: the KEK lives in the token."""
    dek = os.urandom(32)
    mechanism, blob = hsm.wrap_dek(kek, dek, aad=b"x")
    assert adapters().unwrap_dek(kek, mechanism, blob, aad=b"x") == dek


_DESTROY_IN_CHILD = """
import sys
from keygate.hsm import HsmConfig, Pkcs11Hsm, load_pin
hsm = Pkcs11Hsm(HsmConfig(module_path=sys.argv[1], token_label=sys.argv[2], pin=load_pin()))
hsm.destroy_kek(sys.argv[3])
hsm.close()
"""


def test_destroy_in_another_process_shreds_here_too(
    hsm: Pkcs11Hsm, main_token: SoftHsmToken, kek: str
) -> None:
    """A KEK destroyed by another process can no longer unwrap here, despite the cached handle."""
    dek = os.urandom(32)
    mechanism, blob = hsm.wrap_dek(kek, dek, aad=b"")
    assert hsm.unwrap_dek(kek, mechanism, blob, aad=b"") == dek  # handle now cached
    env = {**os.environ, **main_token.env, "KEYGATE_HSM_PIN": main_token.user_pin}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    env.pop("KEYGATE_HSM_PIN_FILE", None)
    subprocess.run(
        [sys.executable, "-c", _DESTROY_IN_CHILD, main_token.module_path, main_token.label, kek],
        env=env,
        check=True,
        timeout=60,
    )
    with pytest.raises(ProviderRejected, match="no KEK"):
        hsm.unwrap_dek(kek, mechanism, blob, aad=b"")
    assert not hsm.kek_exists(kek)


def test_key_without_wrap_permission_is_rejected(
    raw_session: Callable[[], Any], adapters: Callable[..., Pkcs11Hsm], hsm: Pkcs11Hsm
) -> None:
    """A token key not allowed to wrap or encrypt gives ProviderRejected, not a retry."""
    label = f"test-nowrap-{uuid.uuid4().hex[:12]}"
    with raw_session() as session:
        session.generate_key(
            KeyType.AES,
            256,
            label=label,
            store=True,
            capabilities=pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY,
        )
    try:
        for mechanism in (WrapMechanism.HSM_AES_GCM, WrapMechanism.HSM_AES_KW):
            with pytest.raises(ProviderRejected, match=r"refused wrap.*may not (encrypt|wrap)"):
                adapters(mechanism=mechanism).wrap_dek(label, os.urandom(32), aad=b"")
        hsm.check()
    finally:
        hsm.destroy_kek(label)
