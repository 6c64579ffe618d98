"""Golden envelope vectors: pinned bytes, an independent decryptor, and keygate's own decryptor.

``envelope_v1.json`` is made by ``generate_vectors.py`` (see README.md in this directory).
"""

from __future__ import annotations

import hmac
import importlib.util
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from keygate.core.context import aad_prefix, encode_context
from keygate.core.envelope import DataKey, inner_wrap_aad
from keygate.core.errors import DecryptionFailed, ProviderRejected
from keygate.core.model import AlgorithmSuite, KeyRef
from keygate.core.wire import from_text, parse_header, to_text
from keygate.keys.manager import KeyManager
from keygate.keys.randomness import SystemRandom
from keygate.testing.fakes import SoftwareKeyWrapper, StaticRegistry

pytestmark = pytest.mark.unit

HERE = Path(__file__).parent
VECTORS: dict[str, Any] = json.loads((HERE / "envelope_v1.json").read_text(encoding="utf-8"))
POSITIVE: list[dict[str, Any]] = VECTORS["positive"]
NEGATIVE: list[dict[str, Any]] = VECTORS["negative"]
TEXT_NEGATIVE: list[dict[str, Any]] = VECTORS["text_negative"]
KEKS: dict[str, bytes] = {k["kek_ref"]: bytes.fromhex(k["kek"]) for k in VECTORS["keks"]}
LABELS: dict[str, str] = {k["kek_ref"]: k["hsm_label"] for k in VECTORS["keks"]}
SUITE = AlgorithmSuite.AES256_GCM_HKDF_SHA256_COMMIT


def _ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["comment"] for v in vectors]


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate_vectors", HERE / "generate_vectors.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _load_generator()
REGENERATED: dict[str, Any] = GENERATOR.build_vectors()


# ============================================================================ (a) pinned bytes
def test_vector_file_is_exactly_what_the_generator_writes() -> None:
    """The checked-in JSON file is byte-for-byte the generator's current output."""
    on_disk = (HERE / "envelope_v1.json").read_text(encoding="utf-8")
    assert GENERATOR.render(REGENERATED) == on_disk


def test_vector_file_covers_the_required_cases() -> None:
    """The file holds empty, Japanese, 64-byte and 1 KiB plaintexts and each kind of negative."""
    sizes = {len(bytes.fromhex(v["plaintext"])) for v in POSITIVE}
    assert {0, 64, 1024} <= sizes
    assert any(v["plaintext_utf8"] == "山田太郎" for v in POSITIVE)
    comments = " | ".join(_ids(NEGATIVE))
    for kind in ("flipped bit", "truncated", "extended", "context", "commitment", "suite"):
        assert kind in comments
    assert len(NEGATIVE) >= 40
    assert len(TEXT_NEGATIVE) >= 10


@pytest.mark.parametrize(
    ("vector", "again"),
    list(zip(POSITIVE, REGENERATED["positive"], strict=True)),
    ids=_ids(POSITIVE),
)
def test_positive_vector_regenerates_byte_for_byte(
    vector: dict[str, Any], again: dict[str, Any]
) -> None:
    """Sealing the vector's fixed inputs with keygate's code gives exactly the pinned envelope."""
    assert again["envelope"] == vector["envelope"]
    assert again["text"] == vector["text"]
    assert again == vector


@pytest.mark.parametrize(
    ("vector", "again"),
    list(zip(NEGATIVE, REGENERATED["negative"], strict=True)),
    ids=_ids(NEGATIVE),
)
def test_negative_vector_regenerates_byte_for_byte(
    vector: dict[str, Any], again: dict[str, Any]
) -> None:
    """Each negative vector is rebuilt identically from the pinned base envelope."""
    assert again == vector


@pytest.mark.parametrize("vector", POSITIVE, ids=_ids(POSITIVE))
def test_keygate_sealing_reproduces_the_pinned_envelope(vector: dict[str, Any]) -> None:
    """A DataKey from the vector's DEK and header seals its plaintext to the pinned bytes."""
    env = bytes.fromhex(vector["envelope"])
    header = parse_header(env)
    key = DataKey.from_header(bytes.fromhex(vector["dek"]), header)
    aad = encode_context(aad_prefix(SUITE, vector["tenant"], vector["purpose"]), vector["context"])
    assert aad.hex() == vector["aad"]
    sealed = key.seal(bytes.fromhex(vector["plaintext"]), aad, bytes.fromhex(vector["nonce"]))
    assert sealed == env
    assert to_text(sealed) == vector["text"]


# ============================================================================ (b) independent
class Rejected(Exception):
    """The independent implementation refused the envelope."""


_LAYOUT = struct.Struct(">BBH")


def indep_aad(tenant: str, purpose: str, context: Mapping[str, str]) -> bytes:
    """The AAD written from context.py's documented layout, not with keygate's encoder."""
    out = b"kg1\x001\x00" + tenant.encode() + b"\x00" + purpose.encode()
    for key in sorted(context):
        value = context[key]
        out += b"\x00" + key.encode() + b"\x00" + str(len(value)).encode() + b"\x00"
        out += value.encode("utf-8")
    return out


def indep_parse(env: bytes) -> dict[str, Any]:
    """Parse envelope v1 from the byte layout documented in wire.py (struct only)."""
    if len(env) < 4:
        raise Rejected("short")
    fmt, suite, hlen = _LAYOUT.unpack_from(env, 0)
    if fmt != 1 or suite != 1:
        raise Rejected("version or suite")
    if hlen > 8192 or hlen + 12 + 16 > len(env):
        raise Rejected("header length")
    if len(env) - hlen - 12 - 16 > 1 << 20:
        raise Rejected("too long")
    hdr = env[:hlen]
    pos = 4

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > hlen:
            raise Rejected("field runs past the header")
        out = hdr[pos : pos + n]
        pos += n
        return out

    fields: dict[str, Any] = {}
    for name in ("tenant", "purpose"):
        (n,) = take(1)
        if not 1 <= n <= 64:
            raise Rejected(f"{name} length")
        raw = take(n)
        if any(b >= 0x80 or b == 0 for b in raw):
            raise Rejected(f"{name} bytes")
        fields[name] = raw.decode("ascii")
    (version,) = struct.unpack(">I", take(4))
    if not 1 <= version <= 0x7FFFFFFF:
        raise Rejected("version")
    (n_layers,) = take(1)
    if not 1 <= n_layers <= 3:
        raise Rejected("chain length")
    chain = []
    for i in range(n_layers):
        (mech,) = take(1)
        (klen,) = struct.unpack(">H", take(2))
        key_id = take(klen)
        if i == 0 and (mech not in (0x01, 0x02, 0x03) or klen != 0):
            raise Rejected("innermost layer")
        if i > 0 and (mech not in range(0x10, 0x16) or not 1 <= klen <= 512):
            raise Rejected("outer layer")
        chain.append((mech, key_id))
    (wlen,) = struct.unpack(">H", take(2))
    if not 1 <= wlen <= 2048:
        raise Rejected("wrapped length")
    wrapped = take(wlen)
    commitment = take(32)
    # 0..2 zero bytes pad the header to a multiple of 3 bytes (so the text form splits cleanly).
    pad = take(hlen - pos) if hlen > pos else b""
    if hlen % 3 or len(pad) > 2 or any(pad):
        raise Rejected("header padding")
    fields.update(
        version=version,
        chain=chain,
        wrapped=wrapped,
        commitment=commitment,
        header_len=hlen,
        nonce=env[hlen : hlen + 12],
        ciphertext=env[hlen + 12 :],
    )
    return fields


def _hkdf_expand(dek: bytes, info: bytes) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(dek)


def indep_unwrap(fields: dict[str, Any]) -> bytes:
    """Unwrap an HSM_AES_GCM-wrapped DEK with the vector's KEK (iv || ciphertext || tag)."""
    ref = f"{fields['tenant']}/{fields['purpose']}/v{fields['version']}"
    if ref not in KEKS or len(fields["chain"]) != 1 or fields["chain"][0][0] != 0x01:
        raise Rejected("no KEK / not an HSM AES-GCM wrap")
    wrapped = fields["wrapped"]
    aad = f"keygate/v1 dek\x00{fields['tenant']}\x00{fields['purpose']}\x00{fields['version']}"
    try:
        return AESGCM(KEKS[ref]).decrypt(wrapped[:12], wrapped[12:], aad.encode())
    except (InvalidTag, ValueError):
        raise Rejected("unwrap") from None


def indep_open(
    env: bytes, tenant: str, purpose: str, context: Mapping[str, str], dek: bytes | None = None
) -> bytes:
    """Decrypt an envelope independently: parse, unwrap, check the commitment, then AES-GCM."""
    f = indep_parse(env)
    if (f["tenant"], f["purpose"]) != (tenant, purpose):
        raise Rejected("other tenant or purpose")
    if dek is None:
        dek = indep_unwrap(f)
    if not hmac.compare_digest(_hkdf_expand(dek, b"keygate/v1 key commitment"), f["commitment"]):
        raise Rejected("commitment")
    data_key = _hkdf_expand(dek, b"keygate/v1 data key")
    try:
        return AESGCM(data_key).decrypt(
            f["nonce"], f["ciphertext"], indep_aad(tenant, purpose, context)
        )
    except (InvalidTag, ValueError):
        raise Rejected("tag") from None


@pytest.mark.parametrize("vector", POSITIVE, ids=_ids(POSITIVE))
def test_independent_implementation_decrypts_positive_vector(vector: dict[str, Any]) -> None:
    """A decryptor written from the documented layout opens the vector and checks its commitment."""
    env = bytes.fromhex(vector["envelope"])
    dek = bytes.fromhex(vector["dek"])
    f = indep_parse(env)
    assert f["header_len"] == vector["header_len"]
    assert (f["tenant"], f["purpose"], f["version"]) == (
        vector["tenant"],
        vector["purpose"],
        vector["version"],
    )
    assert [(m, k.hex()) for m, k in f["chain"]] == [
        (c["mechanism"], c["key_id"]) for c in vector["chain"]
    ]
    assert f["wrapped"].hex() == vector["wrapped_dek"]
    assert f["nonce"].hex() == vector["nonce"]
    assert f["commitment"] == _hkdf_expand(dek, b"keygate/v1 key commitment")
    assert f["commitment"].hex() == vector["commitment"]
    assert _hkdf_expand(dek, b"keygate/v1 data key").hex() == vector["data_key"]
    assert indep_aad(vector["tenant"], vector["purpose"], vector["context"]).hex() == vector["aad"]
    if vector["hsm_unwrappable"]:
        assert indep_unwrap(f) == dek
        pt = indep_open(env, vector["tenant"], vector["purpose"], vector["context"])
    else:
        pt = indep_open(env, vector["tenant"], vector["purpose"], vector["context"], dek=dek)
    assert pt.hex() == vector["plaintext"]
    if vector["plaintext_utf8"] is not None:
        assert pt.decode() == vector["plaintext_utf8"]


@pytest.mark.parametrize("vector", POSITIVE, ids=_ids(POSITIVE))
def test_independent_text_form_decodes_positive_vector(vector: dict[str, Any]) -> None:
    """The text form is 'kg1.' plus unpadded base64url of the envelope (decoded independently)."""
    import base64

    text: str = vector["text"]
    assert text.startswith("kg1.")
    body = text[4:]
    assert "=" not in body
    assert base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).hex() == vector["envelope"]


@pytest.mark.parametrize("vector", NEGATIVE, ids=_ids(NEGATIVE))
def test_independent_implementation_rejects_negative_vector(vector: dict[str, Any]) -> None:
    """The independent decryptor also refuses every negative vector."""
    with pytest.raises(Rejected):
        indep_open(
            bytes.fromhex(vector["envelope"]),
            vector["tenant"],
            vector["purpose"],
            vector["context"],
        )


# ============================================================================ (c) keygate itself
def _registry() -> StaticRegistry:
    reg = StaticRegistry()
    reg.add_key("131016", "resident", hsm_label=LABELS["131016/resident/v1"])
    reg.add_key("131024", "resident", hsm_label=LABELS["131024/resident/v1"])
    reg.add_key("digital-agency", "mynumber", hsm_label="kg-digital-agency-mynumber-v1")
    reg.rotate("digital-agency", "mynumber", hsm_label="kg-digital-agency-mynumber-v2")
    reg.rotate("digital-agency", "mynumber", hsm_label=LABELS["digital-agency/mynumber/v3"])
    reg.add_key("131016", "tax", hsm_label="kg-131016-tax-v1")
    reg.rotate("131016", "tax", hsm_label="kg-131016-tax-v2")
    return reg


def _manager() -> KeyManager:
    hsm = SoftwareKeyWrapper({LABELS[ref]: kek for ref, kek in KEKS.items()})
    return KeyManager(registry=_registry(), hsm=hsm, rng=SystemRandom())


_BASES = {v["comment"]: v for v in POSITIVE}


@pytest.mark.parametrize("vector", POSITIVE, ids=_ids(POSITIVE))
def test_keygate_parser_and_data_key_open_positive_vector(vector: dict[str, Any]) -> None:
    """parse_header, DataKey.from_header and DataKey.open recover the plaintext."""
    env = from_text(vector["text"])
    assert env.hex() == vector["envelope"]
    header = parse_header(env)
    assert header.key_ref == KeyRef(vector["tenant"], vector["purpose"], vector["version"])
    assert header.length == vector["header_len"]
    key = DataKey.from_header(bytes.fromhex(vector["dek"]), header)
    assert key.header == env[: header.length]
    aad = bytes.fromhex(vector["aad"])
    assert key.open(env, aad).hex() == vector["plaintext"]


@pytest.mark.parametrize("vector", POSITIVE, ids=_ids(POSITIVE))
def test_key_manager_decrypts_positive_vector(vector: dict[str, Any]) -> None:
    """A KeyManager over the vector KEKs decrypts each vector (two-layer: ProviderRejected)."""
    km = _manager()
    env = bytes.fromhex(vector["envelope"])
    if not vector["hsm_unwrappable"]:
        with pytest.raises(ProviderRejected):
            km.decrypt(vector["tenant"], vector["purpose"], vector["context"], env)
        return
    for _ in range(2):  # cold, then from the decrypt cache
        pt = km.decrypt(vector["tenant"], vector["purpose"], vector["context"], env)
        assert pt.hex() == vector["plaintext"]


@pytest.mark.parametrize("vector", NEGATIVE, ids=_ids(NEGATIVE))
def test_keygate_low_level_rejects_negative_vector(vector: dict[str, Any]) -> None:
    """parse_header, unwrap, DataKey.from_header and open end in DecryptionFailed."""
    env = bytes.fromhex(vector["envelope"])
    hsm = SoftwareKeyWrapper({LABELS[ref]: kek for ref, kek in KEKS.items()})
    with pytest.raises(DecryptionFailed):
        header = parse_header(env)
        ref = header.key_ref
        if (ref.tenant, ref.purpose) != (vector["tenant"], vector["purpose"]):
            raise DecryptionFailed()
        label = LABELS.get(f"{ref.tenant}/{ref.purpose}/v{ref.version}", "no such KEK")
        dek = hsm.unwrap_dek(
            label, header.chain[0].mechanism, header.wrapped_dek, aad=inner_wrap_aad(ref)
        )
        key = DataKey.from_header(dek, header)
        if key.header != env[: header.length]:
            raise DecryptionFailed()
        aad = encode_context(aad_prefix(SUITE, ref.tenant, ref.purpose), vector["context"])
        key.open(env, aad)


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("vector", NEGATIVE, ids=_ids(NEGATIVE))
def test_key_manager_rejects_negative_vector(vector: dict[str, Any], cache: str) -> None:
    """KeyManager.decrypt raises DecryptionFailed, whether or not the base header is cached."""
    km = _manager()
    base = _BASES[vector["base"]]
    if cache == "warm":
        base_env = bytes.fromhex(base["envelope"])
        assert (
            km.decrypt(base["tenant"], base["purpose"], base["context"], base_env).hex()
            == (base["plaintext"])
        )
    with pytest.raises(DecryptionFailed):
        km.decrypt(
            vector["tenant"],
            vector["purpose"],
            vector["context"],
            bytes.fromhex(vector["envelope"]),
        )


_SAME_TENANT = [v for v in NEGATIVE if v["tenant"] == _BASES[v["base"]]["tenant"]]


@pytest.mark.parametrize("vector", _SAME_TENANT, ids=_ids(_SAME_TENANT))
def test_key_manager_batch_rejects_negative_vector_in_its_slot(vector: dict[str, Any]) -> None:
    """decrypt_many puts DecryptionFailed in the negative vector's slot and opens its neighbours."""
    km = _manager()
    base = _BASES[vector["base"]]
    base_env = bytes.fromhex(base["envelope"])
    items = [
        (base["context"], base_env),
        (vector["context"], bytes.fromhex(vector["envelope"])),
        (base["context"], base_env),
    ]
    out = km.decrypt_many(base["tenant"], base["purpose"], items)
    assert isinstance(out[1], DecryptionFailed)
    assert out[0] == out[2] == bytes.fromhex(base["plaintext"])


@pytest.mark.parametrize("vector", TEXT_NEGATIVE, ids=_ids(TEXT_NEGATIVE))
def test_text_form_negative_vector_is_rejected(vector: dict[str, Any]) -> None:
    """A malformed or non-canonical text form never reaches a plaintext: DecryptionFailed."""
    base = _BASES[vector["base"]]
    km = _manager()
    with pytest.raises(DecryptionFailed):
        km.decrypt(base["tenant"], base["purpose"], base["context"], from_text(vector["text"]))


@pytest.mark.parametrize("vector", TEXT_NEGATIVE, ids=_ids(TEXT_NEGATIVE))
def test_from_text_rejects_non_canonical_text_negative_vector(vector: dict[str, Any]) -> None:
    """from_text refuses every malformed text form; the canonical ones decode to their own text."""
    if vector["from_text_accepts"]:
        assert to_text(from_text(vector["text"])) == vector["text"]
        return
    with pytest.raises(DecryptionFailed):
        from_text(vector["text"])
