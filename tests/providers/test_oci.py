"""OCI Vault adapter: URI parsing, and the real ``oci`` SDK against the local OCI Vault server."""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import oci.signer
import pytest
from cryptography.hazmat.primitives import serialization
from oci._vendor import requests as oci_requests
from provider_support import (  # type: ignore[import-not-found]
    ADAPTER_FAST,
    ADAPTER_OPTIONS,
)
from pydantic import SecretStr

from keygate.core.errors import ConfigurationError, InvalidRequest
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
from keygate.providers.oci import OciVaultAdapter, OciVaultSettings
from keygate.testing.kms.oci import FakeOciVaultServer

TOKYO_HOST = "abcd1234-crypto.kms.ap-tokyo-1.oraclecloud.com"
TOKYO_OCID = "ocid1.key.oc1.ap-tokyo-1.abcd1234.aaaaaaaaexampleuniqueid0123456789"
TOKYO_URI = f"oci-kms://{TOKYO_HOST}/{TOKYO_OCID}"
OSAKA_HOST = "efgh5678-crypto.kms.ap-osaka-1.oraclecloud.com"
OSAKA_OCID = "ocid1.key.oc1.ap-osaka-1.efgh5678.bbbbbbbbexampleuniqueid0123456789"
DATA = bytes(range(60))  # what keygate hands over: an HSM-wrapped DEK
AAD = b"keygate/v1 outer\x00tenant-a\x00records\x001"
OPTIONS, FAST = ADAPTER_OPTIONS, ADAPTER_FAST


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOciVaultServer]:
    with FakeOciVaultServer(slow_s=1.0) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _clean_server(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "server" in request.fixturenames:
        fake: FakeOciVaultServer = request.getfixturevalue("server")
        fake.fault(None)
        fake.state_error = (409, "IncorrectState")


@pytest.fixture
def adapter(server: FakeOciVaultServer) -> Iterator[OciVaultAdapter]:
    a = OciVaultAdapter(OPTIONS, server.settings())
    yield a
    a.close()


@pytest.fixture
def key(server: FakeOciVaultServer) -> KeyUri:
    return OciVaultAdapter.parse_uri(server.create_key("tenant-a"))


def _bodies(server: FakeOciVaultServer, start: int) -> list[dict[str, object]]:
    return [json.loads(b) for b in server.received[start:] if b]


# -- URIs -----------------------------------------------------------------------------------------


@pytest.mark.unit
def test_parse_uri_reads_region_and_endpoints() -> None:
    """A Tokyo key URI gives region ap-tokyo-1, the key OCID and both vault endpoints."""
    k = OciVaultAdapter.parse_uri(TOKYO_URI)
    assert (k.scheme, k.uri, k.region) == ("oci-kms", TOKYO_URI, "ap-tokyo-1")
    assert k.parts["key_id"] == TOKYO_OCID
    assert k.parts["crypto_endpoint"] == f"https://{TOKYO_HOST}"
    assert k.parts["management_endpoint"] == (
        "https://abcd1234-management.kms.ap-tokyo-1.oraclecloud.com"
    )
    osaka = OciVaultAdapter.parse_uri(f"oci-kms://{OSAKA_HOST}/{OSAKA_OCID}")
    assert osaka.region == "ap-osaka-1"


@pytest.mark.unit
def test_parse_uri_is_canonical_and_stable() -> None:
    """Scheme and host case are normalised; parsing the canonical text again changes nothing."""
    k = OciVaultAdapter.parse_uri(f"OCI-KMS://{TOKYO_HOST.upper()}/{TOKYO_OCID}")
    assert k.uri == TOKYO_URI
    assert OciVaultAdapter.parse_uri(k.uri) == k
    assert OciVaultAdapter.parse_uri(k.uri).uri == k.uri


@pytest.mark.unit
def test_parse_uri_normalises_short_region_codes() -> None:
    """An OCID with the short region code (nrt) names ap-tokyo-1, matching the endpoint host."""
    ocid = "ocid1.key.oc1.nrt.abcd1234.aaaaaaaaexampleuniqueid0123456789"
    k = OciVaultAdapter.parse_uri(f"oci-kms://{TOKYO_HOST}/{ocid}")
    assert k.region == "ap-tokyo-1"
    assert k.parts["key_id"] == ocid


@pytest.mark.unit
def test_parse_uri_accepts_the_japanese_sovereign_realm() -> None:
    """ap-chiyoda-1 keys (realm oc8) are served under oraclecloud8.com."""
    uri = (
        "oci-kms://wxyz-crypto.kms.ap-chiyoda-1.oraclecloud8.com/"
        "ocid1.key.oc8.ap-chiyoda-1.wxyz.aaaaexample"
    )
    assert OciVaultAdapter.parse_uri(uri).region == "ap-chiyoda-1"


BAD_URIS = [
    ("", "must start with oci-kms://"),
    (f"aws-kms://{TOKYO_HOST}/{TOKYO_OCID}", "must start with oci-kms://"),
    (f"oci-kms:/{TOKYO_HOST}/{TOKYO_OCID}", "must start with oci-kms://"),
    (f"oci-kms://{TOKYO_HOST}", "expected oci-kms://"),
    (f"oci-kms://{TOKYO_HOST}/", "expected oci-kms://"),
    (f"oci-kms:///{TOKYO_OCID}", "expected oci-kms://"),
    (f"oci-kms://{TOKYO_HOST}/{TOKYO_OCID}/", "exactly one path segment"),
    (f"oci-kms://{TOKYO_HOST}/../{TOKYO_OCID}", "exactly one path segment"),
    (f"oci-kms://{TOKYO_HOST}/ocid1.key.oc1..ap-tokyo-1.x", "key OCID"),
    (f"oci-kms://{TOKYO_HOST}/{TOKYO_OCID}\n", "whitespace or control"),
    (f"oci-kms://{TOKYO_HOST}/{TOKYO_OCID} x", "whitespace or control"),
    (f"oci-kms://{TOKYO_HOST}/{TOKYO_OCID}\x00", "whitespace or control"),
    (f"oci-kms://admin:hunter2@{TOKYO_HOST}/{TOKYO_OCID}", "user information"),
    (f"oci-kms://{TOKYO_HOST}:443/{TOKYO_OCID}", "port"),
    (f"oci-kms://{TOKYO_HOST}/{TOKYO_OCID}?region=ap-osaka-1", "query"),
    (f"oci-kms://{TOKYO_HOST}/{TOKYO_OCID}#frag", "fragment"),
    (f"oci-kms://{TOKYO_HOST}/ocid1.key.oc1.ap-tokyo-1.abcd%2e1234.x", "percent"),
    (f"oci-kms://ａｂｃ-crypto.kms.ap-tokyo-1.oraclecloud.com/{TOKYO_OCID}", "ASCII"),
    (f"oci-kms://{TOKYO_HOST}/{TOKYO_OCID}{'a' * 500}", "longer than 512"),
    (f"oci-kms://{OSAKA_HOST}/{TOKYO_OCID}", "differs from the endpoint"),
    (f"oci-kms://kms.ap-tokyo-1.oraclecloud.com/{TOKYO_OCID}", "crypto endpoint"),
    (
        f"oci-kms://abcd1234-management.kms.ap-tokyo-1.oraclecloud.com/{TOKYO_OCID}",
        "crypto endpoint",
    ),
    (f"oci-kms://abcd1234-crypto.kms.ap-tokyo-1.example.com/{TOKYO_OCID}", "served under"),
    (
        f"oci-kms://abcd1234-crypto.kms.ap-tokyo-1.oraclecloud.com.evil.example/{TOKYO_OCID}",
        "served under",
    ),
    (
        "oci-kms://abcd1234-crypto.kms.ap-mars-1.oraclecloud.com/"
        "ocid1.key.oc1.ap-mars-1.abcd1234.x",
        "unknown OCI region",
    ),
    (f"oci-kms://{TOKYO_HOST}/ocid1.key.oc8.ap-tokyo-1.abcd1234.x", "not in realm"),
    (f"oci-kms://{TOKYO_HOST}/ocid1.vault.oc1.ap-tokyo-1.abcd1234.x", "not a key OCID"),
    (f"oci-kms://{TOKYO_HOST}/ocid1.keyversion.oc1.ap-tokyo-1.abcd1234.x", "not a key OCID"),
    (f"oci-kms://{TOKYO_HOST}/{TOKYO_OCID.upper()}", "key OCID"),
    (f"oci-kms://{TOKYO_HOST}/arn:aws:kms:ap-northeast-1:1:key/x", "':'"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("uri", "problem"), BAD_URIS, ids=[p for _, p in BAD_URIS])
def test_parse_uri_rejects_malformed_and_hostile(uri: str, problem: str) -> None:
    """Each malformed or ambiguous URI is an InvalidRequest naming the problem."""
    with pytest.raises(InvalidRequest) as info:
        OciVaultAdapter.parse_uri(uri)
    assert problem in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.unit
def test_module_imports_the_real_sdk() -> None:
    """keygate/providers/oci.py does not shadow the SDK: its ``oci`` is the installed package."""
    import oci as sdk

    import keygate
    import keygate.providers.oci as module

    assert vars(module)["oci"] is sdk
    assert hasattr(sdk, "key_management")
    assert not Path(sdk.__file__ or "").is_relative_to(Path(keygate.__file__).parent)


@pytest.mark.unit
def test_other_schemes_keys_are_refused() -> None:
    """A KeyUri of another scheme is an InvalidRequest before any call."""
    other = KeyUri(scheme="aws-kms", uri="aws-kms://arn:aws:kms:ap-northeast-1:1:key/x", region="x")
    with pytest.raises(InvalidRequest, match="aws-kms"):
        OciVaultAdapter(OPTIONS, OciVaultSettings(endpoint="http://127.0.0.1:9")).wrap(
            other, DATA, aad=AAD
        )


@pytest.mark.unit
def test_parse_uri_rejects_non_strings() -> None:
    """A non-string URI is an InvalidRequest, not a TypeError."""
    with pytest.raises(InvalidRequest, match="string"):
        OciVaultAdapter.parse_uri(b"oci-kms://x/y")  # type: ignore[arg-type]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("endpoint", "ok"),
    [
        ("http://127.0.0.1:8080", True),
        ("http://[::1]:8080", True),
        ("http://localhost:8080/", True),
        ("https://kms.example.internal", True),
        ("http://10.0.0.5:8080", False),
        ("http://kms.example.com", False),
        ("https://user:pw@kms.example.com", False),
        ("https://kms.example.com/path", False),
        ("ftp://127.0.0.1", False),
    ],
)
def test_endpoint_override_allows_plain_http_only_on_loopback(endpoint: str, ok: bool) -> None:
    """KEYGATE_OCI_ENDPOINT: https anywhere, http only on loopback, no userinfo or path."""
    settings = OciVaultSettings(endpoint=endpoint)
    if ok:
        OciVaultAdapter(OPTIONS, settings).close()
    else:
        with pytest.raises(ConfigurationError) as info:
            OciVaultAdapter(OPTIONS, settings)
        assert "pw" not in str(info.value)


# -- round trips ----------------------------------------------------------------------------------


def test_round_trip_binds_aad_and_sends_exactly_the_data(
    server: FakeOciVaultServer, adapter: OciVaultAdapter, key: KeyUri
) -> None:
    """wrap/unwrap round-trips; the server got exactly DATA and the AAD, in OCI's JSON shape."""
    start = len(server.received)
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    assert wrapped.isascii() and len(wrapped) <= 2048
    assert DATA not in wrapped
    assert adapter.unwrap(key, wrapped, aad=AAD) == DATA
    encrypt, decrypt = _bodies(server, start)
    aad_text = base64.urlsafe_b64encode(AAD).rstrip(b"=").decode()
    assert encrypt == {
        "keyId": key.parts["key_id"],
        "plaintext": base64.b64encode(DATA).decode(),
        "associatedData": {"keygate": aad_text},
        "encryptionAlgorithm": "AES_256_GCM",
    }
    assert decrypt == {
        "keyId": key.parts["key_id"],
        "ciphertext": wrapped.decode(),
        "associatedData": {"keygate": aad_text},
        "encryptionAlgorithm": "AES_256_GCM",
    }


def test_round_trip_without_aad(
    server: FakeOciVaultServer, adapter: OciVaultAdapter, key: KeyUri
) -> None:
    """With empty AAD no associatedData is sent, and the round trip works."""
    start = len(server.received)
    wrapped = adapter.wrap(key, DATA, aad=b"")
    assert adapter.unwrap(key, wrapped, aad=b"") == DATA
    assert all("associatedData" not in body for body in _bodies(server, start))


def test_largest_input_fits_the_envelope(adapter: OciVaultAdapter, key: KeyUri) -> None:
    """256 bytes of input wrap into at most 2048 bytes and come back."""
    data = os.urandom(256)
    wrapped = adapter.wrap(key, data, aad=AAD)
    assert len(wrapped) <= 2048
    assert adapter.unwrap(key, wrapped, aad=AAD) == data


@pytest.mark.parametrize("other_aad", [b"keygate/v1 outer\x00tenant-b\x00records\x001", b""])
def test_wrong_aad_is_rejected(adapter: OciVaultAdapter, key: KeyUri, other_aad: bytes) -> None:
    """Unwrapping with different (or no) AAD is ProviderCiphertextRejected."""
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    with pytest.raises(ProviderCiphertextRejected, match="rejected the ciphertext"):
        adapter.unwrap(key, wrapped, aad=other_aad)


def test_foreign_ciphertexts_are_rejected(
    server: FakeOciVaultServer, adapter: OciVaultAdapter, key: KeyUri
) -> None:
    """Another key's ciphertext, random base64, a truncated or flipped one: all rejected."""
    other = OciVaultAdapter.parse_uri(server.create_key("tenant-b"))
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    blob = base64.b64decode(wrapped)
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    foreign = [
        adapter.wrap(other, DATA, aad=AAD),
        base64.b64encode(os.urandom(120)),
        base64.b64encode(blob[:-20]),
        base64.b64encode(flipped),
    ]
    before = server.calls["decrypt"]
    for candidate in foreign:
        with pytest.raises(ProviderCiphertextRejected):
            adapter.unwrap(key, candidate, aad=AAD)
    assert server.calls["decrypt"] - before == len(foreign)


def test_non_base64_input_is_rejected_without_a_call(
    server: FakeOciVaultServer, adapter: OciVaultAdapter, key: KeyUri
) -> None:
    """Raw binary or empty input cannot be an OCI ciphertext: rejected locally."""
    before = server.calls["decrypt"]
    for candidate in (os.urandom(80) + b"\xff", b"", b"not base64!"):
        with pytest.raises(ProviderCiphertextRejected, match=r"not an OCI Vault ciphertext|empty"):
            adapter.unwrap(key, candidate, aad=AAD)
    assert server.calls["decrypt"] == before


# -- key state ------------------------------------------------------------------------------------


@pytest.mark.parametrize("state_error", [(409, "IncorrectState"), (400, "InvalidParameter")])
def test_disabled_key_is_refused(
    server: FakeOciVaultServer,
    adapter: OciVaultAdapter,
    key: KeyUri,
    state_error: tuple[int, str],
) -> None:
    """A disabled key refuses wrap and unwrap (OCI's 409 or 400 alike) until re-enabled."""
    server.state_error = state_error
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    server.set_key_enabled(key.uri, False)
    with pytest.raises(ProviderKeyDisabled, match="is disabled"):
        adapter.wrap(key, DATA, aad=AAD)
    with pytest.raises(ProviderKeyDisabled, match="is disabled"):
        adapter.unwrap(key, wrapped, aad=AAD)
    server.set_key_enabled(key.uri, True)
    assert adapter.unwrap(key, wrapped, aad=AAD) == DATA


@pytest.mark.parametrize("state", ["PENDING_DELETION", "DELETED"])
def test_destroyed_key_is_refused(
    server: FakeOciVaultServer, adapter: OciVaultAdapter, key: KeyUri, state: str
) -> None:
    """A key pending deletion (state error) or deleted (404) is ProviderKeyDestroyed."""
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    if state == "PENDING_DELETION":
        server.destroy_key(key.uri)
    else:
        server.set_key_state(key.uri, state)
    with pytest.raises(ProviderKeyDestroyed, match=state):
        adapter.unwrap(key, wrapped, aad=AAD)
    with pytest.raises(ProviderKeyDestroyed):
        adapter.wrap(key, DATA, aad=AAD)


def test_unknown_key_is_not_found(adapter: OciVaultAdapter) -> None:
    """A well-formed URI of a key the vault does not have is ProviderKeyNotFound (404)."""
    missing = OciVaultAdapter.parse_uri(TOKYO_URI)
    with pytest.raises(ProviderKeyNotFound, match="NotAuthorizedOrNotFound"):
        adapter.wrap(missing, DATA, aad=AAD)
    with pytest.raises(ProviderKeyNotFound):
        adapter.describe(missing)


def test_describe_reads_key_metadata(
    server: FakeOciVaultServer, adapter: OciVaultAdapter, key: KeyUri
) -> None:
    """describe() reports state, AES_256, HSM protection and the region, without wrapping."""
    before = server.calls["encrypt"]
    status = adapter.describe(key)
    assert (status.uri, status.enabled, status.state) == (key.uri, True, "ENABLED")
    assert (status.algorithm, status.region) == ("AES_256", "ap-tokyo-1")
    assert status.details["protection_mode"] == "HSM"
    server.set_key_enabled(key.uri, False)
    assert (adapter.describe(key).enabled, adapter.describe(key).state) == (False, "DISABLED")
    server.destroy_key(key.uri)
    assert adapter.describe(key).state == "PENDING_DELETION"
    assert server.calls["encrypt"] == before


# -- credentials ----------------------------------------------------------------------------------


def test_wrong_credentials_are_auth_failures(server: FakeOciVaultServer, key: KeyUri) -> None:
    """A key file that does not match the registered fingerprint gets 401 → ProviderAuthFailed."""
    bad = OciVaultAdapter(OPTIONS, server.bad_settings())
    try:
        with pytest.raises(ProviderAuthFailed, match="NotAuthenticated"):
            bad.wrap(key, DATA, aad=AAD)
        with pytest.raises(ProviderAuthFailed):
            bad.describe(key)
    finally:
        bad.close()


def test_config_file_and_profile(server: FakeOciVaultServer, key: KeyUri, tmp_path: Path) -> None:
    """Credentials from an OCI config file profile work; a missing profile is a config error."""
    good = server.settings()
    config = tmp_path / "config"
    config.write_text(
        "[DEFAULT]\nregion=ap-osaka-1\n\n[keygate]\n"
        f"user={good.user}\ntenancy={good.tenancy}\nfingerprint={good.fingerprint}\n"
        f"key_file={good.key_file}\nregion=ap-tokyo-1\n"
    )
    settings = OciVaultSettings(endpoint=server.url, config_file=config, profile="keygate")
    a = OciVaultAdapter(OPTIONS, settings)
    try:
        assert a.unwrap(key, a.wrap(key, DATA, aad=AAD), aad=AAD) == DATA
    finally:
        a.close()
    missing = OciVaultAdapter(OPTIONS, settings.model_copy(update={"profile": "nope"}))
    with pytest.raises(ConfigurationError, match="no profile 'nope'"):
        missing.wrap(key, DATA, aad=AAD)
    absent = OciVaultAdapter(
        OPTIONS, settings.model_copy(update={"config_file": tmp_path / "absent"})
    )
    with pytest.raises(ConfigurationError, match="no OCI config file"):
        absent.wrap(key, DATA, aad=AAD)


def test_env_settings_reach_the_server(
    server: FakeOciVaultServer, key: KeyUri, monkeypatch: pytest.MonkeyPatch
) -> None:
    """server.env() is enough for OciVaultSettings() (as a subprocess would build it)."""
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    a = OciVaultAdapter(OPTIONS)
    try:
        assert a.unwrap(key, a.wrap(key, DATA, aad=AAD), aad=AAD) == DATA
    finally:
        a.close()


def test_incomplete_direct_credentials_name_what_is_missing(key: KeyUri) -> None:
    """Direct API-key settings without a fingerprint fail as a configuration error naming it."""
    a = OciVaultAdapter(
        OPTIONS,
        OciVaultSettings(endpoint="http://127.0.0.1:9", user="ocid1.user.oc1..x", tenancy="t"),
    )
    with pytest.raises(ConfigurationError, match="KEYGATE_OCI_FINGERPRINT"):
        a.wrap(key, DATA, aad=AAD)


def test_resource_principal_outside_oci_is_a_config_error(
    key: KeyUri, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auth=resource_principal without the OCI_RESOURCE_PRINCIPAL_* variables: config error."""
    for name in list(os.environ):
        if name.startswith("OCI_RESOURCE_PRINCIPAL"):
            monkeypatch.delenv(name)
    a = OciVaultAdapter(
        OPTIONS, OciVaultSettings(auth="resource_principal", endpoint="http://127.0.0.1:9")
    )
    with pytest.raises(ConfigurationError, match="no resource principal"):
        a.wrap(key, DATA, aad=AAD)


def test_no_secret_in_errors_or_logs(
    server: FakeOciVaultServer,
    key: KeyUri,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a pass-phrase-protected key: no PEM, pass phrase, data or AAD in messages or logs."""
    good = server.settings()
    assert good.key_file is not None
    private = serialization.load_pem_private_key(good.key_file.read_bytes(), password=None)
    pass_phrase = "pp-" + os.urandom(8).hex()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(pass_phrase.encode()),
    ).decode()

    def with_pass_phrase(phrase: str) -> OciVaultSettings:
        return OciVaultSettings(
            endpoint=server.url,
            user=good.user,
            tenancy=good.tenancy,
            fingerprint=good.fingerprint,
            private_key=SecretStr(pem),
            pass_phrase=SecretStr(phrase),
        )

    settings = with_pass_phrase(pass_phrase)
    caplog.set_level(logging.DEBUG)
    a = OciVaultAdapter(OPTIONS, settings)
    messages: list[str] = []
    try:
        wrapped = a.wrap(key, DATA, aad=AAD)
        calls: list[Callable[[], bytes]] = [
            lambda: a.unwrap(key, wrapped, aad=b"other"),
            lambda: a.unwrap(key, base64.b64encode(os.urandom(64)), aad=AAD),
        ]
        for call in calls:
            with pytest.raises(ProviderCiphertextRejected) as info:
                call()
            messages.append(str(info.value))
        wrong = OciVaultAdapter(OPTIONS, with_pass_phrase("wrong-pp"))
        with pytest.raises(ConfigurationError) as cfg:
            wrong.wrap(key, DATA, aad=AAD)
        messages.append(str(cfg.value))
    finally:
        a.close()
    texts = [caplog.text, *(r.getMessage() for r in caplog.records), *messages, repr(settings)]
    pem_body = "".join(pem.splitlines()[1:-1])
    secrets = [
        pass_phrase,
        pem_body[:40],
        base64.b64encode(DATA).decode(),
        base64.urlsafe_b64encode(AAD).rstrip(b"=").decode(),
        DATA.hex(),
    ]
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert "wrong-pp" not in messages[-1]


# -- faults ---------------------------------------------------------------------------------------


def test_server_down_is_unavailable(
    server: FakeOciVaultServer, adapter: OciVaultAdapter, key: KeyUri
) -> None:
    """Refused connections are ProviderUnavailable; the adapter recovers when the server is back."""
    adapter.wrap(key, DATA, aad=AAD)  # a kept-alive connection exists
    server.fault("down")
    with pytest.raises(ProviderUnavailable, match="unreachable") as info:
        adapter.wrap(key, DATA, aad=AAD)
    assert not isinstance(info.value, ProviderTimeout)
    with pytest.raises(ProviderUnavailable):
        adapter.wrap(key, DATA, aad=AAD)
    server.fault(None)
    assert adapter.unwrap(key, adapter.wrap(key, DATA, aad=AAD), aad=AAD) == DATA


def test_slow_server_times_out(server: FakeOciVaultServer, key: KeyUri) -> None:
    """A server slower than the read timeout gives ProviderTimeout after one request."""
    adapter = OciVaultAdapter(FAST, server.settings())
    try:
        server.fault("slow")
        before = server.calls["encrypt"]
        with pytest.raises(ProviderTimeout, match="timed out"):
            adapter.wrap(key, DATA, aad=AAD)
        assert server.calls["encrypt"] == before + 1
    finally:
        adapter.close()


def test_service_error_is_unavailable_and_not_retried(
    server: FakeOciVaultServer, adapter: OciVaultAdapter, key: KeyUri
) -> None:
    """503 ServiceUnavailable is ProviderUnavailable after exactly one request (SDK retries off)."""
    server.fault("error")
    before = server.calls["encrypt"]
    with pytest.raises(ProviderUnavailable, match="503 ServiceUnavailable") as info:
        adapter.wrap(key, DATA, aad=AAD)
    assert not isinstance(info.value, ProviderTimeout)
    assert server.calls["encrypt"] - before == 1


def test_clients_are_shared_across_threads(
    server: FakeOciVaultServer, adapter: OciVaultAdapter, key: KeyUri
) -> None:
    """Concurrent wraps from several threads succeed through one client per endpoint."""
    results: list[bytes] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                results.append(adapter.unwrap(key, adapter.wrap(key, DATA, aad=AAD), aad=AAD))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    assert results == [DATA] * 12
    assert len(adapter._crypto) == 1


# -- the fake server itself -----------------------------------------------------------------------


def _signed_post(
    server: FakeOciVaultServer, body: bytes, *, date: str | None = None
) -> oci_requests.PreparedRequest:
    s = server.settings()
    signer = oci.signer.Signer(s.tenancy, s.user, s.fingerprint, str(s.key_file))
    headers = {"content-type": "application/json"}
    if date is not None:
        headers["date"] = date
    request = oci_requests.Request(
        "POST", f"{server.url}/20180608/encrypt", data=body, headers=headers
    ).prepare()
    return signer(request)


def test_fake_verifies_signature_body_hash_and_date(
    server: FakeOciVaultServer, key: KeyUri
) -> None:
    """Unsigned, stale or body-swapped requests get OCI's 401 NotAuthenticated; a good one 200."""
    body = json.dumps(
        {"keyId": key.parts["key_id"], "plaintext": base64.b64encode(DATA).decode()}
    ).encode()
    with oci_requests.Session() as session:
        assert session.send(_signed_post(server, body)).status_code == 200
        unsigned = session.post(f"{server.url}/20180608/encrypt", data=body)
        stale = _signed_post(
            server, body, date=email.utils.formatdate(time.time() - 600, usegmt=True)
        )
        swapped = _signed_post(server, body)
        swapped.body = body.replace(b"plaintext", b"plaintexT")
        for response in (unsigned, session.send(stale), session.send(swapped)):
            assert response.status_code == 401
            assert response.json()["code"] == "NotAuthenticated"
            assert response.headers.get("opc-request-id")
