"""Helpers for the audit tests (a module with a unique name: test modules import it)."""

from __future__ import annotations

import os
from pathlib import Path

from keygate.hsm.softhsm import SoftHsmToken

REPO_ROOT = Path(__file__).resolve().parents[2]


def cli_env(token: SoftHsmToken, home: Path, **extra: str) -> dict[str, str]:
    """The environment a custodian or reviewer sets to run ``keygate`` against ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    pin_file = home / "hsm-pin"
    pin_file.write_text(token.user_pin + "\n", encoding="utf-8")
    pin_file.chmod(0o600)
    env.update(token.env)
    env.update(
        {
            "KEYGATE_DATA_DIR": str(home / "data"),
            "KEYGATE_HSM_TOKEN_LABEL": token.label,
            "KEYGATE_HSM_PIN_FILE": str(pin_file),
            "KEYGATE_ACTOR": "custodian:audit-tests",
            "COLUMNS": "200",
            "NO_COLOR": "1",
            **extra,
        }
    )
    return env
