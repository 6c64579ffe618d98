"""Envelope v1 wire format: every bound at its edge and one past it, round trips, hostile input."""

from __future__ import annotations

import base64
import contextlib
import struct

import pytest

from keygate.core.errors import DecryptionFailed, InvalidRequest
from keygate.core.model import (
    MAX_PURPOSE_LEN,
    MAX_TENANT_LEN,
    AlgorithmSuite,
    KeyRef,
    WrapMechanism,
)
from keygate.core.wire import (
    MAX_CHAIN_LEN,
    MAX_ENVELOPE_LEN,
    MAX_HEADER_LEN,
    MAX_KEY_ID_LEN,
    MAX_PLAINTEXT_LEN,
    MAX_WRAPPED_LEN,
    MIN_ENVELOPE_LEN,
    TEXT_PREFIX,
    WrapLayer,
    build_header,
    from_text,
    header_length,
    parse_header,
    to_text,
)

pytestmark = pytest.mark.unit

SUITE = AlgorithmSuite.AES256_GCM_HKDF_SHA256_COMMIT
HSM = WrapLayer(WrapMechanism.HSM_AES_GCM)
AWS = WrapLayer(WrapMechanism.AWS_KMS, b"aws-kms://arn:aws:kms:ap-northeast-1:1:key/k")
GCP = WrapLayer(WrapMechanism.GCP_KMS, b"gcp-kms://projects/p/locations/asia-northeast1/k")
REF = KeyRef("131016", "resident", 1)
WRAPPED = bytes(range(60))
COMMIT = bytes(range(100, 132))
#: the body after a header when the plaintext is empty: nonce and tag
EMPTY_BODY = bytes(12 + 16)


def header(
    ref: KeyRef = REF,
    chain: tuple[WrapLayer, ...] = (HSM,),
    wrapped: bytes = WRAPPED,
    commitment: bytes = COMMIT,
) -> bytes:
    return build_header(SUITE, ref, chain, wrapped, commitment)


def envelope(hdr: bytes | None = None, body: bytes = EMPTY_BODY) -> bytes:
    return (header() if hdr is None else hdr) + body


def minimal_header() -> bytes:
    return header(KeyRef("t", "p", 1), wrapped=b"\x01")


def raw_header(
    *,
    tenant: bytes = b"131016",
    tenant_len: int | None = None,
    purpose: bytes = b"resident",
    version: int = 1,
    layers: list[tuple[int, bytes]] | None = None,
    chain_len: int | None = None,
    wrapped: bytes = WRAPPED,
    wrapped_len: int | None = None,
    commitment: bytes = COMMIT,
    header_len: int | None = None,
    fmt: int = 1,
    suite: int = 1,
    pad: bytes | None = None,
) -> bytes:
    """A header written byte by byte, so any field can hold a value build_header would refuse."""
    layers = [(0x01, b"")] if layers is None else layers
    body = bytes((len(tenant) if tenant_len is None else tenant_len,)) + tenant
    body += bytes((len(purpose),)) + purpose + struct.pack(">I", version)
    body += bytes((len(layers) if chain_len is None else chain_len,))
    for mech, key_id in layers:
        body += bytes((mech,)) + struct.pack(">H", len(key_id)) + key_id
    body += struct.pack(">H", len(wrapped) if wrapped_len is None else wrapped_len) + wrapped
    body += commitment
    body += b"\x00" * (-(4 + len(body)) % 3) if pad is None else pad
    n = 4 + len(body) if header_len is None else header_len
    return struct.pack(">BBH", fmt, suite, n) + body


# ============================================================================ round trip
@pytest.mark.parametrize(
    "chain",
    [(HSM,), (HSM, AWS), (HSM, AWS, GCP), (WrapLayer(WrapMechanism.HSM_AES_KWP),)],
    ids=["hsm", "hsm+aws", "hsm+aws+gcp", "kwp"],
)
def test_build_parse_round_trip(chain: tuple[WrapLayer, ...]) -> None:
    """parse_header returns exactly the fields build_header wrote, and the header's length."""
    hdr = header(chain=chain)
    parsed = parse_header(envelope(hdr))
    assert parsed.suite is SUITE
    assert parsed.key_ref == REF
    assert parsed.chain == chain
    assert parsed.wrapped_dek == WRAPPED
    assert parsed.commitment == COMMIT
    assert parsed.length == len(hdr) == header_length(envelope(hdr))


def test_header_layout_is_byte_exact() -> None:
    """The header has exactly the documented layout, byte for byte."""
    hdr = header()
    expected = (
        b"\x01\x01" + struct.pack(">H", len(hdr)) + b"\x06131016" + b"\x08resident"
        b"\x00\x00\x00\x01" + b"\x01" + b"\x01\x00\x00" + b"\x00\x3c" + WRAPPED + COMMIT
    )
    expected += b"\x00" * (-len(expected) % 3)  # zero padding to a multiple of 3 bytes
    assert len(hdr) % 3 == 0
    assert hdr == expected
    assert hdr == raw_header()


def test_key_header_repr_hides_wrapped_dek_and_commitment() -> None:
    """KeyHeader's repr names the key but not the wrapped DEK or the commitment."""
    text = repr(parse_header(envelope()))
    assert "131016" in text
    assert WRAPPED.hex() not in text
    assert repr(WRAPPED) not in text
    assert repr(COMMIT) not in text


# ============================================================================ bounds: build
@pytest.mark.parametrize("field", ["tenant", "purpose"])
def test_tenant_and_purpose_length_edges_when_building(field: str) -> None:
    """Tenant and purpose are 1..64 ASCII characters: 64 builds and parses, 65 and 0 are refused."""
    limit = MAX_TENANT_LEN if field == "tenant" else MAX_PURPOSE_LEN
    assert limit == 64

    def ref(value: str) -> KeyRef:
        return KeyRef(value, "resident", 1) if field == "tenant" else KeyRef("131016", value, 1)

    ok = parse_header(envelope(header(ref("a" * limit))))
    assert getattr(ok.key_ref, field) == "a" * limit
    for bad in ("a" * (limit + 1), ""):
        with pytest.raises(InvalidRequest):
            header(ref(bad))


@pytest.mark.parametrize("value", ["東京都", "131016é", "ab\x00cd", "\x00"])
def test_non_ascii_or_nul_tenant_is_refused_when_building(value: str) -> None:
    """A tenant or purpose that is not ASCII, or that holds NUL, cannot be written into a header."""
    with pytest.raises(InvalidRequest):
        header(KeyRef(value, "resident", 1))
    with pytest.raises(InvalidRequest):
        header(KeyRef("131016", value, 1))


@pytest.mark.parametrize(
    ("version", "ok"), [(0, False), (1, True), (2**31 - 1, True), (2**31, False)]
)
def test_kek_version_edges_when_building(version: int, ok: bool) -> None:
    """The KEK version is 1..2^31-1."""
    ref = KeyRef("131016", "resident", version)
    if ok:
        assert parse_header(envelope(header(ref))).key_ref.version == version
    else:
        with pytest.raises(ValueError, match="version"):
            header(ref)


def test_chain_length_edges_when_building() -> None:
    """A wrap chain has 1..3 layers: 3 builds, 0 and 4 are refused."""
    assert MAX_CHAIN_LEN == 3
    assert len(parse_header(envelope(header(chain=(HSM, AWS, GCP)))).chain) == 3
    with pytest.raises(ValueError, match="layers"):
        header(chain=())
    with pytest.raises(ValueError, match="layers"):
        header(chain=(HSM, AWS, GCP, AWS))


def test_chain_shape_rules_when_building() -> None:
    """The innermost layer, and only it, is the HSM; it has no key id; provider layers have one."""
    with pytest.raises(ValueError):
        header(chain=(AWS,))
    with pytest.raises(ValueError):
        header(chain=(HSM, HSM))
    with pytest.raises(ValueError):
        header(chain=(WrapLayer(WrapMechanism.HSM_AES_GCM, b"x"),))
    with pytest.raises(ValueError):
        header(chain=(HSM, WrapLayer(WrapMechanism.AWS_KMS, b"")))


def test_key_id_length_edges_when_building() -> None:
    """A provider key id is 1..512 bytes: 512 builds and parses, 513 is refused."""
    assert MAX_KEY_ID_LEN == 512
    for n in (1, MAX_KEY_ID_LEN):
        layer = WrapLayer(WrapMechanism.AWS_KMS, b"k" * n)
        assert parse_header(envelope(header(chain=(HSM, layer)))).chain[1] == layer
    with pytest.raises(ValueError, match="key id"):
        header(chain=(HSM, WrapLayer(WrapMechanism.AWS_KMS, b"k" * (MAX_KEY_ID_LEN + 1))))


def test_wrapped_dek_length_edges_when_building() -> None:
    """The wrapped DEK is 1..2048 bytes: 1 and 2048 build and parse, 0 and 2049 are refused."""
    assert MAX_WRAPPED_LEN == 2048
    for n in (1, MAX_WRAPPED_LEN):
        assert parse_header(envelope(header(wrapped=b"w" * n))).wrapped_dek == b"w" * n
    for n in (0, MAX_WRAPPED_LEN + 1):
        with pytest.raises(ValueError, match="wrapped"):
            header(wrapped=b"w" * n)


@pytest.mark.parametrize("n", [0, 31, 33])
def test_commitment_must_be_32_bytes_when_building(n: int) -> None:
    """The key commitment is exactly 32 bytes."""
    with pytest.raises(ValueError, match="commitment"):
        header(commitment=bytes(n))


def test_largest_possible_header_fits_the_header_bound() -> None:
    """Every field at its maximum still gives a header below MAX_HEADER_LEN."""
    big = header(
        KeyRef("t" * 64, "p" * 64, 2**31 - 1),
        chain=(
            HSM,
            WrapLayer(WrapMechanism.AWS_KMS, b"k" * 512),
            WrapLayer(WrapMechanism.GCP_KMS, b"k" * 512),
        ),
        wrapped=b"w" * 2048,
    )
    unpadded = 4 + 65 + 65 + 4 + 1 + 3 + 2 * 515 + 2 + 2048 + 32
    assert len(big) == unpadded + (-unpadded % 3)
    assert len(big) <= MAX_HEADER_LEN
    assert parse_header(envelope(big)).length == len(big)


# ============================================================================ bounds: parse
@pytest.mark.parametrize("field", ["tenant", "purpose"])
@pytest.mark.parametrize(
    ("n", "ok"), [(0, False), (1, True), (64, True), (65, False), (255, False)]
)
def test_tenant_and_purpose_length_edges_when_parsing(field: str, n: int, ok: bool) -> None:
    """A tenant or purpose length byte of 0 or above 64 is refused, 1 and 64 are accepted."""
    value = b"a" * n
    hdr = raw_header(tenant=value) if field == "tenant" else raw_header(purpose=value)
    if ok:
        assert getattr(parse_header(envelope(hdr)).key_ref, field) == value.decode()
    else:
        with pytest.raises(DecryptionFailed):
            parse_header(envelope(hdr))


@pytest.mark.parametrize(
    "tenant",
    [b"13101\x80", "氏名".encode(), b"131\x0016", b"\xff" * 6],
    ids=["0x80", "utf8", "nul", "ff"],
)
def test_non_ascii_or_nul_tenant_is_refused_when_parsing(tenant: bytes) -> None:
    """Header tenant or purpose bytes outside ASCII, or containing NUL, are refused."""
    with pytest.raises(DecryptionFailed):
        parse_header(envelope(raw_header(tenant=tenant)))
    with pytest.raises(DecryptionFailed):
        parse_header(envelope(raw_header(purpose=tenant)))


def test_tenant_length_pointing_past_the_header_is_refused() -> None:
    """A tenant length larger than the rest of the header is refused, not read past the header."""
    with pytest.raises(DecryptionFailed):
        parse_header(envelope(raw_header(tenant=b"131016", tenant_len=64)))


@pytest.mark.parametrize(
    ("version", "ok"),
    [(0, False), (1, True), (2**31 - 1, True), (2**31, False), (2**32 - 1, False)],
)
def test_kek_version_edges_when_parsing(version: int, ok: bool) -> None:
    """A KEK version of 0 or at least 2^31 is refused."""
    hdr = raw_header(version=version)
    if ok:
        assert parse_header(envelope(hdr)).key_ref.version == version
    else:
        with pytest.raises(DecryptionFailed):
            parse_header(envelope(hdr))


@pytest.mark.parametrize(("n", "ok"), [(0, False), (1, True), (3, True), (4, False), (255, False)])
def test_chain_length_edges_when_parsing(n: int, ok: bool) -> None:
    """A wrap chain length byte of 0 or above 3 is refused."""
    layers = [(0x01, b"")] + [(0x10, b"k")] * (max(n, 1) - 1)
    hdr = raw_header(layers=layers if n else [], chain_len=n)
    if ok:
        assert len(parse_header(envelope(hdr)).chain) == n
    else:
        with pytest.raises(DecryptionFailed):
            parse_header(envelope(hdr))


@pytest.mark.parametrize(
    "layers",
    [
        [(0x10, b"k")],
        [(0x01, b""), (0x01, b"")],
        [(0x01, b"x")],
        [(0x01, b""), (0x10, b"")],
        [(0x00, b"")],
        [(0x04, b"")],
        [(0x01, b""), (0x16, b"k")],
        [(0xFF, b"")],
    ],
    ids=[
        "provider-innermost",
        "two-hsm-layers",
        "hsm-with-key-id",
        "provider-without-key-id",
        "mechanism-0",
        "mechanism-4",
        "mechanism-0x16",
        "mechanism-0xff",
    ],
)
def test_bad_wrap_chains_are_refused_when_parsing(layers: list[tuple[int, bytes]]) -> None:
    """Unknown mechanisms and chains of the wrong shape are refused."""
    with pytest.raises(DecryptionFailed):
        parse_header(envelope(raw_header(layers=layers)))


@pytest.mark.parametrize(("n", "ok"), [(512, True), (513, False)])
def test_key_id_length_edges_when_parsing(n: int, ok: bool) -> None:
    """A provider key id of 512 bytes parses, 513 is refused."""
    hdr = raw_header(layers=[(0x01, b""), (0x10, b"k" * n)])
    if ok:
        assert parse_header(envelope(hdr)).chain[1].key_id == b"k" * n
    else:
        with pytest.raises(DecryptionFailed):
            parse_header(envelope(hdr))


def test_huge_key_id_length_field_is_refused() -> None:
    """A key id length of 0xffff is refused before anything is read."""
    hdr = raw_header(layers=[(0x01, b""), (0x10, b"k")])
    at = hdr.index(b"\x10\x00\x01k") + 1
    bad = hdr[:at] + b"\xff\xff" + hdr[at + 2 :]
    with pytest.raises(DecryptionFailed):
        parse_header(envelope(bad))


@pytest.mark.parametrize(
    ("declared", "actual", "ok"),
    [
        (1, 1, True),
        (2048, 2048, True),
        (0, 0, False),
        (2049, 2049, False),
        (0xFFFF, 60, False),
        # Three bytes more than written: more than the 0..2 padding bytes could ever absorb.  (One
        # or two more can read as a well-formed header with other field values, whose commitment
        # then fails; the golden vectors cover that at decrypt time.)
        (63, 60, False),
        (59, 60, False),
    ],
)
def test_wrapped_dek_length_edges_when_parsing(declared: int, actual: int, ok: bool) -> None:
    """A wrapped DEK length of 0, above 2048, or disagreeing with the header is refused."""
    hdr = raw_header(wrapped=b"w" * actual, wrapped_len=declared)
    if ok:
        assert parse_header(envelope(hdr)).wrapped_dek == b"w" * actual
    else:
        with pytest.raises(DecryptionFailed):
            parse_header(envelope(hdr))


@pytest.mark.parametrize(("fmt", "suite"), [(0, 1), (2, 1), (0xFF, 1), (1, 0), (1, 2), (1, 0xFF)])
def test_unknown_format_version_or_suite_is_refused(fmt: int, suite: int) -> None:
    """Only format version 1 with suite 1 is accepted."""
    with pytest.raises(DecryptionFailed):
        header_length(envelope(raw_header(fmt=fmt, suite=suite)))
    with pytest.raises(DecryptionFailed):
        parse_header(envelope(raw_header(fmt=fmt, suite=suite)))


def test_header_length_edges() -> None:
    """H below the minimal header (51), above MAX_HEADER_LEN, or past the envelope is refused."""
    hdr = minimal_header()
    assert len(hdr) == MIN_ENVELOPE_LEN - 28 == 51
    # H = 51 is the minimal header and parses.
    assert parse_header(envelope(hdr)).length == 51
    # H = 50: refused by the cheap check.
    with pytest.raises(DecryptionFailed):
        header_length(hdr[:2] + struct.pack(">H", 50) + hdr[4:] + EMPTY_BODY)
    # H = MAX_HEADER_LEN fits the cheap check, but the fields cannot fill it: refused by the parser.
    padded = hdr[:2] + struct.pack(">H", MAX_HEADER_LEN) + hdr[4:] + bytes(MAX_HEADER_LEN - 51)
    assert header_length(padded + EMPTY_BODY) == MAX_HEADER_LEN
    with pytest.raises(DecryptionFailed):
        parse_header(padded + EMPTY_BODY)
    # H = MAX_HEADER_LEN + 1: refused by the cheap check even with enough bytes.
    over = hdr[:2] + struct.pack(">H", MAX_HEADER_LEN + 1) + hdr[4:] + bytes(MAX_HEADER_LEN - 50)
    with pytest.raises(DecryptionFailed):
        header_length(over + EMPTY_BODY)
    # H pointing past the nonce and tag.
    env = envelope(hdr)
    with pytest.raises(DecryptionFailed):
        header_length(env[:2] + struct.pack(">H", len(env) - 27) + env[4:])
    assert header_length(env[:2] + struct.pack(">H", len(env) - 28) + env[4:]) == len(env) - 28


@pytest.mark.parametrize("declared", [0, 4, 0xFFFF])
def test_zero_or_huge_header_length_is_refused(declared: int) -> None:
    """A header length field of 0, 4 or 0xffff is refused."""
    with pytest.raises(DecryptionFailed):
        parse_header(envelope(raw_header(header_len=declared)))


@pytest.mark.parametrize("delta", [-1, 1])
def test_header_length_disagreeing_with_the_fields_is_refused(delta: int) -> None:
    """H one short of, or one past, the end of the fields is refused."""
    hdr = raw_header()
    bad = hdr[:2] + struct.pack(">H", len(hdr) + delta) + hdr[4:]
    if delta > 0:
        bad += b"\x00"
    with pytest.raises(DecryptionFailed):
        parse_header(envelope(bad))


@pytest.mark.parametrize(
    "pad", [b"\x01", b"\x00\x00\x00", b"\x00\x01"], ids=["non-zero", "three", "nonzero-2"]
)
def test_header_padding_must_be_minimal_and_zero(pad: bytes) -> None:
    """Header padding is exactly the 0..2 zero bytes that make H a multiple of 3, nothing else."""
    good = raw_header()
    base = raw_header(pad=b"")
    assert len(good) - len(base) == -len(base) % 3
    bad = raw_header(pad=pad)
    with pytest.raises(DecryptionFailed):
        parse_header(envelope(bad))


def test_min_envelope_len_edge() -> None:
    """The shortest possible envelope parses; one byte less is refused."""
    env = envelope(minimal_header())
    assert len(env) == MIN_ENVELOPE_LEN == 79
    assert parse_header(env).key_ref == KeyRef("t", "p", 1)
    with pytest.raises(DecryptionFailed):
        header_length(env[:-1])
    with pytest.raises(DecryptionFailed):
        parse_header(env[:-1])


@pytest.mark.parametrize("n", [0, 1, 3, 4, 50, 78])
def test_short_inputs_are_refused(n: int) -> None:
    """Any input shorter than MIN_ENVELOPE_LEN is refused before parsing a field."""
    with pytest.raises(DecryptionFailed):
        parse_header(envelope()[:n])


def test_plaintext_limit_edge() -> None:
    """A body of nonce + MAX_PLAINTEXT_LEN + tag is accepted; one more byte is refused."""
    hdr = header()
    ok = hdr + bytes(12 + MAX_PLAINTEXT_LEN + 16)
    assert header_length(ok) == len(hdr)
    assert parse_header(ok).length == len(hdr)
    with pytest.raises(DecryptionFailed, match="too long"):
        header_length(ok + b"\x00")
    with pytest.raises(DecryptionFailed):
        parse_header(ok + b"\x00")


def test_max_envelope_len_is_the_sum_of_the_bounds() -> None:
    """MAX_ENVELOPE_LEN is the largest header plus nonce, the plaintext bound and the tag."""
    assert MAX_ENVELOPE_LEN == MAX_HEADER_LEN + 12 + MAX_PLAINTEXT_LEN + 16


def test_truncated_anywhere_before_nonce_and_tag_is_refused() -> None:
    """Cutting an envelope so that header, nonce and tag no longer fit is always refused."""
    env = envelope(header(chain=(HSM, AWS)), body=bytes(12 + 5 + 16))
    for cut in range(len(env) - 5):
        with pytest.raises(DecryptionFailed):
            parse_header(env[:cut])
    assert parse_header(env[: len(env) - 5]).chain == (HSM, AWS)


def test_flipping_any_header_byte_never_escapes_as_another_error() -> None:
    """Any value of any header byte parses or raises DecryptionFailed, never another error."""
    env = envelope(header(chain=(HSM, AWS)))
    h = header_length(env)
    for pos in range(h):
        for value in range(256):
            bad = env[:pos] + bytes((value,)) + env[pos + 1 :]
            with contextlib.suppress(DecryptionFailed):
                parse_header(bad)


# ============================================================================ text form
def test_text_form_is_prefix_plus_unpadded_base64url() -> None:
    """to_text is 'kg1.' + unpadded base64url and from_text inverts it."""
    env = envelope()
    text = to_text(env)
    assert text == TEXT_PREFIX + base64.urlsafe_b64encode(env).decode().rstrip("=")
    assert from_text(text) == env


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_text_form_round_trip_for_every_length_mod_3(n: int) -> None:
    """Bytes of every length modulo 3 (no, one or two padding characters dropped) round-trip."""
    raw = bytes(range(250, 250 - n, -1)) + b"\xfb\xff"
    assert from_text(to_text(raw)) == raw


def _bad_texts() -> list[tuple[str, object]]:
    text = to_text(envelope() + b"\xff")  # len % 3 == 1: the unpadded text drops "=="
    body = text[4:]
    plus = to_text(b"\xfb\xef\xbe")  # "-----" in base64url, "++++" in standard base64
    slash = to_text(b"\xff\xff\xff")
    return [
        ("padding ==", text + "=="),
        ("padding =", text + "="),
        ("standard alphabet +", plus.replace("-", "+")),
        ("standard alphabet /", slash.replace("_", "/")),
        ("space", text[:10] + " " + text[10:]),
        ("newline", text + "\n"),
        ("CRLF", text + "\r\n"),
        ("tab", "\t" + text),
        ("leading space before prefix", " " + text),
        ("non-ASCII letter", text[:10] + "é" + text[11:]),
        ("full-width", text[:10] + "Ａ" + text[11:]),
        ("NUL", text[:10] + "\x00" + text[11:]),
        ("dot", text[:10] + "." + text[11:]),
        ("wrong prefix", "kg2." + body),
        ("prefix case", "KG1." + body),
        ("no prefix", body),
        ("no dot", "kg1" + body),
        ("empty", ""),
        ("length 1 mod 4", text + "A" * ((1 - len(body)) % 4)),
        ("non-canonical trailing bits", text[:-1] + "B"),
        ("bytes instead of str", text.encode()),
        ("None", None),
    ]


@pytest.mark.parametrize(("name", "text"), _bad_texts(), ids=[n for n, _ in _bad_texts()])
def test_from_text_rejects_malformed_text(name: str, text: object) -> None:
    """from_text refuses padding, +/, whitespace, non-ASCII and non-canonical text."""
    with pytest.raises(DecryptionFailed):
        from_text(text)  # type: ignore[arg-type]


def test_from_text_length_edge() -> None:
    """The text of MAX_ENVELOPE_LEN bytes decodes; one byte more is refused as too long."""
    assert len(from_text(to_text(bytes(MAX_ENVELOPE_LEN)))) == MAX_ENVELOPE_LEN
    with pytest.raises(DecryptionFailed, match="too long"):
        from_text(to_text(bytes(MAX_ENVELOPE_LEN + 1)))


def test_from_text_rejects_over_long_garbage_cheaply() -> None:
    """A multi-megabyte string is refused by its length before any decoding."""
    with pytest.raises(DecryptionFailed, match="too long"):
        from_text("kg1." + "é" * (4 * MAX_ENVELOPE_LEN))


def test_from_text_of_the_bare_prefix_is_empty() -> None:
    """'kg1.' decodes to no bytes (which every decrypt path then refuses as too short)."""
    assert from_text("kg1.") == b""
    with pytest.raises(DecryptionFailed):
        parse_header(from_text("kg1."))
