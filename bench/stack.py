"""The system under test: a real SoftHSM token and a real SQLite registry in a temporary directory,
wired by keygate's own bootstrap (``build_gateway``) and administered through its service layer.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keygate.bootstrap import build_gateway
from keygate.config import Settings, load_settings
from keygate.hsm.softhsm import SoftHsmToken, init_softhsm_token
from keygate.keys.manager import KeyManager
from keygate.keys.randomness import SystemRandom
from keygate.logging import configure_logging
from keygate.service import Gateway

__all__ = ["ACTOR", "PURPOSE", "TENANT", "Stack", "open_stack"]

#: 千代田区 (the check digit is verified by keygate)
TENANT = "131016"
PURPOSE = "resident"
ACTOR = "bench"
TOKEN_LABEL = "keygate-bench"


@dataclass
class Stack:
    directory: Path
    token: SoftHsmToken
    settings: Settings
    gateway: Gateway

    @property
    def keys(self) -> KeyManager:
        """The gateway's own key manager (the writing process: its DEK cache is warm)."""
        return self.gateway.keys

    @property
    def hsm(self) -> Any:
        return self.gateway.hsm

    def fresh_key_manager(self) -> KeyManager:
        """A new KeyManager on the same registry and HSM, with empty DEK caches.

        This is what a separate reader process or a bulk-job worker starts with.  Built exactly as
        :func:`keygate.bootstrap.build_gateway` builds the gateway's own (without the refresher
        thread, which only matters when the registry changes under it).
        """
        return KeyManager(
            registry=self.gateway.registry,
            hsm=self.gateway.hsm,
            rng=SystemRandom(),
            max_plaintext=self.settings.max_plaintext_bytes,
            max_cached_keys=self.settings.max_cached_keys,
        )

    def rotate(self) -> int:
        """Rotate tenant × purpose's KEK through the service; returns the new version."""
        rec = self.gateway.rotate_key(ACTOR, TENANT, PURPOSE)
        return int(rec.version)

    def dek_limits(self) -> dict[str, float]:
        rec = self.keys.snapshot.keys[(TENANT, PURPOSE)]
        return {
            "dek_max_records": int(rec.dek_max_records),
            "dek_max_age_s": float(rec.dek_max_age_s),
        }


@contextmanager
def open_stack() -> Iterator[Stack]:
    """A fresh token, registry and gateway with tenant 131016 and a ``resident`` key (v1)."""
    # The gateway logs at debug on every new DEK and at info on every registry reload; keep the
    # bench's own output readable.  This is the production logging setup at level "warning".
    configure_logging(fmt="console", level="warning")
    with tempfile.TemporaryDirectory(prefix="keygate-bench-") as tmp:
        directory = Path(tmp)
        user_pin = secrets.token_hex(12)
        token = init_softhsm_token(
            directory / "hsm",
            label=TOKEN_LABEL,
            user_pin=user_pin,
            so_pin=secrets.token_hex(12),
        )
        # SoftHSM reads SOFTHSM2_CONF at C_Initialize: before the first PKCS#11 use.
        os.environ.update(token.env)
        # Everything that could point the bench at a real database or HSM is pinned here, so a
        # KEYGATE_* variable in the caller's environment cannot redirect it.
        settings = load_settings(
            data_dir=directory / "data",
            database_url="",
            audit_database_url="",
            hsm_module=token.module_path,
            hsm_token_label=token.label,
            hsm_pin=user_pin,
            hsm_pin_file=None,
        )
        gateway = build_gateway(settings)
        try:
            gateway.add_tenant(ACTOR, TENANT, name="千代田区")
            gateway.create_key(ACTOR, TENANT, PURPOSE)
            yield Stack(directory=directory, token=token, settings=settings, gateway=gateway)
        finally:
            gateway.close()
