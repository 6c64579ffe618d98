"""Bad blobs, wrong AAD, wrong or unknown KEKs: DecryptionFailed or ProviderRejected."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keygate.core.errors import DecryptionFailed, ProviderRejected
from keygate.core.model import WrapMechanism
from keygate.hsm import Pkcs11Hsm

pytestmark = pytest.mark.hsm

HSM_MECHANISMS = [
    WrapMechanism.HSM_AES_GCM,
    WrapMechanism.HSM_AES_KWP,
    WrapMechanism.HSM_AES_KW,
]


def _flip(blob: bytes, index: int) -> bytes:
    changed = bytearray(blob)
    changed[index] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize("mechanism", HSM_MECHANISMS, ids=lambda m: m.name)
def test_flipping_any_byte_fails(
    adapters: Callable[..., Pkcs11Hsm], kek: str, mechanism: WrapMechanism
) -> None:
    """Flipping any single bit-position byte of a blob (IV, body or tag) gives DecryptionFailed."""
    adapter = adapters(mechanism=mechanism)
    _, blob = adapter.wrap_dek(kek, os.urandom(32), aad=b"ctx")
    for index in range(len(blob)):
        with pytest.raises(DecryptionFailed):
            adapter.unwrap_dek(kek, mechanism, _flip(blob, index), aad=b"ctx")


@pytest.mark.parametrize("mechanism", HSM_MECHANISMS, ids=lambda m: m.name)
def test_truncated_or_extended_blob_fails_without_calling_the_token(
    adapters: Callable[..., Pkcs11Hsm], kek: str, mechanism: WrapMechanism
) -> None:
    """A blob of the wrong length is DecryptionFailed before any token call."""
    adapter = adapters(mechanism=mechanism)
    _, blob = adapter.wrap_dek(kek, os.urandom(32), aad=b"")
    calls = adapter.calls
    for bad in (b"", blob[:-1], blob[:8], blob + b"\0"):
        with pytest.raises(DecryptionFailed):
            adapter.unwrap_dek(kek, mechanism, bad, aad=b"")
    assert adapter.calls == calls


def test_wrong_aad_fails_for_gcm(hsm: Pkcs11Hsm, kek: str) -> None:
    """A GCM blob unwrapped with another AAD is DecryptionFailed (SoftHSM: CKR_GENERAL_ERROR)."""
    mechanism, blob = hsm.wrap_dek(kek, os.urandom(32), aad=b"131016/resident/v1")
    for aad in (b"131016/resident/v2", b"", b"131016/resident/v1\0"):
        with pytest.raises(DecryptionFailed):
            hsm.unwrap_dek(kek, mechanism, blob, aad=aad)


def test_session_still_works_after_a_failed_unwrap(hsm: Pkcs11Hsm, kek: str) -> None:
    """A DecryptionFailed does not break the session: the next unwrap succeeds."""
    dek = os.urandom(32)
    mechanism, blob = hsm.wrap_dek(kek, dek, aad=b"a")
    with pytest.raises(DecryptionFailed):
        hsm.unwrap_dek(kek, mechanism, blob, aad=b"b")
    assert hsm.unwrap_dek(kek, mechanism, blob, aad=b"a") == dek
    hsm.check()


@pytest.mark.parametrize("mechanism", HSM_MECHANISMS, ids=lambda m: m.name)
def test_blob_under_another_kek_fails(
    adapters: Callable[..., Pkcs11Hsm], hsm: Pkcs11Hsm, kek: str, mechanism: WrapMechanism
) -> None:
    """A blob wrapped by one tenant's KEK does not unwrap under another existing KEK."""
    adapter = adapters(mechanism=mechanism)
    other = f"test-other-{uuid.uuid4().hex[:12]}"
    hsm.create_kek(other)
    try:
        _, blob = adapter.wrap_dek(kek, os.urandom(32), aad=b"ctx")
        with pytest.raises(DecryptionFailed):
            adapter.unwrap_dek(other, mechanism, blob, aad=b"ctx")
    finally:
        hsm.destroy_kek(other)


def test_unknown_label_is_rejected_by_name(hsm: Pkcs11Hsm) -> None:
    """Wrap, unwrap and destroy with an unknown label raise ProviderRejected naming the label."""
    label = "tenant-999999/resident/v1"
    with pytest.raises(ProviderRejected, match="999999"):
        hsm.wrap_dek(label, os.urandom(32), aad=b"")
    with pytest.raises(ProviderRejected, match="999999"):
        hsm.unwrap_dek(label, WrapMechanism.HSM_AES_GCM, b"\0" * 60, aad=b"")
    with pytest.raises(ProviderRejected, match="999999"):
        hsm.destroy_kek(label)
    assert hsm.kek_exists(label) is False


def test_creating_an_existing_label_is_rejected(hsm: Pkcs11Hsm, kek: str) -> None:
    """create_kek refuses a label that already exists (labels must stay unambiguous)."""
    with pytest.raises(ProviderRejected, match="already exists"):
        hsm.create_kek(kek)


@pytest.mark.parametrize("label", ["", "x" * 129, "bad\nlabel"])
def test_invalid_labels_are_programming_errors(hsm: Pkcs11Hsm, label: str) -> None:
    """Empty, overlong or non-printable labels are ValueError."""
    with pytest.raises(ValueError, match="label"):
        hsm.kek_exists(label)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_garbage_never_unwraps(hsm: Pkcs11Hsm, kek: str, data: st.DataObject) -> None:
    """Random 60-byte GCM and 40-byte KW/KWP blobs are DecryptionFailed, never a DEK."""
    mechanism = data.draw(st.sampled_from(HSM_MECHANISMS))
    size = 60 if mechanism is WrapMechanism.HSM_AES_GCM else 40
    blob = data.draw(st.binary(min_size=size, max_size=size))
    with pytest.raises(DecryptionFailed):
        hsm.unwrap_dek(kek, mechanism, blob, aad=b"")
