"""Retries, backoff, outage state and residency around the provider adapters.

:class:`ProviderSet` is what the key manager talks to: it turns a key URI into its adapter (one
per scheme, imported on first use), checks residency on every call, and runs each call through the
key's :class:`KeyGuard`:

- transient failures (:class:`ProviderUnavailable`, :class:`ProviderTimeout`) are retried up to
  ``options.retries`` times with exponential backoff and full jitter; permanent ones (credentials,
  key state, a rejected ciphertext, a bad request) are never retried;
- when the retries are used up the key counts as *down* for ``options.down_for_s``: calls fail at
  once with 503 and ``Retry-After`` instead of piling up timeouts, then one call is let through
  (half-open) and a success closes it again;
- listeners hear about outages and permanent refusals (the key manager drops cached DEKs: encrypt
  fails closed while the provider is down; a disabled or destroyed provider key also ends
  decryption from the cache).
"""

from __future__ import annotations

import importlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import structlog

from keygate.core.errors import (
    ConfigurationError,
    GatewayError,
    InvalidRequest,
    ProviderUnavailable,
)
from keygate.core.model import WrapMechanism
from keygate.policy.residency import ResidencyPolicy
from keygate.providers import ADAPTERS, scheme_of
from keygate.providers.base import (
    KeyStatus,
    KeyUri,
    KmsAdapter,
    ProviderOptions,
)

__all__ = ["KILL_REASONS", "KeyGuard", "ProviderHealth", "ProviderSet"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

_MAX_URI_LEN: Final = 512
#: the adapters' mechanisms, so a header's layer can be checked against its URI's scheme
_MECHANISM_BY_SCHEME: Final = {
    "aws-kms": WrapMechanism.AWS_KMS,
    "gcp-kms": WrapMechanism.GCP_KMS,
    "azure-kv": WrapMechanism.AZURE_KEY_VAULT,
    "oci-kms": WrapMechanism.OCI_VAULT,
    "hcvault": WrapMechanism.VAULT_TRANSIT,
    "sakura-kms": WrapMechanism.SAKURA_KMS,
}

Listener = Callable[[str, GatewayError], None]


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    """One provider key's state as the guard sees it (``/readyz``, ``keygate provider show``)."""

    uri: str
    ok: bool
    #: error code and reason of the last failure, '' when none
    error: str = ""
    down_for_s: float = 0.0
    calls: int = 0
    failures: int = 0


class KeyGuard:
    """Retry, backoff and outage state for one provider key."""

    def __init__(
        self,
        key: KeyUri,
        options: ProviderOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_down: Listener | None = None,
    ) -> None:
        self.key = key
        self._options = options
        self._clock = clock
        self._sleep = sleep
        self._on_down = on_down
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._half_open = False
        self.last_error: GatewayError | None = None
        self.calls = 0
        self.failures = 0

    @property
    def down(self) -> bool:
        return self._clock() < self._down_until

    def health(self) -> ProviderHealth:
        err = self.last_error
        reason = getattr(err, "reason", "") if err is not None else ""
        return ProviderHealth(
            uri=self.key.uri,
            ok=err is None,
            error=f"{err.code}:{reason}"
            if err is not None and reason
            else (err.code if err else ""),
            down_for_s=max(0.0, self._down_until - self._clock()),
            calls=self.calls,
            failures=self.failures,
        )

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with the retry policy; raises the (last) mapped provider error."""
        now = self._clock()
        with self._lock:
            if now < self._down_until:
                raise ProviderUnavailable(
                    f"{what}: provider key {self.key.uri} is unavailable "
                    f"({self.last_error.detail if self.last_error else 'down'})",
                    retry_after=max(1.0, self._down_until - now),
                )
            if self._down_until:  # the outage window ended: let calls through (half-open)
                self._half_open = True
        opts = self._options
        attempt = 0
        while True:
            self.calls += 1
            try:
                result = fn()
            except ProviderUnavailable as exc:
                self.failures += 1
                if attempt < opts.retries and not self._half_open:
                    delay = min(opts.backoff_max_s, opts.backoff_s * (2**attempt))
                    attempt += 1
                    log.info(
                        "provider.retry",
                        provider=self.key.uri,
                        attempt=attempt,
                        reason=getattr(exc, "reason", exc.code),
                    )
                    self._sleep(random.uniform(0, delay))  # noqa: S311 - jitter, not crypto
                    continue
                self._mark_down(exc)
                raise
            except GatewayError as exc:
                # Permanent: credentials, key state, a rejected ciphertext.  Not retried; the key
                # is not "down" (other ciphertexts may be fine), but listeners hear of key state.
                # A rejected ciphertext says nothing about the key's health (anyone can send
                # one), so only key state and credentials count against it.
                reason = getattr(exc, "reason", "")
                if reason in KILL_REASONS or reason == "provider-key-not-found":
                    self.failures += 1
                    with self._lock:
                        self.last_error = exc
                    if self._on_down is not None and reason in KILL_REASONS:
                        self._on_down(self.key.uri, exc)
                raise
            else:
                if self.last_error is not None or self._half_open:
                    with self._lock:
                        self.last_error = None
                        self._down_until = 0.0
                        self._half_open = False
                    log.info("provider.recovered", provider=self.key.uri)
                return result

    def _mark_down(self, exc: GatewayError) -> None:
        with self._lock:
            self.last_error = exc
            self._down_until = self._clock() + self._options.down_for_s
            self._half_open = False
        log.warning(
            "provider.down",
            provider=self.key.uri,
            reason=getattr(exc, "reason", exc.code),
            seconds=self._options.down_for_s,
        )
        if self._on_down is not None:
            self._on_down(self.key.uri, exc)


#: permanent refusals after which cached DEKs under the key must not be used any more
KILL_REASONS: Final = frozenset(
    {"provider-key-disabled", "provider-key-destroyed", "provider-credentials"}
)


class ProviderSet:
    """Every provider key this gateway uses, behind residency and the guards."""

    def __init__(
        self,
        options: ProviderOptions | None = None,
        residency: ResidencyPolicy | None = None,
        *,
        settings: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.options = options or ProviderOptions()
        self.residency = residency if residency is not None else ResidencyPolicy.load()
        #: per scheme, a settings object for its adapter (tests point adapters at local servers)
        self._settings = dict(settings or {})
        self._clock = clock
        self._sleep = sleep
        self._adapters: dict[str, KmsAdapter] = {}
        self._keys: dict[str, KeyUri] = {}
        self._guards: dict[str, KeyGuard] = {}
        self._lock = threading.Lock()
        self.listeners: list[Listener] = []
        #: calls that reached an adapter, per operation ("wrap", "unwrap", "describe")
        self.counts: dict[str, int] = {"wrap": 0, "unwrap": 0, "describe": 0}

    # -- resolution ----------------------------------------------------------------------
    @staticmethod
    def adapter_class(scheme: str) -> type[KmsAdapter]:
        try:
            module_name, class_name = ADAPTERS[scheme]
        except KeyError:
            known = ", ".join(sorted(ADAPTERS))
            raise InvalidRequest(
                f"unknown provider key scheme {scheme!r} (known: {known})"
            ) from None
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            extra = module_name.rsplit(".", 1)[-1]
            extra = {"gcp": "gcp", "aws": "aws", "azure": "azure", "oci": "oci"}.get(extra, extra)
            raise ConfigurationError(
                f"the {scheme} adapter needs its SDK: pip install 'keygate[{extra}]' "
                f"({type(exc).__name__}: {exc.name or 'import failed'})"
            ) from exc
        cls: type[KmsAdapter] = getattr(module, class_name)
        return cls

    def parse(self, uri: str) -> KeyUri:
        """Parse and validate a key URI (syntax only; residency is :meth:`check`)."""
        if not uri or len(uri) > _MAX_URI_LEN or not uri.isascii():
            raise InvalidRequest(f"a provider key URI is 1..{_MAX_URI_LEN} ASCII characters")
        known = self._keys.get(uri)
        if known is not None:
            return known
        scheme = scheme_of(uri)
        if not scheme:
            raise InvalidRequest("a provider key URI starts with its scheme, e.g. aws-kms://…")
        key = self.adapter_class(scheme).parse_uri(uri)
        with self._lock:
            if len(self._keys) < 10_000:
                self._keys[uri] = key
        return key

    def check(self, uri: str) -> KeyUri:
        """Parse ``uri`` and apply the residency policy."""
        key = self.parse(uri)
        self.residency.check(key)
        return key

    @staticmethod
    def mechanism_of(uri: str) -> WrapMechanism:
        scheme = scheme_of(uri)
        try:
            return _MECHANISM_BY_SCHEME[scheme]
        except KeyError:
            raise InvalidRequest(f"unknown provider key scheme {scheme!r}") from None

    def _adapter(self, scheme: str) -> KmsAdapter:
        adapter = self._adapters.get(scheme)
        if adapter is None:
            with self._lock:
                adapter = self._adapters.get(scheme)
                if adapter is None:
                    cls = self.adapter_class(scheme)
                    settings = self._settings.get(scheme)
                    adapter = cls(self.options, settings)  # type: ignore[call-arg]
                    self._adapters[scheme] = adapter
        return adapter

    def guard(self, uri: str) -> KeyGuard:
        g = self._guards.get(uri)
        if g is None:
            key = self.parse(uri)
            with self._lock:
                g = self._guards.get(uri)
                if g is None:
                    g = KeyGuard(
                        key,
                        self.options,
                        clock=self._clock,
                        sleep=self._sleep,
                        on_down=self._notify,
                    )
                    self._guards[uri] = g
        return g

    def _notify(self, uri: str, exc: GatewayError) -> None:
        for listener in list(self.listeners):
            try:
                listener(uri, exc)
            except Exception:
                log.exception("provider.listener_failed", provider=uri)

    # -- calls ---------------------------------------------------------------------------
    def wrap(self, uri: str, data: bytes, *, aad: bytes) -> bytes:
        key = self.check(uri)
        adapter = self._adapter(key.scheme)

        def call() -> bytes:
            self.counts["wrap"] += 1
            return adapter.wrap(key, data, aad=aad)

        return self.guard(uri).call(f"wrap with {adapter.display_name}", call)

    def unwrap(self, uri: str, data: bytes, *, aad: bytes) -> bytes:
        key = self.check(uri)
        adapter = self._adapter(key.scheme)

        def call() -> bytes:
            self.counts["unwrap"] += 1
            return adapter.unwrap(key, data, aad=aad)

        return self.guard(uri).call(f"unwrap with {adapter.display_name}", call)

    def describe(self, uri: str) -> KeyStatus:
        key = self.check(uri)
        adapter = self._adapter(key.scheme)

        def call() -> KeyStatus:
            self.counts["describe"] += 1
            return adapter.describe(key)

        return self.guard(uri).call(f"describe with {adapter.display_name}", call)

    def display_name(self, uri: str) -> str:
        return self.adapter_class(scheme_of(uri)).display_name

    def health(self) -> list[ProviderHealth]:
        return [g.health() for g in list(self._guards.values())]

    def close(self) -> None:
        with self._lock:
            adapters = list(self._adapters.values())
            self._adapters.clear()
        for adapter in adapters:
            try:
                adapter.close()
            except Exception:  # noqa: BLE001 - closing must not fail shutdown
                log.warning("provider.close_failed", adapter=type(adapter).__name__)
