"""Wrap and unwrap round trips, mechanism selection, and byte equality with pyca/cryptography."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap, aes_key_wrap_with_padding
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from keygate.core.errors import ConfigurationError, ProviderRejected
from keygate.core.model import WrapMechanism
from keygate.hsm import Pkcs11Hsm
from keygate.hsm import pkcs11 as hsm_module

pytestmark = pytest.mark.hsm

HSM_MECHANISMS = [
    WrapMechanism.HSM_AES_GCM,
    WrapMechanism.HSM_AES_KWP,
    WrapMechanism.HSM_AES_KW,
]
BLOB_LEN = {
    WrapMechanism.HSM_AES_GCM: 12 + 32 + 16,
    WrapMechanism.HSM_AES_KWP: 40,
    WrapMechanism.HSM_AES_KW: 40,
}


def test_auto_selects_gcm_on_softhsm(hsm: Pkcs11Hsm) -> None:
    """With no mechanism configured, SoftHSM (which does CKM_AES_GCM) negotiates HSM_AES_GCM."""
    assert hsm.mechanism is WrapMechanism.HSM_AES_GCM


@pytest.mark.parametrize("mechanism", HSM_MECHANISMS, ids=lambda m: m.name)
def test_round_trip_with_pinned_mechanism(
    adapters: Callable[..., Pkcs11Hsm], kek: str, mechanism: WrapMechanism
) -> None:
    """A pinned mechanism is used for wrapping, and its blob unwraps to the same DEK."""
    adapter = adapters(mechanism=mechanism)
    dek = os.urandom(32)
    used, blob = adapter.wrap_dek(kek, dek, aad=b"131016/resident/v1")
    assert used is mechanism
    assert adapter.mechanism is mechanism
    assert len(blob) == BLOB_LEN[mechanism]
    assert dek not in blob
    assert adapter.unwrap_dek(kek, used, blob, aad=b"131016/resident/v1") == dek


@pytest.mark.parametrize("mechanism", HSM_MECHANISMS, ids=lambda m: m.name)
def test_any_adapter_unwraps_every_supported_mechanism(
    hsm: Pkcs11Hsm, adapters: Callable[..., Pkcs11Hsm], kek: str, mechanism: WrapMechanism
) -> None:
    """The auto adapter unwraps blobs made with any mechanism the token supports."""
    dek = os.urandom(32)
    _, blob = adapters(mechanism=mechanism).wrap_dek(kek, dek, aad=b"ctx")
    assert hsm.unwrap_dek(kek, mechanism, blob, aad=b"ctx") == dek


def test_gcm_uses_a_fresh_iv_every_time(hsm: Pkcs11Hsm, kek: str) -> None:
    """Wrapping the same DEK twice with GCM gives different IVs and different blobs."""
    dek = os.urandom(32)
    blobs = {hsm.wrap_dek(kek, dek, aad=b"a")[1] for _ in range(20)}
    assert len(blobs) == 20
    assert len({blob[:12] for blob in blobs}) == 20


def test_key_wrap_is_deterministic(adapters: Callable[..., Pkcs11Hsm], kek: str) -> None:
    """RFC 3394 wrap of the same DEK under the same KEK gives the same bytes (no IV)."""
    adapter = adapters(mechanism=WrapMechanism.HSM_AES_KW)
    dek = os.urandom(32)
    assert adapter.wrap_dek(kek, dek, aad=b"x")[1] == adapter.wrap_dek(kek, dek, aad=b"y")[1]


def test_key_wrap_does_not_bind_aad(adapters: Callable[..., Pkcs11Hsm], kek: str) -> None:
    """KW/KWP do not bind the AAD (documented): a different AAD still unwraps."""
    for mechanism in (WrapMechanism.HSM_AES_KW, WrapMechanism.HSM_AES_KWP):
        adapter = adapters(mechanism=mechanism)
        dek = os.urandom(32)
        _, blob = adapter.wrap_dek(kek, dek, aad=b"one")
        assert adapter.unwrap_dek(kek, mechanism, blob, aad=b"other") == dek


def test_accepts_bytearray_and_memoryview(hsm: Pkcs11Hsm, kek: str) -> None:
    """At run time DEK, AAD and blob may also be bytearray or memoryview (typed as bytes)."""
    dek = os.urandom(32)
    wrap_args: list[Any] = [bytearray(dek), memoryview(b"ctx")]
    mechanism, blob = hsm.wrap_dek(kek, wrap_args[0], aad=wrap_args[1])
    unwrap_args: list[Any] = [memoryview(blob), bytearray(b"ctx")]
    assert hsm.unwrap_dek(kek, mechanism, unwrap_args[0], aad=unwrap_args[1]) == dek


def test_wrong_dek_length_is_a_programming_error(hsm: Pkcs11Hsm, kek: str) -> None:
    """A DEK that is not 32 bytes is refused with ValueError before the token is called."""
    calls = hsm.calls
    with pytest.raises(ValueError, match="32 bytes"):
        hsm.wrap_dek(kek, os.urandom(16), aad=b"")
    assert hsm.calls == calls


def test_non_hsm_mechanism_is_refused(hsm: Pkcs11Hsm, kek: str) -> None:
    """Unwrapping with a cloud-KMS wrap id is a routing error, not an HSM call."""
    with pytest.raises(ValueError, match="not an HSM wrap mechanism"):
        hsm.unwrap_dek(kek, WrapMechanism.AWS_KMS, b"\0" * 40, aad=b"")


def test_pinning_a_non_hsm_mechanism_is_a_configuration_error(main_token: Any) -> None:
    """HsmConfig refuses a wrap mechanism that is not one of the three HSM ones."""
    with pytest.raises(ConfigurationError, match="HSM mechanism"):
        main_token.hsm_config(mechanism=WrapMechanism.AWS_KMS)


# -- mechanism negotiation ----------------------------------------------------------------------


@pytest.fixture
def without_gcm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend CKM_AES_GCM is implemented by a mechanism SoftHSM does not list."""
    candidates = dict(hsm_module._CANDIDATES)
    candidates[WrapMechanism.HSM_AES_GCM] = (Mechanism.AES_CCM,)
    monkeypatch.setattr(hsm_module, "_CANDIDATES", candidates)


@pytest.fixture
def without_gcm_and_kwp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Also pretend RFC 5649 needs CKM_AES_KEY_WRAP_KWP (v3.0), which SoftHSM 2.6 lacks."""
    candidates = dict(hsm_module._CANDIDATES)
    candidates[WrapMechanism.HSM_AES_GCM] = (Mechanism.AES_CCM,)
    candidates[WrapMechanism.HSM_AES_KWP] = (Mechanism.AES_KEY_WRAP_KWP,)
    monkeypatch.setattr(hsm_module, "_CANDIDATES", candidates)


@pytest.mark.usefixtures("without_gcm")
def test_auto_falls_back_to_kwp_without_gcm(adapters: Callable[..., Pkcs11Hsm], kek: str) -> None:
    """When the token cannot do GCM, auto-selection picks RFC 5649 key wrap."""
    adapter = adapters()
    assert adapter.mechanism is WrapMechanism.HSM_AES_KWP
    dek = os.urandom(32)
    mechanism, blob = adapter.wrap_dek(kek, dek, aad=b"")
    assert mechanism is WrapMechanism.HSM_AES_KWP
    assert adapter.unwrap_dek(kek, mechanism, blob, aad=b"") == dek


@pytest.mark.usefixtures("without_gcm_and_kwp")
def test_auto_falls_back_to_kw_without_gcm_and_kwp(
    adapters: Callable[..., Pkcs11Hsm], kek: str
) -> None:
    """When the token can do neither GCM nor RFC 5649, auto-selection picks RFC 3394."""
    adapter = adapters()
    assert adapter.mechanism is WrapMechanism.HSM_AES_KW


@pytest.mark.usefixtures("without_gcm")
def test_pinning_an_unsupported_mechanism_is_a_configuration_error(
    adapters: Callable[..., Pkcs11Hsm], kek: str
) -> None:
    """Pinning a mechanism the token cannot do raises ConfigurationError at connect, not init.

    Within the reconnect back-off the same ConfigurationError is raised again, not a retryable
    ProviderUnavailable.
    """
    adapter = adapters(mechanism=WrapMechanism.HSM_AES_GCM, reconnect_interval_s=30.0)
    for _ in range(2):
        with pytest.raises(ConfigurationError, match="HSM_AES_GCM") as info:
            adapter.wrap_dek(kek, os.urandom(32), aad=b"")
        assert "supported: HSM_AES_KWP, HSM_AES_KW" in str(info.value)


@pytest.mark.usefixtures("without_gcm")
def test_unwrap_with_a_mechanism_the_token_lacks_is_rejected(
    adapters: Callable[..., Pkcs11Hsm], kek: str
) -> None:
    """A GCM blob given to a token without GCM is ProviderRejected, naming the mechanism."""
    adapter = adapters()
    with pytest.raises(ProviderRejected, match="HSM_AES_GCM"):
        adapter.unwrap_dek(kek, WrapMechanism.HSM_AES_GCM, b"\0" * 60, aad=b"")


# -- byte equality with pyca/cryptography (test-only extractable KEK of known value) ------------


@pytest.fixture
def known_kek(raw_session: Callable[[], Any], hsm: Pkcs11Hsm) -> Iterator[tuple[str, bytes]]:
    """A token KEK imported with a known value, extractable, for this check only."""
    label = f"test-known-{uuid.uuid4().hex[:12]}"
    value = os.urandom(32)
    with raw_session() as session:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: value,
                Attribute.LABEL: label,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: False,
                Attribute.EXTRACTABLE: True,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.WRAP: True,
                Attribute.UNWRAP: True,
            }
        )
    yield label, value
    hsm.destroy_kek(label)


def test_rfc3394_bytes_match_cryptography(
    adapters: Callable[..., Pkcs11Hsm], known_kek: tuple[str, bytes]
) -> None:
    """HSM_AES_KW output equals cryptography's aes_key_wrap, and its output unwraps in the HSM."""
    label, value = known_kek
    adapter = adapters(mechanism=WrapMechanism.HSM_AES_KW)
    dek = os.urandom(32)
    assert adapter.wrap_dek(label, dek, aad=b"")[1] == aes_key_wrap(value, dek)
    other = os.urandom(32)
    blob = aes_key_wrap(value, other)
    assert adapter.unwrap_dek(label, WrapMechanism.HSM_AES_KW, blob, aad=b"") == other


def test_rfc5649_bytes_match_cryptography(
    adapters: Callable[..., Pkcs11Hsm], known_kek: tuple[str, bytes]
) -> None:
    """HSM_AES_KWP output equals aes_key_wrap_with_padding (RFC 5649), both ways."""
    label, value = known_kek
    adapter = adapters(mechanism=WrapMechanism.HSM_AES_KWP)
    dek = os.urandom(32)
    blob = adapter.wrap_dek(label, dek, aad=b"")[1]
    assert blob == aes_key_wrap_with_padding(value, dek)
    assert blob != aes_key_wrap(value, dek)  # RFC 5649's IV differs from RFC 3394's
    other = os.urandom(32)
    incoming = aes_key_wrap_with_padding(value, other)
    assert adapter.unwrap_dek(label, WrapMechanism.HSM_AES_KWP, incoming, aad=b"") == other


def test_gcm_bytes_match_cryptography(hsm: Pkcs11Hsm, known_kek: tuple[str, bytes]) -> None:
    """HSM_AES_GCM output is iv || AES-256-GCM(dek, aad) as cryptography computes it, both ways."""
    label, value = known_kek
    dek = os.urandom(32)
    _, blob = hsm.wrap_dek(label, dek, aad=b"tenant/purpose/v1")
    iv, body = blob[:12], blob[12:]
    assert body == AESGCM(value).encrypt(iv, dek, b"tenant/purpose/v1")
    other = os.urandom(32)
    nonce = os.urandom(12)
    incoming = nonce + AESGCM(value).encrypt(nonce, other, b"ctx")
    assert hsm.unwrap_dek(label, WrapMechanism.HSM_AES_GCM, incoming, aad=b"ctx") == other


@pytest.mark.parametrize(
    "ckm", [Mechanism.AES_KEY_WRAP, Mechanism.AES_KEY_WRAP_PAD], ids=lambda m: m.name
)
def test_softhsm_refuses_key_wrap_in_c_encrypt(raw_session: Callable[[], Any], ckm: Any) -> None:
    """SoftHSM 2.6 allows AES key wrap only in C_WrapKey, which is why KW/KWP use key objects.

    If this starts failing after a SoftHSM upgrade, C_Encrypt could replace the session objects.
    """
    with raw_session() as session:
        key = session.generate_key(KeyType.AES, 256, store=False)
        try:
            with pytest.raises(pkcs11.MechanismInvalid):
                key.encrypt(os.urandom(32), mechanism=ckm)
        finally:
            key.destroy()
