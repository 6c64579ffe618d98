"""Configuration: one optional TOML file plus ``KEYGATE_*`` environment variables (which win).

Read in bootstrap only; ``core/`` never imports this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["Settings", "load_settings"]


def _default_data_dir() -> Path:
    return Path(os.environ.get("KEYGATE_DATA_DIR", ".keygate")).resolve()


class Settings(BaseSettings):
    """Every setting, with its environment variable ``KEYGATE_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="KEYGATE_", extra="forbid", toml_file=None, validate_default=True
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    #: SQLAlchemy URL of the registry; default: SQLite in data_dir
    database_url: str = ""
    #: SQLAlchemy URL of the audit trail; default: the registry's database
    audit_database_url: str = ""
    policies_dir: Path | None = None

    # HSM (PKCS#11)
    hsm_module: str = ""
    hsm_token_label: str = "keygate"  # noqa: S105 - a label, not a secret
    hsm_pin: SecretStr | None = None
    hsm_pin_file: Path | None = None
    hsm_mechanism: Literal["auto", "aes-gcm", "aes-kwp", "aes-kw"] = "auto"
    hsm_lock_timeout_s: float = Field(default=5.0, gt=0)

    # DEK limits (defaults for new keys) and caches
    dek_max_records: int = Field(default=1 << 20, ge=1, le=1 << 28)
    dek_max_age_s: float = Field(default=600.0, gt=0, le=86_400)
    refresh_interval_s: float = Field(default=1.0, gt=0, le=60)
    max_cached_keys: int = Field(default=100_000, ge=16)

    # API limits
    max_plaintext_bytes: int = Field(default=64 * 1024, ge=1, le=1 << 20)
    max_batch_items: int = Field(default=10_000, ge=1)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)

    # server
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    workers: int = Field(default=2, ge=1, le=64)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: CA bundle for client certificates; setting it turns on mTLS (client certificates required)
    tls_client_ca: Path | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    audit_timeout_s: float = Field(default=5.0, gt=0)
    #: sign the audit chain head every this many events …
    audit_checkpoint_events: int = Field(default=1000, ge=1, le=1_000_000)
    #: … and at least this often (seconds) while events arrive
    audit_checkpoint_interval_s: float = Field(default=60.0, gt=0, le=86_400)
    audit_signing_key_label: str = "kg/audit-signing"
    audit_pseudonym_key_label: str = "kg/audit-pseudonym"
    #: `keygate audit segments prune` deletes segments older than this (0: keep everything;
    #: otherwise at least 365 days, keygate.audit.retention.MIN_RETENTION_DAYS)
    audit_retention_days: int = Field(default=0, ge=0, le=36_500)
    #: the audit trail is segmented by UTC "month" or "day"
    audit_segment_period: Literal["month", "day"] = "month"
    #: where segment archives are written (default: <data_dir>/audit-archive)
    audit_archive_dir: Path | None = None

    @field_validator("audit_retention_days")
    @classmethod
    def _retention_minimum(cls, v: int) -> int:
        if 0 < v < 365:
            raise ValueError("audit_retention_days must be 0 (keep everything) or at least 365")
        return v

    # cloud KMS providers (outer wrap); each adapter reads its own KEYGATE_<PROVIDER>_* settings
    provider_connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    provider_read_timeout_s: float = Field(default=10.0, gt=0, le=300)
    #: retries of transient provider failures, with exponential backoff and full jitter
    provider_retries: int = Field(default=3, ge=0, le=10)
    provider_backoff_s: float = Field(default=0.2, gt=0, le=10)
    provider_backoff_max_s: float = Field(default=2.0, gt=0, le=60)
    #: after the retries are spent a provider key counts as down for this long (503 at once)
    provider_down_for_s: float = Field(default=5.0, gt=0, le=600)
    #: how often a gateway asks the provider keys it uses whether they are still enabled (0: never)
    provider_probe_interval_s: float = Field(default=30.0, ge=0, le=3600)
    #: while a provider key is down: "refuse" encrypts (fail closed; default) or keep using the
    #: "cached" active DEK within its limits.  Decrypt always goes on from the DEK cache.
    provider_outage_encrypt: Literal["refuse", "cached"] = "refuse"
    #: residency policy file (default: residency.toml in the policy directory)
    residency_file: Path | None = None

    # dual control (keygate.custody; docs/dual-control.md)
    #: approvals (M) a sensitive change needs, out of the enrolled custodians (N)
    custody_quorum: int = Field(default=2, ge=1, le=16)
    #: allow custody_quorum = 1 (one custodian acts alone): development and demos only
    custody_allow_single_custodian: bool = False
    #: seconds a dual-control request waits for its approvals before it expires
    custody_request_ttl_s: float = Field(default=86_400.0, ge=60, le=30 * 86_400)
    #: days between an approved key destruction and the destruction (cancellable meanwhile)
    custody_destruction_wait_days: int = Field(default=7, ge=7, le=30)

    @field_validator("hsm_mechanism", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _dual_control(self) -> Settings:
        if self.custody_quorum < 2 and not self.custody_allow_single_custodian:
            raise ValueError(
                "custody_quorum must be at least 2 (set custody_allow_single_custodian for the "
                "single-custodian development mode)"
            )
        return self

    @property
    def registry_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'keygate.db'}"

    @property
    def audit_url(self) -> str:
        return self.audit_database_url or self.registry_url

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("KEYGATE_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and ``KEYGATE_CONFIG``), with explicit overrides."""
    return Settings(**overrides)  # type: ignore[arg-type]
