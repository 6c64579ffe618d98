"""Fixtures for the HSM adapter tests.

The process-wide SoftHSM token directory (``softhsm_dir``, exported as ``SOFTHSM2_CONF``) and
``make_token`` come from ``tests/conftest.py``: SoftHSM reads ``SOFTHSM2_CONF`` only at
``C_Initialize``, so the whole test process must share one directory.  Tokens that a test takes
away, logs into with a wrong PIN or creates late get labels of their own, so the shared token
(``hsm``) is never disturbed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pkcs11
import pytest

from keygate.hsm import Pkcs11Hsm, SoftHsmToken

#: Fast reconnects keep the recovery tests short.
RECONNECT_S = 0.05


@pytest.fixture(scope="session")
def main_token(make_token: Callable[[str], SoftHsmToken]) -> SoftHsmToken:
    """The token most tests share."""
    return make_token("kg-main")


@pytest.fixture(scope="session")
def hsm(main_token: SoftHsmToken) -> Iterator[Pkcs11Hsm]:
    """The shared adapter on the main token (auto mechanism)."""
    adapter = Pkcs11Hsm(main_token.hsm_config(reconnect_interval_s=RECONNECT_S))
    yield adapter
    adapter.close()


@pytest.fixture
def adapters(main_token: SoftHsmToken) -> Iterator[Callable[..., Pkcs11Hsm]]:
    """Build extra adapters on the main token; all are closed after the test."""
    made: list[Pkcs11Hsm] = []

    def build(**kwargs: Any) -> Pkcs11Hsm:
        kwargs.setdefault("reconnect_interval_s", RECONNECT_S)
        adapter = Pkcs11Hsm(main_token.hsm_config(**kwargs))
        made.append(adapter)
        return adapter

    yield build
    for adapter in made:
        adapter.close()


@pytest.fixture
def kek(hsm: Pkcs11Hsm) -> Iterator[str]:
    """A fresh KEK on the main token, destroyed after the test."""
    label = f"test-kek-{uuid.uuid4().hex[:12]}"
    hsm.create_kek(label)
    yield label
    if hsm.kek_exists(label):
        hsm.destroy_kek(label)


@pytest.fixture
def raw_session(hsm: Pkcs11Hsm, main_token: SoftHsmToken) -> Callable[[], Any]:
    """Open a plain python-pkcs11 session on the main token, for checks beside the adapter.

    The adapter is connected first, so the process is logged in and the raw session (opened
    without a PIN) inherits the login; closing it does not log the adapter out.
    """

    @contextmanager
    def open_session() -> Iterator[Any]:
        hsm.check()
        token = pkcs11.lib(main_token.module_path).get_token(token_label=main_token.label)
        session = token.open(rw=True)
        try:
            yield session
        finally:
            session.close()

    return open_session
