"""Fixtures shared by every test directory.

SoftHSM reads ``SOFTHSM2_CONF`` once, at ``C_Initialize``, so the whole test process uses ONE
token directory, created and exported before any test loads the module; tests that need tokens
of their own create them inside it with unique labels (``make_token``).  Set
``KEYGATE_REQUIRE_HSM=1`` (CI does) to fail instead of skipping when SoftHSM is not installed.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keygate.core.errors import ConfigurationError
from keygate.hsm.softhsm import (
    SoftHsmToken,
    find_softhsm_module,
    init_softhsm_token,
    write_softhsm_conf,
)


@pytest.fixture(scope="session")
def softhsm_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The process's SoftHSM token directory, exported as SOFTHSM2_CONF."""
    try:
        find_softhsm_module()
    except ConfigurationError as exc:
        if os.environ.get("KEYGATE_REQUIRE_HSM"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    directory = tmp_path_factory.mktemp("softhsm")
    conf = write_softhsm_conf(directory)
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    yield directory.resolve()
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def make_token(softhsm_dir: Path) -> Callable[[str], SoftHsmToken]:
    """Initialise a new token with a unique label (prefix + random suffix) and random PINs."""

    def make(prefix: str) -> SoftHsmToken:
        label = f"{prefix}-{uuid.uuid4().hex[:8]}"
        return init_softhsm_token(
            softhsm_dir,
            label=label,
            user_pin=f"user-{secrets.token_hex(8)}",
            so_pin=f"so-{secrets.token_hex(8)}",
        )

    return make
