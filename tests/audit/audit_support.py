"""Helpers for the audit tests (a module with a unique name: test modules import it)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keygate.audit.chain import checkpoint_message, key_id
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


class Signer:
    """A software stand-in for the HSM checkpoint key (same DER ECDSA P-256 signatures)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.pem = self.key.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        )
        self.key_id = key_id(self.pem)

    def __call__(self, seq: int, digest: str, prev_seq: int, ts: str) -> tuple[str, str]:
        message = checkpoint_message(seq=seq, hash=digest, prev_seq=prev_seq, ts=ts)
        signature = self.key.sign(message, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode("ascii"), self.key_id
