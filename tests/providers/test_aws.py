"""AWS KMS adapter: URI parsing, and real boto3 against moto (IAM on) behind the key-state front."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config
from provider_support import (  # type: ignore[import-not-found]
    ADAPTER_FAST,
    ADAPTER_OPTIONS,
)
from pydantic import SecretStr, ValidationError

from keygate.core.errors import ConfigurationError, InvalidRequest
from keygate.providers.aws import AAD_CONTEXT_KEY, AwsKmsAdapter, AwsKmsSettings
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
from keygate.testing.kms.aws import MotoKmsServer

ACCOUNT = "111122223333"
KEY_ARN = f"arn:aws:kms:ap-northeast-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_URI = f"aws-kms://{KEY_ARN}"
DATA = bytes(range(60))  # what keygate hands over: an HSM-wrapped DEK
AAD = b"keygate/v1 outer\x00tenant-a\x00records\x001"
OPTIONS, FAST = ADAPTER_OPTIONS, ADAPTER_FAST


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[MotoKmsServer]:
    with MotoKmsServer(slow_s=1.0) as moto:
        yield moto


@pytest.fixture(autouse=True)
def _clean_server(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").fault(None)


@pytest.fixture(scope="module")
def adapter(server: MotoKmsServer) -> Iterator[AwsKmsAdapter]:
    a = AwsKmsAdapter(OPTIONS, server.settings())
    yield a
    a.close()


@pytest.fixture(scope="module")
def key(server: MotoKmsServer) -> KeyUri:
    """A key every test may use but none may change (state tests make their own)."""
    return AwsKmsAdapter.parse_uri(server.create_key(f"tenant-{os.urandom(4).hex()}"))


@pytest.fixture
def own_key(server: MotoKmsServer) -> KeyUri:
    return AwsKmsAdapter.parse_uri(server.create_key(f"own-{os.urandom(4).hex()}"))


@pytest.fixture(scope="module")
def wrapped(adapter: AwsKmsAdapter, key: KeyUri) -> bytes:
    return adapter.wrap(key, DATA, aad=AAD)


def _bodies(server: MotoKmsServer, start: int) -> list[dict[str, object]]:
    return [json.loads(b) for b in server.received[start:]]


# -- URIs -----------------------------------------------------------------------------------------


@pytest.mark.unit
def test_parse_uri_reads_region_account_and_key() -> None:
    """A Tokyo key ARN gives region ap-northeast-1, its account and its key id."""
    k = AwsKmsAdapter.parse_uri(KEY_URI)
    assert (k.scheme, k.uri, k.region) == ("aws-kms", KEY_URI, "ap-northeast-1")
    assert k.parts["arn"] == KEY_ARN
    assert (k.parts["account"], k.parts["kind"]) == (ACCOUNT, "key")
    assert k.parts["id"] == "1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("uri", "region", "kind"),
    [
        (KEY_URI, "ap-northeast-1", "key"),
        (f"aws-kms://arn:aws:kms:ap-northeast-3:{ACCOUNT}:key/mrk-{'a1' * 16}", "ap-northeast-3",
         "key"),
        (f"aws-kms://arn:aws:kms:ap-northeast-3:{ACCOUNT}:alias/keygate-tenant_a", "ap-northeast-3",
         "alias"),
        (f"aws-kms://arn:aws:kms:us-east-1:{ACCOUNT}:alias/team/tenant-a", "us-east-1", "alias"),
    ],
)  # fmt: skip
def test_parse_uri_is_canonical_and_stable(uri: str, region: str, kind: str) -> None:
    """Key, multi-region and alias ARNs parse to themselves, and parsing is idempotent."""
    k = AwsKmsAdapter.parse_uri(uri)
    assert (k.uri, k.region, k.parts["kind"]) == (uri, region, kind)
    assert AwsKmsAdapter.parse_uri(k.uri) == k


@pytest.mark.unit
def test_scheme_is_case_insensitive_but_canonical_in_lower_case() -> None:
    """AWS-KMS:// is read as aws-kms:// and written back in lower case."""
    assert AwsKmsAdapter.parse_uri("AWS-KMS://" + KEY_ARN).uri == KEY_URI


_BASE = f"aws-kms://arn:aws:kms:ap-northeast-1:{ACCOUNT}"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("", "scheme must be aws-kms"),
        ("aws-kms://", "expected aws-kms://arn:aws:kms"),
        ("gcp-kms://" + KEY_ARN, "scheme must be aws-kms"),
        ("aws-kms:" + KEY_ARN, "scheme must be aws-kms"),
        ("aws-kms://" + KEY_ARN.replace("arn:aws:", "arn:aws-cn:"), "partition 'aws-cn'"),
        ("aws-kms://" + KEY_ARN.replace("arn:aws:", "arn:aws-us-gov:"), "partition 'aws-us-gov'"),
        ("aws-kms://" + KEY_ARN.replace("ap-northeast-1", "cn-north-1"), "partition aws-cn"),
        ("aws-kms://" + KEY_ARN.replace(":kms:", ":s3:"), "service 's3'"),
        ("aws-kms://" + KEY_ARN.replace("ap-northeast-1", "AP-NORTHEAST-1"), "malformed region"),
        ("aws-kms://" + KEY_ARN.replace("ap-northeast-1", ""), "malformed region"),
        ("aws-kms://" + KEY_ARN.replace("ap-northeast-1", "ap-northeast-1a"), "malformed region"),
        ("aws-kms://" + KEY_ARN.replace(ACCOUNT, "11112222333"), "12 digits"),
        ("aws-kms://" + KEY_ARN.replace(ACCOUNT, "1111222233334"), "12 digits"),
        ("aws-kms://" + KEY_ARN.replace(ACCOUNT, "11112222333x"), "12 digits"),
        (f"{_BASE}:key/1234ABCD-12AB-34CD-56EF-1234567890AB", "lower-case UUID"),
        (f"{_BASE}:key/not-a-uuid", "lower-case UUID"),
        (f"{_BASE}:key/mrk-1234", "lower-case UUID"),
        (f"{_BASE}:key/", "lower-case UUID"),
        (f"{_BASE}:role/admin", "key/KEY-ID or alias/NAME"),
        (f"{_BASE}:key", "key/KEY-ID or alias/NAME"),
        (f"{_BASE}:alias/", "alias name"),
        (f"{_BASE}:alias/aws/s3", "AWS managed key"),
        (f"{_BASE}:alias/a//b", "alias name"),
        (f"{_BASE}:alias/../../x", "alias name"),
        (f"{_BASE}:key/../1234abcd-12ab-34cd-56ef-1234567890ab", "lower-case UUID"),
        (f"{_BASE}:alias/x:y", "expected aws-kms://arn"),
        (KEY_URI + "?region=ap-northeast-1", "lower-case UUID"),
        (KEY_URI + "#frag", "lower-case UUID"),
        ("aws-kms://user@" + KEY_ARN, "expected aws-kms://arn"),
        ("aws-kms://user:pw@" + KEY_ARN, "expected aws-kms://arn"),
        (KEY_URI + "\n", "printable ASCII"),
        (KEY_URI.replace("key/", "key/\r\n"), "printable ASCII"),
        (KEY_URI + " ", "printable ASCII"),
        (f"{_BASE}:alias/テナント", "printable ASCII"),
        (f"{_BASE}:alias/caf\u00e9", "printable ASCII"),
        (f"{_BASE}:alias/" + "a" * 600, "longer than 512"),
        (f"{_BASE}:alias/" + "a" * 251, "alias name"),
    ],
)  # fmt: skip
def test_parse_uri_rejects_malformed_and_hostile(uri: str, problem: str) -> None:
    """Every malformed or ambiguous URI is an InvalidRequest that names the problem."""
    with pytest.raises(InvalidRequest, match="invalid aws-kms key URI") as info:
        AwsKmsAdapter.parse_uri(uri)
    assert problem in info.value.detail


@pytest.mark.unit
def test_parse_uri_rejects_non_strings() -> None:
    """Bytes are not a URI."""
    with pytest.raises(InvalidRequest, match="not a string"):
        AwsKmsAdapter.parse_uri(KEY_URI.encode())  # type: ignore[arg-type]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("endpoint", "ok"),
    [
        ("https://kms.ap-northeast-1.amazonaws.com", True),
        ("https://vpce-0123-abcd.kms.ap-northeast-1.vpce.amazonaws.com", True),
        ("http://127.0.0.1:4566", True),
        ("http://[::1]:4566", True),
        ("http://kms.ap-northeast-1.amazonaws.com", False),
        ("http://localhost:4566", False),
        ("https://user:pw@kms.example.jp", False),
        ("ftp://kms.example.jp", False),
    ],
)
def test_endpoint_override_allows_plain_http_only_on_loopback(endpoint: str, ok: bool) -> None:
    """An http:// endpoint is refused unless it is a loopback IP address."""
    if ok:
        assert AwsKmsSettings(endpoint_url=endpoint).endpoint_url == endpoint
    else:
        with pytest.raises(ValidationError):
            AwsKmsSettings(endpoint_url=endpoint)


@pytest.mark.unit
def test_other_schemes_keys_are_refused() -> None:
    """A KeyUri of another scheme handed to the adapter is refused before any call."""
    adapter = AwsKmsAdapter(OPTIONS, AwsKmsSettings(endpoint_url="http://127.0.0.1:9"))
    alien = KeyUri("gcp-kms", "gcp-kms://projects/p/locations/l/keyRings/r/cryptoKeys/k", "l")
    with pytest.raises(InvalidRequest):
        adapter.wrap(alien, DATA, aad=AAD)


# -- round trips ----------------------------------------------------------------------------------


def test_round_trip_binds_aad_and_sends_exactly_the_data(
    server: MotoKmsServer, adapter: AwsKmsAdapter, key: KeyUri
) -> None:
    """Encrypt sends KeyId, the data and the AAD context, nothing else; Decrypt names the key."""
    start = len(server.received)
    wrapped = adapter.wrap(key, DATA, aad=AAD)
    assert DATA not in wrapped and 0 < len(wrapped) <= 2048
    assert adapter.unwrap(key, wrapped, aad=AAD) == DATA
    encrypt, decrypt = _bodies(server, start)
    context = {AAD_CONTEXT_KEY: base64.urlsafe_b64encode(AAD).decode()}
    assert encrypt == {
        "KeyId": key.parts["arn"],
        "Plaintext": base64.b64encode(DATA).decode(),
        "EncryptionContext": context,
    }
    assert decrypt == {
        "KeyId": key.parts["arn"],
        "CiphertextBlob": base64.b64encode(wrapped).decode(),
        "EncryptionContext": context,
    }
    assert server.calls["encrypt"] >= 1 and server.calls["decrypt"] >= 1


def test_round_trip_without_aad_sends_no_context(
    server: MotoKmsServer, adapter: AwsKmsAdapter, key: KeyUri
) -> None:
    """An empty AAD sends no encryption context, and the round trip works."""
    start = len(server.received)
    wrapped = adapter.wrap(key, DATA, aad=b"")
    assert adapter.unwrap(key, wrapped, aad=b"") == DATA
    assert all("EncryptionContext" not in body for body in _bodies(server, start))


def test_largest_input_fits_the_envelope(adapter: AwsKmsAdapter, key: KeyUri) -> None:
    """A 256-byte input (the largest keygate sends) wraps to at most 2048 bytes."""
    data = os.urandom(256)
    wrapped = adapter.wrap(key, data, aad=AAD)
    assert len(wrapped) <= 2048
    assert adapter.unwrap(key, wrapped, aad=AAD) == data


def test_alias_uri_wraps_and_unwraps_under_its_key(
    server: MotoKmsServer, adapter: AwsKmsAdapter
) -> None:
    """An alias ARN reaches the aliased key: wraps made through either unwrap through the other."""
    name = f"team/tenant-{os.urandom(4).hex()}"
    key = AwsKmsAdapter.parse_uri(server.create_key(name))
    alias = AwsKmsAdapter.parse_uri(key.uri.replace(f"key/{key.parts['id']}", f"alias/{name}"))
    assert alias.parts["kind"] == "alias"
    assert adapter.unwrap(alias, adapter.wrap(key, DATA, aad=AAD), aad=AAD) == DATA
    assert adapter.unwrap(key, adapter.wrap(alias, DATA, aad=AAD), aad=AAD) == DATA
    assert adapter.describe(alias).details["key_id"] == key.parts["id"]


@pytest.mark.parametrize("other_aad", [b"keygate/v1 outer\x00tenant-b\x00records\x001", b""])
def test_wrong_aad_is_rejected(
    adapter: AwsKmsAdapter, key: KeyUri, wrapped: bytes, other_aad: bytes
) -> None:
    """Unwrapping with another AAD (or none) is a rejected ciphertext."""
    with pytest.raises(ProviderCiphertextRejected, match="AAD differs"):
        adapter.unwrap(key, wrapped, aad=other_aad)


def test_aad_at_unwrap_only_is_rejected(adapter: AwsKmsAdapter, key: KeyUri) -> None:
    """A wrap without AAD does not unwrap with one."""
    wrapped = adapter.wrap(key, DATA, aad=b"")
    with pytest.raises(ProviderCiphertextRejected):
        adapter.unwrap(key, wrapped, aad=AAD)


def test_another_keys_ciphertext_is_incorrect_key(
    server: MotoKmsServer, adapter: AwsKmsAdapter, key: KeyUri
) -> None:
    """Another key's ciphertext is refused as KMS does: IncorrectKeyException, never decrypted."""
    other = AwsKmsAdapter.parse_uri(server.create_key(f"other-{os.urandom(4).hex()}"))
    wrapped = adapter.wrap(other, DATA, aad=AAD)
    with pytest.raises(ProviderCiphertextRejected) as info:
        adapter.unwrap(key, wrapped, aad=AAD)
    cause = info.value.__cause__
    assert isinstance(cause, botocore.exceptions.ClientError)
    assert cause.response["Error"]["Code"] == "IncorrectKeyException"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda w: os.urandom(len(w)),
        lambda w: os.urandom(20),
        lambda w: w[:-1],
        lambda w: w[:40],
        lambda w: w[:-1] + bytes([w[-1] ^ 1]),
        lambda w: w[:60] + bytes([w[60] ^ 0x80]) + w[61:],
        lambda w: w + b"\x00",
        lambda w: b"",
    ],
    ids=["random", "short-random", "truncated", "header-only", "last-bit", "middle-bit",
         "extended", "empty"],
)  # fmt: skip
def test_foreign_ciphertexts_are_rejected(
    adapter: AwsKmsAdapter, key: KeyUri, wrapped: bytes, mangle: object
) -> None:
    """Random, truncated, extended or bit-flipped blobs are rejected ciphertexts."""
    assert adapter.unwrap(key, wrapped, aad=AAD) == DATA
    with pytest.raises(ProviderCiphertextRejected):
        adapter.unwrap(key, mangle(wrapped), aad=AAD)  # type: ignore[operator]


# -- key state ------------------------------------------------------------------------------------


def test_disabled_key_is_refused_and_comes_back(
    server: MotoKmsServer, adapter: AwsKmsAdapter, own_key: KeyUri
) -> None:
    """A disabled key refuses wrap and unwrap (DisabledException); enabling it again restores it."""
    wrapped = adapter.wrap(own_key, DATA, aad=AAD)
    server.set_key_enabled(own_key.uri, False)
    with pytest.raises(ProviderKeyDisabled, match=r"AWS KMS: key .* is disabled") as info:
        adapter.wrap(own_key, DATA, aad=AAD)
    assert info.value.code == "KEY_NOT_USABLE"
    with pytest.raises(ProviderKeyDisabled):
        adapter.unwrap(own_key, wrapped, aad=AAD)
    with pytest.raises(ProviderKeyDisabled):  # state wins over a bad ciphertext, as in KMS
        adapter.unwrap(own_key, wrapped[:-1], aad=AAD)
    status = adapter.describe(own_key)
    assert (status.enabled, status.state) == (False, "Disabled")
    server.set_key_enabled(own_key.uri, True)
    assert adapter.unwrap(own_key, wrapped, aad=AAD) == DATA


def test_key_pending_deletion_is_destroyed(
    server: MotoKmsServer, adapter: AwsKmsAdapter, own_key: KeyUri
) -> None:
    """A key scheduled for deletion refuses both ways as destroyed (KMSInvalidStateException)."""
    wrapped = adapter.wrap(own_key, DATA, aad=AAD)
    server.destroy_key(own_key.uri)
    with pytest.raises(ProviderKeyDestroyed, match="pending deletion") as info:
        adapter.unwrap(own_key, wrapped, aad=AAD)
    assert info.value.code == "KEY_DESTROYED"
    with pytest.raises(ProviderKeyDestroyed):
        adapter.wrap(own_key, DATA, aad=AAD)
    status = adapter.describe(own_key)
    assert (status.enabled, status.state) == (False, "PendingDeletion")
    assert "deletion_date" in status.details


def test_unknown_key_is_not_found(server: MotoKmsServer, adapter: AwsKmsAdapter) -> None:
    """A well-formed ARN of no key is ProviderKeyNotFound for every operation."""
    missing = AwsKmsAdapter.parse_uri(
        f"aws-kms://arn:aws:kms:ap-northeast-1:{server.account}:key/"
        f"{'0' * 8}-0000-4000-8000-{'0' * 12}"
    )
    with pytest.raises(ProviderKeyNotFound, match="does not exist"):
        adapter.wrap(missing, DATA, aad=AAD)
    with pytest.raises(ProviderKeyNotFound):
        adapter.describe(missing)
    alias = AwsKmsAdapter.parse_uri(
        f"aws-kms://arn:aws:kms:ap-northeast-1:{server.account}:alias/no-such-alias"
    )
    with pytest.raises(ProviderKeyNotFound):
        adapter.wrap(alias, DATA, aad=AAD)


def test_calls_go_to_the_region_in_the_arn(server: MotoKmsServer, adapter: AwsKmsAdapter) -> None:
    """An Osaka key is found through its Osaka ARN, and not under the same id in Tokyo."""
    name = "osaka-" + os.urandom(4).hex()
    osaka = AwsKmsAdapter.parse_uri(server.create_key(name, region="ap-northeast-3"))
    assert osaka.region == "ap-northeast-3"
    assert adapter.unwrap(osaka, adapter.wrap(osaka, DATA, aad=AAD), aad=AAD) == DATA
    tokyo = AwsKmsAdapter.parse_uri(osaka.uri.replace("ap-northeast-3", "ap-northeast-1"))
    with pytest.raises(ProviderKeyNotFound):
        adapter.wrap(tokyo, DATA, aad=AAD)


def test_describe_reads_key_metadata(adapter: AwsKmsAdapter, key: KeyUri) -> None:
    """describe() reports state, spec, region and ids from DescribeKey."""
    status = adapter.describe(key)
    assert (status.uri, status.enabled, status.state) == (key.uri, True, "Enabled")
    assert (status.algorithm, status.region) == ("SYMMETRIC_DEFAULT", "ap-northeast-1")
    assert status.details["key_id"] == key.parts["id"]
    assert status.details["key_usage"] == "ENCRYPT_DECRYPT"


# -- credentials ----------------------------------------------------------------------------------


def test_wrong_secret_is_an_auth_failure(server: MotoKmsServer, key: KeyUri) -> None:
    """A wrong secret key is refused by signature check: ProviderAuthFailed, not retried."""
    a = AwsKmsAdapter(OPTIONS, server.bad_settings())
    start = len(server.received)
    try:
        with pytest.raises(ProviderAuthFailed, match="InvalidSignatureException") as info:
            a.wrap(key, DATA, aad=AAD)
        assert info.value.reason == "provider-credentials"
        assert len(server.received) == start + 1
    finally:
        a.close()


def test_unknown_access_key_is_an_auth_failure(server: MotoKmsServer, key: KeyUri) -> None:
    """An access key moto never issued gets UnrecognizedClientException: ProviderAuthFailed."""
    settings = server.settings()
    settings.access_key_id = "AKIA" + "Z" * 16
    a = AwsKmsAdapter(OPTIONS, settings)
    try:
        with pytest.raises(ProviderAuthFailed, match="UnrecognizedClientException"):
            a.unwrap(key, b"x" * 100, aad=AAD)
    finally:
        a.close()


def test_the_app_credentials_are_least_privilege(server: MotoKmsServer, key: KeyUri) -> None:
    """The credentials handed out may encrypt/decrypt/describe, not manage keys (IAM enforced)."""
    s = server.settings()
    assert s.secret_access_key is not None
    kms = boto3.client(
        "kms",
        region_name="ap-northeast-1",
        endpoint_url=s.endpoint_url,
        aws_access_key_id=s.access_key_id,
        aws_secret_access_key=s.secret_access_key.get_secret_value(),
        config=Config(retries={"total_max_attempts": 1}),
    )
    try:
        with pytest.raises(botocore.exceptions.ClientError) as info:
            kms.disable_key(KeyId=key.parts["id"])
        assert info.value.response["Error"]["Code"] == "AccessDeniedException"
        assert "kms:DisableKey" in info.value.response["Error"]["Message"]
        assert kms.describe_key(KeyId=key.parts["arn"])["KeyMetadata"]["Enabled"] is True
    finally:
        kms.close()


def test_secret_file_and_env_settings(
    server: MotoKmsServer, key: KeyUri, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KEYGATE_AWS_* from the environment, with the secret in a file, reach the server."""
    env = server.env()
    secret_file = tmp_path / "secret"
    secret_file.write_text(env.pop("KEYGATE_AWS_SECRET_ACCESS_KEY") + "\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KEYGATE_AWS_SECRET_ACCESS_KEY_FILE", str(secret_file))
    settings = AwsKmsSettings()
    assert settings.secret_access_key is None
    a = AwsKmsAdapter(OPTIONS, settings)
    try:
        assert a.unwrap(key, a.wrap(key, DATA, aad=AAD), aad=AAD) == DATA
    finally:
        a.close()


def test_incomplete_static_credentials_are_a_config_error(key: KeyUri, tmp_path: Path) -> None:
    """An access key without a secret, or an unreadable secret file, is a ConfigurationError."""
    for settings in (
        AwsKmsSettings(endpoint_url="http://127.0.0.1:9", access_key_id="AKIAEXAMPLE"),
        AwsKmsSettings(endpoint_url="http://127.0.0.1:9", secret_access_key=SecretStr("s3cr3t")),
        AwsKmsSettings(
            endpoint_url="http://127.0.0.1:9",
            access_key_id="AKIAEXAMPLE",
            secret_access_key_file=tmp_path / "missing",
        ),
    ):
        with pytest.raises(ConfigurationError) as info:
            AwsKmsAdapter(OPTIONS, settings).wrap(key, DATA, aad=AAD)
        assert "s3cr3t" not in info.value.detail


def test_no_secret_in_errors_or_logs(
    server: MotoKmsServer, key: KeyUri, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the secret key nor the data appear in errors, logs, reprs or request bodies."""
    caplog.set_level(logging.DEBUG)
    good, bad = server.settings(), server.bad_settings()
    secrets = [
        s.secret_access_key.get_secret_value()
        for s in (good, bad)
        if s.secret_access_key is not None
    ]
    messages = []
    start = len(server.received)
    a, b = AwsKmsAdapter(OPTIONS, good), AwsKmsAdapter(OPTIONS, bad)
    try:
        wrapped = a.wrap(key, DATA, aad=AAD)
        calls: list[Callable[[], bytes]] = [
            lambda: b.wrap(key, DATA, aad=AAD),
            lambda: a.unwrap(key, wrapped, aad=b"other"),
            lambda: a.unwrap(key, os.urandom(90), aad=AAD),
        ]
        for call in calls:
            with pytest.raises(Exception) as info:
                call()
            messages.append(str(info.value))
            messages.append(repr(info.value.__cause__))
    finally:
        a.close()
        b.close()
    bodies = b"".join(server.received[start:])
    texts = [caplog.text, *messages, repr(good), repr(bad), str(good.model_dump())]
    assert caplog.records, "nothing was logged: the capture did not work"
    for secret in secrets:
        assert len(secret) >= 16
        assert all(secret not in t for t in texts)
        assert secret.encode() not in bodies
    assert all(DATA.hex() not in m and repr(DATA) not in m for m in messages)


# -- faults ---------------------------------------------------------------------------------------


def test_server_down_is_unavailable(
    server: MotoKmsServer, adapter: AwsKmsAdapter, key: KeyUri
) -> None:
    """A refused connection (new or pooled) is ProviderUnavailable; service comes back after."""
    adapter.wrap(key, DATA, aad=AAD)  # a pooled connection exists
    server.fault("down")
    with pytest.raises(ProviderUnavailable, match="unreachable"):
        adapter.wrap(key, DATA, aad=AAD)
    fresh = AwsKmsAdapter(OPTIONS, server.settings())
    try:
        with pytest.raises(ProviderUnavailable, match="EndpointConnectionError"):
            fresh.wrap(key, DATA, aad=AAD)
    finally:
        fresh.close()
    server.fault(None)
    assert adapter.unwrap(key, adapter.wrap(key, DATA, aad=AAD), aad=AAD) == DATA


def test_slow_server_times_out_once(server: MotoKmsServer, key: KeyUri) -> None:
    """A server slower than the read timeout is ProviderTimeout after one attempt (no SDK retry)."""
    adapter = AwsKmsAdapter(FAST, server.settings())
    try:
        server.fault("slow")
        start = server.calls["encrypt"]
        with pytest.raises(ProviderTimeout, match="timed out") as info:
            adapter.wrap(key, DATA, aad=AAD)
        assert isinstance(info.value, ProviderUnavailable)
        assert server.calls["encrypt"] == start + 1
    finally:
        adapter.close()


def test_service_error_is_unavailable_and_not_retried(
    server: MotoKmsServer, adapter: AwsKmsAdapter, key: KeyUri
) -> None:
    """HTTP 500 KMSInternalException is ProviderUnavailable after exactly one request."""
    server.fault("error")
    start = len(server.received)
    with pytest.raises(ProviderUnavailable, match="KMSInternalException"):
        adapter.wrap(key, DATA, aad=AAD)
    assert len(server.received) == start + 1


def test_clients_are_shared_across_threads(server: MotoKmsServer, key: KeyUri) -> None:
    """One adapter serves many threads at once; each round trip gets its own data back."""
    a = AwsKmsAdapter(OPTIONS, server.settings())
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
