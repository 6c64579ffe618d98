"""The batch fast path's codec (keygate.api._batch) against what it replaces, with no server.

Each fast function must agree with its reference on every input it accepts: the shape checks with
the Pydantic models, the text decoder with ``keygate.core.wire.from_text``, the base64 decoder
with the declared endpoint's strict decoder, and the renderers with ``json.dumps`` of the old
response documents.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from keygate.api._batch import (
    decode_plaintexts,
    envelope_or_text,
    load,
    parse_decrypt,
    parse_encrypt,
    parse_rewrap,
    render_bytes,
    render_envelopes,
    render_texts,
)
from keygate.api.app import _b64decode
from keygate.api.errors import error_object
from keygate.api.schemas import DecryptBatchRequest, EncryptBatchRequest, RewrapBatchRequest
from keygate.core.errors import (
    DecryptionFailed,
    GatewayError,
    InvalidRequest,
    KeyDestroyed,
    PayloadTooLarge,
)
from keygate.core.wire import MAX_ENVELOPE_LEN, from_text, to_text

pytestmark = pytest.mark.unit

T, P = "131016", "resident"


# ---------------------------------------------------------------------- the text form


def _from_text(text: str) -> bytes | None:
    try:
        return from_text(text)
    except DecryptionFailed:
        return None


def _agrees(text: str) -> None:
    fast = envelope_or_text(text)
    ref = _from_text(text)
    if ref is None:
        assert fast is text, text[:60]
    else:
        assert isinstance(fast, bytes), text[:60]
        assert fast == ref


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_ODD = ["+", "/", "=", "*", ".", " ", "\n", "\x00", "é", "Ａ", "\ud800", "\x7f", '"', "\\"]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 30, 31, 32, 122, 1174, 1175, 1176])
def test_text_decoder_matches_from_text_on_every_single_change(size: int) -> None:
    """For real text forms of every length class, and every one-letter change of their last
    four letters (and a few anywhere), the fast decoder returns from_text's bytes or declines."""
    raw = os.urandom(size)
    text = to_text(raw)
    _agrees(text)
    assert envelope_or_text(text) == raw
    n = len(text)
    positions = sorted({*range(max(4, n - 4), n), 4, 5, n // 2} & set(range(4, n)))
    for pos in positions:
        for ch in [*_LETTERS, *_ODD]:
            _agrees(text[:pos] + ch + text[pos + 1 :])
    for cut in range(1, 6):
        _agrees(text[:-cut])
    for extra in ["A", "AA", "AAA", "=", "==", "\n", " "]:
        _agrees(text + extra)
        _agrees(text[:4] + extra + text[4:])


def test_text_decoder_declines_what_from_text_refuses() -> None:
    """Prefixes, empty texts, padding, the standard alphabet and over-long texts are left to
    from_text (which raises with its own detail)."""
    text = to_text(os.urandom(100))
    for bad in ["", "kg1", "kg1.", "kg2." + text[4:], text[4:], "KG1." + text[4:], " " + text,
                text.replace("-", "+").replace("_", "/"), text + "=", text + "==",
                "kg1." + "A" * 5, "kg1.\u00e9AAA"]:  # fmt: skip
        _agrees(bad)
    too_long = "kg1." + "A" * ((MAX_ENVELOPE_LEN * 4 + 2) // 3 + 1)
    assert envelope_or_text(too_long) is too_long
    with pytest.raises(DecryptionFailed, match="too long"):
        from_text(too_long)
    longest = "kg1." + "A" * ((MAX_ENVELOPE_LEN * 4 + 2) // 3 - 1)
    _agrees(longest)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from([*_LETTERS, *_ODD]), max_size=40))
def test_text_decoder_property(body: str) -> None:
    """On arbitrary strings after the prefix, the fast decoder agrees with from_text."""
    _agrees("kg1." + body)
    _agrees(body)


# ---------------------------------------------------------------------- plaintext base64


def _reference(text: str) -> bytes | GatewayError:
    try:
        return _b64decode(text, "plaintext")
    except GatewayError as exc:
        return exc


@pytest.mark.parametrize(
    "text",
    ["", "eA==", "eB==", "eA=", "eA", "e===", "=eA=", "eA==eA==", "not base64!", "-_-_", "eA==\n",
     "eA== ", " eA==", "e A==", "ＡＡＡＡ", "\ud800AAA", "AAA\x00", "A" * 8, "QUJD", "QUI=",
     base64.b64encode(os.urandom(1024)).decode()],
)  # fmt: skip
def test_plaintext_decoding_matches_the_declared_endpoint(text: str) -> None:
    """Each plaintext decodes to the same bytes, or fails with the same error, as before."""
    good, bad = decode_plaintexts([({}, text), ({"a": "1"}, "eA==")])
    ref = _reference(text)
    if isinstance(ref, GatewayError):
        assert list(bad) == [0]
        assert type(bad[0]) is type(ref) and bad[0].detail == ref.detail
        assert good == [({"a": "1"}, b"x")]
    else:
        assert bad == {}
        assert good == [({}, ref), ({"a": "1"}, b"x")]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from([*"AQgw+/=", *_ODD]), max_size=16))
def test_plaintext_decoding_property(text: str) -> None:
    """On arbitrary strings, the fast decoder and the declared endpoint's decoder agree."""
    good, bad = decode_plaintexts([({}, text)])
    ref = _reference(text)
    if isinstance(ref, GatewayError):
        assert good == [] and bad[0].detail == ref.detail
    else:
        assert good == [({}, ref)] and bad == {}


# ---------------------------------------------------------------------- the request shapes

MODELS: dict[str, Any] = {
    "encrypt": (parse_encrypt, EncryptBatchRequest, "plaintext"),
    "decrypt": (parse_decrypt, DecryptBatchRequest, "ciphertext"),
    "rewrap": (parse_rewrap, RewrapBatchRequest, "ciphertext"),
}


def _pydantic(op: str, doc: Any) -> Any:
    """What the declared endpoint hands the service, or None when Pydantic refuses the doc."""
    _, model, field = MODELS[op]
    try:
        body = model.model_validate(doc)
    except ValidationError:
        return None
    if op == "rewrap":
        return body.tenant, body.purpose, [item.ciphertext for item in body.items]
    return body.tenant, body.purpose, [(item.context, getattr(item, field)) for item in body.items]


def _sound(op: str, doc: Any) -> Any:
    parse = MODELS[op][0]
    fast = parse(doc)
    if fast is not None:
        assert fast == _pydantic(op, doc), doc
    return fast


def _docs(op: str) -> list[tuple[Any, bool]]:
    """(document, whether the fast path should take it)."""
    field = MODELS[op][2]
    good = {field: "eA=="}
    base = {"tenant": T, "purpose": P}
    docs: list[tuple[Any, bool]] = [
        ({**base, "items": []}, True),
        ({**base, "items": [good]}, True),
        ({"items": [good], **base}, True),
        ({**base, "items": [good] * 3}, True),
        ({**base, "tenant": "not a tenant", "items": [good]}, True),  # the service refuses it
        ({**base, "items": [{field: "any string at all"}]}, True),
        (None, False), ([], False), ("x", False), (1, False), ({}, False),
        ({**base}, False), ({**base, "items": None}, False), ({**base, "items": {}}, False),
        ({**base, "items": ["eA=="]}, False), ({**base, "items": [[good]]}, False),
        ({**base, "items": [good], "extra": 1}, False), ({"tenant": T, "items": [good]}, False),
        ({**base, "tenant": 131016, "items": [good]}, False),
        ({**base, "tenant": None, "items": [good]}, False),
        ({**base, "purpose": [P], "items": [good]}, False),
        ({**base, "items": [{field: 1}]}, False), ({**base, "items": [{field: None}]}, False),
        ({**base, "items": [{field: True}]}, False), ({**base, "items": [{field: 1.5}]}, False),
        ({**base, "items": [{field: ["eA=="]}]}, False), ({**base, "items": [{}]}, False),
        ({**base, "items": [{**good, "y": 1}]}, False), ({**base, "items": [{"y": "eA=="}]}, False),
        ({**base, "items": [good, {field: 2}]}, False),
        ({**base, "items": [{**good, "context": {"a": "1"}, "y": "z"}]}, False),
    ]  # fmt: skip
    with_context = [
        ({"a": "1"}, True), ({}, True), ({"field": "氏名", "record_id": "R-1"}, True),
        ({"bad key": "v"}, True), ({"k": "\x00"}, True), ({"k": "\ud800"}, True),
        (None, False), ([], False), ("a=1", False), ({"a": 1}, False), ({"a": None}, False),
        ({"a": ["1"]}, False), ({"a": {"b": "c"}}, False), ({"a": "1", "b": 2}, False),
    ]  # fmt: skip
    for context, ok in with_context:
        docs.append(({**base, "items": [{**good, "context": context}]}, ok and op != "rewrap"))
    return docs


@pytest.mark.parametrize("op", sorted(MODELS))
def test_shape_checks_are_sound_and_take_the_usual_bodies(op: str) -> None:
    """Whatever the fast shape check accepts, Pydantic accepts with the same values; it takes
    the ordinary bodies and declines every off-shape one (left to the declared endpoint)."""
    for doc, taken in _docs(op):
        fast = _sound(op, doc)
        assert (fast is not None) is taken, doc


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.sampled_from(["eA==", T, P, "", "plaintext", "ciphertext", "context"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["tenant", "purpose", "items", "plaintext", "ciphertext",
                                       "context", "a", "x"]), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(op=st.sampled_from(sorted(MODELS)), doc=_json_values)
def test_shape_checks_never_accept_what_pydantic_refuses(op: str, doc: Any) -> None:
    """On random JSON documents over the batch vocabulary, acceptance implies Pydantic's."""
    _sound(op, doc)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(sorted(MODELS)),
    items=st.lists(
        st.fixed_dictionaries(
            {"value": st.sampled_from(["eA==", "kg1.AAAA", "x"])},
            optional={"context": st.dictionaries(st.sampled_from(["a", "b", "field"]),
                                                 st.text(max_size=3), max_size=3)},
        ),
        max_size=5,
    ),
)  # fmt: skip
def test_shape_checks_property_on_valid_batches(op: str, items: list[dict[str, Any]]) -> None:
    """Well-formed batches (with or without contexts) are taken with Pydantic's values."""
    field = MODELS[op][2]
    doc_items = [
        {field: i["value"], **({"context": i["context"]} if "context" in i else {})} for i in items
    ]
    doc = {"tenant": T, "purpose": P, "items": doc_items}
    fast = _sound(op, doc)
    uses_context = any("context" in i for i in items)
    assert (fast is None) == (op == "rewrap" and uses_context)


@pytest.mark.parametrize(
    "raw",
    [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1e400}', b"[" * 100_000 + b"]" * 100_000,
     b'{"a": "\xff"}', b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16"), b'{"a": "\\ud800"}',
     b"", b"{", b"null", b'{"a":1}x'],
)  # fmt: skip
def test_load_matches_json_loads(raw: bytes) -> None:
    """The body parser is json.loads (what Starlette uses); what it refuses becomes None."""
    try:
        expected: Any = json.loads(raw)
    except (ValueError, RecursionError):
        expected = None
    assert load(raw) == expected  # (json.loads gives its one NaN object: equal by identity)


# ---------------------------------------------------------------------- the responses


def _old_render(items: list[Any], key: str, encode: Any = lambda v: v) -> bytes:
    """The declared endpoints' response body (app._batch_body)."""
    doc = {
        "items": [
            {"error": error_object(v)} if isinstance(v, GatewayError) else {key: encode(v)}
            for v in items
        ]
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


ERRORS: list[GatewayError] = [
    DecryptionFailed(),
    DecryptionFailed("bad envelope encoding"),
    InvalidRequest("plaintext is not valid standard base64"),
    PayloadTooLarge("plaintext is larger than 4096 bytes"),
    KeyDestroyed('key 131016/resident v1 destroyed "quoted" \\ 鍵'),
    InvalidRequest("context keys must match [A-Za-z0-9_.-]{1,64}"),
]


def _b64(v: bytes) -> str:
    return binascii.b2a_base64(v, newline=False).decode("ascii")


@pytest.mark.parametrize("errors", [0, 1, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_renderers_match_json_dumps(n: int, errors: int) -> None:
    """Byte for byte the body json.dumps gave, for every kind of item list."""
    values = [os.urandom(i * 7 % 50) for i in range(n)]
    items: list[Any] = list(values)
    for k in range(min(errors, n)):
        items[(k * 3) % n] = ERRORS[k % len(ERRORS)]
    failed = sum(isinstance(v, GatewayError) for v in items)
    assert render_bytes(items, failed, "plaintext") == _old_render(items, "plaintext", _b64)
    assert render_envelopes(items, failed, "ciphertext") == _old_render(
        items, "ciphertext", to_text
    )
    texts = [v if isinstance(v, GatewayError) else to_text(v) for v in items]
    assert render_texts(texts, failed, "ciphertext") == _old_render(texts, "ciphertext")


@pytest.mark.parametrize(
    "text",
    ['kg1.AB"CD', "kg1.AB\\CD", "kg1.AB\x01CD", "kg1.AB\x7fCD", "kg1.鍵", "kg1.\u2028",
     "kg1.AB</script>", "kg1.AB\nCD", "kg1.AB\tCD", "kg1.AB'CD", 'kg1."', "\\"],
)  # fmt: skip
def test_rewrap_renderer_escapes_whatever_comes_back(text: str) -> None:
    """A rewrapped text carries the caller's data part as it came: anything JSON must escape is
    escaped exactly as json.dumps did (never written raw into the response)."""
    for items in ([text], ["kg1.AAAA", text], [text, DecryptionFailed()]):
        failed = sum(isinstance(v, GatewayError) for v in items)
        out = render_texts(items, failed, "ciphertext")
        assert out == _old_render(items, "ciphertext")
        assert json.loads(out)["items"][items.index(text)] == {"ciphertext": text}
