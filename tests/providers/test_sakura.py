"""Sakura Cloud KMS adapter against the local fake server, over real HTTP(S) with httpx.

The fake (``keygate.testing.kms.sakura``) implements the service's OpenAPI document; the last
tests validate what it answers, and what the adapter sends, against that document's schemas.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import pickle
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from provider_support import (  # type: ignore[import-not-found]
    ADAPTER_FAST,
    ADAPTER_OPTIONS,
)
from pydantic import SecretStr

from keygate.core.errors import ConfigurationError, InvalidRequest
from keygate.core.model import WrapMechanism
from keygate.providers import ADAPTERS
from keygate.providers.base import (
    KeyUri,
    ProviderAuthFailed,
    ProviderCiphertextRejected,
    ProviderKeyDestroyed,
    ProviderKeyDisabled,
    ProviderKeyNotFound,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from keygate.providers.sakura import (
    DEFAULT_ENDPOINT,
    SPEC_ZONES,
    SakuraKmsAdapter,
    SakuraKmsSettings,
)
from keygate.testing.kms.sakura import FakeSakuraKmsServer
from keygate.testing.leaks import find_secrets

SPEC_PATH = Path("/work/shared/specs/sakura-cloud-kms.openapi.json")
OPTIONS, FAST = ADAPTER_OPTIONS, ADAPTER_FAST
AAD = b"keygate/v1 outer\x00tenant-a\x00records\x001"
DEK = bytes(range(60))  # stands in for an HSM-wrapped DEK


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server() -> Iterator[FakeSakuraKmsServer]:
    with FakeSakuraKmsServer(slow_s=1.0) as kms:
        yield kms


@pytest.fixture(autouse=True)
def _clean_server(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "server" in request.fixturenames:
        kms: FakeSakuraKmsServer = request.getfixturevalue("server")
        kms.fault(None)
        kms.denied.clear()
        kms.state_error_status = 403
        kms.reset()


@pytest.fixture
def adapter(server: FakeSakuraKmsServer) -> Iterator[SakuraKmsAdapter]:
    a = SakuraKmsAdapter(OPTIONS, server.settings())
    yield a
    a.close()


@pytest.fixture
def key(server: FakeSakuraKmsServer) -> KeyUri:
    return SakuraKmsAdapter.parse_uri(server.create_key(f"k-{secrets.token_hex(4)}"))


def bodies(server: FakeSakuraKmsServer) -> list[dict[str, Any]]:
    return [json.loads(b) for b in server.received]


# ------------------------------------------------------------------------------ URIs
class TestParseUri:
    pytestmark = pytest.mark.unit

    def test_registered_under_its_scheme(self) -> None:
        """The adapter table names this class for sakura-kms, with its mechanism and extra."""
        assert ADAPTERS["sakura-kms"] == ("keygate.providers.sakura", "SakuraKmsAdapter")
        assert SakuraKmsAdapter.scheme == "sakura-kms"
        assert SakuraKmsAdapter.mechanism is WrapMechanism.SAKURA_KMS
        assert SakuraKmsAdapter.extra == "sakura"

    @pytest.mark.parametrize("zone", SPEC_ZONES)
    def test_spec_zones(self, zone: str) -> None:
        """Every zone of the spec parses; the zone is the region the residency policy checks."""
        k = SakuraKmsAdapter.parse_uri(f"sakura-kms://{zone}/110000000000")
        assert k.uri == f"sakura-kms://{zone}/110000000000"
        assert k.region == zone
        assert k.scheme == "sakura-kms"
        assert k.parts == {"zone": zone, "resource_id": "110000000000"}

    def test_any_zone_shaped_name_is_left_to_the_policy(self) -> None:
        """A zone outside the spec's list parses; the residency policy (not the adapter) decides."""
        assert SakuraKmsAdapter.parse_uri("sakura-kms://tk1v/123456789012").region == "tk1v"

    @pytest.mark.parametrize(
        "uri",
        ["SAKURA-KMS://IS1A/110000000001", "Sakura-Kms://Tk1B/110000000001"],
    )
    def test_canonical_form_is_lower_case_and_stable(self, uri: str) -> None:
        """Scheme and zone are case-insensitive; the canonical text is lower case and a fixpoint."""
        k = SakuraKmsAdapter.parse_uri(uri)
        assert k.uri == k.uri.lower()
        assert SakuraKmsAdapter.parse_uri(k.uri) == k
        assert SakuraKmsAdapter.parse_uri(k.uri).uri == k.uri

    @pytest.mark.parametrize(
        ("uri", "problem"),
        [
            ("", "not a sakura-kms:// URI"),
            ("is1a/110000000000", "not a sakura-kms:// URI"),
            ("aws-kms://is1a/110000000000", "not a sakura-kms:// URI"),
            ("sakura://is1a/110000000000", "not a sakura-kms:// URI"),
            ("https://secure.sakura.ad.jp/110000000000", "not a sakura-kms:// URI"),
            ("sakura-kms:/is1a/110000000000", "not a sakura-kms:// URI"),
            ("sakura-kms:///110000000000", "zone"),
            ("sakura-kms://is1a", "exactly a zone and a resource id"),
            ("sakura-kms://is1a/", "resource id"),
            ("sakura-kms://is1a/110000000000/", "exactly a zone and a resource id"),
            ("sakura-kms://is1a/110000000000/encrypt", "exactly a zone and a resource id"),
            ("sakura-kms://is1a//110000000000", "exactly a zone and a resource id"),
            ("sakura-kms://is1/110000000000", "zone"),
            ("sakura-kms://is1ab/110000000000", "zone"),
            ("sakura-kms://tokyo/110000000000", "zone"),
            ("sakura-kms://1s1a/110000000000", "zone"),
            ("sakura-kms://is1a/11000000000", "12-digit"),
            ("sakura-kms://is1a/1100000000000", "12-digit"),
            ("sakura-kms://is1a/11000000000a", "12-digit"),
            ("sakura-kms://is1a/+11000000000", "12-digit"),
            ("sakura-kms://is1a/../110000000000", "dot segment"),
            ("sakura-kms://../is1a/110000000000", "dot segment"),
            ("sakura-kms://is1a/./110000000000", "dot segment"),
            ("sakura-kms://is1a/110000000000?x=1", "query"),
            ("sakura-kms://is1a/110000000000#frag", "fragment"),
            ("sakura-kms://is1a:443/110000000000", "port"),
            ("sakura-kms://is1a/11000000%300", "percent"),
            ("sakura-kms://is1a\\110000000000", "backslash"),
            ("sakura-kms://is1a/110000000000\n", "control"),
            ("sakura-kms://is1a/110000000000\r\nX-Evil: 1", "control"),
            ("sakura-kms://is1a/ 110000000000", "whitespace"),
            ("sakura-kms://is1a/110000000000\x00", "control"),
            ("sakura-kms://is1a/\t110000000000", "whitespace"),
            ("sakura-kms://東京/110000000000", "non-ASCII"),
            ("sakura-kms://is1a/１１００００００００００", "non-ASCII"),
            ("sakura-kms://is1a/" + "1" * 600, "longer than 512"),
        ],
    )
    def test_malformed(self, uri: str, problem: str) -> None:
        """Malformed or ambiguous URIs are InvalidRequest naming the problem and the form."""
        with pytest.raises(InvalidRequest) as info:
            SakuraKmsAdapter.parse_uri(uri)
        message = str(info.value)
        assert problem in message
        assert "sakura-kms://ZONE/RESOURCE-ID" in message

    def test_user_info_is_refused_without_echoing_it(self) -> None:
        """A URI carrying credentials is refused and the message does not repeat them."""
        with pytest.raises(InvalidRequest) as info:
            SakuraKmsAdapter.parse_uri("sakura-kms://tok3n:s3cr3t-value@is1a/110000000000")
        assert "user information" in str(info.value)
        assert "s3cr3t-value" not in str(info.value)
        assert "tok3n" not in str(info.value)

    def test_not_a_string(self) -> None:
        """A non-string is an InvalidRequest, not a TypeError from deep inside."""
        with pytest.raises(InvalidRequest, match="not a string"):
            SakuraKmsAdapter.parse_uri(b"sakura-kms://is1a/110000000000")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ settings
class TestSettings:
    pytestmark = pytest.mark.unit

    @pytest.fixture
    def clean_env(self, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
        for name in (
            "KEYGATE_SAKURA_ACCESS_TOKEN",
            "KEYGATE_SAKURA_ACCESS_TOKEN_FILE",
            "KEYGATE_SAKURA_ACCESS_TOKEN_SECRET",
            "KEYGATE_SAKURA_ACCESS_TOKEN_SECRET_FILE",
            "KEYGATE_SAKURA_ENDPOINT",
            "KEYGATE_SAKURA_CA_BUNDLE",
            "SAKURACLOUD_ACCESS_TOKEN",
            "SAKURACLOUD_ACCESS_TOKEN_SECRET",
        ):
            monkeypatch.delenv(name, raising=False)
        return monkeypatch

    def test_defaults_are_the_spec_servers(self, clean_env: pytest.MonkeyPatch) -> None:
        """With no settings the endpoint is the spec's server URL and no credential is set."""
        s = SakuraKmsSettings()
        assert s.endpoint == DEFAULT_ENDPOINT
        spec_urls = {srv["url"] for srv in json.loads(SPEC_PATH.read_text())["servers"]}
        assert {DEFAULT_ENDPOINT.replace("{zone}", z) for z in SPEC_ZONES} == spec_urls
        assert s.access_token is None
        assert s.access_token_secret is None
        assert s.ca_bundle is None

    def test_keygate_names_win_over_sakuracloud_names(self, clean_env: pytest.MonkeyPatch) -> None:
        """SAKURACLOUD_ACCESS_TOKEN(_SECRET) are fallbacks; KEYGATE_SAKURA_* win over them."""
        clean_env.setenv("SAKURACLOUD_ACCESS_TOKEN", "usacloud-token")
        clean_env.setenv("SAKURACLOUD_ACCESS_TOKEN_SECRET", "usacloud-secret")
        s = SakuraKmsSettings()
        assert s.access_token is not None
        assert s.access_token.get_secret_value() == "usacloud-token"
        assert s.access_token_secret is not None
        assert s.access_token_secret.get_secret_value() == "usacloud-secret"
        clean_env.setenv("KEYGATE_SAKURA_ACCESS_TOKEN", "keygate-token")
        clean_env.setenv("KEYGATE_SAKURA_ACCESS_TOKEN_SECRET", "keygate-secret")
        s = SakuraKmsSettings()
        assert s.access_token is not None
        assert s.access_token.get_secret_value() == "keygate-token"
        assert s.access_token_secret is not None
        assert s.access_token_secret.get_secret_value() == "keygate-secret"
        assert "keygate-secret" not in repr(s)
        assert "keygate-token" not in repr(s)

    def test_missing_credentials_name_the_variables(self, clean_env: pytest.MonkeyPatch) -> None:
        """No API key: ConfigurationError naming the variables to set, before any request."""
        a = SakuraKmsAdapter(OPTIONS, SakuraKmsSettings())
        try:
            with pytest.raises(ConfigurationError, match="KEYGATE_SAKURA_ACCESS_TOKEN"):
                a.wrap(SakuraKmsAdapter.parse_uri("sakura-kms://is1a/110000000000"), b"x", aad=b"")
        finally:
            a.close()

    @pytest.mark.parametrize(
        ("endpoint", "problem"),
        [
            ("http://kms.example.jp/cloud/zone/{zone}/api/cloud/1.1", "loopback"),
            ("https://secure.sakura.ad.jp/cloud/zone/is1a/api/cloud/1.1", "{zone}"),
            ("https://{zone}.example/{zone}", "{zone}"),
            ("ftp://127.0.0.1/{zone}", "https"),
            ("https://user:hunter2@secure.sakura.ad.jp/cloud/zone/{zone}/api", "user info"),
            ("https://secure.sakura.ad.jp/cloud/zone/{zone}/api?x=1", "no query"),
            ("https:///cloud/zone/{zone}", "scheme://host"),
        ],
    )
    def test_bad_endpoint(self, endpoint: str, problem: str) -> None:
        """An unusable endpoint is a ConfigurationError at construction that never echoes it."""
        with pytest.raises(ConfigurationError) as info:
            SakuraKmsAdapter(OPTIONS, SakuraKmsSettings(endpoint=endpoint))
        assert problem in str(info.value)
        assert "hunter2" not in str(info.value)

    @pytest.mark.parametrize(
        "endpoint",
        [
            "http://127.0.0.1:8080/cloud/zone/{zone}/api/cloud/1.1",
            "http://[::1]:8080/cloud/zone/{zone}/api/cloud/1.1",
            "http://localhost:8080/cloud/zone/{zone}/api/cloud/1.1/",
            "https://kms.internal.example/{zone}",
        ],
    )
    def test_good_endpoint(self, endpoint: str) -> None:
        """Loopback http and any https endpoint with one {zone} are accepted."""
        SakuraKmsAdapter(OPTIONS, SakuraKmsSettings(endpoint=endpoint)).close()

    def test_adapter_refuses_pickling(self) -> None:
        """The adapter holds credentials: pickling it is a TypeError."""
        a = SakuraKmsAdapter(OPTIONS, SakuraKmsSettings(access_token=SecretStr("t")))
        with pytest.raises(TypeError, match="credentials"):
            pickle.dumps(a)


# ------------------------------------------------------------------------------ wrap/unwrap
@pytest.mark.api
@pytest.mark.parametrize("size", [0, 1, 60, 256])
def test_round_trip(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri, size: int
) -> None:
    """wrap then unwrap returns the bytes, and the provider ciphertext is ASCII ≤ 2048 bytes."""
    data = secrets.token_bytes(size)
    wrapped = adapter.wrap(key, data, aad=AAD)
    assert wrapped != data
    assert wrapped.isascii()
    assert len(wrapped) <= 2048
    assert adapter.unwrap(key, wrapped, aad=AAD) == data
    assert server.calls["encrypt"] == 1
    assert server.calls["decrypt"] == 1


@pytest.mark.api
def test_requests_follow_the_spec_and_carry_only_the_data(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri
) -> None:
    """encrypt sends {Key: {Plain: b64(data), Algo: aes-256-gcm}} and decrypt only the Cipher."""
    wrapped = adapter.wrap(key, DEK, aad=AAD)
    adapter.unwrap(key, wrapped, aad=AAD)
    assert bodies(server) == [
        {"Key": {"Plain": base64.b64encode(DEK).decode(), "Algo": "aes-256-gcm"}},
        {"Key": {"Cipher": wrapped.decode()}},
    ]
    everything = b"".join(server.received)
    assert AAD not in everything
    assert base64.b64encode(AAD) not in everything
    assert b"tenant-a" not in everything


@pytest.mark.api
def test_aad_is_not_bound_by_sakura(adapter: SakuraKmsAdapter, key: KeyUri) -> None:
    """The spec has no AAD field: a different (or no) aad still unwraps (documented behaviour)."""
    wrapped = adapter.wrap(key, DEK, aad=AAD)
    assert adapter.unwrap(key, wrapped, aad=b"another tenant") == DEK
    assert adapter.unwrap(key, wrapped, aad=b"") == DEK


@pytest.mark.api
def test_same_key_uri_in_any_case_reaches_the_key(adapter: SakuraKmsAdapter, key: KeyUri) -> None:
    """A KeyUri is re-parsed: an upper-case spelling of a key reaches the same key."""
    loose = KeyUri(scheme="sakura-kms", uri=key.uri.upper(), region="IGNORED")
    assert adapter.unwrap(key, adapter.wrap(loose, DEK, aad=b""), aad=b"") == DEK


@pytest.mark.api
def test_key_uri_of_another_scheme_is_refused(adapter: SakuraKmsAdapter) -> None:
    """A KeyUri whose text is not sakura-kms is InvalidRequest, with no request sent."""
    other = KeyUri(scheme="aws-kms", uri="aws-kms://arn:aws:kms:ap-northeast-1:1:key/x", region="x")
    with pytest.raises(InvalidRequest):
        adapter.wrap(other, DEK, aad=b"")


@pytest.mark.api
def test_rotated_key_still_unwraps_old_ciphertexts(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri
) -> None:
    """After a rotation, old ciphertexts unwrap and new ones use the new version."""
    old = adapter.wrap(key, DEK, aad=b"")
    assert server.rotate_key(key.uri) == 1
    new = adapter.wrap(key, DEK, aad=b"")
    # the fake's ciphertext starts with the key version (4 bytes, big-endian)
    assert base64.b64decode(old)[:4] == b"\x00\x00\x00\x00"
    assert base64.b64decode(new)[:4] == b"\x00\x00\x00\x01"
    assert adapter.unwrap(key, old, aad=b"") == DEK
    assert adapter.unwrap(key, new, aad=b"") == DEK
    assert adapter.describe(key).details["latest_version"] == "1"


# ------------------------------------------------------------------------------ foreign input
def _flip(text: bytes, at: int) -> bytes:
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    c = text[at]
    replacement = alphabet[(alphabet.index(c) + 1) % 64] if c in alphabet else ord("A")
    return text[:at] + bytes([replacement]) + text[at + 1 :]


@pytest.mark.api
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda w, other: other, id="another-keys-ciphertext"),
        pytest.param(lambda w, other: secrets.token_bytes(80), id="random-bytes"),
        pytest.param(
            lambda w, other: base64.b64encode(secrets.token_bytes(80)), id="random-base64"
        ),
        pytest.param(lambda w, other: w[: len(w) // 2], id="truncated"),
        pytest.param(lambda w, other: w[:-4], id="tag-cut"),
        pytest.param(lambda w, other: _flip(w, 30), id="tampered"),
        pytest.param(lambda w, other: b"", id="empty"),
        pytest.param(lambda w, other: w + b"\n", id="trailing-newline"),
        pytest.param(lambda w, other: b"A" * 3000, id="oversized"),
    ],
)
def test_foreign_ciphertext_is_rejected(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri, make: Any
) -> None:
    """Another key's ciphertext, random, truncated or tampered input: ProviderCiphertextRejected."""
    other = SakuraKmsAdapter.parse_uri(server.create_key("other"))
    wrapped = adapter.wrap(key, DEK, aad=AAD)
    foreign = make(wrapped, adapter.wrap(other, DEK, aad=AAD))
    with pytest.raises(ProviderCiphertextRejected) as info:
        adapter.unwrap(key, foreign, aad=AAD)
    assert key.uri in str(info.value)
    assert adapter.unwrap(key, wrapped, aad=AAD) == DEK  # the key itself is fine


# ------------------------------------------------------------------------------ key state
@pytest.mark.api
def test_suspended_key_is_disabled(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri
) -> None:
    """A suspended key refuses wrap and unwrap with ProviderKeyDisabled; re-enabled it works."""
    wrapped = adapter.wrap(key, DEK, aad=b"")
    server.set_key_enabled(key.uri, False)
    with pytest.raises(ProviderKeyDisabled, match="suspended"):
        adapter.wrap(key, DEK, aad=b"")
    with pytest.raises(ProviderKeyDisabled, match="suspended"):
        adapter.unwrap(key, wrapped, aad=b"")
    server.set_key_enabled(key.uri, True)
    assert adapter.unwrap(key, wrapped, aad=b"") == DEK


@pytest.mark.api
def test_restricted_key_decrypts_only(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri
) -> None:
    """restricted (復号のみ): wrap is ProviderKeyDisabled, unwrap still works."""
    wrapped = adapter.wrap(key, DEK, aad=b"")
    server.set_key_status(key.uri, "restricted")
    with pytest.raises(ProviderKeyDisabled, match="restricted"):
        adapter.wrap(key, DEK, aad=b"")
    assert adapter.unwrap(key, wrapped, aad=b"") == DEK


@pytest.mark.api
def test_pending_destruction_is_destroyed(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri
) -> None:
    """A key scheduled for destruction: ProviderKeyDestroyed on wrap and unwrap."""
    wrapped = adapter.wrap(key, DEK, aad=b"")
    server.destroy_key(key.uri)
    with pytest.raises(ProviderKeyDestroyed, match="pending destruction"):
        adapter.wrap(key, DEK, aad=b"")
    with pytest.raises(ProviderKeyDestroyed, match="pending destruction"):
        adapter.unwrap(key, wrapped, aad=b"")


@pytest.mark.api
@pytest.mark.parametrize("status", [400, 403, 409])
def test_key_state_is_read_whatever_status_refuses_it(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri, status: int
) -> None:
    """The spec names no status for a refused key state: 400/403/409 all read the key's Status."""
    server.state_error_status = status
    wrapped = adapter.wrap(key, DEK, aad=b"")
    server.set_key_enabled(key.uri, False)
    with pytest.raises(ProviderKeyDisabled):
        adapter.unwrap(key, wrapped, aad=b"")
    server.destroy_key(key.uri)
    with pytest.raises(ProviderKeyDestroyed):
        adapter.wrap(key, DEK, aad=b"")
    assert server.calls["get"] == 2  # one metadata read per refusal, no retry of the operation
    assert server.calls["encrypt"] == 2
    assert server.calls["decrypt"] == 1


@pytest.mark.api
def test_unknown_key_is_not_found(adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer) -> None:
    """A resource id the service does not know: ProviderKeyNotFound for every operation."""
    missing = SakuraKmsAdapter.parse_uri("sakura-kms://is1a/999999999999")
    with pytest.raises(ProviderKeyNotFound, match="999999999999"):
        adapter.wrap(missing, DEK, aad=b"")
    with pytest.raises(ProviderKeyNotFound):
        adapter.unwrap(missing, b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", aad=b"")
    with pytest.raises(ProviderKeyNotFound):
        adapter.describe(missing)


@pytest.mark.api
def test_key_lives_in_its_zone(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri
) -> None:
    """The same resource id under another zone is not found: the zone in the URI is used."""
    elsewhere = SakuraKmsAdapter.parse_uri(f"sakura-kms://tk1a/{key.parts['resource_id']}")
    with pytest.raises(ProviderKeyNotFound, match="tk1a"):
        adapter.wrap(elsewhere, DEK, aad=b"")
    tokyo = SakuraKmsAdapter.parse_uri(server.create_key("tokyo", region="tk1b"))
    assert tokyo.region == "tk1b"
    assert adapter.unwrap(tokyo, adapter.wrap(tokyo, DEK, aad=b""), aad=b"") == DEK


@pytest.mark.api
def test_deleted_key_is_not_found(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri
) -> None:
    """A key deleted for good answers 404 like one that never existed: ProviderKeyNotFound."""
    wrapped = adapter.wrap(key, DEK, aad=b"")
    server.delete_key(key.uri)
    with pytest.raises(ProviderKeyNotFound):
        adapter.unwrap(key, wrapped, aad=b"")


# ------------------------------------------------------------------------------ credentials
@pytest.mark.api
def test_wrong_credentials(server: FakeSakuraKmsServer, key: KeyUri) -> None:
    """A wrong access token secret: ProviderAuthFailed for wrap, unwrap and describe."""
    good = SakuraKmsAdapter(OPTIONS, server.settings())
    bad = SakuraKmsAdapter(OPTIONS, server.bad_settings())
    try:
        wrapped = good.wrap(key, DEK, aad=b"")
        for call in (
            lambda: bad.wrap(key, DEK, aad=b""),
            lambda: bad.unwrap(key, wrapped, aad=b""),
            lambda: bad.describe(key),
        ):
            with pytest.raises(ProviderAuthFailed, match="401"):
                call()
    finally:
        good.close()
        bad.close()


@pytest.mark.api
def test_missing_permission_is_auth_failed(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri
) -> None:
    """403 on an active key (the API key lacks the permission) is ProviderAuthFailed."""
    wrapped = adapter.wrap(key, DEK, aad=b"")
    server.denied.update({"encrypt", "decrypt"})
    with pytest.raises(ProviderAuthFailed, match="permission"):
        adapter.wrap(key, DEK, aad=b"")
    with pytest.raises(ProviderAuthFailed, match="permission"):
        adapter.unwrap(key, wrapped, aad=b"")
    server.denied.add("get")  # the key's state cannot be read either
    with pytest.raises(ProviderAuthFailed):
        adapter.wrap(key, DEK, aad=b"")
    with pytest.raises(ProviderAuthFailed):
        adapter.describe(key)


@pytest.mark.api
def test_credential_files_are_read_at_use(
    server: FakeSakuraKmsServer, key: KeyUri, tmp_path: Path
) -> None:
    """*_file settings win over values and are re-read per call (a rotated API key is picked up)."""
    token_file, secret_file = tmp_path / "token", tmp_path / "secret"
    token_file.write_text(server.access_token + "\n")
    secret_file.write_text("not-the-secret\n")
    settings = server.settings().model_copy(
        update={"access_token_file": token_file, "access_token_secret_file": secret_file}
    )
    a = SakuraKmsAdapter(OPTIONS, settings)  # the values in settings are right; the file is not
    try:
        with pytest.raises(ProviderAuthFailed):
            a.wrap(key, DEK, aad=b"")
        secret_file.write_text(server.access_token_secret + "\r\n")
        assert a.unwrap(key, a.wrap(key, DEK, aad=b""), aad=b"") == DEK
        secret_file.write_text("")
        with pytest.raises(ConfigurationError, match="empty"):
            a.wrap(key, DEK, aad=b"")
        secret_file.unlink()
        with pytest.raises(ConfigurationError, match="cannot read"):
            a.wrap(key, DEK, aad=b"")
    finally:
        a.close()


@pytest.mark.api
def test_env_reaches_the_server(
    server: FakeSakuraKmsServer, key: KeyUri, monkeypatch: pytest.MonkeyPatch
) -> None:
    """server.env() is all a subprocess needs: settings read from it reach the key."""
    for name in ("KEYGATE_SAKURA_ACCESS_TOKEN_FILE", "KEYGATE_SAKURA_ACCESS_TOKEN_SECRET_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    a = SakuraKmsAdapter(OPTIONS)
    try:
        assert a.unwrap(key, a.wrap(key, DEK, aad=b""), aad=b"") == DEK
    finally:
        a.close()


# ------------------------------------------------------------------------------ faults
@pytest.mark.api
def test_server_down_is_unavailable(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri
) -> None:
    """Refused or closed connections: ProviderUnavailable (not a timeout), then recovery."""
    wrapped = adapter.wrap(key, DEK, aad=b"")  # leaves a kept-alive connection in the pool
    server.fault("down")
    for _ in range(2):  # the pooled connection, then a refused new one
        with pytest.raises(ProviderUnavailable) as info:
            adapter.unwrap(key, wrapped, aad=b"")
        assert type(info.value) is ProviderUnavailable
    server.fault(None)
    assert adapter.unwrap(key, wrapped, aad=b"") == DEK


@pytest.mark.api
def test_slow_server_times_out(server: FakeSakuraKmsServer, key: KeyUri) -> None:
    """A server slower than the read timeout: ProviderTimeout after one request."""
    adapter = SakuraKmsAdapter(FAST, server.settings())
    try:
        server.fault("slow")
        with pytest.raises(ProviderTimeout, match="timed out"):
            adapter.wrap(key, DEK, aad=b"")
        assert server.calls["encrypt"] == 1  # no retry inside the adapter
    finally:
        adapter.close()


@pytest.mark.api
@pytest.mark.parametrize(("mode", "status"), [("error", "503"), ("throttle", "429")])
def test_5xx_and_throttling_are_unavailable(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri, mode: str, status: str
) -> None:
    """503 and 429 are ProviderUnavailable (retryable by the guard), sent once, no retry here."""
    server.fault(mode)
    with pytest.raises(ProviderUnavailable, match=status) as info:
        adapter.wrap(key, DEK, aad=b"")
    assert type(info.value) is ProviderUnavailable
    assert server.calls["encrypt"] == 1
    if mode == "throttle":
        assert info.value.retry_after == 1.0


@pytest.mark.api
def test_https_with_the_configured_ca_bundle() -> None:
    """HTTPS: trusted with ca_bundle; without it the system CAs refuse the certificate."""
    with FakeSakuraKmsServer(tls=True) as kms:
        assert kms.endpoint.startswith("https://")
        uri = SakuraKmsAdapter.parse_uri(kms.create_key("tls"))
        trusted = SakuraKmsAdapter(OPTIONS, kms.settings())
        untrusted = SakuraKmsAdapter(OPTIONS, kms.settings().model_copy(update={"ca_bundle": None}))
        try:
            assert trusted.unwrap(uri, trusted.wrap(uri, DEK, aad=b""), aad=b"") == DEK
            with pytest.raises(ProviderRejected, match="certificate") as info:
                untrusted.wrap(uri, DEK, aad=b"")
            assert not isinstance(info.value, ProviderUnavailable)
            assert kms.calls["encrypt"] == 1
        finally:
            trusted.close()
            untrusted.close()


# ------------------------------------------------------------------------------ describe
@pytest.mark.api
def test_describe(adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri) -> None:
    """describe() reads GET /kms/keys/{id}: status, enabled, zone and the key's details."""
    status = adapter.describe(key)
    assert status.uri == key.uri
    assert status.enabled is True
    assert status.state == "active"
    assert status.region == "is1a"
    assert status.details["name"].startswith("k-")
    assert status.details["key_origin"] == "generated"
    assert status.details["latest_version"] == "0"
    for state in ("restricted", "suspended", "pending_destruction"):
        server.set_key_status(key.uri, state)
        described = adapter.describe(key)
        assert (described.state, described.enabled) == (state, False)
    assert server.calls["get"] == 4
    assert server.received == []  # GET has no body


# ------------------------------------------------------------------------------ secrets
@pytest.mark.api
def test_no_secret_in_errors_or_logs(
    server: FakeSakuraKmsServer, key: KeyUri, caplog: pytest.LogCaptureFixture
) -> None:
    """Error messages, their causes and DEBUG logs never contain the API key or the data."""
    caplog.set_level(logging.DEBUG)
    secret_data = b"\x13\x37" + secrets.token_bytes(30)
    good = SakuraKmsAdapter(OPTIONS, server.settings())
    bad = SakuraKmsAdapter(OPTIONS, server.bad_settings())
    impatient = SakuraKmsAdapter(FAST, server.settings())  # for the "slow" fault
    errors: list[BaseException] = []

    def failing(call: Any) -> None:
        with pytest.raises(Exception) as info:
            call()
        errors.append(info.value)

    try:
        wrapped = good.wrap(key, secret_data, aad=AAD)
        failing(lambda: bad.wrap(key, secret_data, aad=AAD))
        failing(lambda: bad.unwrap(key, wrapped, aad=AAD))
        failing(lambda: good.unwrap(key, _flip(wrapped, 20), aad=AAD))
        for mode in ("error", "slow", "down"):
            server.fault(mode)
            client = impatient if mode == "slow" else good
            failing(lambda client=client: client.wrap(key, secret_data, aad=AAD))
            server.fault(None)
    finally:
        good.close()
        bad.close()
        impatient.close()
    assert len(errors) == 6
    texts = [caplog.text, *(r.getMessage() for r in caplog.records)]
    for exc in errors:
        seen: BaseException | None = exc
        while seen is not None:
            texts.append(str(seen))
            texts.append(repr(seen))
            seen = seen.__cause__ or seen.__context__
    basic = base64.b64encode(
        f"{server.access_token}:{server.access_token_secret}".encode()
    ).decode()
    forbidden = [
        server.access_token_secret,
        server.access_token_secret + "-wrong",
        server.access_token,
        basic,
        base64.b64encode(secret_data).decode(),
        secret_data.hex(),
    ]
    for text in texts:
        for needle in forbidden:
            assert needle not in text
    haystack = "\n".join(texts).encode()
    assert find_secrets(haystack, [secret_data, *(f.encode() for f in forbidden[:4])]) == []


# ------------------------------------------------------------------------------ threads
@pytest.mark.api
def test_one_client_shared_by_threads(
    adapter: SakuraKmsAdapter,
    server: FakeSakuraKmsServer,
    key: KeyUri,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Concurrent first calls create one httpx client; every thread's round trip succeeds."""
    created: list[int] = []
    real = httpx.Client
    lock = threading.Lock()

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            with lock:
                created.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(httpx, "Client", Counting)
    payloads = [secrets.token_bytes(60) for _ in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(
            pool.map(
                lambda d: adapter.unwrap(key, adapter.wrap(key, d, aad=b""), aad=b""), payloads
            )
        )
    assert results == payloads
    assert len(created) == 1
    assert server.calls["encrypt"] == 24


# ------------------------------------------------------------------------------ the spec
def _strict(node: Any) -> Any:
    """The spec's schemas with additionalProperties: false on every object with properties."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and out.get("type") == "object":
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(SPEC_PATH.read_text())
    return doc


def _validator(spec: dict[str, Any], name: str) -> jsonschema.Draft7Validator:
    components = _strict(copy.deepcopy(spec["components"]))
    schema = {"$ref": f"#/components/schemas/{name}", "components": components}
    return jsonschema.Draft7Validator(schema)


@pytest.mark.api
def test_fake_answers_match_the_openapi_schemas(
    server: FakeSakuraKmsServer, spec: dict[str, Any]
) -> None:
    """Every answer of the fake validates against the spec's schemas (no extra field)."""

    def schema_of(path: str, method: str, status: int) -> str:
        content = spec["paths"][path][method]["responses"][str(status)]["content"]
        ref: str = content["application/json"]["schema"]["$ref"]
        return ref.rsplit("/", 1)[1]

    auth = (server.access_token, server.access_token_secret)
    base = server.endpoint.replace("{zone}", "is1b")
    with httpx.Client(base_url=base, auth=auth, timeout=5) as c:

        def check(method: str, path: str, template: str, status: int, **kw: Any) -> Any:
            r = c.request(method, path, **kw)
            assert r.status_code == status, r.text
            doc = r.json()
            _validator(spec, schema_of(template, method.lower(), status)).validate(doc)
            return doc

        created = check(
            "POST",
            "/kms/keys",
            "/kms/keys",
            201,
            json={"Key": {"Name": "schema", "Description": "d", "Tags": ["t"]}},
        )
        assert "PlainKey" not in created["Key"]
        kid = created["Key"]["ID"]
        assert len(kid) == 12
        assert kid.isdigit()
        imported = check(
            "POST",
            "/kms/keys",
            "/kms/keys",
            201,
            json={"Key": {"Name": "imp", "PlainKey": base64.b64encode(bytes(32)).decode()}},
        )
        assert imported["Key"]["KeyOrigin"] == "imported"
        assert "PlainKey" not in imported["Key"]
        one = "/kms/keys/{resource_id}"
        check("GET", "/kms/keys", "/kms/keys", 200)
        assert check("GET", f"/kms/keys/{kid}", one, 200)["Key"]["Status"] == "active"
        check("PUT", f"/kms/keys/{kid}", one, 200, json={"Key": {"Name": "renamed"}})
        rotated = check("POST", f"/kms/keys/{kid}/rotate", one + "/rotate", 200)
        assert rotated["Key"]["LatestVersion"] == 1
        enc = check(
            "POST",
            f"/kms/keys/{kid}/encrypt",
            one + "/encrypt",
            200,
            json={"Key": {"Plain": base64.b64encode(DEK).decode(), "Algo": "aes-256-gcm"}},
        )
        dec = check("POST", f"/kms/keys/{kid}/decrypt", one + "/decrypt", 200, json=enc)
        assert "Algo" not in dec["Key"]
        assert base64.b64decode(dec["Key"]["Plain"]) == DEK
        # status and schedule-destruction: 200 with no body, as in the spec
        r = c.post(f"/kms/keys/{kid}/status", json={"Key": {"Status": "suspended"}})
        assert (r.status_code, r.content) == (200, b"")
        assert c.get(f"/kms/keys/{kid}").json()["Key"]["Status"] == "suspended"
        assert c.post(f"/kms/keys/{kid}/rotate").status_code == 403  # "not available for rotation"
        r = c.post(f"/kms/keys/{kid}/schedule-destruction", json={"Key": {"PendingDays": 6}})
        assert r.status_code == 400
        r = c.post(f"/kms/keys/{kid}/schedule-destruction", json={"Key": {"PendingDays": 7}})
        assert (r.status_code, r.content) == (200, b"")
        assert c.get(f"/kms/keys/{kid}").json()["Key"]["Status"] == "pending_destruction"
        # zones and auth
        elsewhere = server.endpoint.replace("{zone}", "is1a") + f"/kms/keys/{kid}"
        assert c.get(elsewhere).status_code == 404
        assert all(k["ID"] != kid for k in c.get(elsewhere.rsplit("/", 1)[0]).json()["Keys"])
        denied = httpx.get(f"{base}/kms/keys/{kid}", auth=("x", "y"), timeout=5)
        assert denied.status_code == 401
        assert denied.json()["error_code"] == "unauthorized"
        r = c.delete(f"/kms/keys/{imported['Key']['ID']}")
        assert (r.status_code, r.content) == (204, b"")
        assert c.get(f"/kms/keys/{imported['Key']['ID']}").status_code == 404


@pytest.mark.api
def test_adapter_requests_match_the_openapi_schemas(
    adapter: SakuraKmsAdapter, server: FakeSakuraKmsServer, key: KeyUri, spec: dict[str, Any]
) -> None:
    """What the adapter sends to encrypt and decrypt validates against the request schemas."""
    adapter.unwrap(key, adapter.wrap(key, DEK, aad=AAD), aad=AAD)
    encrypt, decrypt = bodies(server)
    one = spec["paths"]["/kms/keys/{resource_id}/encrypt"]["post"]["requestBody"]["content"]
    assert one["application/json"]["schema"]["$ref"].endswith("/WrappedKeyPlain")
    _validator(spec, "WrappedKeyPlain").validate(encrypt)
    _validator(spec, "WrappedKeyCipher").validate(decrypt)
    enum = spec["components"]["schemas"]["KeyEncryptAlgoEnum"]["enum"]
    assert encrypt["Key"]["Algo"] in enum
    with pytest.raises(jsonschema.ValidationError):  # the validator is strict enough to fail
        _validator(spec, "WrappedKeyCipher").validate({"Key": {"Cipher": "x", "Aad": "y"}})
