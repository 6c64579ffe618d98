"""Generate the golden envelope vectors ``envelope_v1.json`` from fixed inputs.

Run from the repository root::

    python tests/vectors/generate_vectors.py          # rewrite tests/vectors/envelope_v1.json
    python tests/vectors/generate_vectors.py --check  # exit 1 if the file is out of date

Every input is fixed (KEKs, DEKs, the HSM wrap IVs, record nonces, tenants, purposes, versions,
contexts, plaintexts), and the envelopes are made by keygate's own code (``DataKey``, ``seal``,
``aad_prefix``/``encode_context``, ``build_header``, ``to_text``).  The HSM wrap of each DEK is
simulated here exactly as the PKCS#11 adapter's ``HSM_AES_GCM`` mechanism does it
(``iv || AES-256-GCM(KEK, iv, DEK, aad=inner_wrap_aad(key_ref))``), with a fixed IV.

The output must never change once released: ``tests/vectors/test_golden.py`` re-generates every
vector and compares it byte for byte, and checks each positive vector with an independent
implementation.  A change of the format needs a new format version and a new vector file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from keygate.core.aead import derive_key_commitment
from keygate.core.context import aad_prefix, encode_context
from keygate.core.envelope import DataKey, inner_wrap_aad
from keygate.core.model import AlgorithmSuite, KeyRef, WrapMechanism
from keygate.core.wire import MIN_ENVELOPE_LEN, WrapLayer, build_header, to_text

OUT: Final = Path(__file__).with_name("envelope_v1.json")
SUITE: Final = AlgorithmSuite.AES256_GCM_HKDF_SHA256_COMMIT
HSM: Final = WrapMechanism.HSM_AES_GCM


def _fixed(tag: str, n: int) -> bytes:
    """Fixed, nothing-up-my-sleeve bytes: the first n bytes of SHA-256 chained over ``tag``."""
    out = b""
    block = tag.encode()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return out[:n]


# ---------------------------------------------------------------------------- fixed key material
#: KEKs as held by the HSM, per key reference; the label is the HSM object label.
KEKS: Final = {
    "131016/resident/v1": ("kg-131016-resident-v1", bytes(range(0x20))),
    "131024/resident/v1": ("kg-131024-resident-v1", bytes(range(0x20, 0x40))),
    "digital-agency/mynumber/v3": (
        "kg-digital-agency-mynumber-v3",
        _fixed("KEK digital-agency", 32),
    ),
}

#: One DEK per key header.  ``wrap_iv`` is the IV the (simulated) HSM used to wrap it.
DEKS: Final = {
    "A": {
        "key_ref": KeyRef("131016", "resident", 1),
        "dek": bytes(range(0x40, 0x60)),
        "wrap_iv": bytes(range(0x60, 0x6C)),
    },
    "A2": {
        "key_ref": KeyRef("131016", "resident", 1),
        "dek": _fixed("DEK A2", 32),
        "wrap_iv": _fixed("wrap IV A2", 12),
    },
    "B": {
        "key_ref": KeyRef("digital-agency", "mynumber", 3),
        "dek": _fixed("DEK B", 32),
        "wrap_iv": _fixed("wrap IV B", 12),
    },
    "C": {
        "key_ref": KeyRef("131016", "tax", 2),
        "dek": _fixed("DEK C", 32),
        "wrap_iv": b"",
    },
}

#: An outer (cloud KMS) layer for the two-layer vector: its output is opaque to the tests.
AWS_KEY_ID: Final = (
    b"aws-kms://arn:aws:kms:ap-northeast-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
)
OUTER_WRAPPED: Final = _fixed("opaque AWS KMS ciphertext blob", 184)

JA_NAME: Final = "山田太郎"
JA_ADDRESS: Final = "東京都千代田区霞が関二丁目1番2号 〒100-8926"


def _kek_ref(ref: KeyRef) -> str:
    return f"{ref.tenant}/{ref.purpose}/v{ref.version}"


def hsm_wrap(name: str) -> bytes:
    """The simulated HSM_AES_GCM wrap of DEK ``name`` under its KEK, with its fixed IV."""
    d = DEKS[name]
    ref: KeyRef = d["key_ref"]  # type: ignore[assignment]
    _, kek = KEKS[_kek_ref(ref)]
    iv: bytes = d["wrap_iv"]  # type: ignore[assignment]
    return iv + AESGCM(kek).encrypt(iv, d["dek"], inner_wrap_aad(ref))  # type: ignore[arg-type]


def data_key(name: str) -> DataKey:
    d = DEKS[name]
    ref: KeyRef = d["key_ref"]  # type: ignore[assignment]
    if name == "C":
        chain: tuple[WrapLayer, ...] = (
            WrapLayer(HSM),
            WrapLayer(WrapMechanism.AWS_KMS, AWS_KEY_ID),
        )
        wrapped = OUTER_WRAPPED
    else:
        chain = (WrapLayer(HSM),)
        wrapped = hsm_wrap(name)
    return DataKey(d["dek"], suite=SUITE, key_ref=ref, chain=chain, wrapped_dek=wrapped)  # type: ignore[arg-type]


def nonce(i: int) -> bytes:
    return bytes.fromhex("cafef00d0000000000000000")[:-1] + bytes((i,))


# ---------------------------------------------------------------------------- positive vectors
CTX_JA: Final = {"record_id": "R-000123", "field": "氏名"}

POSITIVE: Final = [
    # (comment, DEK, nonce index, context, plaintext)
    ("resident v1, empty plaintext, empty context", "A", 1, {}, b""),
    ("resident v1, Japanese name, record_id and field context", "A", 2, CTX_JA, JA_NAME.encode()),
    (
        "resident v1, 64-byte plaintext 00..3f",
        "A",
        3,
        {"record_id": "R-000124", "field": "blob"},
        bytes(range(64)),
    ),
    (
        "resident v1, 1 KiB plaintext",
        "A",
        4,
        {"record_id": "R-000125", "field": "attachment"},
        bytes(i * 7 % 256 for i in range(1024)),
    ),
    (
        "resident v1, Japanese address, adversarial context values with NUL and digits",
        "A",
        5,
        {"field": "住所", "note": "1\x002\x00", "x": "", "y.z-0_": "\x00\x00"},
        JA_ADDRESS.encode(),
    ),
    (
        "resident v1, second DEK of the same key, Japanese name",
        "A2",
        6,
        CTX_JA,
        JA_NAME.encode(),
    ),
    (
        "mynumber v3, slug tenant, My Number plaintext",
        "B",
        7,
        {"record_id": "P-7", "field": "個人番号"},
        b"123456789018",
    ),
    (
        "tax v2, two-layer wrap chain (HSM then AWS KMS key id), opaque outer wrap",
        "C",
        8,
        {"record_id": "T-1"},
        "課税標準額 1234000".encode(),
    ),
]


def _data_key_bytes(dek: bytes) -> bytes:
    """The suite's AES-256-GCM key (aead.py keeps it inside an AESGCM object), for the record."""
    return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=b"keygate/v1 data key").derive(dek)


def _text_or_none(b: bytes) -> str | None:
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return s if s.isprintable() else None


def _positive(comment: str, name: str, i: int, ctx: dict[str, str], pt: bytes) -> dict[str, Any]:
    key = data_key(name)
    ref = key.key_ref
    d = DEKS[name]
    aad = encode_context(aad_prefix(SUITE, ref.tenant, ref.purpose), ctx)
    n = nonce(i)
    env = key.seal(pt, aad, n)
    return {
        "comment": comment,
        "tenant": ref.tenant,
        "purpose": ref.purpose,
        "version": ref.version,
        "suite": int(SUITE),
        "chain": [
            {"mechanism": int(layer.mechanism), "key_id": layer.key_id.hex()} for layer in key.chain
        ],
        "hsm_unwrappable": len(key.chain) == 1,
        "kek_ref": _kek_ref(ref) if len(key.chain) == 1 else None,
        "dek": d["dek"].hex(),  # type: ignore[union-attr]
        "wrap_iv": d["wrap_iv"].hex(),  # type: ignore[union-attr]
        "wrapped_dek": (OUTER_WRAPPED if name == "C" else hsm_wrap(name)).hex(),
        "data_key": _data_key_bytes(d["dek"]).hex(),  # type: ignore[arg-type]
        "commitment": key.commitment.hex(),
        "context": ctx,
        "aad": aad.hex(),
        "plaintext": pt.hex(),
        "plaintext_utf8": _text_or_none(pt),
        "nonce": n.hex(),
        "header_len": key.header_len,
        "header": key.header.hex(),
        "envelope": env.hex(),
        "text": to_text(env),
    }


# ---------------------------------------------------------------------------- negative vectors
def _offsets(env: bytes) -> dict[str, int]:
    """Offsets of the fields of a one-layer envelope (for building the negative vectors)."""
    o: dict[str, int] = {"version": 0, "suite": 1, "header_len": 2, "tenant_len": 4}
    o["tenant"] = 5
    o["purpose_len"] = 5 + env[4]
    o["purpose"] = o["purpose_len"] + 1
    o["kek_version"] = o["purpose"] + env[o["purpose_len"]]
    o["chain_len"] = o["kek_version"] + 4
    o["mechanism"] = o["chain_len"] + 1
    o["key_id_len"] = o["mechanism"] + 1
    o["wrapped_len"] = o["key_id_len"] + 2
    o["wrapped"] = o["wrapped_len"] + 2
    o["commitment"] = o["wrapped"] + int.from_bytes(env[o["wrapped_len"] : o["wrapped"]], "big")
    o["nonce"] = o["commitment"] + 32
    o["ciphertext"] = o["nonce"] + 12
    o["tag"] = len(env) - 16
    return o


def _set(env: bytes, off: int, new: bytes) -> bytes:
    return env[:off] + new + env[off + len(new) :]


def _flip(env: bytes, off: int, mask: int = 0x01) -> bytes:
    return _set(env, off, bytes((env[off] ^ mask,)))


def _rebuild(
    env: bytes,
    *,
    tenant: str | None = None,
    purpose: str | None = None,
    version: int | None = None,
    commitment: bytes | None = None,
) -> bytes:
    """The envelope with a well-formed header naming other values; the rest unchanged."""
    key = data_key("A")
    ref = key.key_ref
    header = build_header(
        SUITE,
        KeyRef(tenant or ref.tenant, purpose or ref.purpose, version or ref.version),
        key.chain,
        hsm_wrap("A"),
        commitment or key.commitment,
    )
    return header + env[key.header_len :]


def _negatives(base: dict[str, Any], small: dict[str, Any]) -> list[dict[str, Any]]:
    env = bytes.fromhex(base["envelope"])
    o = _offsets(env)
    h = base["header_len"]
    ctx: dict[str, str] = base["context"]
    out: list[tuple[str, bytes, dict[str, str], str]] = []

    def add(
        comment: str, e: bytes, c: dict[str, str] | None = None, tenant: str = "131016"
    ) -> None:
        out.append((comment, e, ctx if c is None else c, tenant))

    # One flipped bit in every header field, the nonce, the ciphertext and the tag.
    add("flipped bit: format version", _flip(env, o["version"]))
    add("flipped bit: suite", _flip(env, o["suite"], 0x80))
    add("flipped bit: header length high byte", _flip(env, o["header_len"]))
    add("flipped bit: header length low byte", _flip(env, o["header_len"] + 1))
    add("flipped bit: tenant length", _flip(env, o["tenant_len"]))
    add("flipped bit: tenant first byte", _flip(env, o["tenant"]))
    add("flipped bit: purpose length", _flip(env, o["purpose_len"]))
    add("flipped bit: purpose last byte", _flip(env, o["kek_version"] - 1))
    add("flipped bit: KEK version high byte", _flip(env, o["kek_version"]))
    add("flipped bit: KEK version low byte", _flip(env, o["kek_version"] + 3, 0x02))
    add("flipped bit: wrap chain length", _flip(env, o["chain_len"], 0x02))
    add("flipped bit: wrap mechanism (AES-GCM to KWP)", _flip(env, o["mechanism"], 0x02))
    add("flipped bit: key id length", _flip(env, o["key_id_len"] + 1))
    add("flipped bit: wrapped DEK length", _flip(env, o["wrapped_len"] + 1))
    add("flipped bit: wrapped DEK IV", _flip(env, o["wrapped"]))
    add("flipped bit: wrapped DEK tag", _flip(env, o["commitment"] - 1))
    add("flipped bit: commitment first byte", _flip(env, o["commitment"]))
    add("flipped bit: commitment last byte", _flip(env, o["nonce"] - 1, 0x80))
    add("flipped bit: nonce", _flip(env, o["nonce"]))
    add("flipped bit: ciphertext", _flip(env, o["ciphertext"]))
    add("flipped bit: tag last byte", _flip(env, len(env) - 1, 0x80))
    # Unknown or impossible identifiers and lengths.
    add("unknown format version 0x02", _set(env, 0, b"\x02"))
    add("unknown suite 0x02", _set(env, 1, b"\x02"))
    add("suite 0x00", _set(env, 1, b"\x00"))
    add("header length 0xffff", _set(env, 2, b"\xff\xff"))
    add("header length one short", _set(env, 2, (h - 1).to_bytes(2, "big")))
    add("header length one long", _set(env, 2, (h + 1).to_bytes(2, "big")))
    add("tenant length 0", _set(env, o["tenant_len"], b"\x00"))
    add("tenant length 65", _set(env, o["tenant_len"], b"\x41"))
    add("tenant byte 0xff (not ASCII)", _set(env, o["tenant"], b"\xff"))
    add("tenant byte NUL", _set(env, o["tenant"], b"\x00"))
    add("KEK version 0", _set(env, o["kek_version"], b"\x00\x00\x00\x00"))
    add("KEK version 2^31", _set(env, o["kek_version"], b"\x80\x00\x00\x00"))
    add("wrap chain length 0", _set(env, o["chain_len"], b"\x00"))
    add("wrap chain length 4", _set(env, o["chain_len"], b"\x04"))
    add("wrap mechanism 0xff (unknown)", _set(env, o["mechanism"], b"\xff"))
    add("wrap mechanism AWS KMS as the innermost layer", _set(env, o["mechanism"], b"\x10"))
    add("wrap mechanism HSM AES-KW (known, wrong)", _set(env, o["mechanism"], b"\x02"))
    add("key id length 0xffff", _set(env, o["key_id_len"], b"\xff\xff"))
    add("wrapped DEK length 0", _set(env, o["wrapped_len"], b"\x00\x00"))
    add("wrapped DEK length 2049", _set(env, o["wrapped_len"], (2049).to_bytes(2, "big")))
    add("wrapped DEK length 0xffff", _set(env, o["wrapped_len"], b"\xff\xff"))
    add(
        "extra byte inside the header (header length adjusted)",
        _set(env[:h] + b"\x00" + env[h:], 2, (h + 1).to_bytes(2, "big")),
    )
    # Key commitment and header substitution.
    add(
        "commitment of another DEK",
        _rebuild(env, commitment=derive_key_commitment(DEKS["A2"]["dek"])),  # type: ignore[arg-type]
    )
    add(
        "header of another DEK of the same key (valid header, wrong DEK for the ciphertext)",
        data_key("A2").header + env[h:],
    )
    add("header names KEK version 2 (not in the registry)", _rebuild(env, version=2))
    add(
        "header tenant rewritten to 131024 and presented as 131024 (cross-tenant)",
        _rebuild(env, tenant="131024"),
        tenant="131024",
    )
    add(
        "header tenant rewritten to 131024, presented as 131016",
        _rebuild(env, tenant="131024"),
    )
    add("header purpose rewritten to tax", _rebuild(env, purpose="tax"))
    add("valid envelope presented as tenant 131024", env, tenant="131024")
    # Truncation and extension.
    for n, what in [
        (0, "empty"),
        (3, "3 bytes"),
        (MIN_ENVELOPE_LEN - 1, "MIN_ENVELOPE_LEN - 1 bytes"),
        (h - 1, "header minus one byte"),
        (h, "header only"),
        (h + 7, "header and 7 nonce bytes"),
        (h + 12, "header and nonce"),
        (h + 12 + 15, "header, nonce and 15 bytes"),
        (len(env) - 1, "last byte dropped"),
    ]:
        add(f"truncated to {what}", env[:n])
    add("extended by one zero byte", env + b"\x00")
    add("extended by a repeated tag", env + env[-16:])
    add(
        "record of another envelope spliced after this header",
        env[:h] + bytes.fromhex(small["envelope"])[small["header_len"] :],
    )
    # Wrong context.
    add("context value changed", env, {**ctx, "field": "氏名カナ"})
    add("context pair added", env, {**ctx, "extra": ""})
    add("context pair removed", env, {"record_id": ctx["record_id"]})
    add("empty context", env, {})
    add("context key renamed", env, {"record_id": ctx["record_id"], "field_": ctx["field"]})
    add(
        "both pairs folded into the field value (NUL record_id NUL 8 NUL R-000123 appended)",
        env,
        {"field": "氏名\x00record_id\x008\x00R-000123"},
    )
    return [
        {
            "comment": c,
            "base": base["comment"],
            "tenant": t,
            "purpose": "resident",
            "context": cx,
            "envelope": e.hex(),
            "expect": "DecryptionFailed",
        }
        for c, e, cx, t in out
    ]


_B64: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _text_negatives(vec: dict[str, Any]) -> list[dict[str, str]]:
    text: str = vec["text"]
    env = bytes.fromhex(vec["envelope"])
    assert len(env) % 3 == 1, "the chosen vector must need two '=' of padding"
    body = text[4:]
    last = _B64.index(body[-1])
    non_canonical = text[:-1] + _B64[last | 1]
    i = next(k for k, ch in enumerate(body) if ch in "-_")
    std = text[: 4 + i] + {"-": "+", "_": "/"}[body[i]] + text[4 + i + 1 :]
    swapped = text[:10] + text[11] + text[10] + text[12:]
    assert swapped != text, "pick two different characters to swap"
    # (comment, text, whether from_text accepts it: canonical base64url of some other bytes)
    cases = [
        ("padded with ==", text + "==", False),
        ("standard base64 alphabet (+ or /)", std, False),
        ("non-canonical trailing bits", non_canonical, False),
        ("trailing newline", text + "\n", False),
        ("leading space", " " + text, False),
        ("space inside", text[:20] + " " + text[20:], False),
        ("full-width character inside", text[:20] + "Ａ" + text[21:], False),
        ("wrong prefix kg2.", "kg2." + body, False),
        ("upper-case prefix KG1.", "KG1." + body, False),
        ("no prefix", body, False),
        ("one character dropped (length 1 mod 4 after the prefix)", text[:-2] + text[-1:], False),
        ("prefix only (decodes to an empty envelope)", "kg1.", True),
        ("one extra character (decodes to one more byte)", text + "A", True),
        ("two characters swapped (decodes to other bytes)", swapped, True),
    ]
    return [
        {
            "comment": f"text form: {c}",
            "base": vec["comment"],
            "text": t,
            "from_text_accepts": accepts,
            "expect": "DecryptionFailed",
        }
        for c, t, accepts in cases
    ]


def build_vectors() -> dict[str, Any]:
    """Every vector, as written to ``envelope_v1.json``."""
    positive = [_positive(*p) for p in POSITIVE]
    by_comment = {v["comment"]: v for v in positive}
    base = by_comment["resident v1, Japanese name, record_id and field context"]
    small = by_comment["resident v1, 64-byte plaintext 00..3f"]
    return {
        "description": (
            "Golden vectors of the keygate envelope v1 (docs/envelope.md).  Generated by "
            "tests/vectors/generate_vectors.py; never edit by hand."
        ),
        "format_version": 1,
        "suite": int(SUITE),
        "keks": [
            {"kek_ref": ref, "hsm_label": label, "kek": kek.hex()}
            for ref, (label, kek) in KEKS.items()
        ],
        "base_offsets": _offsets(bytes.fromhex(base["envelope"])),
        "positive": positive,
        "negative": _negatives(base, small),
        # The empty-plaintext vector: with the header a multiple of 3 bytes, its length leaves
        # one byte in the last base64 group (two '=' of padding in padded base64).
        "text_negative": _text_negatives(by_comment["resident v1, empty plaintext, empty context"]),
    }


def render(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, ensure_ascii=False, indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render(build_vectors())
    if "--check" in argv:
        if OUT.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"{OUT} is out of date\n")
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
