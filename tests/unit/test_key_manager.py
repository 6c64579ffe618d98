"""KeyManager: DEK life cycle, caches, key states, tenant isolation, batches, threads, RNG."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import select
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from keygate.core.envelope import REWRAP_CAPABILITY, DataKey
from keygate.core.errors import (
    DecryptionFailed,
    GatewayError,
    InvalidRequest,
    KeyDestroyed,
    KeyNotUsable,
    NotFound,
    PayloadTooLarge,
)
from keygate.core.model import AlgorithmSuite, KeyRef, KeyState, WrapMechanism
from keygate.core.wire import (
    MAX_ENVELOPE_LEN,
    MAX_PLAINTEXT_LEN,
    MIN_ENVELOPE_LEN,
    WrapLayer,
    build_header,
    from_text,
    header_length,
    parse_header,
    to_text,
)
from keygate.keys.manager import KeyManager
from keygate.keys.randomness import SystemRandom
from keygate.testing.fakes import ManualClock, SoftwareKeyWrapper, StaticRegistry

pytestmark = pytest.mark.unit

A, B = "131016", "131024"
RES = "resident"
CTX = {"record_id": "R-000123", "field": "氏名"}


@dataclass
class World:
    registry: StaticRegistry
    hsm: SoftwareKeyWrapper
    clock: ManualClock
    km: KeyManager

    def manager(self) -> KeyManager:
        """Another gateway over the same registry and HSM, with a cold cache."""
        return KeyManager(
            registry=self.registry, hsm=self.hsm, rng=SystemRandom(), clock=self.clock
        )


def make_world(*, max_records: int = 1 << 20, max_age: float = 3600.0, **kw: int) -> World:
    reg = StaticRegistry()
    reg.add_key(A, RES, dek_max_records=max_records, dek_max_age_s=max_age)
    reg.add_key(B, RES, dek_max_records=max_records, dek_max_age_s=max_age)
    reg.add_key(A, "tax")
    hsm = SoftwareKeyWrapper()
    clock = ManualClock()
    km = KeyManager(registry=reg, hsm=hsm, rng=SystemRandom(), clock=clock, **kw)
    return World(reg, hsm, clock, km)


@pytest.fixture
def w() -> World:
    return make_world()


def hdr(env: bytes) -> bytes:
    return env[: header_length(env)]


def version_of(env: bytes) -> int:
    return parse_header(env).key_ref.version


# ============================================================================ DEK life cycle
def test_dek_is_reused_under_the_record_limit(w: World) -> None:
    """N records under the record limit cost one HSM wrap and share one header (one DEK)."""
    envs = [w.km.encrypt(A, RES, CTX, b"x%d" % i) for i in range(200)]
    assert w.hsm.wrap_calls == 1
    assert w.km.stats.deks_created == 1
    assert len({hdr(e) for e in envs}) == 1
    assert len({e[header_length(e) : header_length(e) + 12] for e in envs}) == 200


def test_new_dek_after_max_records() -> None:
    """A DEK encrypts exactly dek_max_records records; the next record gets a new DEK."""
    w = make_world(max_records=5)
    envs = [w.km.encrypt(A, RES, CTX, b"r") for _ in range(12)]
    groups = Counter(hdr(e) for e in envs)
    assert sorted(groups.values(), reverse=True) == [5, 5, 2]
    assert w.hsm.wrap_calls == 3
    assert [hdr(e) for e in envs[:5]] == [hdr(envs[0])] * 5
    assert hdr(envs[5]) != hdr(envs[4])


def test_encrypt_many_respects_max_records() -> None:
    """encrypt_many also starts a new DEK after dek_max_records items."""
    w = make_world(max_records=4)
    out = w.km.encrypt_many(A, RES, [(CTX, b"r")] * 10)
    groups = Counter(hdr(e) for e in out if isinstance(e, bytes))
    assert sorted(groups.values(), reverse=True) == [4, 4, 2]
    assert w.hsm.wrap_calls == 3


def test_new_dek_after_max_age() -> None:
    """A DEK older than dek_max_age_s is replaced; at exactly that age it is still used."""
    w = make_world(max_age=60.0)
    first = w.km.encrypt(A, RES, CTX, b"1")
    w.clock.advance(60.0)
    same = w.km.encrypt(A, RES, CTX, b"2")
    w.clock.advance(0.001)
    later = w.km.encrypt(A, RES, CTX, b"3")
    assert hdr(first) == hdr(same)
    assert hdr(later) != hdr(first)
    assert w.hsm.wrap_calls == 2
    assert w.km.decrypt(A, RES, CTX, first) == b"1"


def test_lowering_the_record_limit_takes_effect_on_refresh() -> None:
    """After dek_max_records is lowered and the registry refreshed, the current DEK is replaced."""
    w = make_world(max_records=100)
    first = w.km.encrypt(A, RES, CTX, b"1")
    w.registry.set_limits(A, RES, dek_max_records=10)
    assert w.km.refresh() is True
    assert w.km.refresh() is False
    second = w.km.encrypt(A, RES, CTX, b"2")
    assert hdr(first) != hdr(second)


def test_lowering_the_age_limit_takes_effect_on_refresh() -> None:
    """After dek_max_age_s is lowered below the current DEK's age a new DEK is made."""
    w = make_world(max_age=86_400.0)
    first = w.km.encrypt(A, RES, CTX, b"1")
    w.clock.advance(7_200.0)
    w.registry.set_limits(A, RES, dek_max_age_s=3_600.0)
    w.km.refresh()
    second = w.km.encrypt(A, RES, CTX, b"2")
    assert hdr(first) != hdr(second), "a DEK two hours old is still used under a one-hour limit"


def test_stats_count_single_record_calls(w: World) -> None:
    """KeyStats counts the records of single calls as batch calls do (they feed the metrics)."""
    envs = [w.km.encrypt(A, RES, CTX, b"x") for _ in range(3)]
    for e in envs[:2]:
        w.km.decrypt(A, RES, CTX, e)
    w.km.rewrap(A, RES, envs[0])
    assert (
        w.km.stats.records_encrypted,
        w.km.stats.records_decrypted,
        w.km.stats.records_rewrapped,
    ) == (3, 2, 1)


# ============================================================================ decrypt cache
def test_decrypt_cache_one_unwrap_per_distinct_dek() -> None:
    """A cold gateway unwraps each distinct DEK once, however many records it decrypts."""
    w = make_world(max_records=4)
    envs = [w.km.encrypt(A, RES, CTX, b"%d" % i) for i in range(12)]
    assert len({hdr(e) for e in envs}) == 3
    assert w.hsm.unwrap_calls == 0  # the encrypting gateway already holds its own DEKs
    assert [w.km.decrypt(A, RES, CTX, e) for e in envs] == [b"%d" % i for i in range(12)]
    assert w.hsm.unwrap_calls == 0
    # Cached DEKs also count decryptions against dek_max_records; lift the limit for the reader
    # so that this test counts unwraps per DEK only.
    w.registry.set_limits(A, RES, dek_max_records=1 << 20)
    reader = w.manager()
    for _ in range(3):
        assert reader.decrypt_many(A, RES, [(CTX, e) for e in envs[:2]]) == [b"0", b"1"]
        assert [reader.decrypt(A, RES, CTX, e) for e in envs[2:4]] == [b"2", b"3"]
    for e in envs:
        reader.decrypt(A, RES, CTX, e)
    assert w.hsm.unwrap_calls == 3


def test_decrypt_cache_entry_expires_with_the_dek_age() -> None:
    """A cached DEK older than dek_max_age_s is unwrapped again on its next use."""
    w = make_world(max_age=60.0)
    env = w.km.encrypt(A, RES, CTX, b"x")
    reader = w.manager()
    reader.decrypt(A, RES, CTX, env)
    reader.decrypt(A, RES, CTX, env)
    assert w.hsm.unwrap_calls == 1
    w.clock.advance(61.0)
    assert reader.decrypt(A, RES, CTX, env) == b"x"
    assert w.hsm.unwrap_calls == 2


# ============================================================================ rewrap
def _rotated_world() -> tuple[World, list[bytes]]:
    w = make_world(max_records=3)
    envs = [w.km.encrypt(A, RES, {"record_id": str(i)}, b"p%d" % i) for i in range(7)]
    assert len({hdr(e) for e in envs}) == 3
    assert w.registry.rotate(A, RES) == 2
    w.km.refresh()
    return w, envs


@pytest.mark.parametrize("gateway", ["same", "cold"])
def test_rewrap_changes_only_the_header(gateway: str) -> None:
    """Rewrap puts a header under the new version; nonce, ciphertext and tag stay identical."""
    w, envs = _rotated_world()
    km = w.km if gateway == "same" else w.manager()
    wraps, unwraps = w.hsm.wrap_calls, w.hsm.unwrap_calls
    new = [km.rewrap(A, RES, e) for e in envs]
    for old, nw in zip(envs, new, strict=True):
        assert nw[header_length(nw) :] == old[header_length(old) :]
        assert version_of(nw) == 2
        assert version_of(old) == 1
    assert len({hdr(e) for e in new}) == 3
    assert w.hsm.wrap_calls - wraps == 3  # one HSM wrap per distinct DEK, not per record
    assert w.hsm.unwrap_calls - unwraps == (0 if gateway == "same" else 3)
    reader = w.manager()
    for i, e in enumerate(new):
        assert reader.decrypt(A, RES, {"record_id": str(i)}, e) == b"p%d" % i


def test_rewrap_many_one_wrap_per_distinct_dek_and_slots() -> None:
    """rewrap_many rewraps each record, wraps once per DEK and puts errors in their slots."""
    w, envs = _rotated_world()
    wraps = w.hsm.wrap_calls
    garbage = b"\x01\x01" + bytes(100)
    out = w.km.rewrap_many(A, RES, [envs[0], garbage, *envs[1:]])
    assert isinstance(out[1], DecryptionFailed)
    good = [o for i, o in enumerate(out) if i != 1]
    assert all(isinstance(o, bytes) and version_of(o) == 2 for o in good)
    assert w.hsm.wrap_calls - wraps == 3


def test_rewrap_of_a_current_ciphertext_returns_it_unchanged(w: World) -> None:
    """A ciphertext already under the active version comes back as the very same object."""
    env = w.km.encrypt(A, RES, CTX, b"x")
    wraps = w.hsm.wrap_calls
    assert w.km.rewrap(A, RES, env) is env
    assert w.km.rewrap_many(A, RES, [env])[0] is env
    assert w.manager().rewrap(A, RES, env) is env
    assert w.hsm.wrap_calls == wraps


def test_rewrap_refuses_another_tenants_ciphertext(w: World) -> None:
    """Rewrap of tenant A's ciphertext requested as tenant B fails with DecryptionFailed."""
    env = w.km.encrypt(A, RES, CTX, b"x")
    w.registry.rotate(B, RES)
    w.km.refresh()
    with pytest.raises(DecryptionFailed):
        w.km.rewrap(B, RES, env)


def test_rewrap_of_a_disabled_version_is_refused() -> None:
    """A ciphertext under a disabled version cannot be rewrapped (KeyNotUsable)."""
    w, envs = _rotated_world()
    w.registry.set_state(A, RES, 1, KeyState.DISABLED)
    w.km.refresh()
    with pytest.raises(KeyNotUsable):
        w.km.rewrap(A, RES, envs[0])


# ============================================================================ key states
def test_rotation_then_refresh_switches_new_ciphertexts_and_old_still_decrypt(w: World) -> None:
    """After rotation and refresh, new ciphertexts name v2 and v1 ciphertexts still decrypt."""
    old = w.km.encrypt(A, RES, CTX, b"old")
    assert version_of(old) == 1
    w.registry.rotate(A, RES)
    assert w.km.refresh() is True
    new = w.km.encrypt(A, RES, CTX, b"new")
    assert version_of(new) == 2
    assert w.km.active_version(A, RES) == 2
    assert w.km.decrypt(A, RES, CTX, old) == b"old"
    assert w.manager().decrypt(A, RES, CTX, old) == b"old"
    assert w.km.decrypt(A, RES, CTX, new) == b"new"


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_disabled_version_is_not_usable(w: World, cache: str) -> None:
    """A disabled key version refuses decrypt and (being the active one) encrypt: KeyNotUsable."""
    env = w.km.encrypt(A, RES, CTX, b"x")
    km = w.km if cache == "warm" else w.manager()
    w.registry.set_state(A, RES, 1, KeyState.DISABLED)
    km.refresh()
    with pytest.raises(KeyNotUsable):
        km.decrypt(A, RES, CTX, env)
    with pytest.raises(KeyNotUsable):
        km.encrypt(A, RES, CTX, b"y")
    w.registry.set_state(A, RES, 1, KeyState.ACTIVE)
    km.refresh()
    assert km.decrypt(A, RES, CTX, env) == b"x"


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_destroyed_version_raises_key_destroyed(w: World, cache: str) -> None:
    """A destroyed key version refuses decrypt with KeyDestroyed."""
    env = w.km.encrypt(A, RES, CTX, b"x")
    km = w.km if cache == "warm" else w.manager()
    w.registry.rotate(A, RES)
    w.registry.set_state(A, RES, 1, KeyState.DESTROYED)
    km.refresh()
    with pytest.raises(KeyDestroyed):
        km.decrypt(A, RES, CTX, env)
    with pytest.raises(KeyDestroyed):
        km.rewrap(A, RES, env)


def test_decrypt_only_version_decrypts_but_does_not_encrypt(w: World) -> None:
    """With only a decrypt-only version, decrypt works and encrypt raises KeyNotUsable."""
    env = w.km.encrypt(A, RES, CTX, b"x")
    w.registry.set_state(A, RES, 1, KeyState.DECRYPT_ONLY)
    w.km.refresh()
    assert w.km.decrypt(A, RES, CTX, env) == b"x"
    with pytest.raises(KeyNotUsable):
        w.km.encrypt(A, RES, CTX, b"y")


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_disabled_tenant_is_not_usable(w: World, cache: str) -> None:
    """A disabled tenant refuses encrypt, decrypt and rewrap with KeyNotUsable."""
    env = w.km.encrypt(A, RES, CTX, b"x")
    km = w.km if cache == "warm" else w.manager()
    w.registry.set_tenant_enabled(A, False)
    km.refresh()
    with pytest.raises(KeyNotUsable):
        km.encrypt(A, RES, CTX, b"y")
    with pytest.raises(KeyNotUsable):
        km.decrypt(A, RES, CTX, env)
    with pytest.raises(KeyNotUsable):
        km.rewrap(A, RES, env)
    assert km.encrypt(B, RES, CTX, b"other tenant unaffected")


def test_unknown_tenant_or_purpose(w: World) -> None:
    """Encrypting for an unknown tenant or purpose raises NotFound."""
    with pytest.raises(NotFound):
        w.km.encrypt("999999", RES, CTX, b"x")
    with pytest.raises(NotFound):
        w.km.encrypt(A, "nosuchpurpose", CTX, b"x")


# ============================================================================ tenant isolation
@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_ciphertext_of_tenant_a_presented_as_tenant_b_fails(w: World, cache: str) -> None:
    """Tenant A's ciphertext, unchanged, presented as tenant B raises DecryptionFailed."""
    env = w.km.encrypt(A, RES, CTX, b"secret")
    km = w.km if cache == "warm" else w.manager()
    if cache == "warm":
        km.decrypt(A, RES, CTX, env)
    with pytest.raises(DecryptionFailed):
        km.decrypt(B, RES, CTX, env)
    assert isinstance(km.decrypt_many(B, RES, [(CTX, env)])[0], DecryptionFailed)


def _retarget(env: bytes, tenant: str, purpose: str = RES) -> bytes:
    """The envelope with its header rewritten to name another tenant, the rest unchanged."""
    h = parse_header(env)
    new = build_header(
        h.suite, KeyRef(tenant, purpose, h.key_ref.version), h.chain, h.wrapped_dek, h.commitment
    )
    return new + env[h.length :]


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_header_tenant_rewritten_to_b_fails(w: World, cache: str) -> None:
    """Tenant A's ciphertext with its header rewritten to tenant B fails as B and as A."""
    env = w.km.encrypt(A, RES, CTX, b"secret")
    w.km.encrypt(B, RES, CTX, b"B has a DEK too")
    km = w.km if cache == "warm" else w.manager()
    forged = _retarget(env, B)
    assert len(forged) == len(env)  # same-length tenant code: only the tenant bytes differ
    assert sum(x != y for x, y in zip(forged, env, strict=True)) <= 6
    for tenant in (B, A):
        with pytest.raises(DecryptionFailed):
            km.decrypt(tenant, RES, CTX, forged)
    with pytest.raises(DecryptionFailed):
        km.decrypt(A, "tax", CTX, _retarget(env, A, "tax"))


def test_wrong_purpose_fails(w: World) -> None:
    """A resident ciphertext presented under the tax purpose of the same tenant fails."""
    env = w.km.encrypt(A, RES, CTX, b"x")
    with pytest.raises(DecryptionFailed):
        w.km.decrypt(A, "tax", CTX, env)


# ============================================================================ batches
def test_encrypt_many_puts_errors_in_their_slots() -> None:
    """A too-large plaintext or a bad context fails in its own slot; the others are encrypted."""
    w = make_world(max_plaintext=16)
    items = [
        (CTX, b"ok-0"),
        (CTX, b"x" * 17),
        ({"bad key": "v"}, b"ok?"),
        ({"k": "\ud800"}, b"ok?"),
        (CTX, b"ok-4"),
    ]
    out = w.km.encrypt_many(A, RES, items)
    assert isinstance(out[1], PayloadTooLarge)
    assert isinstance(out[2], InvalidRequest)
    assert isinstance(out[3], InvalidRequest)
    assert isinstance(out[0], bytes)
    assert isinstance(out[4], bytes)
    assert w.km.decrypt(A, RES, CTX, out[0]) == b"ok-0"
    assert w.km.decrypt(A, RES, CTX, out[4]) == b"ok-4"


def test_encrypt_many_for_a_disabled_tenant_fails_every_slot(w: World) -> None:
    """When the key cannot be used, every slot holds the error and nothing is raised."""
    w.registry.set_tenant_enabled(A, False)
    w.km.refresh()
    out = w.km.encrypt_many(A, RES, [(CTX, b"1"), (CTX, b"2")])
    assert all(isinstance(o, KeyNotUsable) for o in out)


def test_decrypt_many_puts_errors_in_their_slots(w: World) -> None:
    """Tampered, wrong-context, short and foreign items fail in their slots; good ones decrypt."""
    good = w.km.encrypt(A, RES, CTX, b"good")
    other = w.km.encrypt(B, RES, CTX, b"other tenant")
    tampered = good[:-1] + bytes((good[-1] ^ 1,))
    items = [
        (CTX, good),
        (CTX, tampered),
        ({"record_id": "R-999"}, good),
        (CTX, good[:40]),
        (CTX, other),
        ({"bad key": "v"}, good),
        (CTX, good),
    ]
    out = w.km.decrypt_many(A, RES, items)
    assert out[0] == out[6] == b"good"
    assert isinstance(out[1], DecryptionFailed)
    assert isinstance(out[2], DecryptionFailed)
    assert isinstance(out[3], DecryptionFailed)
    assert isinstance(out[4], DecryptionFailed)
    assert isinstance(out[5], InvalidRequest)


def test_decrypt_many_with_interleaved_deks_uses_each_items_own_dek() -> None:
    """Items of one batch switch between DEKs, versions and tenants in any order: each is
    decrypted under its own DEK (a DEK remembered from the item before serves only envelopes
    that begin with its exact header), one HSM unwrap per distinct DEK."""
    w, envs = _rotated_world()  # 7 envelopes under 3 DEKs of version 1
    newer = [w.km.encrypt(A, RES, {"record_id": str(i)}, b"v2-%d" % i) for i in range(2)]
    other = w.km.encrypt(B, RES, {"record_id": "0"}, b"tenant B")
    e0 = envs[0]
    h = header_length(e0)
    forged = e0[:h] + envs[4][h:]  # DEK 1's header on DEK 2's nonce, ciphertext and tag
    order = [0, 3, 1, 6, 4, 2, 5]
    items = [({"record_id": str(i)}, envs[i]) for i in order]
    items[2:2] = [({"record_id": "1"}, newer[1]), ({"record_id": "0"}, other)]
    items += [({"record_id": "4"}, forged), ({"record_id": "0"}, e0[: h + 20]), items[0]]
    reader = w.manager()
    out = reader.decrypt_many(A, RES, items)
    want: list[object] = [b"p0", b"p3", b"v2-1", DecryptionFailed, b"p1", b"p6", b"p4", b"p2"]
    want += [b"p5", DecryptionFailed, DecryptionFailed, b"p0"]
    assert len(out) == len(want)
    for got, expected in zip(out, want, strict=True):
        if isinstance(expected, bytes):
            assert got == expected
        else:
            assert isinstance(got, DecryptionFailed)
    assert w.hsm.unwrap_calls == 4  # 3 DEKs of version 1, 1 of version 2 (B's was refused)
    again = reader.decrypt_many(A, RES, items)
    assert [type(g) for g in again] == [type(g) for g in out]
    assert [g for g in again if isinstance(g, bytes)] == [g for g in out if isinstance(g, bytes)]
    assert w.hsm.unwrap_calls == 4  # all four from the cache the second time


def test_decrypt_refuses_envelopes_outside_the_length_bounds_before_any_key_use(w: World) -> None:
    """Envelopes below MIN_ENVELOPE_LEN or above MAX_ENVELOPE_LEN never reach the HSM."""
    env = w.km.encrypt(A, RES, CTX, b"x")
    too_long = env + bytes(MAX_ENVELOPE_LEN + 1 - len(env))
    reader = w.manager()
    for bad in (env[: MIN_ENVELOPE_LEN - 1], too_long):
        with pytest.raises(DecryptionFailed):
            reader.decrypt(A, RES, CTX, bad)
        assert isinstance(reader.decrypt_many(A, RES, [(CTX, bad)])[0], DecryptionFailed)
    assert w.hsm.unwrap_calls == 0


@pytest.mark.parametrize("extra", [0, 1, 7])
def test_decrypt_truncated_after_a_cached_header_fails_cleanly(w: World, extra: int) -> None:
    """A record cut inside its nonce after a cached header raises DecryptionFailed."""
    env = w.km.encrypt(A, RES, CTX, b"secret")
    cut = env[: header_length(env) + extra]
    with pytest.raises(DecryptionFailed):
        w.km.decrypt(A, RES, CTX, cut)


def test_decrypt_many_truncated_after_a_cached_header_is_a_slot_error(w: World) -> None:
    """decrypt_many gives a record cut inside its nonce a DecryptionFailed slot."""
    env = w.km.encrypt(A, RES, CTX, b"secret")
    out = w.km.decrypt_many(A, RES, [(CTX, env), (CTX, env[: header_length(env)]), (CTX, env)])
    assert out[0] == out[2] == b"secret"
    assert isinstance(out[1], DecryptionFailed)


def test_plaintext_limit_edge() -> None:
    """max_plaintext bytes are accepted; one more raises PayloadTooLarge (single and batch)."""
    w = make_world(max_plaintext=1024)
    env = w.km.encrypt(A, RES, {}, b"p" * 1024)
    assert w.km.decrypt(A, RES, {}, env) == b"p" * 1024
    with pytest.raises(PayloadTooLarge):
        w.km.encrypt(A, RES, {}, b"p" * 1025)
    assert isinstance(w.km.encrypt_many(A, RES, [({}, b"p" * 1025)])[0], PayloadTooLarge)


def test_format_plaintext_limit_round_trip() -> None:
    """A plaintext of exactly MAX_PLAINTEXT_LEN round-trips through a cold gateway."""
    w = make_world(max_plaintext=MAX_PLAINTEXT_LEN)
    big = os.urandom(MAX_PLAINTEXT_LEN)
    env = w.km.encrypt(A, RES, {}, big)
    assert w.manager().decrypt(A, RES, {}, env) == big


# ============================================================================ concurrency
def test_concurrent_encrypt_distinct_nonces_and_all_decrypt() -> None:
    """8 threads encrypting at once get distinct nonces, no DEK over its limit, all decrypt."""
    w = make_world(max_records=50)
    n_threads, per_thread = 8, 400
    barrier = threading.Barrier(n_threads)
    results: list[list[tuple[bytes, bytes]]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                pt = b"t%d-%d" % (t, i)
                results[t].append((pt, w.km.encrypt(A, RES, CTX, pt)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    envs = [e for r in results for _, e in r]
    assert len(envs) == n_threads * per_thread
    nonces = {e[header_length(e) : header_length(e) + 12] for e in envs}
    assert len(nonces) == len(envs)
    per_dek = Counter(hdr(e) for e in envs)
    assert max(per_dek.values()) <= 50
    reader = w.manager()
    for r in results:
        for pt, e in r:
            assert reader.decrypt(A, RES, CTX, e) == pt


# ============================================================================ randomness
def test_system_random_never_repeats_a_nonce_in_100k_draws() -> None:
    """100,000 nonces from one SystemRandom are 12 bytes each and all distinct."""
    rng = SystemRandom()
    nonces = [rng.nonce() for _ in range(100_000)]
    assert {len(n) for n in nonces} == {12}
    assert len(set(nonces)) == 100_000
    assert len(rng.dek()) == 32
    assert rng.dek() != rng.dek()


def test_system_random_threads_never_share_a_nonce() -> None:
    """8 threads drawing from one SystemRandom at once never receive the same nonce."""
    rng = SystemRandom()
    out: list[list[bytes]] = [[] for _ in range(8)]
    barrier = threading.Barrier(8)

    def draw(t: int) -> None:
        barrier.wait()
        out[t].extend(rng.nonce() for _ in range(20_000))

    threads = [threading.Thread(target=draw, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    flat = [n for o in out for n in o]
    assert len(flat) == len(set(flat)) == 160_000


def _read_all(fd: int, timeout: float) -> bytes:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError("the child did not answer")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


@pytest.fixture
def fork_child() -> Iterator[list[int]]:
    """Pids of forked children; any still running at teardown are killed and reaped."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_does_not_repeat_the_parents_nonces(fork_child: list[int]) -> None:
    """After fork, the child's nonces differ from the ones the parent draws next from its block."""
    rng = SystemRandom()
    rng.nonce()  # the parent now holds a block of 4095 unused nonces, which the child inherits
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.write(wfd, b"".join(rng.nonce() for _ in range(100)))
        finally:
            os._exit(0)
    fork_child.append(pid)
    os.close(wfd)
    try:
        data = _read_all(r, timeout=10)
    finally:
        os.close(r)
    child = {data[i : i + 12] for i in range(0, len(data), 12)}
    parent = {rng.nonce() for _ in range(100)}
    assert len(child) == 100
    assert not child & parent


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_can_draw_nonces_while_another_thread_held_the_refill_lock(
    fork_child: list[int],
) -> None:
    """A child forked while another thread is refilling the nonce block can still draw nonces."""
    # The at-fork hook empties the inherited block but keeps the inherited threading.Lock; if a
    # thread held it at fork time, the child's first nonce() blocks forever in _refill.
    rng = SystemRandom()
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with rng._lock:  # stands for a refill in progress at the moment of the fork
            holding.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    holding.wait(5)
    r, wfd = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                os.write(wfd, rng.nonce())
            finally:
                os._exit(0)
        fork_child.append(pid)
    finally:
        release.set()
        t.join()
    os.close(wfd)
    try:
        data = _read_all(r, timeout=5)
    except TimeoutError:
        data = b""
    finally:
        os.close(r)
    assert len(data) == 12, "the forked child deadlocked on the inherited refill lock"


# ============================================================================ DataKey hygiene
def _data_key() -> tuple[DataKey, bytes]:
    dek = bytes(range(0x40, 0x60))
    key = DataKey(
        dek,
        suite=AlgorithmSuite.AES256_GCM_HKDF_SHA256_COMMIT,
        key_ref=KeyRef(A, RES, 1),
        chain=(WrapLayer(WrapMechanism.HSM_AES_GCM),),
        wrapped_dek=b"w" * 60,
    )
    return key, dek


def test_data_key_refuses_pickle_and_copy() -> None:
    """DataKey cannot be pickled, copied or deep-copied."""
    key, _ = _data_key()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(key, protocol=protocol)
    with pytest.raises(TypeError):
        copy.copy(key)
    with pytest.raises(TypeError):
        copy.deepcopy(key)


def test_data_key_repr_shows_no_key_material() -> None:
    """repr(DataKey) names the key reference but shows no DEK, data key or commitment bytes."""
    key, dek = _data_key()
    text = repr(key) + str(key)
    assert "131016/resident/v1" in text
    for secret in (dek, key.commitment):
        assert secret.hex() not in text
        assert repr(secret) not in text
        assert secret.hex()[:8] not in text


def test_data_key_exports_the_dek_only_with_the_capability() -> None:
    """dek_for_rewrap needs REWRAP_CAPABILITY; anything else raises PermissionError."""
    key, dek = _data_key()
    assert key.dek_for_rewrap(REWRAP_CAPABILITY) == dek
    for wrong in (None, object(), "REWRAP_CAPABILITY"):
        with pytest.raises(PermissionError):
            key.dek_for_rewrap(wrong)


def test_data_key_refuses_a_header_committing_to_another_dek() -> None:
    """Building a DataKey with a commitment that is not the DEK's raises DecryptionFailed."""
    key, _ = _data_key()
    other = bytes(32)
    with pytest.raises(DecryptionFailed):
        DataKey(
            other,
            suite=key.suite,
            key_ref=key.key_ref,
            chain=key.chain,
            wrapped_dek=b"w" * 60,
            commitment=key.commitment,
        )


def test_errors_from_the_manager_are_gateway_errors(w: World) -> None:
    """Every failure seen so far is a GatewayError subclass with a stable code."""
    env = w.km.encrypt(A, RES, CTX, b"x")
    for bad in (b"", env[:10], env + b"\x00", b"\xff" * 200):
        try:
            w.km.decrypt(A, RES, CTX, bad)
        except GatewayError as exc:
            assert exc.code == "DECRYPTION_FAILED"
        else:
            pytest.fail("decrypt accepted garbage")


def test_text_rewrap_swaps_header_characters_only() -> None:
    """Text rewrap gives the text of the binary rewrap, and the data part's characters are kept."""
    w, envs = _rotated_world()
    texts = [to_text(e) for e in envs]
    out = w.km.rewrap_text_many(A, RES, texts)
    for env, old, new in zip(envs, texts, out, strict=True):
        assert isinstance(new, str)
        binary = w.manager().rewrap(A, RES, env)
        assert from_text(new)[header_length(binary) :] == binary[header_length(binary) :]
        assert version_of(from_text(new)) == 2
        h_old = 4 + header_length(env) // 3 * 4
        h_new = 4 + header_length(from_text(new)) // 3 * 4
        assert new[h_new:] == old[h_old:]  # the data part's characters are untouched
    reader = w.manager()
    for i, t in enumerate(out):
        assert isinstance(t, str)
        assert reader.decrypt(A, RES, {"record_id": str(i)}, from_text(t)) == b"p%d" % i


def test_text_rewrap_uses_its_cache_and_puts_errors_in_slots() -> None:
    """A known text header costs no HSM call; malformed, foreign or non-ASCII texts fail alone."""
    w, envs = _rotated_world()
    texts = [to_text(e) for e in envs]
    first = w.km.rewrap_text_many(A, RES, texts)
    wraps, unwraps = w.hsm.wrap_calls, w.hsm.unwrap_calls
    assert w.km.rewrap_text_many(A, RES, texts) == first
    assert (w.hsm.wrap_calls, w.hsm.unwrap_calls) == (wraps, unwraps)
    bad_body = texts[0][:-3] + "あいう"
    out = w.km.rewrap_text_many(
        A,
        RES,
        ["kg1.", "garbage", texts[0], bad_body, texts[0][:60], b"kg1.x"],  # type: ignore[list-item]
    )
    assert isinstance(out[2], str)
    for i in (0, 1, 3, 4, 5):
        assert isinstance(out[i], DecryptionFailed), i
    w.registry.rotate(B, RES)
    w.km.refresh()
    assert isinstance(w.km.rewrap_text_many(B, RES, [texts[0]])[0], DecryptionFailed)


def test_current_text_ciphertext_comes_back_unchanged(w: World) -> None:
    """A text ciphertext already under the active version is returned as it is."""
    text = to_text(w.km.encrypt(A, RES, CTX, b"x"))
    assert w.km.rewrap_text_many(A, RES, [text]) == [text]
    assert w.km.rewrap_text_many(A, RES, [text])[0] is text


def test_reads_do_not_count_against_the_record_limit() -> None:
    """The record limit bounds encryptions; a cached DEK decrypts any number of records."""
    w = make_world(max_records=2)
    env = w.km.encrypt(A, RES, CTX, b"x")
    reader = w.manager()
    unwraps = w.hsm.unwrap_calls
    for _ in range(10):
        assert reader.decrypt(A, RES, CTX, env) == b"x"
    assert reader.decrypt_many(A, RES, [(CTX, env)] * 10) == [b"x"] * 10
    assert w.hsm.unwrap_calls - unwraps == 1
    w.clock.advance(3601)
    assert reader.decrypt(A, RES, CTX, env) == b"x"
    assert w.hsm.unwrap_calls - unwraps == 2  # the age limit still applies to the cache
