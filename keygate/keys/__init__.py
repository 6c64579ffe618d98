"""Key registry: tenants, keys, key versions and their states, service identities."""

from keygate.keys.registry import (
    IdentityRecord,
    KeyRecord,
    KeyVersionRecord,
    Registry,
    RegistrySnapshot,
    TenantRecord,
)

__all__ = [
    "IdentityRecord",
    "KeyRecord",
    "KeyVersionRecord",
    "Registry",
    "RegistrySnapshot",
    "TenantRecord",
]
