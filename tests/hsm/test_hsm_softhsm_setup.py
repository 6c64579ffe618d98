"""SoftHSM helpers (keygate.hsm.softhsm) and hsm/setup-softhsm.sh."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from keygate.core.errors import ConfigurationError
from keygate.hsm import SoftHsmToken, find_softhsm_module, init_softhsm_token
from keygate.hsm.softhsm import softhsm_token_labels, write_softhsm_conf

pytestmark = pytest.mark.hsm

SCRIPT = Path(__file__).resolve().parents[2] / "hsm" / "setup-softhsm.sh"


def test_find_softhsm_module_finds_the_installed_module(softhsm_dir: Path) -> None:
    """find_softhsm_module returns an existing libsofthsm2.so."""
    path = find_softhsm_module()
    assert Path(path).is_file()
    assert path.endswith("libsofthsm2.so")


def test_missing_module_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the module, ConfigurationError says how to install SoftHSM2."""
    monkeypatch.delenv("KEYGATE_SOFTHSM_MODULE", raising=False)
    with pytest.raises(ConfigurationError, match="apt-get install -y softhsm2"):
        find_softhsm_module(("/nonexistent/libsofthsm2.so",))


def test_conf_file_contents(tmp_path: Path) -> None:
    """The conf uses the file backend, ERROR logging, fixed slots and DIR/tokens."""
    conf = write_softhsm_conf(tmp_path)
    lines = conf.read_text().splitlines()
    assert lines == [
        f"directories.tokendir = {tmp_path.resolve() / 'tokens'}",
        "objectstore.backend = file",
        "log.level = ERROR",
        "slots.removable = false",
    ]
    assert (tmp_path / "tokens").is_dir()


def test_several_tokens_share_a_directory_and_labels_are_unique(
    main_token: SoftHsmToken, softhsm_dir: Path
) -> None:
    """Tokens are added next to each other; re-initialising an existing label is refused."""
    assert main_token.directory == softhsm_dir
    assert main_token.label in softhsm_token_labels(main_token.conf_path)
    assert main_token.token_path is not None
    assert main_token.token_path.parent == softhsm_dir / "tokens"
    with pytest.raises(ConfigurationError, match="already exists"):
        init_softhsm_token(
            softhsm_dir, label=main_token.label, user_pin="1234-user", so_pin="1234-so"
        )


def test_short_pins_are_refused(tmp_path: Path) -> None:
    """SoftHSM needs PINs of at least 4 characters; the helper says so up front."""
    with pytest.raises(ConfigurationError, match="4 to 255"):
        init_softhsm_token(tmp_path, label="t", user_pin="123", so_pin="1234")


def test_activate_refuses_a_second_directory_once_loaded(
    main_token: SoftHsmToken, hsm: object, tmp_path: Path
) -> None:
    """After SoftHSM is loaded, activating another directory is a ConfigurationError."""
    main_token.activate()  # same directory: a no-op
    other = SoftHsmToken(
        directory=tmp_path,
        conf_path=tmp_path / "softhsm2.conf",
        module_path=main_token.module_path,
        label="other",
        so_pin="so-pin-x",
        user_pin="user-pin-x",
    )
    with pytest.raises(ConfigurationError, match="one token directory per process"):
        other.activate()
    assert os.environ["SOFTHSM2_CONF"] == str(main_token.conf_path)


def _run_script(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KEYGATE_", "SOFTHSM2_"))}
    done = subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def _exports(stdout: str) -> dict[str, str]:
    lines = [line.removeprefix("export ") for line in stdout.splitlines()]
    return dict(line.split("=", 1) for line in lines if not line.startswith("#"))


def test_setup_script_with_pins_from_env(tmp_path: Path) -> None:
    """The script initialises the token and prints only export and comment lines."""
    out = _run_script(
        tmp_path,
        str(tmp_path / "hsm"),
        "kg-script",
        env={"KEYGATE_HSM_SO_PIN": "so-script-1", "KEYGATE_HSM_PIN": "user-script-1"},
    )
    assert all(line.startswith(("export ", "# ")) for line in out.splitlines())
    exports = _exports(out)
    conf = Path(exports["SOFTHSM2_CONF"])
    assert conf == (tmp_path / "hsm" / "softhsm2.conf").resolve()
    assert "KEYGATE_HSM_PIN_FILE" not in exports
    assert "kg-script" in softhsm_token_labels(conf)
    assert "user-script-1" not in out
    assert "so-script-1" not in out


def test_setup_script_generates_pins_and_is_idempotent(tmp_path: Path) -> None:
    """Without PINs the script writes 0600 PIN files; a second run leaves the token alone."""
    first = _exports(_run_script(tmp_path, str(tmp_path / "hsm"), "kg gen"))
    pin_file = Path(first["KEYGATE_HSM_PIN_FILE"])
    assert pin_file.stat().st_mode & 0o777 == 0o600
    pin = pin_file.read_text().removesuffix("\n")
    assert len(pin) == 24
    second = _exports(_run_script(tmp_path, str(tmp_path / "hsm"), "kg gen"))
    assert second == first
    assert pin_file.read_text().removesuffix("\n") == pin
    assert softhsm_token_labels(Path(first["SOFTHSM2_CONF"])).count("kg gen") == 1


def test_setup_script_refuses_short_pins(tmp_path: Path) -> None:
    """PINs shorter than SoftHSM allows are refused with a message, not a prompt."""
    with pytest.raises(subprocess.CalledProcessError) as info:
        _run_script(tmp_path, str(tmp_path / "hsm"), "kg", "abc", "defg")
    assert "4 to 255" in info.value.stderr
