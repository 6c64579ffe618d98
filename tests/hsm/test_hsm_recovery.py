"""Token loss and return, late tokens, missing modules: ProviderUnavailable, then self-healing.

Token loss is simulated by moving the token's folder out of SoftHSM's token store and back
(``SoftHsmToken.detach``/``attach``): while it is away SoftHSM stops answering for it
(``C_GetTokenInfo`` fails, object handles turn invalid) and, once the adapter re-initialises the
module, no longer lists it; after it returns, a re-initialisation finds it again with its keys.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

import pytest

from keygate.core.errors import ProviderUnavailable
from keygate.core.model import WrapMechanism
from keygate.hsm import HsmConfig, Pkcs11Hsm, SoftHsmToken, init_softhsm_token

pytestmark = pytest.mark.hsm

RECONNECT_S = 0.05


def _eventually(action: Callable[[], object], timeout: float = 3.0) -> object:
    """Retry ``action`` while it raises ProviderUnavailable, up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except ProviderUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(RECONNECT_S / 2)


@pytest.fixture
def away_token(make_token: Callable[[str], SoftHsmToken]) -> SoftHsmToken:
    """A token of its own, so taking it away does not disturb the shared one."""
    return make_token("kg-away")


@pytest.fixture
def away_hsm(away_token: SoftHsmToken) -> Iterator[Pkcs11Hsm]:
    """An adapter on the token that will be taken away."""
    adapter = Pkcs11Hsm(away_token.hsm_config(reconnect_interval_s=RECONNECT_S))
    yield adapter
    adapter.close()


def test_token_away_then_back(away_token: SoftHsmToken, away_hsm: Pkcs11Hsm) -> None:
    """While the token is away every call is ProviderUnavailable; after it returns all works."""
    away_hsm.create_kek("kek")
    dek = os.urandom(32)
    mechanism, blob = away_hsm.wrap_dek("kek", dek, aad=b"a")

    with away_token.detached():
        calls: list[Callable[[], object]] = [
            lambda: away_hsm.wrap_dek("kek", dek, aad=b"a"),
            lambda: away_hsm.unwrap_dek("kek", mechanism, blob, aad=b"a"),
            lambda: away_hsm.kek_exists("kek"),
            away_hsm.check,
            lambda: away_hsm.mechanism,
        ]
        for call in calls * 2:  # first against the live session, then against reconnects
            with pytest.raises(ProviderUnavailable) as info:
                call()
            assert info.value.retry_after == pytest.approx(1.0)
            assert away_token.label in str(info.value)
            time.sleep(RECONNECT_S)

    _eventually(away_hsm.check)
    assert away_hsm.unwrap_dek("kek", mechanism, blob, aad=b"a") == dek
    assert away_hsm.kek_exists("kek")
    new_mechanism, new_blob = away_hsm.wrap_dek("kek", dek, aad=b"b")
    assert away_hsm.unwrap_dek("kek", new_mechanism, new_blob, aad=b"b") == dek


def test_wrong_label_while_away_is_not_reported_as_missing(
    away_token: SoftHsmToken, away_hsm: Pkcs11Hsm
) -> None:
    """An empty KEK search while the token is away is ProviderUnavailable, not 'no such KEK'."""
    away_hsm.check()
    with away_token.detached(), pytest.raises(ProviderUnavailable):
        away_hsm.kek_exists("never-created")


def test_other_adapters_survive_a_reinitialisation(
    away_token: SoftHsmToken, away_hsm: Pkcs11Hsm, hsm: Pkcs11Hsm, kek: str
) -> None:
    """Re-initialising the module for one token does not make calls on another token fail."""
    dek = os.urandom(32)
    mechanism, blob = hsm.wrap_dek(kek, dek, aad=b"")
    away_hsm.check()
    with away_token.detached():
        for _ in range(3):  # each attempt re-initialises the module
            with pytest.raises(ProviderUnavailable):
                away_hsm.check()
            time.sleep(RECONNECT_S)
            assert hsm.unwrap_dek(kek, mechanism, blob, aad=b"") == dek
    _eventually(away_hsm.check)
    assert hsm.unwrap_dek(kek, mechanism, blob, aad=b"") == dek


def test_token_that_appears_later_is_found(softhsm_dir: object, main_token: SoftHsmToken) -> None:
    """An adapter built before its token exists fails softly, then works once it is created."""
    label = f"kg-late-{os.urandom(4).hex()}"
    adapter = Pkcs11Hsm(
        HsmConfig(
            module_path=main_token.module_path,
            token_label=label,
            pin="late-user-pin",
            reconnect_interval_s=RECONNECT_S,
        )
    )
    try:
        with pytest.raises(ProviderUnavailable, match="not found"):
            adapter.check()
        time.sleep(RECONNECT_S)
        with pytest.raises(ProviderUnavailable):
            _ = adapter.mechanism
        init_softhsm_token(
            main_token.directory, label=label, user_pin="late-user-pin", so_pin="late-so-pin"
        )
        _eventually(adapter.check)
        assert adapter.mechanism is WrapMechanism.HSM_AES_GCM
        adapter.create_kek("kek")
        dek = os.urandom(32)
        mechanism, blob = adapter.wrap_dek("kek", dek, aad=b"")
        assert adapter.unwrap_dek("kek", mechanism, blob, aad=b"") == dek
    finally:
        adapter.close()


def test_missing_module_is_unavailable_not_fatal(main_token: SoftHsmToken) -> None:
    """A module that cannot be loaded gives ProviderUnavailable naming its path; init succeeds."""
    adapter = Pkcs11Hsm(
        HsmConfig(
            module_path="/nonexistent/libkeygate-missing.so",
            token_label=main_token.label,
            pin="whatever",
        )
    )
    with pytest.raises(ProviderUnavailable, match="libkeygate-missing") as info:
        adapter.check()
    assert info.value.retry_after == pytest.approx(1.0)
    adapter.close()


def test_reconnects_are_rate_limited(
    away_token: SoftHsmToken, caplog: pytest.LogCaptureFixture
) -> None:
    """Within reconnect_interval_s failed calls do not retry the connection."""
    adapter = Pkcs11Hsm(away_token.hsm_config(reconnect_interval_s=30.0))
    caplog.set_level(logging.DEBUG, logger="keygate.hsm")
    try:
        with away_token.detached():
            for _ in range(5):
                with pytest.raises(ProviderUnavailable):
                    adapter.check()
        attempts = [r for r in caplog.records if r.getMessage().startswith("connecting to HSM")]
        assert len(attempts) == 1
        with pytest.raises(ProviderUnavailable, match="reconnecting"):
            adapter.check()
    finally:
        adapter.close()
