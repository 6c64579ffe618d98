"""DEK life cycle: one active DEK per tenant × purpose, an unwrapped-DEK cache, rewrap maps.

The hot path (encrypt, decrypt and rewrap of one record) is a dictionary lookup, a few checks and
one AES-GCM call.  The HSM is called once per DEK: when a new DEK is made (the previous one reached
its record or age limit, or the key was rotated) and when a header is seen for the first time.

Key state comes from a snapshot of the registry.  A refresher thread polls the registry's
generation counter (one cheap query) every ``refresh_interval`` seconds and, when it moved, loads a
new snapshot and drops every cached DEK whose key version may no longer be used the same way: a
rotation, a disabled key or a disabled tenant takes effect in running gateways within seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog

from keygate.core.aead import InvalidTag
from keygate.core.context import aad_prefix, encode_context
from keygate.core.envelope import REWRAP_CAPABILITY, DataKey, inner_wrap_aad
from keygate.core.errors import (
    DecryptionFailed,
    GatewayError,
    KeyDestroyed,
    KeyNotUsable,
    NotFound,
    PayloadTooLarge,
    ProviderRejected,
    ProviderUnavailable,
)
from keygate.core.model import AlgorithmSuite, KeyRef, KeyState
from keygate.core.ports import KeyWrapper, RandomSource
from keygate.core.wire import (
    MAX_ENVELOPE_LEN,
    MIN_ENVELOPE_LEN,
    TEXT_PREFIX,
    WrapLayer,
    from_text,
    header_length,
    parse_header,
    split_text_header,
    to_text,
)
from keygate.keys.registry import ProviderKeyState
from keygate.providers.base import ProviderKeyDisabled, outer_wrap_aad

if TYPE_CHECKING:
    from keygate.providers.guard import ProviderSet

__all__ = ["KeyManager", "KeyStats"]

log = structlog.get_logger(__name__)

SUITE: Final = AlgorithmSuite.AES256_GCM_HKDF_SHA256_COMMIT


@dataclass(slots=True)
class KeyStats:
    """Plain counters (cheap on the hot path); exported to Prometheus by the refresher."""

    records_encrypted: int = 0
    records_decrypted: int = 0
    records_rewrapped: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    deks_created: int = 0
    hsm_wraps: int = 0
    hsm_unwraps: int = 0
    provider_wraps: int = 0
    provider_unwraps: int = 0


class _Active:
    """The DEK that encrypts for one tenant × purpose, with its limits."""

    __slots__ = (
        "aad0",
        "cipher",
        "counter",
        "created",
        "expires",
        "header",
        "key",
        "max_records",
        "prefix",
    )

    def __init__(
        self, key: DataKey, prefix: str, max_records: int, created: float, expires: float
    ) -> None:
        self.key = key
        self.created = created
        self.cipher = key.cipher
        self.header = key.header
        self.prefix = prefix
        self.aad0 = encode_context(prefix, {})
        self.max_records = max_records
        self.expires = expires
        self.counter = itertools.count()


def _no_key(nonce: bytes, data: bytes, aad: bytes) -> bytes:
    raise AssertionError("decrypt_many used a DEK before choosing one")  # pragma: no cover


class _Opened:
    """An unwrapped DEK in the decrypt cache, keyed by its exact header bytes.

    It lives as long as the key's DEK age limit.  The record limit bounds *encryptions* under one
    DEK (random-nonce collisions); reading does not use nonces, so reads are not counted.
    """

    __slots__ = ("aad0", "cipher", "expires", "h", "key", "prefix", "purpose", "tenant")

    def __init__(
        self, key: DataKey, tenant: str, purpose: str, prefix: str, expires: float
    ) -> None:
        self.key = key
        self.cipher = key.cipher
        self.h = key.header_len
        self.tenant = tenant
        self.purpose = purpose
        self.prefix = prefix
        self.aad0 = encode_context(prefix, {})
        self.expires = expires


class KeyManager:
    """Hands out data keys for encrypt, decrypt and rewrap, within the configured limits."""

    def __init__(
        self,
        *,
        registry: object,
        hsm: KeyWrapper,
        rng: RandomSource,
        clock: Callable[[], float] = time.monotonic,
        max_plaintext: int = 64 * 1024,
        max_cached_keys: int = 100_000,
        providers: ProviderSet | None = None,
        outage_encrypt: str = "refuse",
        probe_interval: float = 30.0,
    ) -> None:
        if outage_encrypt not in ("refuse", "cached"):
            raise ValueError("outage_encrypt is 'refuse' or 'cached'")
        self._registry = registry
        self._hsm = hsm
        #: the cloud KMS adapters (outer wrap); None: this gateway only reads HSM-only envelopes
        self._providers = providers
        self._outage_encrypt = outage_encrypt
        self._probe_interval = probe_interval
        self._next_probe = 0.0
        #: per tenant × purpose, serialises the making of a new DEK (HSM and provider calls are
        #: made under it, not under the manager-wide lock)
        self._making: dict[tuple[str, str], threading.Lock] = {}
        self._rng = rng
        self._clock = clock
        self.max_plaintext = max_plaintext
        self._max_cached = max_cached_keys
        self._snap = registry.snapshot()  # type: ignore[attr-defined]
        self._active: dict[tuple[str, str], _Active] = {}
        self._opened: dict[bytes, _Opened] = {}
        self._rewrap: dict[tuple[str, str], dict[bytes, bytes]] = {}
        self._rewrap_text: dict[tuple[str, str], dict[str, str]] = {}
        #: first 8 characters of a validated text header → where its data part starts
        self._text_ends: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = KeyStats()
        self.last_refresh_error: str | None = None
        self.on_refresh: list[Callable[[KeyManager], None]] = []
        if providers is not None:
            providers.listeners.append(self._on_provider_trouble)

    # ------------------------------------------------------------------ registry view
    @property
    def snapshot(self) -> Any:
        """The registry snapshot in force (tenants, keys, versions, identities)."""
        return self._snap

    @property
    def generation(self) -> int:
        return int(self._snap.generation)

    def refresh(self, *, force: bool = False) -> bool:
        """Reload the registry snapshot if it changed; returns True when it did."""
        gen = self._registry.generation()  # type: ignore[attr-defined]
        if not force and gen == self._snap.generation:
            return False
        snap = self._registry.snapshot()  # type: ignore[attr-defined]
        with self._lock:
            self._snap = snap
            self._prune(snap)
        log.info("registry.reloaded", generation=snap.generation)
        return True

    def _prune(self, snap: object) -> None:
        def version_state(ref: KeyRef) -> KeyState | None:
            rec = self._version(snap, ref)
            return None if rec is None else rec.state

        def tenant_ok(tenant: str) -> bool:
            t = snap.tenants.get(tenant)  # type: ignore[attr-defined]
            return t is not None and t.enabled

        def provider_current(k: tuple[str, str], a: _Active) -> bool:
            prov = snap.active_provider(*k)  # type: ignore[attr-defined]
            return _provider_uri(a.key.chain) == (prov.uri if prov is not None else None)

        def provider_usable(o: _Opened) -> bool:
            uri = _provider_uri(o.key.chain)
            if uri is None:
                return True
            rec = snap.provider_key(o.tenant, o.purpose, uri)  # type: ignore[attr-defined]
            return rec is not None and rec.state is not ProviderKeyState.RETIRED

        self._active = {
            k: a
            for k, a in self._active.items()
            if tenant_ok(k[0])
            and version_state(a.key.key_ref) is KeyState.ACTIVE
            and self._limits_unchanged(snap, k, a)
            and provider_current(k, a)
        }
        self._opened = {
            h: o
            for h, o in self._opened.items()
            if tenant_ok(o.tenant)
            and (st := version_state(o.key.key_ref)) is not None
            and st.can_decrypt
            and provider_usable(o)
        }
        self._rewrap = {}
        self._rewrap_text = {}

    @staticmethod
    def _limits_unchanged(snap: object, k: tuple[str, str], a: _Active) -> bool:
        rec = snap.keys.get(k)  # type: ignore[attr-defined]
        return (
            rec is not None
            and rec.dek_max_records >= a.max_records
            and a.created + rec.dek_max_age_s >= a.expires
        )

    @staticmethod
    def _version(snap: Any, ref: KeyRef) -> Any:
        for rec in snap.versions.get((ref.tenant, ref.purpose), ()):
            if rec.version == ref.version:
                return rec
        return None

    def start(self, interval: float = 1.0) -> None:
        """Start the refresher thread (daemon)."""
        if self._thread is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                    self.last_refresh_error = None
                    self.probe_providers()
                except GatewayError as exc:
                    self.last_refresh_error = exc.code
                    log.warning("registry.refresh_failed", code=exc.code)
                except Exception as exc:  # noqa: BLE001 - the refresher must survive anything
                    self.last_refresh_error = type(exc).__name__
                    log.warning("registry.refresh_failed", error=type(exc).__name__)
                for hook in self.on_refresh:
                    with contextlib.suppress(Exception):  # a metrics hook must not kill refresh
                        hook(self)

        self._thread = threading.Thread(target=run, name="keygate-refresher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ------------------------------------------------------------------ encrypt
    def _check_plaintext(self, plaintext: bytes) -> None:
        if len(plaintext) > self.max_plaintext:
            raise PayloadTooLarge(f"plaintext is larger than {self.max_plaintext} bytes")

    def encrypt(
        self, tenant: str, purpose: str, context: Mapping[str, str], plaintext: bytes
    ) -> bytes:
        """Encrypt one value; returns the binary envelope."""
        if len(plaintext) > self.max_plaintext:
            raise PayloadTooLarge(f"plaintext is larger than {self.max_plaintext} bytes")
        a = self._active.get((tenant, purpose))
        if a is None or next(a.counter) >= a.max_records or a.expires < self._clock():
            a = self._new_active(tenant, purpose, a)
        self.stats.records_encrypted += 1
        nonce = self._rng.nonce()
        aad = encode_context(a.prefix, context) if context else a.aad0
        return a.header + nonce + a.cipher.encrypt(nonce, plaintext, aad)

    def encrypt_many(
        self,
        tenant: str,
        purpose: str,
        items: Sequence[tuple[Mapping[str, str], bytes]],
    ) -> list[bytes | GatewayError]:
        """Encrypt a batch; a bad item yields its error in its slot, the others go on."""
        out: list[bytes | GatewayError] = []
        append = out.append
        nonce = self._rng.nonce
        clock = self._clock
        limit = self.max_plaintext
        key = (tenant, purpose)
        a = self._active.get(key)
        now = clock()
        for context, plaintext in items:
            try:
                if len(plaintext) > limit:
                    raise PayloadTooLarge(f"plaintext is larger than {limit} bytes")
                if a is None or next(a.counter) >= a.max_records or a.expires < now:
                    a = self._new_active(tenant, purpose, a)
                    now = clock()
                n = nonce()
                aad = encode_context(a.prefix, context) if context else a.aad0
                append(a.header + n + a.cipher.encrypt(n, plaintext, aad))
            except GatewayError as exc:
                append(exc)
        self.stats.records_encrypted += len(items)
        return out

    def active_version(self, tenant: str, purpose: str) -> int:
        """The version new ciphertexts of tenant × purpose are made under (raises if none)."""
        return self._active_record(tenant, purpose).version  # type: ignore[attr-defined, no-any-return]

    def _active_record(self, tenant: str, purpose: str) -> object:
        snap = self._snap
        t = snap.tenants.get(tenant)
        if t is None:
            raise NotFound(f"unknown tenant {tenant}")
        if not t.enabled:
            raise KeyNotUsable(f"tenant {tenant} is disabled")
        versions = snap.versions.get((tenant, purpose))
        if not versions:
            raise NotFound(f"no key for {tenant}/{purpose}")
        for rec in reversed(versions):
            if rec.state is KeyState.ACTIVE:
                return rec
        raise KeyNotUsable(f"{tenant}/{purpose} has no active key version")

    def _new_active(self, tenant: str, purpose: str, seen: _Active | None) -> _Active:
        k = (tenant, purpose)
        with self._lock:
            making = self._making.get(k)
            if making is None:
                making = self._making.setdefault(k, threading.Lock())
        # One thread makes the new DEK of tenant × purpose (the others wait for it and use it);
        # its HSM and provider calls do not hold up other tenants.
        with making:
            cur = self._active.get(k)
            if (
                cur is not None
                and cur is not seen
                and cur.expires >= self._clock()
                and next(cur.counter) < cur.max_records
            ):
                return cur
            snap = self._snap
            rec = self._active_record(tenant, purpose)
            limits = snap.keys[k]
            prov = snap.active_provider(tenant, purpose)
            if prov is not None:
                self._provider_ready(prov.uri)
            ref = KeyRef(tenant, purpose, rec.version)  # type: ignore[attr-defined]
            dek = self._rng.dek()
            key = self._wrap_new(dek, ref, rec, None if prov is None else prov.uri)
            self.stats.deks_created += 1
            now = self._clock()
            prefix = aad_prefix(SUITE, tenant, purpose)
            active = _Active(
                key, prefix, int(limits.dek_max_records), now, now + float(limits.dek_max_age_s)
            )
            next(active.counter)
            with self._lock:
                if self._snap is not snap and not self._still_current(tenant, purpose, key):
                    # the registry changed while the DEK was being wrapped: try again
                    raise ProviderUnavailable(
                        f"{tenant}/{purpose}: the key configuration changed; retry", retry_after=1
                    )
                self._active[k] = active
                self._remember(key, limits, now)
            log.debug("dek.created", tenant=tenant, purpose=purpose, key_version=ref.version)
            return active

    def _still_current(self, tenant: str, purpose: str, key: DataKey) -> bool:
        snap = self._snap
        rec = self._version(snap, key.key_ref)
        prov = snap.active_provider(tenant, purpose)
        return (
            rec is not None
            and rec.state is KeyState.ACTIVE
            and _provider_uri(key.chain) == (prov.uri if prov is not None else None)
        )

    def _wrap_new(self, dek: bytes, ref: KeyRef, rec: object, provider_uri: str | None) -> DataKey:
        """Wrap ``dek`` by the KEK version ``rec`` (HSM) and then by the provider key, if any."""
        mechanism, wrapped = self._hsm.wrap_dek(
            rec.hsm_label,  # type: ignore[attr-defined]
            dek,
            aad=inner_wrap_aad(ref),
        )
        self.stats.hsm_wraps += 1
        chain: tuple[WrapLayer, ...] = (WrapLayer(mechanism),)
        if provider_uri is not None:
            providers = self._need_providers()
            wrapped = providers.wrap(
                provider_uri, wrapped, aad=outer_wrap_aad(ref.tenant, ref.purpose, ref.version)
            )
            self.stats.provider_wraps += 1
            chain = (
                WrapLayer(mechanism),
                WrapLayer(providers.mechanism_of(provider_uri), provider_uri.encode("ascii")),
            )
        return DataKey(dek, suite=SUITE, key_ref=ref, chain=chain, wrapped_dek=wrapped)

    def _need_providers(self) -> ProviderSet:
        if self._providers is None:
            raise ProviderRejected(
                "this gateway has no provider adapters configured (the key uses a cloud KMS)"
            )
        return self._providers

    def _provider_ready(self, uri: str) -> None:
        """Fail fast (503) while the provider key is known to be down."""
        providers = self._need_providers()
        guard = providers.guard(uri)
        if guard.down:
            last = guard.last_error
            raise ProviderUnavailable(
                f"provider key {uri} is unavailable"
                + (f" ({last.detail})" if last is not None else ""),
                retry_after=max(1.0, guard.health().down_for_s),
            )

    # ------------------------------------------------------------------ provider trouble
    def _on_provider_trouble(self, uri: str, exc: GatewayError) -> None:
        """A provider key went down, or refused us for good: stop using what depends on it.

        Down (transient): encrypt fails closed — the active DEKs wrapped by that key are dropped,
        so the next encrypt asks the provider and gets 503 — unless ``outage_encrypt`` is
        ``cached``.  Decrypt goes on from the unwrapped-DEK cache within its limits.
        Disabled, destroyed or credentials refused (permanent): every cached DEK under that key
        is dropped, for decrypt too: the provider's kill switch works within one call.
        """
        reason = getattr(exc, "reason", "")
        permanent = reason in (
            "provider-key-disabled",
            "provider-key-destroyed",
            "provider-credentials",
        )
        if not permanent and self._outage_encrypt == "cached":
            return
        with self._lock:
            self._active = {
                k: a for k, a in self._active.items() if _provider_uri(a.key.chain) != uri
            }
            if permanent:
                self._opened = {
                    h: o for h, o in self._opened.items() if _provider_uri(o.key.chain) != uri
                }
                self._rewrap = {}
                self._rewrap_text = {}
        log.warning("provider.cache_dropped", provider=uri, reason=reason or exc.code)

    def provider_uris_in_use(self) -> set[str]:
        """Provider keys this process holds DEKs under (active or cached)."""
        uris = {_provider_uri(a.key.chain) for a in list(self._active.values())}
        uris |= {_provider_uri(o.key.chain) for o in list(self._opened.values())}
        uris.discard(None)
        return uris  # type: ignore[return-value]

    def probe_providers(self, *, force: bool = False) -> None:
        """Ask each provider key in use whether it is still there and enabled (``describe``).

        Run by the refresher every ``probe_interval`` seconds: it is how a provider outage, or a
        provider key disabled by its custodian, reaches a gateway that has everything cached.
        """
        if self._providers is None or (self._probe_interval <= 0 and not force):
            return
        now = self._clock()
        if not force and now < self._next_probe:
            return
        self._next_probe = now + self._probe_interval
        snap = self._snap
        uris = self.provider_uris_in_use()
        for recs in snap.providers.values():
            uris.update(r.uri for r in recs if r.state is ProviderKeyState.ACTIVE)
        for uri in sorted(uris):
            guard = self._providers.guard(uri)
            if guard.down and not force:
                continue  # fails fast until its window ends; the next probe is the half-open try
            try:
                status = self._providers.describe(uri)
            except GatewayError:
                continue  # the guard recorded it and told the listeners
            if not status.enabled:
                self._on_provider_trouble(
                    uri, ProviderKeyDisabled(f"provider key {uri} is {status.state}")
                )

    def _remember(self, key: DataKey, limits: object, now: float) -> _Opened:
        opened = _Opened(
            key,
            key.key_ref.tenant,
            key.key_ref.purpose,
            aad_prefix(SUITE, key.key_ref.tenant, key.key_ref.purpose),
            now + float(limits.dek_max_age_s),  # type: ignore[attr-defined]
        )
        cache = self._opened
        if len(cache) >= self._max_cached:
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                cache.pop(next(iter(cache)))  # the oldest entry (dicts keep insertion order)
        cache[key.header] = opened
        return opened

    # ------------------------------------------------------------------ decrypt
    def decrypt(
        self, tenant: str, purpose: str, context: Mapping[str, str], envelope: bytes
    ) -> bytes:
        """Decrypt one binary envelope under tenant × purpose and context."""
        # Fast path: a header seen before is looked up by its exact bytes, so it needs no parsing;
        # anything else goes through the full, bounded parser in _open_slow.
        n = len(envelope)
        if n < MIN_ENVELOPE_LEN or n > MAX_ENVELOPE_LEN:
            raise DecryptionFailed("bad envelope length")
        h = envelope[2] << 8 | envelope[3]
        if h + 28 > n:  # nonce (12) and tag (16) must fit after the header
            raise DecryptionFailed("bad header length")
        o = self._opened.get(envelope[:h])
        if o is None or o.tenant != tenant or o.purpose != purpose or o.expires < self._clock():
            o = self._open_slow(tenant, purpose, envelope)
            h = o.h
        self.stats.records_decrypted += 1
        try:
            return o.cipher.decrypt(
                envelope[h : h + 12],
                envelope[h + 12 :],
                encode_context(o.prefix, context) if context else o.aad0,
            )
        except InvalidTag:
            raise DecryptionFailed() from None

    def decrypt_many(
        self,
        tenant: str,
        purpose: str,
        items: Sequence[tuple[Mapping[str, str], bytes]],
    ) -> list[bytes | GatewayError]:
        out: list[bytes | GatewayError] = []
        append = out.append
        opened = self._opened
        now = self._clock()
        # The DEK of the item before, already checked in this call for tenant × purpose and age:
        # its exact header bytes, and what decrypting under it needs.  Items of one batch mostly
        # share a DEK, so most need one prefix comparison instead of a header slice, its hash
        # and a cache lookup.  An envelope that starts with those bytes has that header length
        # (the length is inside the header).
        header: bytes | None = None
        h = min_n = 0
        prefix = ""
        aad0 = b""
        decrypt: Callable[[bytes, bytes, bytes], bytes] = _no_key
        for context, envelope in items:
            try:
                n = len(envelope)
                if n < MIN_ENVELOPE_LEN or n > MAX_ENVELOPE_LEN:
                    raise DecryptionFailed("bad envelope length")
                if header is None or n < min_n or not envelope.startswith(header):
                    hn = envelope[2] << 8 | envelope[3]
                    if hn + 28 > n:  # nonce (12) and tag (16) must fit after the header
                        raise DecryptionFailed("bad header length")
                    o = opened.get(envelope[:hn])
                    if o is None or o.tenant != tenant or o.purpose != purpose or o.expires < now:
                        o = self._open_slow(tenant, purpose, envelope)
                        opened = self._opened
                    header, h, prefix, aad0 = o.key.header, o.h, o.prefix, o.aad0
                    min_n, decrypt = o.h + 28, o.cipher.decrypt
                aad = encode_context(prefix, context) if context else aad0
                append(decrypt(envelope[h : h + 12], envelope[h + 12 :], aad))
            except InvalidTag:
                append(DecryptionFailed())
            except GatewayError as exc:
                append(exc)
        self.stats.records_decrypted += len(items)
        return out

    def open_key(self, tenant: str, purpose: str, envelope: bytes) -> DataKey:
        """The data key of an envelope (cached), with every state check applied."""
        h = header_length(envelope)
        o = self._opened.get(envelope[:h])
        if o is None or o.tenant != tenant or o.purpose != purpose or o.expires < self._clock():
            o = self._open_slow(tenant, purpose, envelope)
        return o.key

    def _open_slow(self, tenant: str, purpose: str, envelope: bytes) -> _Opened:
        self.stats.cache_misses += 1
        header = parse_header(envelope)
        h = header.length
        ref = header.key_ref
        if ref.tenant != tenant or ref.purpose != purpose:
            # Another tenant's or purpose's ciphertext: the same opaque answer as a tampered one.
            raise DecryptionFailed()
        snap = self._snap
        t = snap.tenants.get(tenant)
        if t is None:
            raise NotFound(f"unknown tenant {tenant}")
        if not t.enabled:
            raise KeyNotUsable(f"tenant {tenant} is disabled")
        rec = self._version(snap, ref)
        if rec is None:
            raise DecryptionFailed()
        state: KeyState = rec.state
        if state is KeyState.DESTROYED:
            raise KeyDestroyed(f"key version {ref} has been destroyed")
        if not state.can_decrypt:
            raise KeyNotUsable(f"key version {ref} is {state.value}")
        chain = header.chain
        if not chain[0].mechanism.is_hsm:
            raise DecryptionFailed()
        wrapped = header.wrapped_dek
        if len(chain) == 2 and not chain[1].mechanism.is_hsm:
            wrapped = self._outer_unwrap(ref, chain[1], wrapped)
        elif len(chain) != 1:
            raise DecryptionFailed()
        dek = self._hsm.unwrap_dek(
            rec.hsm_label,
            chain[0].mechanism,
            wrapped,
            aad=inner_wrap_aad(ref),
        )
        self.stats.hsm_unwraps += 1
        key = DataKey.from_header(dek, header)
        if key.header != envelope[:h]:
            raise DecryptionFailed()
        limits = snap.keys[(tenant, purpose)]
        with self._lock:
            return self._remember(key, limits, self._clock())

    def _outer_unwrap(self, ref: KeyRef, layer: WrapLayer, wrapped: bytes) -> bytes:
        """Undo the provider layer.  Only a provider key the registry names for this tenant ×
        purpose is ever called: a header cannot make keygate talk to a key (or host) of its
        choosing."""
        providers = self._need_providers()
        try:
            uri = layer.key_id.decode("ascii")
        except UnicodeDecodeError:
            raise DecryptionFailed() from None
        rec = self._snap.provider_key(ref.tenant, ref.purpose, uri)
        if rec is None:
            log.info("decrypt.unknown_provider_key", tenant=ref.tenant, purpose=ref.purpose)
            raise DecryptionFailed()
        if rec.state is ProviderKeyState.RETIRED:
            raise KeyNotUsable(
                f"provider key {uri} of {ref.tenant}/{ref.purpose} is retired "
                "(its migration was finished)"
            )
        if providers.mechanism_of(uri) != layer.mechanism:
            raise DecryptionFailed()
        inner = providers.unwrap(
            uri, wrapped, aad=outer_wrap_aad(ref.tenant, ref.purpose, ref.version)
        )
        self.stats.provider_unwraps += 1
        return inner

    # ------------------------------------------------------------------ rewrap
    # The rewrap map goes from an old header to the header of the same DEK under the active key
    # version, per tenant × purpose; a header already current maps to itself.  Filled once per
    # DEK (one HSM wrap), emptied whenever the registry changes.

    def _rewrap_map(self, tenant: str, purpose: str) -> dict[bytes, bytes]:
        m = self._rewrap.get((tenant, purpose))
        if m is None:
            m = self._rewrap.setdefault((tenant, purpose), {})
        return m

    def rewrap(self, tenant: str, purpose: str, envelope: bytes) -> bytes:
        """The envelope under the active key version; only the header changes."""
        n = len(envelope)
        if n < MIN_ENVELOPE_LEN or n > MAX_ENVELOPE_LEN:
            raise DecryptionFailed("bad envelope length")
        h = envelope[2] << 8 | envelope[3]
        if h + 28 > n:
            raise DecryptionFailed("bad header length")
        old = envelope[:h]
        m = self._rewrap.get((tenant, purpose))
        new = m.get(old) if m is not None else None
        if new is None:
            new = self._rewrap_slow(tenant, purpose, envelope, h)
        self.stats.records_rewrapped += 1
        return envelope if new == old else new + envelope[h:]

    def rewrap_many(
        self, tenant: str, purpose: str, envelopes: Sequence[bytes]
    ) -> list[bytes | GatewayError]:
        """Rewrap a batch; a bad item yields its error in its slot."""
        out: list[bytes | GatewayError] = []
        append = out.append
        cache = self._rewrap_map(tenant, purpose)
        for envelope in envelopes:
            try:
                n = len(envelope)
                if n < MIN_ENVELOPE_LEN or n > MAX_ENVELOPE_LEN:
                    raise DecryptionFailed("bad envelope length")
                h = envelope[2] << 8 | envelope[3]
                if h + 28 > n:
                    raise DecryptionFailed("bad header length")
                old = envelope[:h]
                new = cache.get(old)
                if new is None:
                    new = self._rewrap_slow(tenant, purpose, envelope, h)
                    cache = self._rewrap_map(tenant, purpose)
                append(envelope if new == old else new + envelope[h:])
            except GatewayError as exc:
                append(exc)
        self.stats.records_rewrapped += len(envelopes)
        return out

    def rewrap_text_many(
        self, tenant: str, purpose: str, texts: Sequence[str]
    ) -> list[str | GatewayError]:
        """Rewrap text envelopes by replacing their header characters only.

        The header is a multiple of 3 bytes, so its base64url characters stand apart from the
        data part's: a header seen before is swapped without decoding or encoding the data part.
        Its first 8 characters fix the header length (they encode bytes 0..5, H among them), so a
        known header is found with two dictionary lookups.  A header seen for the first time goes
        through the binary path with full validation.  (Rewrap cannot authenticate the data part —
        that needs the context — so, as for binary envelopes, a damaged data part comes back as
        damaged as it went in.)
        """
        out: list[str | GatewayError] = []
        append = out.append
        key = (tenant, purpose)
        cache = self._rewrap_text.setdefault(key, {})
        ends = self._text_ends
        for text in texts:
            try:
                end = ends.get(text[4:12]) if text.__class__ is str else None
                new = None
                if end is not None and len(text) >= end + 38 and text.startswith(TEXT_PREFIX):
                    old = text[4:end]
                    new = cache.get(old)
                if new is None:
                    old, end, new = self._rewrap_text_slow(tenant, purpose, text)
                    cache = self._rewrap_text.setdefault(key, {})
                elif not text.isascii():
                    raise DecryptionFailed("not a keygate v1 envelope")
                append(text if new == old else TEXT_PREFIX + new + text[end:])
            except GatewayError as exc:
                append(exc)
        self.stats.records_rewrapped += len(texts)
        return out

    def _rewrap_text_slow(self, tenant: str, purpose: str, text: str) -> tuple[str, int, str]:
        split = split_text_header(text)
        if split is None:
            raise DecryptionFailed("not a keygate v1 envelope")
        old, end = split
        envelope = from_text(text)  # the whole text, strictly
        result = self.rewrap_many(tenant, purpose, (envelope,))[0]
        if isinstance(result, GatewayError):
            raise result
        self.stats.records_rewrapped -= 1  # counted by the caller
        h = result[2] << 8 | result[3]  # the new header's length: a new wrap may change it
        new = to_text(result[:h])[len(TEXT_PREFIX) :]
        cache = self._rewrap_text.setdefault((tenant, purpose), {})
        if len(cache) >= self._max_cached:
            cache.clear()  # bounded
        cache[old] = new
        if len(self._text_ends) >= self._max_cached:
            self._text_ends.clear()
        self._text_ends[text[4:12]] = end
        return old, end, new

    def _rewrap_slow(self, tenant: str, purpose: str, envelope: bytes, h: int) -> bytes:
        key = self.open_key(tenant, purpose, envelope)
        rec = self._active_record(tenant, purpose)
        version: int = rec.version  # type: ignore[attr-defined]
        prov = self._snap.active_provider(tenant, purpose)
        target_uri = None if prov is None else prov.uri
        if key.key_ref.version == version and _provider_uri(key.chain) == target_uri:
            new_header = key.header
        else:
            if target_uri is not None:
                self._provider_ready(target_uri)
            new_key = self._wrap_new(
                key.dek_for_rewrap(REWRAP_CAPABILITY),
                KeyRef(tenant, purpose, version),
                rec,
                target_uri,
            )
            with self._lock:
                self._remember(new_key, self._snap.keys[(tenant, purpose)], self._clock())
            new_header = new_key.header
        m = self._rewrap_map(tenant, purpose)
        if len(m) >= self._max_cached:
            m.clear()  # bounded: hostile or huge inputs cannot grow it without limit
        m[envelope[:h]] = new_header
        return new_header


def _provider_uri(chain: tuple[WrapLayer, ...]) -> str | None:
    """The provider key URI of a wrap chain (its outer layer), or None for HSM-only chains."""
    if len(chain) < 2:
        return None
    return chain[-1].key_id.decode("ascii", "replace")
