"""The canonical AAD encoding of the encryption context: exact bytes, order, bounds, injectivity."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keygate.core.context import aad_prefix, encode_context, validate_context_key
from keygate.core.errors import InvalidRequest
from keygate.core.model import (
    MAX_CONTEXT_KEY_LEN,
    MAX_CONTEXT_PAIRS,
    MAX_CONTEXT_VALUE_LEN,
    AlgorithmSuite,
)

pytestmark = pytest.mark.unit

SUITE = AlgorithmSuite.AES256_GCM_HKDF_SHA256_COMMIT
PREFIX = aad_prefix(SUITE, "131016", "resident")


def test_documented_example_bytes() -> None:
    """The documented example (131016 / resident / record_id, field) encodes to its bytes."""
    aad = encode_context(PREFIX, {"record_id": "R-000123", "field": "氏名"})
    expected = (
        b"kg1\x001\x00131016\x00resident"
        b"\x00field\x002\x00\xe6\xb0\x8f\xe5\x90\x8d"
        b"\x00record_id\x008\x00R-000123"
    )
    assert aad == expected
    assert aad.hex() == (
        "6b6731003100313331303136007265736964656e74"
        "006669656c64003200e6b08fe5908d"
        "007265636f72645f6964003800522d303030313233"
    )


def test_empty_context_is_the_prefix_alone() -> None:
    """With no pairs the AAD is just 'kg1' NUL suite NUL tenant NUL purpose."""
    assert encode_context(PREFIX, {}) == b"kg1\x001\x00131016\x00resident"


def test_pair_order_does_not_matter() -> None:
    """Pairs are sorted by key (code-point order), so insertion order never changes the bytes."""
    pairs = [("record_id", "R-1"), ("field", "氏名"), ("Z", "z"), ("a.b", ""), ("_", "x")]
    encodings = {encode_context(PREFIX, dict(p)) for p in itertools.permutations(pairs)}
    assert len(encodings) == 1
    (aad,) = encodings
    keys = [k for k, _ in sorted(pairs)]
    positions = [aad.index(b"\x00" + k.encode() + b"\x00") for k in keys]
    assert positions == sorted(positions)


def test_value_length_counts_code_points_not_bytes() -> None:
    """The length written before a value is its number of code points (氏名 is 2, not 6)."""
    assert b"\x00field\x002\x00" in encode_context(PREFIX, {"field": "氏名"})
    assert b"\x00k\x001\x00\xf0\x9f\x98\x80" in encode_context(PREFIX, {"k": "😀"})


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"a": "1\x00b\x001\x00c"}, {"a": "1", "b": "c"}),
        ({"a": "x\x00b\x001\x00y"}, {"a": "x", "b": "y"}),
        ({"a": ""}, {}),
        ({"a": "\x00"}, {"a": ""}),
        ({"ab": "c"}, {"a": "bc"}),
        ({"a": "12"}, {"a": "1", "2": ""}),
        ({"a1": "0"}, {"a": "10"}),
        (
            {"field": "氏名\x00record_id\x008\x00R-000123"},
            {"field": "氏名", "record_id": "R-000123"},
        ),
    ],
    ids=[
        "value-imitating-a-pair",
        "value-imitating-a-pair-2",
        "empty-value-vs-no-pair",
        "nul-value-vs-empty-value",
        "key-value-boundary",
        "digit-key",
        "digit-moves-across",
        "folded-pairs",
    ],
)
def test_adversarial_contexts_encode_differently(a: dict[str, str], b: dict[str, str]) -> None:
    """Contexts built to collide under a naive join (NUL, digits, shifted boundaries) differ."""
    assert encode_context(PREFIX, a) != encode_context(PREFIX, b)


@pytest.mark.parametrize(
    ("p1", "p2"),
    [
        (("131016", "resident"), ("131016", "residen")),
        (("13101", "6resident"), ("131016", "resident")),
        (("a", "b"), ("b", "a")),
    ],
)
def test_tenant_and_purpose_are_bound(p1: tuple[str, str], p2: tuple[str, str]) -> None:
    """Different tenant/purpose pairs give different AAD, even when their concatenations agree."""
    assert encode_context(aad_prefix(SUITE, *p1), {}) != encode_context(aad_prefix(SUITE, *p2), {})


@pytest.mark.parametrize("bad", [("13\x0016", "resident"), ("131016", "res\x00ident")])
def test_nul_in_tenant_or_purpose_is_refused(bad: tuple[str, str]) -> None:
    """A NUL in the tenant or purpose would make the prefix ambiguous and is refused."""
    with pytest.raises(InvalidRequest):
        aad_prefix(SUITE, *bad)


def test_pair_count_edge() -> None:
    """32 pairs are accepted, 33 are refused."""
    assert MAX_CONTEXT_PAIRS == 32
    ok = {f"k{i}": "v" for i in range(MAX_CONTEXT_PAIRS)}
    assert encode_context(PREFIX, ok).count(b"\x00v") == MAX_CONTEXT_PAIRS
    with pytest.raises(InvalidRequest, match="pairs"):
        encode_context(PREFIX, {**ok, "extra": "v"})


def test_key_length_edge() -> None:
    """A 64-character key is accepted, a 65-character key and an empty key are refused."""
    assert MAX_CONTEXT_KEY_LEN == 64
    key = "k" * MAX_CONTEXT_KEY_LEN
    assert key.encode() in encode_context(PREFIX, {key: "v"})
    for bad in ("k" * (MAX_CONTEXT_KEY_LEN + 1), ""):
        with pytest.raises(InvalidRequest):
            encode_context(PREFIX, {bad: "v"})


@pytest.mark.parametrize("char", ["A", "z", "0", "_", ".", "-"])
def test_allowed_key_characters(char: str) -> None:
    """Keys may use ASCII letters, digits, '_', '.' and '-'."""
    assert validate_context_key(f"x{char}y") == f"x{char}y"


@pytest.mark.parametrize("key", ["a b", "a\x00b", "a=b", "氏名", "a/b", "é", "a\nb", "a:b"])
def test_disallowed_keys_are_refused(key: str) -> None:
    """Keys with spaces, NUL, '=', '/', ':', newlines or non-ASCII are refused."""
    with pytest.raises(InvalidRequest):
        validate_context_key(key)
    with pytest.raises(InvalidRequest):
        encode_context(PREFIX, {key: "v"})


@pytest.mark.parametrize("char", ["a", "氏", "😀"])
def test_value_length_edge_in_code_points(char: str) -> None:
    """A value of 1024 code points is accepted whatever its UTF-8 size; 1025 is refused."""
    assert MAX_CONTEXT_VALUE_LEN == 1024
    aad = encode_context(PREFIX, {"v": char * MAX_CONTEXT_VALUE_LEN})
    assert aad.endswith(b"\x00v\x001024\x00" + (char * MAX_CONTEXT_VALUE_LEN).encode())
    with pytest.raises(InvalidRequest, match="longer"):
        encode_context(PREFIX, {"v": char * (MAX_CONTEXT_VALUE_LEN + 1)})


@pytest.mark.parametrize(
    "value", [1, None, b"bytes", 1.5, ["x"]], ids=["int", "none", "bytes", "float", "list"]
)
def test_non_string_values_are_refused(value: object) -> None:
    """Context values must be str."""
    with pytest.raises(InvalidRequest, match="string"):
        encode_context(PREFIX, {"k": value})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "context", [{1: "v"}, {b"k": "v"}, {"k": "v", 2: "w"}], ids=["int", "bytes", "mixed"]
)
def test_non_string_keys_are_refused(context: dict[object, str]) -> None:
    """Context keys must be str (mixed key types raise InvalidRequest, not TypeError)."""
    with pytest.raises(InvalidRequest):
        encode_context(PREFIX, context)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["\ud800", "a\udfffb", "\udc80"])
def test_lone_surrogates_are_refused(value: str) -> None:
    """A value that is not valid Unicode text (a lone surrogate) is refused, not encoded lossily."""
    with pytest.raises(InvalidRequest, match="Unicode"):
        encode_context(PREFIX, {"k": value})


def test_str_subclass_values_are_refused() -> None:
    """A str subclass as a value is refused (its formatting could differ from the plain string)."""

    class Sneaky(str):
        __slots__ = ()

    with pytest.raises(InvalidRequest):
        encode_context(PREFIX, {"k": Sneaky("v")})


def test_str_subclass_keys_are_refused_even_when_the_key_is_known() -> None:
    """A str-subclass key is refused whether or not an equal plain key was seen before."""
    # encode_context skips validation for keys in its _KNOWN_KEYS cache; a str subclass equal to
    # a known key then bypasses the `key.__class__ is str` check, and its __format__ decides the
    # bytes written into the AAD (here: a forged second pair), so the result depends on which
    # contexts the process encoded earlier and the encoding stops being injective.

    class Forged(str):
        __slots__ = ()

        def __format__(self, spec: str) -> str:
            return "probe_key\x001\x00v\x00zz"

    key = Forged("probe_key")
    with pytest.raises(InvalidRequest):
        encode_context(PREFIX, {key: "w"})  # not yet known: refused
    genuine = encode_context(PREFIX, {"probe_key": "v", "zz": "w"})  # now "probe_key" is known
    try:
        forged = encode_context(PREFIX, {key: "w"})
    except InvalidRequest:
        return
    assert forged != genuine, "a one-pair context encoded to the bytes of a two-pair context"
    pytest.fail("a str-subclass key was accepted once an equal plain key had been seen")


def _reference(prefix: str, context: dict[str, str]) -> bytes:
    """The documented encoding, written out plainly (no fast paths)."""
    out = prefix
    for key in sorted(context):
        out += "\x00" + key + "\x00" + str(len(context[key])) + "\x00" + context[key]
    return out.encode("utf-8")


_KEYS = st.sampled_from(["record_id", "field", "record_type", "a", "Z.9_-"]) | st.from_regex(
    r"[A-Za-z0-9_.-]{1,8}", fullmatch=True
)
_VALUES = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, min_size=0, max_size=4))
def test_encoding_equals_the_plain_reference(context: dict[str, str]) -> None:
    """Every context (the one- and two-pair fast paths included) encodes as the documented rule."""
    for key in context:
        validate_context_key(key)  # known or not, the bytes must be the same
    assert encode_context(PREFIX, context) == _reference(PREFIX, context)
    fresh = {k + "-new": v for k, v in context.items()}  # keys not seen before: general path
    assert encode_context(PREFIX, fresh) == _reference(PREFIX, fresh)
