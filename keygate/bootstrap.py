"""Wires keygate together from :class:`~keygate.config.Settings`: the one place that does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from keygate.audit.keys import AuditKeys
from keygate.audit.store import AuditStore
from keygate.audit.writer import AuditWriter, Checkpointer
from keygate.config import Settings
from keygate.core.errors import ConfigurationError
from keygate.core.model import WrapMechanism
from keygate.custody.guard import DualControlGuard
from keygate.custody.store import CustodyStore
from keygate.hsm.pkcs11 import HsmConfig, Pkcs11Hsm
from keygate.hsm.softhsm import find_softhsm_module
from keygate.keys.manager import KeyManager
from keygate.keys.randomness import SystemRandom
from keygate.keys.registry import Registry
from keygate.policy.records import load_policies
from keygate.policy.residency import ResidencyPolicy
from keygate.providers.base import ProviderOptions
from keygate.providers.guard import ProviderSet
from keygate.service import Gateway

__all__ = ["audit_keys", "build_gateway", "hsm_config", "open_registry", "provider_set"]

log = structlog.get_logger(__name__)

_MECHANISMS = {
    "auto": None,
    "aes-gcm": WrapMechanism.HSM_AES_GCM,
    "aes-kwp": WrapMechanism.HSM_AES_KWP,
    "aes-kw": WrapMechanism.HSM_AES_KW,
}


def _pin(settings: Settings) -> str:
    if settings.hsm_pin_file is not None:
        try:
            text = Path(settings.hsm_pin_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the HSM PIN file {settings.hsm_pin_file}: {exc.strerror}"
            ) from None
        pin = text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
        if pin:
            return pin
        raise ConfigurationError(f"the HSM PIN file {settings.hsm_pin_file} is empty")
    if settings.hsm_pin is not None and settings.hsm_pin.get_secret_value():
        return settings.hsm_pin.get_secret_value()
    raise ConfigurationError(
        "no HSM PIN configured: set KEYGATE_HSM_PIN_FILE (a file) or KEYGATE_HSM_PIN"
    )


def hsm_config(settings: Settings) -> HsmConfig:
    return HsmConfig(
        module_path=settings.hsm_module or find_softhsm_module(),
        token_label=settings.hsm_token_label,
        pin=_pin(settings),
        mechanism=_MECHANISMS[settings.hsm_mechanism],
        lock_timeout_s=settings.hsm_lock_timeout_s,
    )


def open_registry(settings: Settings, *, create: bool = False) -> tuple[Registry, AuditStore]:
    if settings.registry_url.startswith("sqlite:///") or settings.audit_url.startswith(
        "sqlite:///"
    ):
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    registry = Registry(settings.registry_url)
    store = AuditStore(settings.audit_url)
    if create:
        registry.create_schema()
        store.create_schema()
    return registry, store


def provider_set(settings: Settings) -> ProviderSet:
    """The cloud KMS adapters with the residency policy and the retry/outage settings."""
    path = settings.residency_file
    if path is None and settings.policies_dir is not None:
        path = settings.policies_dir / "residency.toml"
    options = ProviderOptions(
        connect_timeout_s=settings.provider_connect_timeout_s,
        read_timeout_s=settings.provider_read_timeout_s,
        retries=settings.provider_retries,
        backoff_s=settings.provider_backoff_s,
        backoff_max_s=settings.provider_backoff_max_s,
        down_for_s=settings.provider_down_for_s,
    )
    return ProviderSet(options, ResidencyPolicy.load(path))


def audit_keys(settings: Settings, hsm: Any, store: AuditStore) -> AuditKeys:
    """The checkpoint signing key and the pseudonym key of the audit trail (in the HSM)."""
    return AuditKeys(
        hsm,
        store,
        signing_label=settings.audit_signing_key_label,
        pseudonym_label=settings.audit_pseudonym_key_label,
    )


def build_gateway(
    settings: Settings,
    *,
    start_refresher: bool = True,
    instrument_hsm: Callable[[Any], Any] | None = None,
    providers: ProviderSet | None = None,
) -> Gateway:
    """A ready Gateway.  The HSM connects lazily, so a missing token shows in /readyz.

    ``instrument_hsm`` may wrap the HSM adapter the key manager calls (the API adds metrics);
    ``providers`` replaces the cloud KMS adapters built from the settings and the environment.
    """
    registry, store = open_registry(settings, create=True)
    hsm = Pkcs11Hsm(hsm_config(settings))
    if providers is None:
        providers = provider_set(settings)
    keys = KeyManager(
        registry=registry,
        hsm=instrument_hsm(hsm) if instrument_hsm is not None else hsm,
        rng=SystemRandom(),
        max_plaintext=settings.max_plaintext_bytes,
        max_cached_keys=settings.max_cached_keys,
        providers=providers,
        outage_encrypt=settings.provider_outage_encrypt,
        probe_interval=settings.provider_probe_interval_s,
    )
    if start_refresher:
        keys.start(settings.refresh_interval_s)
    keys_for_audit = audit_keys(settings, hsm, store)
    checkpointer = Checkpointer(
        store,
        keys_for_audit.sign_checkpoint,
        every_events=settings.audit_checkpoint_events,
        every_s=settings.audit_checkpoint_interval_s,
        prepare=keys_for_audit.prepare,
    )
    audit = AuditWriter(store, timeout_s=settings.audit_timeout_s, checkpointer=checkpointer)
    return Gateway(
        registry=registry,
        hsm=hsm,
        keys=keys,
        audit=audit,
        audit_store=store,
        audit_keys=keys_for_audit,
        providers=providers,
        policies=load_policies(settings.policies_dir),
        max_batch_items=settings.max_batch_items,
        default_dek_max_records=settings.dek_max_records,
        default_dek_max_age_s=settings.dek_max_age_s,
        dual_control=DualControlGuard(CustodyStore(registry), quorum=settings.custody_quorum),
    )
