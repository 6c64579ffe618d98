"""The package surface and the ``calls`` counter."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest

import keygate.hsm
from keygate.core.errors import DecryptionFailed, ProviderRejected
from keygate.hsm import Pkcs11Hsm

pytestmark = pytest.mark.hsm


def test_exported_members() -> None:
    """keygate.hsm exports a sorted __all__ of public names that all exist."""
    exported = keygate.hsm.__all__
    assert exported == sorted(exported)
    assert all(not name.startswith("_") and hasattr(keygate.hsm, name) for name in exported)
    assert {"HsmConfig", "Pkcs11Hsm", "load_pin", "init_softhsm_token"} <= set(exported)


def test_calls_counts_logical_operations(hsm: Pkcs11Hsm) -> None:
    """calls grows by one per wrap, unwrap, create and destroy, failed ones included."""
    label = f"test-calls-{uuid.uuid4().hex[:12]}"
    start = hsm.calls
    hsm.create_kek(label)
    mechanism, blob = hsm.wrap_dek(label, os.urandom(32), aad=b"")
    hsm.unwrap_dek(label, mechanism, blob, aad=b"")
    with pytest.raises(DecryptionFailed):
        hsm.unwrap_dek(label, mechanism, blob, aad=b"wrong")
    hsm.destroy_kek(label)
    with pytest.raises(ProviderRejected):
        hsm.wrap_dek(label, os.urandom(32), aad=b"")
    assert hsm.calls - start == 6


def test_probes_and_lookups_are_not_counted(hsm: Pkcs11Hsm, kek: str) -> None:
    """check, kek_exists and mechanism do not count as HSM operations."""
    start = hsm.calls
    hsm.check()
    assert hsm.kek_exists(kek)
    _ = hsm.mechanism
    assert hsm.calls == start


def test_closed_adapter_refuses_calls(adapters: Callable[..., Pkcs11Hsm], kek: str) -> None:
    """After close() calls raise RuntimeError; close() may be called again."""
    adapter = adapters()
    adapter.check()
    adapter.close()
    adapter.close()
    with pytest.raises(RuntimeError, match="closed"):
        adapter.wrap_dek(kek, os.urandom(32), aad=b"")


def test_adapter_is_a_context_manager(main_token: object, kek: str, hsm: Pkcs11Hsm) -> None:
    """Leaving a ``with Pkcs11Hsm(...)`` block closes it, and the shared adapter keeps working."""
    with Pkcs11Hsm(hsm.config) as adapter:
        assert adapter.kek_exists(kek)
    with pytest.raises(RuntimeError):
        adapter.check()
    assert hsm.kek_exists(kek)
