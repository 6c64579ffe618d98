"""Azure Key Vault / Managed HSM adapter: URI parsing, and the real azure-keyvault-keys and
azure-identity clients against the local Key Vault + Entra ID server (HTTPS, bearer challenge,
client-credentials tokens over the wire)."""

from __future__ import annotations

import base64
import datetime
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError
from azure.identity import ClientSecretCredential
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
from provider_support import (  # type: ignore[import-not-found]
    ADAPTER_FAST,
    ADAPTER_OPTIONS,
)
from pydantic import SecretStr, ValidationError

from keygate.core.errors import ConfigurationError, InvalidRequest
from keygate.providers.azure import AzureKeyVaultAdapter, AzureKeyVaultSettings
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
from keygate.testing.kms.azure import FakeAzureKeyVaultServer

DATA = bytes(range(60))  # what keygate hands over: an HSM-wrapped DEK
AAD = b"keygate/v1 outer\x00tenant-a\x00records\x001"
OPTIONS, FAST = ADAPTER_OPTIONS, ADAPTER_FAST
VERSION = "0123456789abcdef0123456789abcdef"


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kv() -> Iterator[FakeAzureKeyVaultServer]:
    with FakeAzureKeyVaultServer(slow_s=1.0) as fake:
        yield fake


@pytest.fixture(scope="module")
def hsm() -> Iterator[FakeAzureKeyVaultServer]:
    with FakeAzureKeyVaultServer(managed_hsm=True, region="japanwest", slow_s=1.0) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _clean_servers(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("kv", "hsm"):
        if name in request.fixturenames:
            fake: FakeAzureKeyVaultServer = request.getfixturevalue(name)
            fake.fault(None)
            fake.authorized = True
            fake.deleted_keys_readable = True


@pytest.fixture
def adapter(kv: FakeAzureKeyVaultServer) -> Iterator[AzureKeyVaultAdapter]:
    a = AzureKeyVaultAdapter(OPTIONS, kv.settings())
    yield a
    a.close()


@pytest.fixture
def hsm_adapter(hsm: FakeAzureKeyVaultServer) -> Iterator[AzureKeyVaultAdapter]:
    a = AzureKeyVaultAdapter(OPTIONS, hsm.settings())
    yield a
    a.close()


def _name() -> str:
    return f"kek-{secrets.token_hex(4)}"


def _key(server: FakeAzureKeyVaultServer, **kw: Any) -> KeyUri:
    return AzureKeyVaultAdapter.parse_uri(server.create_key(_name(), **kw))


def _frame_version(blob: bytes) -> str:
    return blob[3 : 3 + blob[2]].decode()


def _inner(blob: bytes) -> bytes:
    return blob[3 + blob[2] :]


def _bodies(server: FakeAzureKeyVaultServer, start: int) -> list[dict[str, Any]]:
    return [json.loads(b) for b in server.received[start:] if b]


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sdk_credential(server: FakeAzureKeyVaultServer) -> ClientSecretCredential:
    s = server.settings()
    assert s.client_secret is not None
    return ClientSecretCredential(
        server.tenant_id,
        server.client_id,
        s.client_secret.get_secret_value(),
        authority=server.url,
        disable_instance_discovery=True,
        connection_verify=str(server.ca_pem),
    )


def _sdk_key_client(server: FakeAzureKeyVaultServer) -> KeyClient:
    return KeyClient(
        server.url,
        _sdk_credential(server),
        verify_challenge_resource=False,
        connection_verify=str(server.ca_pem),
    )


# -- URIs ---------------------------------------------------------------------------------------

VAULT_URI = "azure-kv://kg-tokyo.vault.azure.net/keys/tenant-a?region=japaneast"


@pytest.mark.unit
def test_parse_vault_uri() -> None:
    """A Key Vault URI yields its host, key name, declared region and vault URL."""
    key = AzureKeyVaultAdapter.parse_uri(VAULT_URI)
    assert key.scheme == "azure-kv"
    assert key.uri == VAULT_URI
    assert key.region == "japaneast"
    assert key.parts["host"] == "kg-tokyo.vault.azure.net"
    assert key.parts["vault_url"] == "https://kg-tokyo.vault.azure.net"
    assert key.parts["name"] == "tenant-a"
    assert key.parts["version"] == ""
    assert key.parts["kind"] == "vault"


@pytest.mark.unit
def test_parse_managed_hsm_uri_with_version() -> None:
    """A Managed HSM URI with a key version keeps the version and names the HSM kind."""
    uri = f"azure-kv://kg-osaka.managedhsm.azure.net/keys/aes-1/{VERSION}?region=japanwest"
    key = AzureKeyVaultAdapter.parse_uri(uri)
    assert key.uri == uri
    assert key.region == "japanwest"
    assert key.parts["kind"] == "managedhsm"
    assert key.parts["version"] == VERSION


@pytest.mark.unit
def test_canonical_form_is_stable() -> None:
    """Scheme, host, version and region are lower-cased; the key name keeps its case; idempotent."""
    messy = f"AZURE-KV://KG-Tokyo.Vault.Azure.NET/keys/Tenant-A/{VERSION.upper()}?REGION=JapanEast"
    key = AzureKeyVaultAdapter.parse_uri(messy)
    assert (
        key.uri == f"azure-kv://kg-tokyo.vault.azure.net/keys/Tenant-A/{VERSION}?region=japaneast"
    )
    assert AzureKeyVaultAdapter.parse_uri(key.uri).uri == key.uri
    assert AzureKeyVaultAdapter.parse_uri(key.uri) == key


BAD_URIS: list[tuple[str, str]] = [
    ("", "scheme"),
    ("aws-kms://arn:aws:kms:ap-northeast-1:111122223333:key/x", "scheme"),
    ("https://kg-tokyo.vault.azure.net/keys/k?region=japaneast", "scheme"),
    ("azure-kv://kg-tokyo.vault.azure.net?region=japaneast", "path"),
    ("azure-kv://kg-tokyo.vault.azure.net/secrets/k?region=japaneast", "path"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/?region=japaneast", "path"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k/?region=japaneast", "path"),
    (f"azure-kv://kg-tokyo.vault.azure.net/keys/k/{VERSION}/x?region=japaneast", "path"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k/1234?region=japaneast", "version"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k/" + "g" * 32 + "?region=japaneast", "version"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/my_key?region=japaneast", "key name"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/" + "k" * 128 + "?region=japaneast", "key name"),
    ("azure-kv://ab.vault.azure.net/keys/k?region=japaneast", "vault name"),
    ("azure-kv://1vault.vault.azure.net/keys/k?region=japaneast", "vault name"),
    ("azure-kv://kg--tokyo.vault.azure.net/keys/k?region=japaneast", "vault name"),
    ("azure-kv://kg-tokyo-.vault.azure.net/keys/k?region=japaneast", "vault name"),
    ("azure-kv://kg-tokyo.vault.azure.cn/keys/k?region=chinaeast", "sovereign"),
    ("azure-kv://kg-tokyo.vault.usgovcloudapi.net/keys/k?region=usgovvirginia", "sovereign"),
    ("azure-kv://kg-tokyo.vault.azure.net.evil.example/keys/k?region=japaneast", "sovereign"),
    ("azure-kv://a.kg-tokyo.vault.azure.net/keys/k?region=japaneast", "sovereign"),
    ("azure-kv://keys.example.com/keys/k?region=japaneast", "sovereign"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k", "region"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k?", "region"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k?region=", "region"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k?region=japan-east", "region"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k?region=japaneast&region=eastus", "more than once"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k?region=japaneast&api-version=7.4", "query"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k?location=japaneast", "query"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k?region=japaneast#frag", "fragment"),
    ("azure-kv://kg-tokyo.vault.azure.net:443/keys/k?region=japaneast", "port"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/../keys/k?region=japaneast", "dot segments"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k%2F..?region=japaneast", "percent"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k?region=japan%20east", "percent"),
    ("azure-kv://kg-tokyo.vault.azure.net\\keys\\k?region=japaneast", "backslash"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k?region=japaneast\n", "printable ASCII"),
    (
        "azure-kv://kg-tokyo.vault.azure.net/keys/k\r\nHost: evil?region=japaneast",
        "printable ASCII",
    ),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k?region=japan east", "printable ASCII"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/k\x00?region=japaneast", "printable ASCII"),
    ("azure-kv://kg-tökyo.vault.azure.net/keys/k?region=japaneast", "printable ASCII"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/ｋ?region=japaneast", "printable ASCII"),
    ("azure-kv://kg-tokyo.vault.azure.net/keys/" + "k" * 500 + "?region=japaneast", "longer than"),
]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("uri", "problem"), BAD_URIS, ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD_URIS)]
)
def test_malformed_uris_are_refused(uri: str, problem: str) -> None:
    """Malformed, ambiguous or hostile URIs raise InvalidRequest naming the problem."""
    with pytest.raises(InvalidRequest) as err:
        AzureKeyVaultAdapter.parse_uri(uri)
    assert problem in str(err.value)
    assert str(err.value).startswith("invalid azure-kv key URI:")


@pytest.mark.unit
def test_userinfo_is_refused_without_echoing_it() -> None:
    """A URI carrying user:password@ is refused and the password is not repeated."""
    uri = "azure-kv://admin:hunter2-s3cret@kg-tokyo.vault.azure.net/keys/k?region=japaneast"
    with pytest.raises(InvalidRequest) as err:
        AzureKeyVaultAdapter.parse_uri(uri)
    assert "user information" in str(err.value)
    assert "hunter2" not in str(err.value)
    assert "admin" not in str(err.value)


@pytest.mark.unit
def test_non_string_uri_is_refused() -> None:
    """A non-string URI is an InvalidRequest, not a TypeError."""
    with pytest.raises(InvalidRequest, match="not a string"):
        AzureKeyVaultAdapter.parse_uri(b"azure-kv://x")  # type: ignore[arg-type]


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """KEYGATE_AZURE_* fill the settings; the secret stays hidden in repr."""
    monkeypatch.setenv("KEYGATE_AZURE_TENANT_ID", "tenant-1")
    monkeypatch.setenv("KEYGATE_AZURE_CLIENT_ID", "client-1")
    monkeypatch.setenv("KEYGATE_AZURE_CLIENT_SECRET", "very-secret-value")
    monkeypatch.setenv("KEYGATE_AZURE_ENDPOINT", "https://127.0.0.1:8443/")
    s = AzureKeyVaultSettings()
    assert (s.tenant_id, s.client_id, s.endpoint) == (
        "tenant-1",
        "client-1",
        "https://127.0.0.1:8443",
    )
    assert s.client_secret is not None
    assert s.client_secret.get_secret_value() == "very-secret-value"
    assert "very-secret-value" not in repr(s)


@pytest.mark.unit
@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "https://user:pw@host", "ftp://host", "https://host/?x=1"]
)
def test_endpoint_must_be_plain_https(url: str) -> None:
    """Bearer tokens never travel in clear: endpoint and authority overrides must be https."""
    with pytest.raises(ValidationError):
        AzureKeyVaultSettings(endpoint=url)
    with pytest.raises(ValidationError):
        AzureKeyVaultSettings(authority_host=url)


@pytest.mark.unit
def test_conflicting_secret_settings(tmp_path: Path) -> None:
    """A secret and a secret file together, or a secret without tenant/client, are refused."""
    f = tmp_path / "secret"
    f.write_text("s")
    with pytest.raises(ConfigurationError, match="not both"):
        AzureKeyVaultAdapter(
            OPTIONS,
            AzureKeyVaultSettings(
                tenant_id="t", client_id="c", client_secret=SecretStr("s"), client_secret_file=f
            ),
        )
    with pytest.raises(ConfigurationError, match="TENANT_ID"):
        AzureKeyVaultAdapter(
            OPTIONS, AzureKeyVaultSettings(client_id="c", client_secret=SecretStr("s"))
        )


class _StaticToken:
    """A TokenCredential handing out a fixed (possibly forged) token."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.calls = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.calls += 1
        return AccessToken(self.token, int(time.time()) + 3600)


@pytest.mark.unit
def test_clients_are_per_vault_without_override() -> None:
    """Without an endpoint override each vault host gets its own client at https://HOST."""
    adapter = AzureKeyVaultAdapter(OPTIONS, AzureKeyVaultSettings(), credential=_StaticToken("t"))
    a = adapter.parse_uri(VAULT_URI)
    b = adapter.parse_uri("azure-kv://kg-osaka.managedhsm.azure.net/keys/k?region=japanwest")
    ca, cb = adapter._client_for(a), adapter._client_for(b)
    assert ca.vault_url == "https://kg-tokyo.vault.azure.net"
    assert cb.vault_url == "https://kg-osaka.managedhsm.azure.net"
    assert adapter._client_for(a) is ca
    adapter.close()


# -- round trips --------------------------------------------------------------------------------


def test_rsa_round_trip(kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter) -> None:
    """RSA-HSM key: wrap and unwrap both run in the vault with RSA-OAEP-256."""
    key = _key(kv)
    start, wraps, unwraps = len(kv.received), kv.calls["wrap_key"], kv.calls["unwrap_key"]
    blob = adapter.wrap(key, DATA, aad=AAD)
    assert kv.calls["wrap_key"] == wraps + 1  # the wrap reached the vault (no local RSA wrap)
    assert blob[:2] == b"\x01\x01" and len(_inner(blob)) == 256
    assert adapter.unwrap(key, blob, aad=AAD) == DATA
    assert kv.calls["unwrap_key"] == unwraps + 1
    version = _frame_version(blob)
    assert kv.unwrap_locally(key.uri, version, "RSA-OAEP-256", _inner(blob)) == DATA
    bodies = [b for b in _bodies(kv, start) if "value" in b]
    assert bodies[0] == {"alg": "RSA-OAEP-256", "value": _b64u(DATA)}


def test_rsa_ciphertext_is_plain_key_vault_output(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter
) -> None:
    """The SDK's own CryptographyClient (another client) unwraps what the adapter wrapped."""
    key = _key(kv)
    blob = adapter.wrap(key, DATA, aad=AAD)
    kid = f"https://{kv.vault_host}/keys/{key.parts['name']}/{_frame_version(blob)}"
    # vault host → the test server: a client built on the server URL with the kid's path
    client = CryptographyClient(
        kid.replace(f"https://{kv.vault_host}", kv.url),
        _sdk_credential(kv),
        verify_challenge_resource=False,
        connection_verify=str(kv.ca_pem),
    )
    result = client.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, _inner(blob))
    assert result.key == DATA


def test_aad_is_not_sent_and_not_bound(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter
) -> None:
    """Key Vault wraps take no AAD: it is never sent, and another AAD still unwraps (documented)."""
    key = _key(kv)
    start = len(kv.received)
    blob = adapter.wrap(key, DATA, aad=AAD)
    assert adapter.unwrap(key, blob, aad=b"other") == DATA
    assert adapter.unwrap(key, blob, aad=b"") == DATA
    raw = b"".join(kv.received[start:])
    assert b"tenant-a" not in raw
    assert _b64u(AAD).encode() not in raw


def test_managed_hsm_oct_key_two_clients(
    hsm: FakeAzureKeyVaultServer, hsm_adapter: AzureKeyVaultAdapter
) -> None:
    """oct-HSM key: A256KW runs in the HSM, so a second, independent adapter can unwrap."""
    key = _key(hsm)
    wraps, unwraps = hsm.calls["wrap_key"], hsm.calls["unwrap_key"]
    blob = hsm_adapter.wrap(key, DATA, aad=AAD)
    assert hsm.calls["wrap_key"] == wraps + 1
    assert blob[:2] == b"\x01\x02"
    other = AzureKeyVaultAdapter(OPTIONS, hsm.settings())
    try:
        assert other.unwrap(key, blob, aad=AAD) == DATA
    finally:
        other.close()
    assert hsm.calls["unwrap_key"] == unwraps + 1
    # the server's own key opens the inner A256KW: 2-byte length, data, zero padding
    framed = hsm.unwrap_locally(key.uri, _frame_version(blob), "A256KW", _inner(blob))
    assert framed == len(DATA).to_bytes(2, "big") + DATA + b"\x00\x00"


def test_sdk_cryptography_client_wraps_oct_keys_locally(hsm: FakeAzureKeyVaultServer) -> None:
    """Why the adapter avoids CryptographyClient: with oct-HSM keys it wraps locally with a random
    key that nobody can unwrap (azure-keyvault-keys 4.11.3).  If this starts failing, the SDK was
    fixed; the adapter still works either way."""
    uri = hsm.create_key(_name(), versioned=True)
    key = AzureKeyVaultAdapter.parse_uri(uri)
    kid = f"{hsm.url}/keys/{key.parts['name']}/{key.parts['version']}"
    opts = {"verify_challenge_resource": False, "connection_verify": str(hsm.ca_pem)}
    wraps = hsm.calls["wrap_key"]
    one = CryptographyClient(kid, _sdk_credential(hsm), **opts)
    wrapped = one.wrap_key(KeyWrapAlgorithm.aes_256, bytes(32)).encrypted_key
    assert hsm.calls["wrap_key"] == wraps  # never reached the HSM
    assert one.unwrap_key(KeyWrapAlgorithm.aes_256, wrapped).key == bytes(32)  # same client: OK
    two = CryptographyClient(kid, _sdk_credential(hsm), **opts)
    with pytest.raises(HttpResponseError) as err:  # its local try fails, then the HSM refuses
        two.unwrap_key(KeyWrapAlgorithm.aes_256, wrapped)
    assert err.value.status_code == 400


@pytest.mark.parametrize("size", [1, 15, 16, 60, 64, 256])
def test_managed_hsm_sizes(
    hsm: FakeAzureKeyVaultServer, hsm_adapter: AzureKeyVaultAdapter, size: int
) -> None:
    """Any input of 1..256 bytes round-trips through A256KW (not only multiples of 8)."""
    key = _key(hsm)
    data = secrets.token_bytes(size)
    assert hsm_adapter.unwrap(key, hsm_adapter.wrap(key, data, aad=AAD), aad=AAD) == data


def test_rsa_size_limit(kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter) -> None:
    """A 2048-bit RSA key takes 190 bytes with RSA-OAEP-256; more is refused before any wrap."""
    key = _key(kv)
    assert adapter.unwrap(key, adapter.wrap(key, bytes(190), aad=AAD), aad=AAD) == bytes(190)
    wraps = kv.calls["wrap_key"]
    with pytest.raises(ProviderRejected, match="at most 190 bytes"):
        adapter.wrap(key, bytes(191), aad=AAD)
    assert kv.calls["wrap_key"] == wraps
    with pytest.raises(InvalidRequest):
        adapter.wrap(key, b"", aad=AAD)
    with pytest.raises(InvalidRequest):
        adapter.wrap(key, bytes(257), aad=AAD)


def test_rotation_with_unversioned_uri(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter
) -> None:
    """After rotation an unversioned URI wraps under the new version and still unwraps the old."""
    key = _key(kv)
    old = adapter.wrap(key, DATA, aad=AAD)
    new_version = kv.rotate_key(key.uri)
    new = adapter.wrap(key, DATA, aad=AAD)
    assert _frame_version(new) == new_version != _frame_version(old)
    assert adapter.unwrap(key, old, aad=AAD) == DATA
    assert adapter.unwrap(key, new, aad=AAD) == DATA
    pinned = adapter.parse_uri(key.uri.replace("?", f"/{_frame_version(old)}?"))
    assert adapter.unwrap(pinned, old, aad=AAD) == DATA
    with pytest.raises(ProviderCiphertextRejected, match="another key version"):
        adapter.unwrap(pinned, new, aad=AAD)
    assert _frame_version(adapter.wrap(pinned, DATA, aad=AAD)) == _frame_version(old)


# -- foreign ciphertexts ------------------------------------------------------------------------


def test_other_keys_ciphertext_is_rejected(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter
) -> None:
    """A ciphertext made under another key (same vault) is a foreign ciphertext."""
    mine, theirs = _key(kv), _key(kv)
    blob = adapter.wrap(theirs, DATA, aad=AAD)
    with pytest.raises(ProviderCiphertextRejected):
        adapter.unwrap(mine, blob, aad=AAD)


def test_other_keys_ciphertext_with_same_version_is_rejected(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter
) -> None:
    """Another key's inner ciphertext re-framed with this key's version: the vault refuses (400)."""
    mine, theirs = _key(kv), _key(kv)
    my_blob = adapter.wrap(mine, DATA, aad=AAD)
    their_blob = adapter.wrap(theirs, DATA, aad=AAD)
    forged = my_blob[: 3 + my_blob[2]] + _inner(their_blob)
    with pytest.raises(ProviderCiphertextRejected):
        adapter.unwrap(mine, forged, aad=AAD)


@pytest.mark.parametrize(
    "damage", ["random", "truncated", "flipped", "empty", "bad-version", "too-long"]
)
def test_damaged_ciphertexts_are_rejected(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter, damage: str
) -> None:
    """Random bytes, truncation, a flipped byte or a broken frame: ProviderCiphertextRejected."""
    key = _key(kv)
    blob = adapter.wrap(key, DATA, aad=AAD)
    bad = {
        "random": secrets.token_bytes(len(blob)),
        "truncated": blob[:-1],
        "flipped": blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:],
        "empty": b"",
        "bad-version": blob[:3] + b"Z" + blob[4:],
        "too-long": blob + bytes(2048),
    }[damage]
    with pytest.raises(ProviderCiphertextRejected):
        adapter.unwrap(key, bad, aad=AAD)


def test_damaged_hsm_ciphertext_is_rejected(
    hsm: FakeAzureKeyVaultServer, hsm_adapter: AzureKeyVaultAdapter
) -> None:
    """A truncated or flipped A256KW ciphertext is refused by the HSM (400 BadParameter)."""
    key = _key(hsm)
    blob = hsm_adapter.wrap(key, DATA, aad=AAD)
    for bad in (blob[:-8], blob[:-1] + bytes([blob[-1] ^ 0x80])):
        with pytest.raises(ProviderCiphertextRejected):
            hsm_adapter.unwrap(key, bad, aad=AAD)


# -- key state ----------------------------------------------------------------------------------


def test_disabled_key(kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter) -> None:
    """A disabled key refuses wrap (checked first: the vault would still do the public RSA op)
    and unwrap (403 KeyDisabled); enabling it again restores both."""
    key = _key(kv)
    blob = adapter.wrap(key, DATA, aad=AAD)
    kv.set_key_enabled(key.uri, False)
    wraps = kv.calls["wrap_key"]
    with pytest.raises(ProviderKeyDisabled, match="is disabled"):
        adapter.wrap(key, DATA, aad=AAD)
    assert kv.calls["wrap_key"] == wraps
    with pytest.raises(ProviderKeyDisabled, match="KeyDisabled"):
        adapter.unwrap(key, blob, aad=AAD)
    status = adapter.describe(key)
    assert (status.enabled, status.state) == (False, "Disabled")
    kv.set_key_enabled(key.uri, True)
    assert adapter.unwrap(key, blob, aad=AAD) == DATA


def test_disabled_through_the_sdk(
    hsm: FakeAzureKeyVaultServer, hsm_adapter: AzureKeyVaultAdapter
) -> None:
    """Disabling with KeyClient.update_key_properties (PATCH over the wire) is honoured."""
    key = _key(hsm)
    blob = hsm_adapter.wrap(key, DATA, aad=AAD)
    client = _sdk_key_client(hsm)
    props = client.update_key_properties(key.parts["name"], _frame_version(blob), enabled=False)
    assert props.properties.enabled is False
    with pytest.raises(ProviderKeyDisabled):
        hsm_adapter.unwrap(key, blob, aad=AAD)
    with pytest.raises(ProviderKeyDisabled):
        hsm_adapter.wrap(key, DATA, aad=AAD)
    client.close()


def test_expired_key_wraps_no_more_but_unwraps(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter
) -> None:
    """Past its expiry a key wraps nothing new, but what it wrapped can still be unwrapped."""
    key = _key(kv)
    blob = adapter.wrap(key, DATA, aad=AAD)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    client = _sdk_key_client(kv)
    client.update_key_properties(key.parts["name"], expires_on=past)
    client.close()
    with pytest.raises(ProviderKeyDisabled, match="expired"):
        adapter.wrap(key, DATA, aad=AAD)
    assert adapter.unwrap(key, blob, aad=AAD) == DATA
    assert adapter.describe(key).state == "Expired"


def test_deleted_key(kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter) -> None:
    """A soft-deleted key is ProviderKeyDestroyed for wrap and unwrap; describe reports it."""
    key = _key(kv)
    blob = adapter.wrap(key, DATA, aad=AAD)
    kv.destroy_key(key.uri)
    with pytest.raises(ProviderKeyDestroyed, match="deleted"):
        adapter.wrap(key, DATA, aad=AAD)
    with pytest.raises(ProviderKeyDestroyed):
        adapter.unwrap(key, blob, aad=AAD)
    status = adapter.describe(key)
    assert (status.enabled, status.state) == (False, "Deleted")


def test_deleted_through_the_sdk(
    hsm: FakeAzureKeyVaultServer, hsm_adapter: AzureKeyVaultAdapter
) -> None:
    """KeyClient.begin_delete_key (DELETE over the wire) makes the key ProviderKeyDestroyed."""
    key = _key(hsm)
    blob = hsm_adapter.wrap(key, DATA, aad=AAD)
    client = _sdk_key_client(hsm)
    client.begin_delete_key(key.parts["name"]).wait()
    client.close()
    with pytest.raises(ProviderKeyDestroyed):
        hsm_adapter.unwrap(key, blob, aad=AAD)


def test_deleted_key_without_deleted_keys_permission(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter
) -> None:
    """If the principal may not read deleted keys, a deleted key can only be reported missing."""
    key = _key(kv)
    kv.destroy_key(key.uri)
    kv.deleted_keys_readable = False
    with pytest.raises(ProviderKeyNotFound):
        adapter.wrap(key, DATA, aad=AAD)


def test_purged_key_is_not_found(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter
) -> None:
    """After a purge nothing is left to tell: ProviderKeyNotFound."""
    key = _key(kv)
    blob = adapter.wrap(key, DATA, aad=AAD)
    kv.destroy_key(key.uri)
    kv.purge_key(key.uri)
    with pytest.raises(ProviderKeyNotFound):
        adapter.unwrap(key, blob, aad=AAD)


def test_unknown_key(kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter) -> None:
    """A key that never existed is ProviderKeyNotFound for wrap, unwrap and describe."""
    known = _key(kv)
    blob = adapter.wrap(known, DATA, aad=AAD)
    unknown = adapter.parse_uri(f"azure-kv://{kv.vault_host}/keys/{_name()}?region=japaneast")
    with pytest.raises(ProviderKeyNotFound):
        adapter.wrap(unknown, DATA, aad=AAD)
    with pytest.raises(ProviderKeyNotFound):
        adapter.unwrap(unknown, blob, aad=AAD)
    with pytest.raises(ProviderKeyNotFound):
        adapter.describe(unknown)


def test_region_mismatch_is_refused(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter
) -> None:
    """A URI declaring another region than the vault reports (x-ms-keyvault-region) is refused."""
    key = _key(kv)
    lying = adapter.parse_uri(key.uri.replace("region=japaneast", "region=japanwest"))
    with pytest.raises(ProviderRejected, match="reports japaneast"):
        adapter.wrap(lying, DATA, aad=AAD)
    with pytest.raises(ProviderRejected, match="reports japaneast"):
        adapter.describe(lying)


# -- describe -----------------------------------------------------------------------------------


def test_describe(kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter) -> None:
    """describe() reads the key: enabled, RSA size, wrap algorithm, version, reported region."""
    key = _key(kv)
    status = adapter.describe(key)
    assert status.uri == key.uri
    assert (status.enabled, status.state) == (True, "Enabled")
    assert status.algorithm == "RSA-HSM 2048"
    assert status.region == "japaneast"
    assert status.details["wrap_algorithm"] == "RSA-OAEP-256"
    assert status.details["reported_region"] == "japaneast"
    assert len(status.details["version"]) == 32
    assert "wrapKey" in status.details["key_ops"]


def test_describe_managed_hsm(
    hsm: FakeAzureKeyVaultServer, hsm_adapter: AzureKeyVaultAdapter
) -> None:
    """A Managed HSM AES key is described as oct-HSM with A256KW, in japanwest."""
    status = hsm_adapter.describe(_key(hsm))
    assert (status.algorithm, status.region) == ("oct-HSM", "japanwest")
    assert status.details["wrap_algorithm"] == "A256KW"


# -- credentials --------------------------------------------------------------------------------


def test_wrong_client_secret(kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter) -> None:
    """A wrong secret: Entra ID answers AADSTS7000215 over the wire → ProviderAuthFailed."""
    key = _key(kv)
    adapter.describe(key)  # the challenge is known now: the next client goes to Entra ID first
    tokens = kv.calls["token"]
    bad = AzureKeyVaultAdapter(OPTIONS, kv.bad_settings())
    try:
        with pytest.raises(ProviderAuthFailed, match="AADSTS7000215") as err:
            bad.wrap(key, DATA, aad=AAD)
    finally:
        bad.close()
    assert kv.calls["token"] == tokens + 1
    secret = kv.bad_settings().client_secret
    assert secret is not None
    assert secret.get_secret_value() not in str(err.value)


def test_principal_without_role(kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter) -> None:
    """A valid token of a principal without a role on the vault (403 ForbiddenByRbac)."""
    key = _key(kv)
    kv.authorized = False
    with pytest.raises(ProviderAuthFailed, match="ForbiddenByRbac"):
        adapter.wrap(key, DATA, aad=AAD)


def test_forged_token(kv: FakeAzureKeyVaultServer) -> None:
    """A token Entra ID did not issue gets 401 from the vault → ProviderAuthFailed."""
    key = _key(kv)
    forged = _StaticToken("eyJhbGciOiJIUzI1NiJ9.eyJ0aWQiOiJ4In0.AAAA")
    a = AzureKeyVaultAdapter(OPTIONS, kv.settings(), credential=forged)
    try:
        with pytest.raises(ProviderAuthFailed, match="token"):
            a.describe(key)
    finally:
        a.close()
    assert forged.calls >= 1


def test_client_secret_file(kv: FakeAzureKeyVaultServer, tmp_path: Path) -> None:
    """The secret can come from KEYGATE_AZURE_CLIENT_SECRET_FILE, read when the client is built."""
    key = _key(kv)
    good = kv.settings()
    assert good.client_secret is not None
    path = tmp_path / "client-secret"
    path.write_text(good.client_secret.get_secret_value() + "\n")
    settings = good.model_copy(update={"client_secret": None, "client_secret_file": path})
    a = AzureKeyVaultAdapter(OPTIONS, settings)
    try:
        assert a.unwrap(key, a.wrap(key, DATA, aad=AAD), aad=AAD) == DATA
    finally:
        a.close()


def test_environment_for_subprocesses(
    kv: FakeAzureKeyVaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """env() holds everything a subprocess needs: settings read from it reach the server."""
    for name, value in kv.env().items():
        monkeypatch.setenv(name, value)
    key = _key(kv)
    a = AzureKeyVaultAdapter(OPTIONS)  # settings from the environment
    try:
        assert a.unwrap(key, a.wrap(key, DATA, aad=AAD), aad=AAD) == DATA
    finally:
        a.close()


# -- outages --------------------------------------------------------------------------------------


def test_server_down(kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter) -> None:
    """Connections refused/closed → ProviderUnavailable, for a warm and a fresh client."""
    key = _key(kv)
    blob = adapter.wrap(key, DATA, aad=AAD)
    kv.fault("down")
    with pytest.raises(ProviderUnavailable) as err:
        adapter.unwrap(key, blob, aad=AAD)
    assert not isinstance(err.value, ProviderTimeout)
    fresh = AzureKeyVaultAdapter(OPTIONS, kv.settings())
    try:
        with pytest.raises(ProviderUnavailable):
            fresh.unwrap(key, blob, aad=AAD)
    finally:
        fresh.close()
    kv.fault(None)
    assert adapter.unwrap(key, blob, aad=AAD) == DATA


def test_server_slow(kv: FakeAzureKeyVaultServer) -> None:
    """An answer slower than the read timeout → ProviderTimeout, promptly."""
    key = _key(kv)
    adapter = AzureKeyVaultAdapter(FAST, kv.settings())
    try:
        # warm up (a token from Entra ID, a connection) so the fault below meets the vault call;
        # a busy machine may need more than one try at FAST's 0.3 s, which is not under test
        for attempt in range(10):
            try:
                blob = adapter.wrap(key, DATA, aad=AAD)
                break
            except ProviderTimeout:
                if attempt == 9:
                    raise
        kv.fault("slow")
        before = len(kv.received)
        with pytest.raises(ProviderTimeout):
            adapter.unwrap(key, blob, aad=AAD)
        assert len(kv.received) == before + 1  # one attempt, no SDK retry
    finally:
        adapter.close()


def test_server_error_is_not_retried(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter
) -> None:
    """503 ServiceUnavailable → ProviderUnavailable after exactly one attempt (SDK retries off)."""
    key = _key(kv)
    blob = adapter.wrap(key, DATA, aad=AAD)
    kv.fault("error")
    before = len(kv.received)
    with pytest.raises(ProviderUnavailable, match="ServiceUnavailable"):
        adapter.unwrap(key, blob, aad=AAD)
    assert len(kv.received) == before + 1


def test_throttled(kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter) -> None:
    """429 Throttled → ProviderUnavailable carrying the vault's Retry-After."""
    key = _key(kv)
    adapter.describe(key)  # holds a token: the vault itself answers 429
    kv.fault("throttle")
    with pytest.raises(ProviderUnavailable, match="Throttled") as err:
        adapter.describe(key)
    assert err.value.retry_after == 1.0


@pytest.mark.parametrize(
    ("mode", "error"),
    [("error", ProviderUnavailable), ("slow", ProviderTimeout), ("down", ProviderUnavailable)],
)
def test_entra_id_outage_is_not_an_auth_failure(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter, mode: str, error: type[Exception]
) -> None:
    """When the token endpoint fails, a fresh client reports an outage, not refused credentials."""
    key = _key(kv)
    adapter.describe(key)  # the challenge is known: a fresh client asks Entra ID first
    entra = kv.calls["discovery"] + kv.calls["token"]
    kv.fault(mode)
    fresh = AzureKeyVaultAdapter(FAST, kv.settings())
    try:
        with pytest.raises(error) as err:
            fresh.describe(key)
    finally:
        fresh.close()
    assert not isinstance(err.value, ProviderAuthFailed)
    if mode != "down":  # "down" closes connections before any request is read
        assert kv.calls["discovery"] + kv.calls["token"] == entra + 1
        assert "Entra ID" in str(err.value)


# -- secrets, wire contents, threads --------------------------------------------------------------


def test_no_secret_in_logs_or_errors(
    kv: FakeAzureKeyVaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Client secret, access tokens and the wrapped bytes appear in no log line or error."""
    caplog.set_level(logging.DEBUG)
    key = _key(kv)
    secret_data = b"\xa5" * 20 + b"S3CRETDEKBYTES" + b"\x5a" * 26
    messages: list[str] = []
    a = AzureKeyVaultAdapter(OPTIONS, kv.settings())
    try:
        blob = a.wrap(key, secret_data, aad=AAD)
        assert a.unwrap(key, blob, aad=AAD) == secret_data
        for bad in (blob[:-1], b"junk"):
            try:
                a.unwrap(key, bad, aad=AAD)
            except ProviderCiphertextRejected as exc:
                messages.append(str(exc))
        kv.set_key_enabled(key.uri, False)
        try:
            a.unwrap(key, blob, aad=AAD)
        except ProviderKeyDisabled as exc:
            messages.append(str(exc))
        kv.set_key_enabled(key.uri, True)
    finally:
        a.close()
    wrong = AzureKeyVaultAdapter(OPTIONS, kv.bad_settings())
    try:
        wrong.wrap(key, secret_data, aad=AAD)
    except ProviderAuthFailed as exc:
        messages.append(str(exc))
        messages.append(repr(exc.__cause__))
    finally:
        wrong.close()
    assert len(messages) == 5
    good_secret = kv.settings().client_secret
    bad_secret = kv.bad_settings().client_secret
    assert good_secret is not None and bad_secret is not None
    texts = [caplog.text, *(r.getMessage() for r in caplog.records), *messages]
    forbidden = [
        good_secret.get_secret_value(),
        *kv.issued_tokens,
        secret_data.hex(),
        _b64u(secret_data),
        "S3CRETDEKBYTES",
    ]
    assert kv.issued_tokens
    for text in texts:
        for value in forbidden:
            assert value not in text


def test_server_receives_only_the_wrapped_bytes(
    kv: FakeAzureKeyVaultServer, adapter: AzureKeyVaultAdapter
) -> None:
    """Of everything sent to the vault, only the wrapkey body carries the data, exactly once."""
    key = _key(kv)
    start = len(kv.received)
    adapter.wrap(key, DATA, aad=AAD)
    bodies = _bodies(kv, start)
    assert [b for b in bodies if _b64u(DATA) in json.dumps(b)] == [
        {"alg": "RSA-OAEP-256", "value": _b64u(DATA)}
    ]
    assert all(set(b) == {"alg", "value"} for b in bodies)
    assert all(b"client_secret" not in raw for raw in kv.received)


def test_concurrent_use_builds_one_client(kv: FakeAzureKeyVaultServer) -> None:
    """Eight threads share one adapter: all round trips succeed, one client, one token request."""
    key = _key(kv)
    a = AzureKeyVaultAdapter(OPTIONS, kv.settings())
    tokens = kv.calls["token"]
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        data = bytes([i]) * 60
        try:
            barrier.wait(5)
            for _ in range(3):
                assert a.unwrap(key, a.wrap(key, data, aad=AAD), aad=AAD) == data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(a._clients) == 1
    assert kv.calls["token"] - tokens == 1
    a.close()
