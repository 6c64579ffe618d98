"""SoftHSM2 tokens in a directory, for tests, the demo and the benchmark.  Not for production.

SoftHSM reads ``SOFTHSM2_CONF`` when the module is initialised (``C_Initialize``), that is at the
first ``pkcs11.lib(...)`` of a process and again whenever :class:`~keygate.hsm.Pkcs11Hsm`
re-initialises it.  So a process should use **one** token directory (one ``softhsm2.conf``)
and put every token it needs in it under different labels::

    token = init_softhsm_token(tmp / "hsm", label="keygate", user_pin=pin, so_pin=so_pin)
    token.activate()                      # sets SOFTHSM2_CONF for this process
    hsm = Pkcs11Hsm(token.hsm_config())

``softhsm2-util`` receives the PINs on its command line, which other local users can see in
``ps``: acceptable for throw-away test tokens only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NoReturn

from keygate.core.errors import ConfigurationError
from keygate.core.model import WrapMechanism
from keygate.hsm.pkcs11 import HsmConfig

__all__ = [
    "SOFTHSM_MODULE_PATHS",
    "SoftHsmToken",
    "find_softhsm_module",
    "init_softhsm_token",
    "softhsm_token_labels",
    "write_softhsm_conf",
]

#: Where Debian, Ubuntu, Fedora and source builds put the module.
SOFTHSM_MODULE_PATHS: Final = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
_INSTALL_HINT: Final = "install SoftHSM2 (Debian/Ubuntu: apt-get install -y softhsm2)"
_UTIL_TIMEOUT_S: Final = 30.0


def find_softhsm_module(paths: tuple[str, ...] = SOFTHSM_MODULE_PATHS) -> str:
    """Path of ``libsofthsm2.so``: ``KEYGATE_SOFTHSM_MODULE`` if set, else the usual places."""
    override = os.environ.get("KEYGATE_SOFTHSM_MODULE")
    candidates = (override,) if override else paths
    for path in candidates:
        if path and Path(path).is_file():
            return path
    raise ConfigurationError(
        f"SoftHSM2 PKCS#11 module not found (looked in {', '.join(candidates)}); {_INSTALL_HINT}"
    )


def _softhsm_util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise ConfigurationError(f"softhsm2-util not found on PATH; {_INSTALL_HINT}")
    return util


def write_softhsm_conf(directory: Path) -> Path:
    """Write ``directory/softhsm2.conf`` with its token store in ``directory/tokens``."""
    directory = Path(directory).resolve()
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n",
        encoding="utf-8",
    )
    return conf


def _run_util(conf: Path, args: list[str], *, secrets: tuple[str, ...] = ()) -> str:
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    try:
        done = subprocess.run(  # noqa: S603 - fixed executable, arguments are not shell-parsed
            [_softhsm_util(), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=_UTIL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigurationError(f"softhsm2-util {args[0]} failed: {type(exc).__name__}") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        for secret in secrets:
            message = message.replace(secret, "***")
        raise ConfigurationError(f"softhsm2-util {args[0]} failed: {message}")
    return done.stdout


def softhsm_token_labels(conf: Path) -> list[str]:
    """Labels of the initialised tokens in the token store ``conf`` points at."""
    out = _run_util(conf, ["--show-slots"])
    return [
        m.group(1).strip()
        for m in re.finditer(r"^\s*Label:\s*(.*)$", out, re.MULTILINE)
        if m.group(1).strip()
    ]


@dataclass(frozen=True, slots=True)
class SoftHsmToken:
    """A SoftHSM token initialised in ``directory``.  PINs never appear in ``repr``."""

    directory: Path
    conf_path: Path
    module_path: str
    label: str
    so_pin: str = field(repr=False)
    user_pin: str = field(repr=False)
    #: the token's own folder inside ``directory/tokens`` (moved away by :meth:`detach`)
    token_path: Path | None = None

    def __getstate__(self) -> NoReturn:
        raise TypeError("SoftHsmToken holds PINs and cannot be pickled")

    @property
    def env(self) -> dict[str, str]:
        """Environment a process needs to see this token."""
        return {"SOFTHSM2_CONF": str(self.conf_path)}

    def activate(self) -> None:
        """Point this process's ``SOFTHSM2_CONF`` at this token's directory.

        Raises :class:`ConfigurationError` if the SoftHSM module is already loaded in this
        process with another configuration: SoftHSM would keep serving the other directory
        until it is re-initialised, and re-initialising kills every open session.
        """
        current = os.environ.get("SOFTHSM2_CONF")
        if current == str(self.conf_path):
            return
        loaded = sys.modules.get("pkcs11")
        if current and loaded is not None and self.module_path in getattr(loaded, "_loaded", {}):
            raise ConfigurationError(
                f"SoftHSM is already initialised in this process with SOFTHSM2_CONF={current}; "
                "use one token directory per process (several labels in it)"
            )
        os.environ["SOFTHSM2_CONF"] = str(self.conf_path)

    def hsm_config(
        self,
        *,
        mechanism: WrapMechanism | None = None,
        lock_timeout_s: float = 5.0,
        reconnect_interval_s: float = 0.5,
        pin: str | None = None,
    ) -> HsmConfig:
        """An :class:`HsmConfig` for this token (``pin`` overrides the user PIN, for tests)."""
        return HsmConfig(
            module_path=self.module_path,
            token_label=self.label,
            pin=self.user_pin if pin is None else pin,
            mechanism=mechanism,
            lock_timeout_s=lock_timeout_s,
            reconnect_interval_s=reconnect_interval_s,
        )

    # Simulating token loss: SoftHSM serves a token from its folder in the token store.  Moving
    # the folder out makes every call on it fail (the token stops answering C_GetTokenInfo) and
    # re-initialising the module then no longer lists it; moving it back and re-initialising
    # brings it back with its keys.

    def _detached_path(self) -> Path:
        if self.token_path is None:
            raise ConfigurationError(f"token folder of SoftHSM token {self.label!r} is unknown")
        return self.directory / "detached" / self.token_path.name

    def detach(self) -> None:
        """Take the token away (as if the HSM were unplugged)."""
        target = self._detached_path()
        target.parent.mkdir(mode=0o700, exist_ok=True)
        assert self.token_path is not None  # noqa: S101 - checked by _detached_path
        self.token_path.rename(target)

    def attach(self) -> None:
        """Bring a detached token back."""
        source = self._detached_path()
        assert self.token_path is not None  # noqa: S101 - checked by _detached_path
        source.rename(self.token_path)

    @contextmanager
    def detached(self) -> Iterator[None]:
        """Keep the token away for the duration of the ``with`` block."""
        self.detach()
        try:
            yield
        finally:
            self.attach()


def init_softhsm_token(directory: Path, *, label: str, user_pin: str, so_pin: str) -> SoftHsmToken:
    """Initialise a new SoftHSM token ``label`` in ``directory`` (created if needed).

    Several tokens may share one directory; a label already initialised there is refused.
    """
    if not label or len(label) > 32:
        raise ConfigurationError("a SoftHSM token label must be 1 to 32 characters")
    if not all(4 <= len(pin) <= 255 for pin in (user_pin, so_pin)):
        raise ConfigurationError("SoftHSM token PINs must be 4 to 255 characters")
    module = find_softhsm_module()
    directory = Path(directory).resolve()
    conf = write_softhsm_conf(directory)
    if label in softhsm_token_labels(conf):
        raise ConfigurationError(
            f"a SoftHSM token labelled {label!r} already exists in {directory}"
        )
    tokens = directory / "tokens"
    before = set(tokens.iterdir())
    _run_util(
        conf,
        ["--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", user_pin],
        secrets=(so_pin, user_pin),
    )
    created = sorted(set(tokens.iterdir()) - before)
    return SoftHsmToken(
        directory=directory,
        conf_path=conf,
        module_path=module,
        label=label,
        so_pin=so_pin,
        user_pin=user_pin,
        token_path=created[0] if len(created) == 1 else None,
    )
