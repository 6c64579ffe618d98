"""Provider migration: the one call into the provider layer a ``migrate`` job makes.

``keygate bulk migrate --to URI`` first switches tenant × purpose to the provider key ``URI``
(``Gateway.provider_migrate``: audited, residency-checked, by the provider layer), then rewraps
every ciphertext in scope, so each DEK ends up wrapped by the HSM and then by the new provider key.
"""

from __future__ import annotations

from typing import Any

from keygate.core.errors import ConfigurationError

__all__ = ["provider_migrate"]


def provider_migrate(gateway: Any, actor: str, tenant: str, purpose: str, uri: str) -> Any:
    """Switch ``tenant`` × ``purpose`` to the provider key ``uri`` through the Gateway
    (``hsm-only``: drop the outer wrap, as ``keygate provider migrate --to hsm-only``)."""
    migrate = getattr(gateway, "provider_migrate", None)
    if migrate is None:
        raise ConfigurationError(
            "provider migration is not available in this keygate build (no cloud KMS provider "
            "layer yet); rewrap to the HSM with 'keygate bulk rewrap' instead"
        )
    target = None if uri == "hsm-only" else uri
    keys = getattr(gateway, "keys", None)
    if keys is not None:
        # Idempotent: a job run again after a crash finds the switch already made.
        keys.refresh(force=True)
        active = keys.snapshot.active_provider(tenant, purpose)
        if (active.uri if active is not None else None) == target:
            return None
    return migrate(actor, tenant, purpose, target)
