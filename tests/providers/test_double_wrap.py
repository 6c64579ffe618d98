"""The double wrap on every provider, against its local server with the provider's real SDK.

DEKs are wrapped by the HSM first and then by the provider key: these tests check what each
provider server actually received (no DEK, no plaintext, in any encoding), that provider calls
are per DEK, that residency is enforced when a key is configured and again when it is used, and
how the gateway behaves when the provider is down, slow, refuses our credentials, or has the
key disabled or destroyed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from provider_support import (  # type: ignore[import-not-found]
    ACTOR,
    FOREIGN_REGION,
    OPTIONS,
    SERVERS,
    TENANT,
    residency,
)

from keygate.core.envelope import REWRAP_CAPABILITY
from keygate.core.errors import DecryptionFailed, GatewayError, KeyDestroyed, KeyNotUsable
from keygate.core.wire import WrapLayer, build_header, from_text, parse_header, to_text
from keygate.keys.manager import KeyManager
from keygate.keys.randomness import SystemRandom
from keygate.policy.residency import ResidencyViolation
from keygate.providers.base import ProviderAuthFailed, ProviderUnavailable
from keygate.providers.guard import ProviderSet
from keygate.service import Gateway
from keygate.testing.leaks import find_secrets

ALL = sorted(SERVERS)
CONTEXT = {"record_id": "R-000123", "field": "氏名"}

Kms = Callable[[str], Any]
MakeGateway = Callable[..., Gateway]


def uri_for(server: Any, name: str, **kw: Any) -> str:
    return str(server.create_key(f"{name}-{os.urandom(4).hex()}", **kw))


def encrypt_some(gw: Gateway, n: int, purpose: str = "resident") -> list[tuple[bytes, bytes]]:
    """``n`` random plaintexts and their envelopes."""
    plaintexts = [os.urandom(24) + f"山田太郎{i:06d}".encode() for i in range(n)]
    envelopes = gw.keys.encrypt_many(TENANT, purpose, [(CONTEXT, p) for p in plaintexts])
    assert all(isinstance(e, bytes) for e in envelopes)
    return list(zip(plaintexts, envelopes, strict=True))  # type: ignore[arg-type]


def deks_of(gw: Gateway, envelopes: list[bytes], purpose: str = "resident") -> list[bytes]:
    seen: dict[bytes, bytes] = {}
    for env in envelopes:
        h = int.from_bytes(env[2:4], "big")
        if env[:h] not in seen:
            key = gw.keys.open_key(TENANT, purpose, env)
            seen[env[:h]] = key.dek_for_rewrap(REWRAP_CAPABILITY)
    return list(seen.values())


@pytest.mark.parametrize("name", ALL)
def test_double_wrap_provider_sees_no_dek_and_no_plaintext(
    name: str, kms: Kms, make_gateway: MakeGateway
) -> None:
    server = kms(name)
    gw = make_gateway({server.scheme: server.settings()}, dek_max_records=50)
    uri = uri_for(server, "resident")
    start = len(server.received)
    gw.provider_set(ACTOR, TENANT, "resident", uri)

    pairs = encrypt_some(gw, 400)
    envelopes = [e for _, e in pairs]
    header = parse_header(envelopes[0])
    assert [layer.mechanism.is_hsm for layer in header.chain] == [True, False]
    assert header.chain[1].key_id == uri.encode()
    assert gw.keys.stats.deks_created == 8  # 400 records, 50 per DEK
    # one provider wrap per DEK (plus set's own probe round trip), never per record
    assert gw.providers.counts["wrap"] == gw.keys.stats.deks_created + 1

    # A second gateway process would unwrap through the provider: drop the cache to do the same.
    gw.keys.refresh(force=True)
    gw.keys._opened.clear()
    for plaintext, envelope in pairs:
        assert gw.keys.decrypt(TENANT, "resident", CONTEXT, envelope) == plaintext
    assert gw.providers.counts["unwrap"] == 8 + 1

    received = b"".join(server.received[start:])
    assert received, "the server recorded nothing"
    deks = deks_of(gw, envelopes)
    assert len(deks) == 8
    assert find_secrets(received, deks) == []
    assert find_secrets(received, [p for p, _ in pairs]) == []


@pytest.mark.parametrize("name", sorted(FOREIGN_REGION))
def test_residency_refused_when_configured_and_when_used(
    name: str, kms: Kms, make_gateway: MakeGateway
) -> None:
    server = kms(name)
    gw = make_gateway({server.scheme: server.settings()})
    foreign = uri_for(server, "abroad", region=FOREIGN_REGION[name])
    start = len(server.received)
    with pytest.raises(ResidencyViolation) as info:
        gw.provider_set(ACTOR, TENANT, "resident", foreign)
    assert FOREIGN_REGION[name] in info.value.detail
    assert server.received[start:] == []  # refused before any call
    assert gw.registry.list_provider_keys(TENANT, "resident") == []

    # Written into the registry behind keygate's back: refused again on use.
    key = gw.providers.parse(foreign)
    gw.registry.switch_provider_key(
        TENANT, "resident", foreign, scheme=key.scheme, region=key.region, first=True
    )
    gw.keys.refresh(force=True)
    with pytest.raises(ResidencyViolation):
        gw.keys.encrypt(TENANT, "resident", CONTEXT, b"x" * 16)
    assert server.received[start:] == []


def test_vault_residency_is_by_configured_address(kms: Kms, make_gateway: MakeGateway) -> None:
    server = kms("vault")
    gw = make_gateway({server.scheme: server.settings()}, allow_vault=False)
    uri = uri_for(server, "resident")
    with pytest.raises(ResidencyViolation, match=r"127\.0\.0\.1"):
        gw.provider_set(ACTOR, TENANT, "resident", uri)


@pytest.mark.parametrize("name", ALL)
def test_wrong_credentials_get_a_clear_error(
    name: str, kms: Kms, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    server = kms(name)
    uri = uri_for(server, "resident")
    bad = server.bad_settings()
    gw = make_gateway({server.scheme: bad})
    with pytest.raises(ProviderAuthFailed) as info:
        gw.provider_set(ACTOR, TENANT, "resident", uri)
    assert info.value.reason == "provider-credentials"
    assert gw.registry.list_provider_keys(TENANT, "resident") == []
    secrets = [
        v.get_secret_value()
        for v in vars(bad).values()
        if hasattr(v, "get_secret_value") and len(v.get_secret_value()) >= 8
    ]
    for secret in secrets:
        assert secret not in info.value.detail
        assert secret not in caplog.text


@pytest.mark.parametrize("name", ALL)
def test_outage_encrypt_fails_closed_decrypt_continues_from_the_cache(
    name: str, kms: Kms, make_gateway: MakeGateway
) -> None:
    server = kms(name)
    gw = make_gateway({server.scheme: server.settings()})
    uri = uri_for(server, "resident")
    gw.provider_set(ACTOR, TENANT, "resident", uri)
    cached = encrypt_some(gw, 5)

    server.fault("down")
    gw.keys.probe_providers(force=True)
    with pytest.raises(ProviderUnavailable) as info:
        gw.keys.encrypt(TENANT, "resident", CONTEXT, b"during the outage")
    assert info.value.retry_after is not None
    assert info.value.code == "UNAVAILABLE"
    for plaintext, envelope in cached:  # the DEK is cached: reads go on
        assert gw.keys.decrypt(TENANT, "resident", CONTEXT, envelope) == plaintext
    report = gw.readiness()
    assert not report.ready
    assert report.checks[f"provider {uri}"].startswith("unavailable")

    server.fault(None)
    time.sleep(0.6)  # the outage window (down_for_s=0.5) ends; the next call is let through
    gw.keys.probe_providers(force=True)
    envelope = gw.keys.encrypt(TENANT, "resident", CONTEXT, b"after")
    assert gw.keys.decrypt(TENANT, "resident", CONTEXT, envelope) == b"after"
    assert gw.readiness().checks[f"provider {uri}"] == "ok"


@pytest.mark.parametrize("name", ALL)
def test_outage_with_cached_mode_keeps_encrypting_with_the_active_dek(
    name: str, kms: Kms, make_gateway: MakeGateway
) -> None:
    server = kms(name)
    gw = make_gateway({server.scheme: server.settings()}, provider_outage_encrypt="cached")
    uri = uri_for(server, "resident")
    gw.provider_set(ACTOR, TENANT, "resident", uri)
    encrypt_some(gw, 2)
    server.fault("down")
    gw.keys.probe_providers(force=True)
    envelope = gw.keys.encrypt(TENANT, "resident", CONTEXT, b"cached mode")
    assert gw.keys.decrypt(TENANT, "resident", CONTEXT, envelope) == b"cached mode"


@pytest.mark.parametrize("name", ALL)
def test_a_slow_provider_times_out_and_a_cold_decrypt_gets_503(
    name: str, kms: Kms, make_gateway: MakeGateway
) -> None:
    server = kms(name)
    gw = make_gateway({server.scheme: server.settings()})
    uri = uri_for(server, "resident")
    gw.provider_set(ACTOR, TENANT, "resident", uri)
    pairs = encrypt_some(gw, 3)
    gw.keys._opened.clear()
    # a second key manager on the same registry and HSM whose adapters have a short read
    # timeout (the first one's are generous, for the encryptions above on a busy machine)
    providers = ProviderSet(
        replace(OPTIONS, connect_timeout_s=0.5, read_timeout_s=0.5),
        residency(),
        settings={server.scheme: server.settings()},
    )
    impatient = KeyManager(
        registry=gw.registry, hsm=gw.hsm, rng=SystemRandom(), providers=providers
    )
    server.slow_s = 3.0
    server.fault("slow")
    try:
        with pytest.raises(ProviderUnavailable):
            impatient.decrypt(TENANT, "resident", CONTEXT, pairs[0][1])
    finally:
        providers.close()
    guard = providers.guard(uri)
    assert (guard.calls, guard.failures) == (2, 2)  # retries=1: two attempts, each timed out


@pytest.mark.parametrize("name", ALL)
def test_a_disabled_provider_key_stops_encrypt_and_decrypt(
    name: str, kms: Kms, make_gateway: MakeGateway
) -> None:
    server = kms(name)
    gw = make_gateway({server.scheme: server.settings()})
    uri = uri_for(server, "resident")
    gw.provider_set(ACTOR, TENANT, "resident", uri)
    pairs = encrypt_some(gw, 3)
    server.set_key_enabled(uri, False)
    gw.keys.probe_providers(force=True)
    # the provider's kill switch works on cached DEKs too
    with pytest.raises(KeyNotUsable) as info:
        gw.keys.decrypt(TENANT, "resident", CONTEXT, pairs[0][1])
    assert getattr(info.value, "reason", "") == "provider-key-disabled"
    with pytest.raises(KeyNotUsable):
        gw.keys.encrypt(TENANT, "resident", CONTEXT, b"no")
    server.set_key_enabled(uri, True)
    assert gw.keys.decrypt(TENANT, "resident", CONTEXT, pairs[0][1]) == pairs[0][0]


@pytest.mark.parametrize("name", ALL)
def test_a_destroyed_provider_key_answers_key_destroyed(
    name: str, kms: Kms, make_gateway: MakeGateway
) -> None:
    server = kms(name)
    gw = make_gateway({server.scheme: server.settings()})
    uri = uri_for(server, "resident")
    gw.provider_set(ACTOR, TENANT, "resident", uri)
    pairs = encrypt_some(gw, 2)
    gw.keys._opened.clear()
    server.destroy_key(uri)
    with pytest.raises((KeyDestroyed, GatewayError)) as info:
        gw.keys.decrypt(TENANT, "resident", CONTEXT, pairs[0][1])
    # Providers that delete at once cannot tell "destroyed" from "never existed"; both refuse.
    assert info.value.code in ("KEY_DESTROYED", "UNAVAILABLE")
    assert getattr(info.value, "reason", "") in ("provider-key-destroyed", "provider-key-not-found")


@pytest.mark.parametrize("name", ALL)
def test_a_header_naming_an_unregistered_provider_key_is_never_sent_anywhere(
    name: str, kms: Kms, make_gateway: MakeGateway
) -> None:
    server = kms(name)
    gw = make_gateway({server.scheme: server.settings()})
    uri = uri_for(server, "resident")
    other = uri_for(server, "other")
    gw.provider_set(ACTOR, TENANT, "resident", uri)
    ((_, envelope),) = encrypt_some(gw, 1)
    header = parse_header(envelope)
    forged_chain = (header.chain[0], WrapLayer(header.chain[1].mechanism, other.encode()))
    forged = build_header(
        header.suite, header.key_ref, forged_chain, header.wrapped_dek, header.commitment
    )
    start = len(server.received)
    with pytest.raises(DecryptionFailed):
        gw.keys.decrypt(TENANT, "resident", CONTEXT, forged + envelope[header.length :])
    assert server.received[start:] == []


@pytest.mark.parametrize("name", ALL)
def test_a_wrapped_dek_from_another_key_is_a_foreign_ciphertext(
    name: str, kms: Kms, make_gateway: MakeGateway
) -> None:
    server = kms(name)
    gw = make_gateway({server.scheme: server.settings()})
    uri = uri_for(server, "resident")
    gw.provider_set(ACTOR, TENANT, "resident", uri)
    gw.provider_set(ACTOR, TENANT, "tax", uri_for(server, "tax"))
    ((_, envelope),) = encrypt_some(gw, 1)
    ((_, tax_envelope),) = encrypt_some(gw, 1, purpose="tax")
    header = parse_header(envelope)
    tax_header = parse_header(tax_envelope)
    swapped = build_header(
        header.suite, header.key_ref, header.chain, tax_header.wrapped_dek, header.commitment
    )
    gw.keys._opened.clear()
    with pytest.raises(DecryptionFailed):
        gw.keys.decrypt(TENANT, "resident", CONTEXT, swapped + envelope[header.length :])
    assert gw.readiness().checks[f"provider {uri}"] == "ok"  # a bad input is not an outage


@pytest.mark.parametrize(("src", "dst"), [("sakura", "gcp"), ("oci", "azure"), ("vault", "aws")])
def test_migration_by_rewrap_between_providers(
    src: str, dst: str, kms: Kms, make_gateway: MakeGateway
) -> None:
    a, b = kms(src), kms(dst)
    gw = make_gateway({a.scheme: a.settings(), b.scheme: b.settings()}, dek_max_records=20)
    old, new = uri_for(a, "resident"), uri_for(b, "resident")
    gw.provider_set(ACTOR, TENANT, "resident", old)
    pairs = encrypt_some(gw, 100)
    wraps_before = gw.providers.counts["wrap"]
    gw.provider_migrate(ACTOR, TENANT, "resident", new)
    gw.keys._opened.clear()
    moved = gw.keys.rewrap_many(TENANT, "resident", [e for _, e in pairs])
    assert all(isinstance(m, bytes) for m in moved)
    assert {parse_header(m).chain[1].key_id for m in moved} == {new.encode()}  # type: ignore[arg-type]
    # per DEK: one unwrap at the old provider and one wrap at the new (plus set/migrate probes)
    assert gw.providers.counts["wrap"] - wraps_before == 5 + 1
    for (_, before), after in zip(pairs, moved, strict=True):
        h = parse_header(before).length
        assert before[h:] == after[parse_header(after).length :]  # type: ignore[arg-type]
    gw.provider_finish(ACTOR, TENANT, "resident")
    a.fault("down")  # the old provider is not needed any more
    try:
        gw.keys._opened.clear()
        for (plaintext, _), envelope in zip(pairs, moved, strict=True):
            assert gw.keys.decrypt(TENANT, "resident", CONTEXT, envelope) == plaintext  # type: ignore[arg-type]
        # the old ciphertexts name a retired provider key: refused without calling it
        with pytest.raises(KeyNotUsable, match="retired"):
            gw.keys.decrypt(TENANT, "resident", CONTEXT, pairs[0][1])
    finally:
        a.fault(None)


def test_text_rewrap_when_the_header_grows_and_shrinks(kms: Kms, make_gateway: MakeGateway) -> None:
    """HSM-only → provider → HSM-only: the text header's length changes both ways, and the
    data part's characters must stay exactly as they were (regression: the text path once cut
    the new header at the old header's length)."""
    server = kms("sakura")
    gw = make_gateway({server.scheme: server.settings()})
    pairs = encrypt_some(gw, 20)
    texts = [to_text(e) for _, e in pairs]
    for target in (uri_for(server, "resident"), None):
        gw.provider_migrate(ACTOR, TENANT, "resident", target)
        new = gw.keys.rewrap_text_many(TENANT, "resident", texts)
        assert all(isinstance(t, str) for t in new)
        for (plaintext, _), before, after in zip(pairs, texts, new, strict=True):
            envelope = from_text(after)  # type: ignore[arg-type]
            chain = parse_header(envelope).chain
            assert len(chain) == (1 if target is None else 2)
            old_h = parse_header(from_text(before)).length
            assert after.endswith(before[4 + old_h * 4 // 3 :])  # type: ignore[union-attr]
            assert gw.keys.decrypt(TENANT, "resident", CONTEXT, envelope) == plaintext
        texts = new  # type: ignore[assignment]
