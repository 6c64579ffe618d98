"""Google Cloud KMS adapter: URI parsing, settings, and the real google-cloud-kms client (gRPC)
against the local Cloud KMS server."""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import google.oauth2.credentials
import grpc
import pytest
from google.api_core.exceptions import FailedPrecondition
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)
from provider_support import (  # type: ignore[import-not-found]
    ADAPTER_FAST,
    ADAPTER_OPTIONS,
)
from pydantic import SecretStr, ValidationError

from keygate.core.errors import ConfigurationError, InvalidRequest
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
from keygate.providers.gcp import GcpKmsAdapter, GcpKmsSettings, crc32c
from keygate.testing.kms.gcp import ENCRYPTER_DECRYPTER, FakeGcpKmsServer
from keygate.testing.leaks import find_secrets

NAME = "projects/my-project/locations/asia-northeast1/keyRings/keygate/cryptoKeys/tenant-a"
TOKYO_URI = f"gcp-kms://{NAME}"
DATA = bytes(range(60))  # what keygate hands over: an HSM-wrapped DEK
AAD = b"keygate/v1 outer\x00tenant-a\x00records\x001"
OPTIONS, FAST = ADAPTER_OPTIONS, ADAPTER_FAST


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[FakeGcpKmsServer]:
    with FakeGcpKmsServer(slow_s=1.5) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _clean_server(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "server" in request.fixturenames:
        fake: FakeGcpKmsServer = request.getfixturevalue("server")
        fake.fault(None)
        fake.terse_errors = False


@pytest.fixture
def adapter(server: FakeGcpKmsServer) -> Iterator[GcpKmsAdapter]:
    a = GcpKmsAdapter(OPTIONS, server.settings())
    yield a
    a.close()


def new_key(server: FakeGcpKmsServer, **kw: str) -> KeyUri:
    return GcpKmsAdapter.parse_uri(server.create_key(f"k-{os.urandom(4).hex()}", **kw))


@pytest.fixture
def key(server: FakeGcpKmsServer) -> KeyUri:
    return new_key(server)


# -- URIs -----------------------------------------------------------------------------------------


@pytest.mark.unit
def test_parse_uri_reads_region_and_name() -> None:
    """A Tokyo key URI gives region asia-northeast1 and the CryptoKey resource name."""
    k = GcpKmsAdapter.parse_uri(TOKYO_URI)
    assert (k.scheme, k.uri, k.region) == ("gcp-kms", TOKYO_URI, "asia-northeast1")
    assert k.parts == {
        "name": NAME,
        "project": "my-project",
        "location": "asia-northeast1",
        "key_ring": "keygate",
        "crypto_key": "tenant-a",
    }
    osaka = GcpKmsAdapter.parse_uri(TOKYO_URI.replace("asia-northeast1", "asia-northeast2"))
    assert osaka.region == "asia-northeast2"


@pytest.mark.unit
def test_parse_uri_is_canonical_and_stable() -> None:
    """The scheme's case is normalised; parsing the canonical text again changes nothing."""
    k = GcpKmsAdapter.parse_uri(f"GCP-KMS://{NAME}")
    assert k.uri == TOKYO_URI
    assert GcpKmsAdapter.parse_uri(k.uri) == k
    assert GcpKmsAdapter.parse_uri(k.uri).parts == k.parts


@pytest.mark.unit
@pytest.mark.parametrize(
    ("project", "ring", "key"),
    [
        ("123456789012", "keygate", "tenant-a"),  # project number
        ("example.co.jp:legacy-app", "keygate", "tenant-a"),  # domain-scoped project id
        ("a12345", "R", "K"),  # shortest ids
        ("a" * 30, "r_" * 31 + "r", "K-" * 31 + "K"),  # longest ids (30, 63, 63)
    ],
    ids=["project-number", "domain-scoped", "shortest", "longest"],
)
def test_parse_uri_accepts_googles_id_forms(project: str, ring: str, key: str) -> None:
    """Project numbers, domain-scoped ids and ids at both length limits are accepted."""
    uri = f"gcp-kms://projects/{project}/locations/asia-northeast1/keyRings/{ring}/cryptoKeys/{key}"
    k = GcpKmsAdapter.parse_uri(uri)
    assert (k.uri, k.parts["project"], k.parts["key_ring"], k.parts["crypto_key"]) == (
        uri,
        project,
        ring,
        key,
    )


BAD_URIS = [
    ("", "scheme"),
    ("projects/p/locations/l/keyRings/r/cryptoKeys/k", "scheme"),
    (TOKYO_URI.replace("gcp-kms", "aws-kms"), "scheme"),
    (TOKYO_URI.replace("gcp-kms://", "https://cloudkms.googleapis.com/v1/"), "scheme"),
    ("gcp-kms:/" + NAME, "scheme"),
    (TOKYO_URI + "/cryptoKeyVersions/1", "key version is not allowed"),
    (TOKYO_URI + "/", "empty path segment"),
    (TOKYO_URI.replace("/keyRings/", "//keyRings/"), "empty path segment"),
    ("gcp-kms:///" + NAME, "empty path segment"),
    (TOKYO_URI.replace("keyRings", "keyrings"), "case-sensitive"),
    (TOKYO_URI.replace("cryptoKeys/tenant-a", "tenant-a"), "expected"),
    (TOKYO_URI + "/extra", "expected"),
    (TOKYO_URI.replace("keygate", "../keygate"), "'..'"),
    (TOKYO_URI.replace("/keyRings/keygate", "/keyRings/.."), "'..'"),
    (TOKYO_URI.replace("/cryptoKeys/tenant-a", "/cryptoKeys/."), "'..'"),
    (TOKYO_URI + "\n", "printable ASCII"),
    (TOKYO_URI.replace("tenant-a", "tenant-a\r\nX-Evil: 1"), "printable ASCII"),
    (TOKYO_URI.replace("tenant-a", "tenant a"), "printable ASCII"),
    (TOKYO_URI + "\x00", "printable ASCII"),
    (TOKYO_URI.replace("tenant-a", "テナント"), "printable ASCII"),
    (TOKYO_URI.replace("tenant-a", "tenant-ａ"), "printable ASCII"),
    ("gcp-kms://user:hunter2-secret@" + NAME, "user information"),
    (TOKYO_URI + "?alt=json", "query or fragment"),
    (TOKYO_URI + "#frag", "query or fragment"),
    (TOKYO_URI.replace("tenant-a", "tenant%2Fa"), "percent-encoding"),
    (TOKYO_URI.replace("my-project", "My-Project"), "project"),
    (TOKYO_URI.replace("my-project", "short"), "project"),
    (TOKYO_URI.replace("my-project", "my-project-"), "project"),
    (TOKYO_URI.replace("my-project", "0123"), "project"),
    (TOKYO_URI.replace("my-project", "a" * 31), "project"),
    (TOKYO_URI.replace("asia-northeast1", "ASIA-NORTHEAST1"), "location"),
    (TOKYO_URI.replace("asia-northeast1", "asia_northeast1"), "location"),
    (TOKYO_URI.replace("asia-northeast1", "asia-northeast1-"), "location"),
    (TOKYO_URI.replace("keyRings/keygate", "keyRings/" + "r" * 64), "key ring id"),
    (TOKYO_URI.replace("keyRings/keygate", "keyRings/ring.1"), "key ring id"),
    (TOKYO_URI.replace("tenant-a", "k" * 64), "key id"),
    (TOKYO_URI.replace("tenant-a", "tenant:a"), "key id"),
    (TOKYO_URI.replace("tenant-a", "k" * 480), "longer than 512"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("uri", "problem"), BAD_URIS, ids=[p for _, p in BAD_URIS])
def test_parse_uri_refuses_malformed_and_hostile_input(uri: str, problem: str) -> None:
    """Each bad URI is an InvalidRequest naming the problem, without repeating the input."""
    with pytest.raises(InvalidRequest, match=problem) as info:
        GcpKmsAdapter.parse_uri(uri)
    message = str(info.value)
    assert message.startswith("invalid gcp-kms key URI: ")
    if uri:
        assert uri not in message
    assert "hunter2" not in message
    assert "\n" not in message


@pytest.mark.unit
def test_version_uri_refusal_explains_why() -> None:
    """A version path is refused with the reason: Encrypt uses the primary, name the key."""
    with pytest.raises(InvalidRequest, match="primary version") as info:
        GcpKmsAdapter.parse_uri(TOKYO_URI + "/cryptoKeyVersions/3")
    assert "name the CryptoKey" in str(info.value)


@pytest.mark.unit
def test_uri_length_bound_is_512_characters() -> None:
    """A valid URI of exactly 512 characters passes; one character more does not."""
    domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 48])
    ids = f"locations/{'l' * 63}/keyRings/{'r' * 63}/cryptoKeys/{'k' * 63}"
    uri = f"gcp-kms://projects/{domain}:{'p' * 30}/{ids}"
    assert len(uri) == 512
    assert GcpKmsAdapter.parse_uri(uri).uri == uri
    with pytest.raises(InvalidRequest, match="longer than 512"):
        GcpKmsAdapter.parse_uri(uri.replace("d" * 48, "d" * 49))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x00000000),
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
    ids=["empty", "check-value", "zeros", "ones", "incrementing", "decrementing"],
)
def test_crc32c_known_answers(data: bytes, expected: int) -> None:
    """CRC32C matches the RFC 3720 B.4 vectors and the standard check value."""
    assert crc32c(data) == expected


# -- settings -------------------------------------------------------------------------------------


@pytest.mark.unit
def test_settings_default_to_google_and_adc(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no env, the settings name no endpoint, no credential and TLS (production defaults)."""
    for name in list(os.environ):
        if name.startswith("KEYGATE_GCP_"):
            monkeypatch.delenv(name)
    s = GcpKmsSettings()
    assert s.endpoint is None
    assert (s.credentials_file, s.access_token, s.access_token_file, s.ca_file) == (None,) * 4
    assert s.local_channel is False


@pytest.mark.unit
def test_settings_read_env_and_hide_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """KEYGATE_GCP_* are read; the token never shows in repr; a bare host gets port 443."""
    monkeypatch.setenv("KEYGATE_GCP_ENDPOINT", "kms.example.internal")
    monkeypatch.setenv("KEYGATE_GCP_ACCESS_TOKEN", "ya29.secret-token-value")
    s = GcpKmsSettings()
    assert s.endpoint == "kms.example.internal:443"
    assert s.access_token is not None
    assert s.access_token.get_secret_value() == "ya29.secret-token-value"
    assert "secret-token-value" not in repr(s)
    assert "secret-token-value" not in str(s.model_dump())


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"endpoint": "https://cloudkms.googleapis.com"}, "host or host:port"),
        ({"endpoint": "cloudkms.googleapis.com/v1"}, "host or host:port"),
        ({"endpoint": "user:pw@cloudkms.googleapis.com:443"}, "host or host:port"),
        ({"endpoint": "cloudkms.googleapis.com:70000"}, "port"),
        ({"endpoint": "kms.example.com:443", "local_channel": True}, "loopback"),
        ({"local_channel": True}, "loopback"),
        (
            {"endpoint": "127.0.0.1:1", "local_channel": True, "ca_file": Path("ca.pem")},
            "exclude",
        ),
        (
            {"access_token": SecretStr("t"), "access_token_file": Path("t")},
            "only one credential",
        ),
        (
            {"access_token": SecretStr("t"), "credentials_file": Path("sa.json")},
            "only one credential",
        ),
    ],
    ids=[
        "scheme",
        "path",
        "userinfo",
        "port",
        "local-remote",
        "local-google",
        "local-ca",
        "2x",
        "3x",
    ],
)
def test_settings_refuse_unsafe_or_ambiguous_values(
    kwargs: dict[str, object], problem: str
) -> None:
    """Plain-text channels to non-loopback hosts and conflicting credentials are refused."""
    with pytest.raises(ValidationError, match=problem) as info:
        GcpKmsSettings(**kwargs)  # type: ignore[arg-type]
    assert "pw@" not in str(info.value)


@pytest.mark.unit
def test_local_channel_accepts_loopback_endpoints() -> None:
    """127.0.0.1, ::1 and localhost may use gRPC local credentials."""
    for endpoint in ("127.0.0.1:8443", "[::1]:8443", "localhost:8443"):
        assert GcpKmsSettings(endpoint=endpoint, local_channel=True).endpoint == endpoint


@pytest.mark.unit
def test_adapter_refuses_pickling() -> None:
    """An adapter holding credentials cannot be pickled."""
    adapter = GcpKmsAdapter(OPTIONS, GcpKmsSettings(access_token=SecretStr("ya29.x")))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(adapter)


@pytest.mark.unit
def test_sdk_payload_logging_is_held_at_info() -> None:
    """Importing the adapter holds the SDK's logger (which logs payloads at DEBUG) at INFO."""
    assert logging.getLogger("google.cloud.kms_v1").level >= logging.INFO


# -- wrap / unwrap --------------------------------------------------------------------------------


def test_round_trip_binds_the_aad(adapter: GcpKmsAdapter, key: KeyUri) -> None:
    """wrap → unwrap gives the data back, with the AAD and with an empty AAD."""
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    assert not find_secrets(wrapped, [DATA])
    assert adapter.unwrap(key, wrapped, aad=AAD) == DATA
    bare = adapter.wrap(key, DATA, aad=b"")
    assert adapter.unwrap(key, bare, aad=b"") == DATA
    with pytest.raises(ProviderCiphertextRejected):
        adapter.unwrap(key, bare, aad=AAD)


def test_server_receives_exactly_the_requests_we_mean(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter, key: KeyUri
) -> None:
    """On the wire: one EncryptRequest with the data, AAD and both CRC32Cs, nothing else."""
    start = len(server.received)
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    adapter.unwrap(key, wrapped, aad=AAD)
    encrypt = kms_v1.EncryptRequest(
        name=key.parts["name"],
        plaintext=DATA,
        additional_authenticated_data=AAD,
        plaintext_crc32c=crc32c(DATA),
        additional_authenticated_data_crc32c=crc32c(AAD),
    )
    decrypt = kms_v1.DecryptRequest(
        name=key.parts["name"],
        ciphertext=wrapped,
        additional_authenticated_data=AAD,
        ciphertext_crc32c=crc32c(wrapped),
        additional_authenticated_data_crc32c=crc32c(AAD),
    )
    assert server.received[start:] == [
        kms_v1.EncryptRequest.serialize(encrypt),
        kms_v1.DecryptRequest.serialize(decrypt),
    ]
    token = server.token.encode()
    assert all(token not in body for body in server.received)


def test_wrong_aad_is_a_rejected_ciphertext(adapter: GcpKmsAdapter, key: KeyUri) -> None:
    """Unwrapping with another AAD gives ProviderCiphertextRejected, naming neither data nor AAD."""
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    with pytest.raises(ProviderCiphertextRejected, match="AAD differs") as info:
        adapter.unwrap(key, wrapped, aad=AAD.replace(b"tenant-a", b"tenant-b"))
    assert key.uri in str(info.value)
    assert not find_secrets(str(info.value).encode(), [DATA, wrapped])


@pytest.mark.parametrize(
    "forge",
    ["other-key", "random", "truncated", "flipped", "empty", "extended"],
)
def test_foreign_ciphertexts_are_rejected(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter, key: KeyUri, forge: str
) -> None:
    """Another key's ciphertext, random bytes, truncation or one flipped bit: all rejected."""
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    if forge == "other-key":
        bad = adapter.wrap(new_key(server), DATA, aad=AAD)
    elif forge == "random":
        bad = os.urandom(len(wrapped))
    elif forge == "truncated":
        bad = wrapped[:-1]
    elif forge == "flipped":
        bad = wrapped[:20] + bytes([wrapped[20] ^ 1]) + wrapped[21:]
    elif forge == "extended":
        bad = wrapped + b"\x00"
    else:
        bad = b""
    with pytest.raises(ProviderCiphertextRejected):
        adapter.unwrap(key, bad, aad=AAD)
    assert adapter.unwrap(key, wrapped, aad=AAD) == DATA


def test_old_ciphertexts_unwrap_after_rotation(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter, key: KeyUri
) -> None:
    """After a rotation the new primary wraps, and ciphertexts of version 1 still unwrap."""
    old = adapter.wrap(key, DATA, aad=AAD)
    assert server.rotate_key(key.uri) == 2
    new = adapter.wrap(key, DATA, aad=AAD)
    assert adapter.describe(key).details["primary_version"] == "2"
    assert adapter.unwrap(key, old, aad=AAD) == DATA
    assert adapter.unwrap(key, new, aad=AAD) == DATA


def test_a_keyuri_built_elsewhere_is_parsed_again(adapter: GcpKmsAdapter, key: KeyUri) -> None:
    """A KeyUri without our parts (built from stored text) still reaches the right key."""
    bare = KeyUri(scheme="gcp-kms", uri=key.uri, region=key.region)
    assert adapter.unwrap(bare, adapter.wrap(bare, DATA, aad=AAD), aad=AAD) == DATA
    with pytest.raises(InvalidRequest):
        adapter.wrap(KeyUri(scheme="gcp-kms", uri="gcp-kms://nope", region=""), DATA, aad=AAD)


def test_concurrent_calls_share_one_client(adapter: GcpKmsAdapter, key: KeyUri) -> None:
    """Eight threads wrap and unwrap at once through one lazily built client."""
    errors: list[BaseException] = []
    clients: set[int] = set()

    def work() -> None:
        try:
            for i in range(5):
                data = DATA + bytes([i])
                assert adapter.unwrap(key, adapter.wrap(key, data, aad=AAD), aad=AAD) == data
                clients.add(id(adapter._client))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert len(clients) == 1


def test_close_then_use_builds_a_new_client(adapter: GcpKmsAdapter, key: KeyUri) -> None:
    """close() releases the channel; the next call connects again."""
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    adapter.close()
    assert adapter._client is None
    assert adapter.unwrap(key, wrapped, aad=AAD) == DATA


# -- key state ------------------------------------------------------------------------------------


def test_disabled_key_is_refused_both_ways(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter, key: KeyUri
) -> None:
    """A disabled primary refuses wrap, and its ciphertexts refuse unwrap, until re-enabled."""
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    server.set_key_enabled(key.uri, False)
    with pytest.raises(ProviderKeyDisabled, match=r"version 1 is not enabled \(DISABLED\)"):
        adapter.wrap(key, DATA, aad=AAD)
    with pytest.raises(ProviderKeyDisabled, match="DISABLED"):
        adapter.unwrap(key, wrapped, aad=AAD)
    server.set_key_enabled(key.uri, True)
    assert adapter.unwrap(key, wrapped, aad=AAD) == DATA


@pytest.mark.parametrize("scheduled", [True, False], ids=["destroy-scheduled", "destroyed"])
def test_destroyed_key_is_refused_both_ways(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter, key: KeyUri, scheduled: bool
) -> None:
    """DESTROY_SCHEDULED and DESTROYED primaries give ProviderKeyDestroyed on wrap and unwrap."""
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    server.destroy_key(key.uri, scheduled=scheduled)
    state = "DESTROY_SCHEDULED" if scheduled else "DESTROYED"
    with pytest.raises(ProviderKeyDestroyed, match=rf"destroyed \({state}\)"):
        adapter.wrap(key, DATA, aad=AAD)
    with pytest.raises(ProviderKeyDestroyed, match=state):
        adapter.unwrap(key, wrapped, aad=AAD)


def test_state_is_asked_for_when_the_message_does_not_say(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter, key: KeyUri
) -> None:
    """A FAILED_PRECONDITION without the state is explained by one GetCryptoKey on wrap."""
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    server.terse_errors = True
    server.set_key_enabled(key.uri, False)
    before = server.calls["get_crypto_key"]
    with pytest.raises(ProviderKeyDisabled, match="DISABLED"):
        adapter.wrap(key, DATA, aad=AAD)
    assert server.calls["get_crypto_key"] == before + 1
    with pytest.raises(ProviderKeyDisabled, match="not enabled"):
        adapter.unwrap(key, wrapped, aad=AAD)
    other = new_key(server)
    server.destroy_key(other.uri)
    with pytest.raises(ProviderKeyDestroyed, match="DESTROY_SCHEDULED"):
        adapter.wrap(other, DATA, aad=AAD)


def test_unknown_key_or_ring_is_not_found(server: FakeGcpKmsServer, adapter: GcpKmsAdapter) -> None:
    """A missing key, or a key in a missing ring, gives ProviderKeyNotFound for every call."""
    missing = [
        GcpKmsAdapter.parse_uri(new_key(server).uri + "-missing"),
        GcpKmsAdapter.parse_uri(TOKYO_URI),
    ]
    for k in missing:
        with pytest.raises(ProviderKeyNotFound, match="does not exist"):
            adapter.wrap(k, DATA, aad=AAD)
        with pytest.raises(ProviderKeyNotFound):
            adapter.unwrap(k, os.urandom(60), aad=AAD)
        with pytest.raises(ProviderKeyNotFound):
            adapter.describe(k)


def test_key_of_another_purpose_is_refused(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter
) -> None:
    """An ASYMMETRIC_SIGN key is a permanent refusal that says ENCRYPT_DECRYPT is needed."""
    k = new_key(server, purpose="ASYMMETRIC_SIGN")
    with pytest.raises(ProviderRejected, match="ENCRYPT_DECRYPT") as info:
        adapter.describe(k)
    assert not isinstance(info.value, ProviderUnavailable)
    with pytest.raises(ProviderRejected, match="purpose is ASYMMETRIC_SIGN"):
        adapter.wrap(k, DATA, aad=AAD)
    with pytest.raises(ProviderRejected, match="purpose is ASYMMETRIC_SIGN"):
        adapter.unwrap(k, os.urandom(60), aad=AAD)


def test_admin_calls_through_the_real_client_change_what_the_adapter_sees(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter
) -> None:
    """CreateKeyRing/CreateCryptoKey/UpdateCryptoKeyVersion/DestroyCryptoKeyVersion over gRPC."""
    assert server.ca_file is not None
    admin = kms_v1.KeyManagementServiceClient(
        transport=KeyManagementServiceGrpcTransport(
            host=server.endpoint,
            credentials=google.oauth2.credentials.Credentials(server.token),  # type: ignore[no-untyped-call]
            ssl_channel_credentials=grpc.ssl_channel_credentials(server.ca_file.read_bytes()),
        )
    )
    try:
        ring = admin.create_key_ring(
            parent=f"projects/{server.project}/locations/asia-northeast2",
            key_ring_id=f"ring-{os.urandom(3).hex()}",
            key_ring=kms_v1.KeyRing(),
            retry=None,
            timeout=5,
        )
        made = admin.create_crypto_key(
            parent=ring.name,
            crypto_key_id="admin",
            crypto_key=kms_v1.CryptoKey(purpose=kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT),
            retry=None,
            timeout=5,
        )
        k = GcpKmsAdapter.parse_uri(f"gcp-kms://{made.name}")
        assert (k.region, adapter.describe(k).details["protection_level"]) == (
            "asia-northeast2",
            "SOFTWARE",
        )
        wrapped = adapter.wrap(k, DATA, aad=AAD)
        version = kms_v1.CryptoKeyVersion(
            name=made.primary.name, state=kms_v1.CryptoKeyVersion.CryptoKeyVersionState.DISABLED
        )
        admin.update_crypto_key_version(
            crypto_key_version=version, update_mask={"paths": ["state"]}, retry=None, timeout=5
        )
        with pytest.raises(ProviderKeyDisabled):
            adapter.unwrap(k, wrapped, aad=AAD)
        admin.destroy_crypto_key_version(name=made.primary.name, retry=None, timeout=5)
        with pytest.raises(ProviderKeyDestroyed):
            adapter.wrap(k, DATA, aad=AAD)
        with pytest.raises(FailedPrecondition, match="has value DESTROY_SCHEDULED"):
            admin.update_crypto_key_version(
                crypto_key_version=version, update_mask={"paths": ["state"]}, retry=None, timeout=5
            )
    finally:
        admin.transport.close()  # type: ignore[no-untyped-call]


# -- describe -------------------------------------------------------------------------------------


def test_describe_reports_state_algorithm_and_protection(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter, key: KeyUri
) -> None:
    """describe() reads GetCryptoKey: primary state, algorithm, protection level, region."""
    status = adapter.describe(key)
    assert (status.uri, status.enabled, status.state) == (key.uri, True, "ENABLED")
    assert status.algorithm == "GOOGLE_SYMMETRIC_ENCRYPTION"
    assert status.region == "asia-northeast1"
    assert status.details["protection_level"] == "HSM"
    assert status.details["purpose"] == "ENCRYPT_DECRYPT"
    server.set_key_enabled(key.uri, False)
    assert (adapter.describe(key).enabled, adapter.describe(key).state) == (False, "DISABLED")
    server.destroy_key(key.uri)
    assert adapter.describe(key).state == "DESTROY_SCHEDULED"
    software = new_key(server, protection_level="SOFTWARE", region="asia-northeast2")
    status = adapter.describe(software)
    assert (status.region, status.details["protection_level"]) == ("asia-northeast2", "SOFTWARE")


# -- credentials ----------------------------------------------------------------------------------


def test_wrong_token_is_an_auth_failure_without_the_token(
    server: FakeGcpKmsServer, key: KeyUri, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown token gives ProviderAuthFailed; the token is in no message, cause or log."""
    caplog.set_level(logging.DEBUG)
    settings = server.bad_settings()
    assert settings.access_token is not None
    token = settings.access_token.get_secret_value()
    adapter = GcpKmsAdapter(OPTIONS, settings)
    try:
        for call in (
            lambda: adapter.wrap(key, DATA, aad=AAD),
            lambda: adapter.unwrap(key, DATA, aad=AAD),
            lambda: adapter.describe(key),
        ):
            with pytest.raises(ProviderAuthFailed, match="UNAUTHENTICATED") as info:
                call()
            assert token not in str(info.value)
            assert token not in str(info.value.__cause__)
        assert token not in caplog.text
    finally:
        adapter.close()


def test_permission_denied_names_the_missing_permission(
    server: FakeGcpKmsServer, key: KeyUri
) -> None:
    """A caller without IAM rights gets ProviderAuthFailed naming the permission it lacks."""
    adapter = GcpKmsAdapter(OPTIONS, server.settings(token=server.add_token(())))
    try:
        with pytest.raises(ProviderAuthFailed, match=r"cloudkms\.cryptoKeyVersions\.useToEncrypt"):
            adapter.wrap(key, DATA, aad=AAD)
    finally:
        adapter.close()


def test_encrypter_decrypter_suffices_to_wrap_but_not_to_describe(
    server: FakeGcpKmsServer, key: KeyUri
) -> None:
    """roles/cloudkms.cryptoKeyEncrypterDecrypter wraps and unwraps; describe needs .get too."""
    adapter = GcpKmsAdapter(OPTIONS, server.settings(token=server.add_token(ENCRYPTER_DECRYPTER)))
    try:
        assert adapter.unwrap(key, adapter.wrap(key, DATA, aad=AAD), aad=AAD) == DATA
        with pytest.raises(ProviderAuthFailed, match=r"cloudkms\.cryptoKeys\.get"):
            adapter.describe(key)
    finally:
        adapter.close()


def test_service_account_key_file_signs_its_own_jwts(
    server: FakeGcpKmsServer, key: KeyUri, tmp_path: Path
) -> None:
    """A service-account key file works offline (self-signed JWT); an unknown account is refused."""
    good = server.service_account_file(tmp_path / "sa.json")
    foreign = server.service_account_file(tmp_path / "other.json", register=False)

    def settings(path: Path) -> GcpKmsSettings:
        return GcpKmsSettings(
            endpoint=server.endpoint, ca_file=server.ca_file, credentials_file=path
        )

    adapter = GcpKmsAdapter(OPTIONS, settings(good))
    refused = GcpKmsAdapter(OPTIONS, settings(foreign))
    try:
        assert adapter.unwrap(key, adapter.wrap(key, DATA, aad=AAD), aad=AAD) == DATA
        with pytest.raises(ProviderAuthFailed, match="UNAUTHENTICATED") as info:
            refused.wrap(key, DATA, aad=AAD)
        assert "PRIVATE KEY" not in str(info.value)
    finally:
        adapter.close()
        refused.close()


def test_unreadable_credentials_file_is_a_configuration_error(
    server: FakeGcpKmsServer, key: KeyUri, tmp_path: Path
) -> None:
    """A missing or malformed credentials file is a ConfigurationError naming the setting."""
    (tmp_path / "bad.json").write_text('{"type": "service_account", "private_key": "oops"}')
    for path in (tmp_path / "missing.json", tmp_path / "bad.json"):
        settings = GcpKmsSettings(endpoint=server.endpoint, credentials_file=path)
        with pytest.raises(ConfigurationError, match="KEYGATE_GCP_CREDENTIALS_FILE") as info:
            GcpKmsAdapter(OPTIONS, settings).wrap(key, DATA, aad=AAD)
        assert "oops" not in str(info.value)


def test_access_token_file_is_read_before_every_call(
    server: FakeGcpKmsServer, key: KeyUri, tmp_path: Path
) -> None:
    """A refreshed token file takes effect at the next call; a missing one is a config error."""
    path = tmp_path / "token"
    path.write_text(server.token + "\n")
    settings = GcpKmsSettings(
        endpoint=server.endpoint, ca_file=server.ca_file, access_token_file=path
    )
    adapter = GcpKmsAdapter(OPTIONS, settings)
    try:
        wrapped = adapter.wrap(key, DATA, aad=AAD)
        path.write_text("ya29.expired-token")
        with pytest.raises(ProviderAuthFailed):
            adapter.unwrap(key, wrapped, aad=AAD)
        path.write_text(server.add_token())
        assert adapter.unwrap(key, wrapped, aad=AAD) == DATA
        path.unlink()
        with pytest.raises(ConfigurationError, match="KEYGATE_GCP_ACCESS_TOKEN_FILE") as info:
            adapter.wrap(key, DATA, aad=AAD)
        assert server.token not in str(info.value)
        path.write_text("")
        with pytest.raises(ConfigurationError, match="is empty"):
            adapter.wrap(key, DATA, aad=AAD)
    finally:
        adapter.close()


def test_missing_application_default_credentials_is_an_auth_failure(
    server: FakeGcpKmsServer, key: KeyUri, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no credential setting and no ADC, the call fails with ProviderAuthFailed at once."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "none.json"))
    adapter = GcpKmsAdapter(
        OPTIONS, GcpKmsSettings(endpoint=server.endpoint, ca_file=server.ca_file)
    )
    before = server.calls["encrypt"]
    with pytest.raises(ProviderAuthFailed, match="Application Default Credentials"):
        adapter.wrap(key, DATA, aad=AAD)
    assert server.calls["encrypt"] == before


def test_server_env_is_enough_for_a_subprocess(
    server: FakeGcpKmsServer, key: KeyUri, monkeypatch: pytest.MonkeyPatch
) -> None:
    """server.env() alone lets GcpKmsSettings() (as a subprocess builds it) reach the key."""
    for name in list(os.environ):
        if name.startswith("KEYGATE_GCP_"):
            monkeypatch.delenv(name)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    adapter = GcpKmsAdapter(OPTIONS)
    try:
        assert adapter.unwrap(key, adapter.wrap(key, DATA, aad=AAD), aad=AAD) == DATA
    finally:
        adapter.close()


# -- transport security ---------------------------------------------------------------------------


def test_endpoint_certificate_is_verified(server: FakeGcpKmsServer, key: KeyUri) -> None:
    """Without the test CA the client refuses the server's certificate: ProviderRejected."""
    settings = GcpKmsSettings(endpoint=server.endpoint, access_token=SecretStr(server.token))
    adapter = GcpKmsAdapter(OPTIONS, settings)
    before = server.calls["encrypt"]
    try:
        with pytest.raises(ProviderRejected, match="TLS verification"):
            adapter.wrap(key, DATA, aad=AAD)
    finally:
        adapter.close()
    assert server.calls["encrypt"] == before


def test_local_channel_still_checks_the_token() -> None:
    """Over gRPC local credentials (no TLS, loopback only) the round trip works, a bad token not."""
    with FakeGcpKmsServer(tls=False) as fake:
        k = GcpKmsAdapter.parse_uri(fake.create_key("local"))
        assert fake.settings().local_channel
        good = GcpKmsAdapter(OPTIONS, fake.settings())
        bad = GcpKmsAdapter(OPTIONS, fake.bad_settings())
        try:
            assert good.unwrap(k, good.wrap(k, DATA, aad=AAD), aad=AAD) == DATA
            with pytest.raises(ProviderAuthFailed):
                bad.wrap(k, DATA, aad=AAD)
        finally:
            good.close()
            bad.close()


# -- faults ---------------------------------------------------------------------------------------


def test_down_server_is_unavailable_then_recovers() -> None:
    """A stopped server gives ProviderUnavailable at once; the same adapter recovers after."""
    with FakeGcpKmsServer() as fake:
        k = GcpKmsAdapter.parse_uri(fake.create_key("down"))
        adapter = GcpKmsAdapter(OPTIONS, fake.settings())
        try:
            wrapped = adapter.wrap(k, DATA, aad=AAD)
            fake.fault("down")
            with pytest.raises(ProviderUnavailable) as info:
                adapter.unwrap(k, wrapped, aad=AAD)
            assert not isinstance(info.value, ProviderTimeout)  # refused, not waited for
            fake.fault(None)
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert adapter.unwrap(k, wrapped, aad=AAD) == DATA
                    break
                except ProviderUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            adapter.close()


def test_slow_server_times_out_once(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter, key: KeyUri
) -> None:
    """An answer later than the deadline gives ProviderTimeout after one attempt."""
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    impatient = GcpKmsAdapter(FAST, server.settings())  # deadline = connect 0.3 s + read 0.3 s
    try:
        server.fault("slow")
        before = server.calls["decrypt"]
        with pytest.raises(ProviderTimeout, match="DEADLINE_EXCEEDED"):
            impatient.unwrap(key, wrapped, aad=AAD)
        assert server.calls["decrypt"] == before + 1
    finally:
        impatient.close()


@pytest.mark.parametrize("mode", ["error", "throttle"])
def test_server_errors_are_unavailable_and_not_retried(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter, key: KeyUri, mode: str
) -> None:
    """UNAVAILABLE and RESOURCE_EXHAUSTED give ProviderUnavailable after exactly one attempt."""
    adapter.describe(key)  # connect first
    server.fault(mode)
    before = server.calls["encrypt"]
    with pytest.raises(ProviderUnavailable) as info:
        adapter.wrap(key, DATA, aad=AAD)
    assert not isinstance(info.value, ProviderTimeout)
    assert server.calls["encrypt"] == before + 1


@pytest.mark.parametrize("mode", ["crc-request", "crc-response", "crc-unverified"])
def test_checksum_failures_are_transient(
    server: FakeGcpKmsServer, adapter: GcpKmsAdapter, key: KeyUri, mode: str
) -> None:
    """Damage in transit, either way, or unverified checksums give ProviderUnavailable."""
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    server.fault(mode)
    with pytest.raises(ProviderUnavailable, match="corrupted in transit") as info:
        adapter.wrap(key, DATA, aad=AAD)
    assert not find_secrets(str(info.value).encode(), [DATA])
    if mode == "crc-unverified":
        return  # Decrypt answers carry no verified_* flags
    with pytest.raises(ProviderUnavailable, match="corrupted in transit"):
        adapter.unwrap(key, wrapped, aad=AAD)
    server.fault(None)
    assert adapter.unwrap(key, wrapped, aad=AAD) == DATA


# -- secrets in logs ------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_debug_logging_carries_no_data_or_token(
    server: FakeGcpKmsServer, key: KeyUri, caplog: pytest.LogCaptureFixture
) -> None:
    """With every logger at DEBUG, no log record holds the data, the plaintext or the token."""
    caplog.set_level(logging.DEBUG)
    sdk = _Records()
    logging.getLogger("google").addHandler(sdk)
    adapter = GcpKmsAdapter(OPTIONS, server.settings())
    try:
        wrapped = adapter.wrap(key, DATA, aad=AAD)
        assert adapter.unwrap(key, wrapped, aad=AAD) == DATA
    finally:
        adapter.close()
        logging.getLogger("google").removeHandler(sdk)
    records = [*caplog.records, *sdk.records]
    dump = "\n".join(f"{r.getMessage()} {r.__dict__!r}" for r in records).encode()
    assert not find_secrets(dump, [DATA, server.token.encode()])
