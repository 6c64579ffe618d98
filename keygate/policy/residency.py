"""Residency: provider keys must live in Japan (``policies/residency.toml``).

The rule is checked twice: when a custodian configures a provider key, and again on every use of
one (the registry could have been edited, or the policy narrowed since).  Anything not explicitly
allowed is refused: an unknown scheme, a scheme without a table, a region not listed.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from keygate.core.errors import ConfigurationError, PolicyDenied
from keygate.policy.records import DEFAULT_POLICIES_DIR, POLICIES_DIR_ENV

if TYPE_CHECKING:
    from keygate.providers.base import KeyUri

__all__ = ["RESIDENCY_FILE_ENV", "ResidencyPolicy", "ResidencyViolation"]

#: environment variable naming a residency file to use instead of ``policies/residency.toml``
RESIDENCY_FILE_ENV: Final = "KEYGATE_RESIDENCY_FILE"
_MAX_REGIONS: Final = 256


class ResidencyViolation(PolicyDenied):
    """A provider key outside the allowed (Japanese) regions: 403 FORBIDDEN."""

    reason = "residency"


@dataclass(frozen=True, slots=True)
class ResidencyPolicy:
    """Allowed regions per key-URI scheme."""

    regions: Mapping[str, frozenset[str]]
    source: str = "policies/residency.toml"

    @classmethod
    def load(cls, path: Path | None = None) -> ResidencyPolicy:
        """Read the residency file: ``path``, else ``$KEYGATE_RESIDENCY_FILE``, else the policy
        directory's ``residency.toml``.  Raises :class:`ConfigurationError` naming the file."""
        if path is None:
            env = os.environ.get(RESIDENCY_FILE_ENV)
            if env:
                path = Path(env)
            else:
                directory = Path(os.environ.get(POLICIES_DIR_ENV) or DEFAULT_POLICIES_DIR)
                path = directory / "residency.toml"
        try:
            with path.open("rb") as stream:
                data = tomllib.load(stream)
        except OSError as exc:
            raise ConfigurationError(
                f"residency policy {path}: cannot be read: {exc.strerror}"
            ) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"residency policy {path}: not valid TOML: {exc}") from exc
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, object], *, source: str = "<memory>"
    ) -> ResidencyPolicy:
        regions: dict[str, frozenset[str]] = {}
        for scheme, table in data.items():
            if not isinstance(table, Mapping) or set(table) - {"regions"}:
                raise ConfigurationError(
                    f"residency policy {source}: [{scheme}] must hold only 'regions = [...]'"
                )
            values = table.get("regions", [])
            if (
                not isinstance(values, list)
                or len(values) > _MAX_REGIONS
                or not all(isinstance(v, str) and 0 < len(v) <= 255 for v in values)
            ):
                raise ConfigurationError(
                    f"residency policy {source}: [{scheme}].regions must be a list of names"
                )
            regions[scheme.lower()] = frozenset(v.lower() for v in values)
        return cls(regions=regions, source=source)

    def allows(self, scheme: str, region: str) -> bool:
        allowed = self.regions.get(scheme.lower())
        if not allowed:
            return False
        region = region.lower()
        if region in allowed:
            return True
        # Vault/OpenBao: "host" allows any port of host ("host:port" regions)
        host, sep, _ = region.rpartition(":")
        return bool(sep) and host in allowed

    def check(self, key: KeyUri) -> None:
        """Raise :class:`ResidencyViolation` unless ``key`` lives in an allowed region."""
        if not self.allows(key.scheme, key.region):
            allowed = sorted(self.regions.get(key.scheme, ()))
            shown = ", ".join(allowed) if allowed else "none configured"
            raise ResidencyViolation(
                f"residency: provider key {key.uri} is in {key.region!r}, which is not an "
                f"allowed location for {key.scheme} (allowed: {shown}; {self.source})"
            )
