"""PINs: login refusal, loading from env or file, and never a secret in reprs, errors or logs."""

from __future__ import annotations

import base64
import logging
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keygate.core.errors import (
    ConfigurationError,
    DecryptionFailed,
    GatewayError,
    ProviderRejected,
    ProviderUnavailable,
)
from keygate.core.model import WrapMechanism
from keygate.hsm import HsmConfig, Pkcs11Hsm, SoftHsmToken, load_pin

pytestmark = pytest.mark.hsm

RECONNECT_S = 0.05


# -- login ------------------------------------------------------------------------------------


def test_wrong_pin_is_rejected_clearly(make_token: Callable[[str], SoftHsmToken]) -> None:
    """A wrong PIN gives ProviderRejected saying 'PIN incorrect', without the PIN."""
    token = make_token("kg-pin")
    wrong = "wrong-" + os.urandom(6).hex()
    adapter = Pkcs11Hsm(token.hsm_config(pin=wrong, reconnect_interval_s=0))
    try:
        with pytest.raises(ProviderRejected, match="PIN incorrect") as info:
            adapter.check()
        assert token.label in str(info.value)
        assert wrong not in str(info.value)
        assert token.user_pin not in str(info.value)
    finally:
        adapter.close()


def test_refused_pin_is_not_retried(
    make_token: Callable[[str], SoftHsmToken], caplog: pytest.LogCaptureFixture
) -> None:
    """After a refused login later calls fail at once without another C_Login (no lockout)."""
    token = make_token("kg-pin")
    adapter = Pkcs11Hsm(token.hsm_config(pin="wrong-pin-1234", reconnect_interval_s=0))
    caplog.set_level(logging.DEBUG, logger="keygate.hsm")
    try:
        for _ in range(4):
            with pytest.raises(ProviderRejected, match="PIN"):
                adapter.wrap_dek("kek", os.urandom(32), aad=b"")
        attempts = [r for r in caplog.records if r.getMessage().startswith("connecting to HSM")]
        assert len(attempts) == 1
    finally:
        adapter.close()


def test_wrong_pin_is_refused_while_the_process_is_logged_in(
    make_token: Callable[[str], SoftHsmToken],
) -> None:
    """PKCS#11 login is per process; a second adapter with another PIN is still refused."""
    token = make_token("kg-pin")
    good = Pkcs11Hsm(token.hsm_config(reconnect_interval_s=0))
    bad = Pkcs11Hsm(token.hsm_config(pin="another-pin-5678", reconnect_interval_s=0))
    same = Pkcs11Hsm(token.hsm_config(reconnect_interval_s=0))
    try:
        good.create_kek("kek")
        with pytest.raises(ProviderRejected, match="PIN incorrect"):
            bad.kek_exists("kek")
        assert same.kek_exists("kek")
        same.close()
        assert good.kek_exists("kek")  # closing one adapter does not log the other out
    finally:
        for adapter in (bad, same, good):
            adapter.close()


# -- load_pin -----------------------------------------------------------------------------------


@pytest.fixture
def clean_pin_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No PIN variables set."""
    monkeypatch.delenv("KEYGATE_HSM_PIN", raising=False)
    monkeypatch.delenv("KEYGATE_HSM_PIN_FILE", raising=False)
    return monkeypatch


def test_pin_from_env(clean_pin_env: pytest.MonkeyPatch) -> None:
    """load_pin reads KEYGATE_HSM_PIN."""
    clean_pin_env.setenv("KEYGATE_HSM_PIN", "1234-env")
    assert load_pin() == "1234-env"


def test_pin_file_wins_and_loses_one_newline(
    clean_pin_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The PIN file wins over the variable; exactly one trailing newline is stripped."""
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(b"from-file \n\n")
    pin_file.chmod(0o600)
    clean_pin_env.setenv("KEYGATE_HSM_PIN", "from-env")
    clean_pin_env.setenv("KEYGATE_HSM_PIN_FILE", str(pin_file))
    assert load_pin() == "from-file \n"
    pin_file.write_bytes(b"crlf\r\n")
    assert load_pin() == "crlf"
    pin_file.write_bytes(b"no-newline")
    assert load_pin() == "no-newline"


def test_pin_variables_can_be_renamed(clean_pin_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """load_pin honours custom variable names."""
    clean_pin_env.setenv("OTHER_PIN", "other")
    assert load_pin(env="OTHER_PIN", file_env="OTHER_PIN_FILE") == "other"


def test_missing_pin_names_the_variables(clean_pin_env: pytest.MonkeyPatch) -> None:
    """With neither variable set, ConfigurationError names both variables."""
    with pytest.raises(ConfigurationError) as info:
        load_pin()
    assert "KEYGATE_HSM_PIN" in str(info.value)
    assert "KEYGATE_HSM_PIN_FILE" in str(info.value)


@pytest.mark.parametrize(
    "content", [b"", b"\n", b"\xffsecret-pin\xfe\n"], ids=["empty", "newline", "not-utf8"]
)
def test_unusable_pin_file_is_a_configuration_error(
    clean_pin_env: pytest.MonkeyPatch, tmp_path: Path, content: bytes
) -> None:
    """An empty or undecodable PIN file is a ConfigurationError that shows none of its bytes."""
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(content)
    clean_pin_env.setenv("KEYGATE_HSM_PIN_FILE", str(pin_file))
    with pytest.raises(ConfigurationError) as info:
        load_pin()
    assert "secret" not in str(info.value)
    assert "xff" not in str(info.value)
    assert info.value.__cause__ is None


def test_unreadable_pin_file_is_a_configuration_error(
    clean_pin_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A PIN file that cannot be read is a ConfigurationError naming the variable."""
    clean_pin_env.setenv("KEYGATE_HSM_PIN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match="KEYGATE_HSM_PIN_FILE"):
        load_pin()


def test_world_readable_pin_file_is_warned_about(
    clean_pin_env: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PIN file readable by group or others is used, with a warning that shows no PIN."""
    pin_file = tmp_path / "pin"
    pin_file.write_text("open-pin-9876\n")
    pin_file.chmod(0o644)
    clean_pin_env.setenv("KEYGATE_HSM_PIN_FILE", str(pin_file))
    with caplog.at_level(logging.WARNING, logger="keygate.hsm"):
        assert load_pin() == "open-pin-9876"
    assert "0600" in caplog.text
    assert "open-pin-9876" not in caplog.text


# -- no secrets anywhere ---------------------------------------------------------------------------


def test_reprs_hide_pins(main_token: SoftHsmToken, hsm: Pkcs11Hsm) -> None:
    """repr/str of the config, the token helper and the adapter never show a PIN."""
    config = main_token.hsm_config()
    for text in (repr(config), str(config), repr(main_token), repr(hsm), str(hsm)):
        assert main_token.user_pin not in text
        assert main_token.so_pin not in text


def test_secret_holders_refuse_pickling(main_token: SoftHsmToken, hsm: Pkcs11Hsm) -> None:
    """HsmConfig, SoftHsmToken and Pkcs11Hsm cannot be pickled (a PIN would travel)."""
    for obj in (main_token.hsm_config(), main_token, hsm):
        with pytest.raises(TypeError) as info:
            pickle.dumps(obj)
        assert main_token.user_pin not in str(info.value)


def test_empty_pin_is_a_configuration_error(main_token: SoftHsmToken) -> None:
    """HsmConfig refuses an empty PIN."""
    with pytest.raises(ConfigurationError, match="PIN"):
        HsmConfig(module_path=main_token.module_path, token_label=main_token.label, pin="")


def _forms(secret: bytes) -> list[str]:
    forms = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()]
    forms.append(base64.urlsafe_b64encode(secret).decode().rstrip("="))
    forms.append(secret.decode("latin-1"))
    forms.append(repr(secret)[2:-1])
    return forms


def test_no_secret_in_logs_or_errors(
    make_token: Callable[[str], SoftHsmToken], caplog: pytest.LogCaptureFixture
) -> None:
    """Across a busy scenario at DEBUG, no PIN, DEK or blob byte form is logged or raised."""
    caplog.set_level(logging.DEBUG)
    token = make_token("kg-leak")
    wrong_pin = "wrong-" + os.urandom(8).hex()
    adapter = Pkcs11Hsm(token.hsm_config(reconnect_interval_s=RECONNECT_S))
    errors: list[BaseException] = []
    deks = [os.urandom(32) for _ in range(3)]

    def attempt(action: Callable[..., object], *args: object, **kwargs: object) -> None:
        try:
            action(*args, **kwargs)
        except (GatewayError, ValueError) as exc:
            errors.append(exc)

    try:
        adapter.create_kek("kek")
        attempt(adapter.create_kek, "kek")
        blobs = []
        for mechanism in (WrapMechanism.HSM_AES_GCM, WrapMechanism.HSM_AES_KW):
            pinned = Pkcs11Hsm(token.hsm_config(mechanism=mechanism))
            try:
                for dek in deks:
                    used, blob = pinned.wrap_dek("kek", dek, aad=b"ctx")
                    blobs.append(blob)
                    attempt(pinned.unwrap_dek, "kek", used, blob[::-1], aad=b"ctx")
                    attempt(pinned.unwrap_dek, "kek", used, blob, aad=b"other")
                    attempt(pinned.unwrap_dek, "nope", used, blob, aad=b"ctx")
                    attempt(pinned.wrap_dek, "kek", dek[:31], aad=b"")
            finally:
                pinned.close()
        with token.detached():
            attempt(adapter.wrap_dek, "kek", deks[0], aad=b"")
            attempt(adapter.check)
        time.sleep(RECONNECT_S)
        bad = Pkcs11Hsm(token.hsm_config(pin=wrong_pin))
        attempt(bad.check)
        bad.close()
    finally:
        adapter.close()

    kinds = {type(exc) for exc in errors}
    assert {ProviderRejected, ProviderUnavailable, DecryptionFailed, ValueError} <= kinds
    texts = [caplog.text, *(r.getMessage() for r in caplog.records)]
    for exc in errors:
        texts += [str(exc), repr(exc), getattr(exc, "detail", "")]
        cause = exc.__cause__
        if cause is not None:
            texts += [str(cause), repr(cause)]
    haystack = "\n".join(texts)
    for pin in (token.user_pin, token.so_pin, wrong_pin):
        assert pin not in haystack
    for secret in deks:
        for form in _forms(secret):
            assert form not in haystack
    for blob in blobs:
        assert blob.hex() not in haystack
