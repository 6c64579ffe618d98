"""The fast path of the opaque batch endpoints (``/v1/{encrypt,decrypt,rewrap}/batch``).

A batch of 1000 values of 1 KiB is about 1.4 MB of JSON.  Through FastAPI and Pydantic the gateway
spent most of its time on that JSON and on per-item objects, not on cryptography (issue 5).  This
module reads such a body with one JSON parse and a hand-written check of the batch shape, decodes
and encodes base64 with ``binascii`` directly, and writes the response as bytes.

**Sound, never complete.**  The declared FastAPI endpoints (with their Pydantic models) stay: they
give the OpenAPI document, and they answer every request the fast path does not take.  The fast
path takes a request only when its body is one that those endpoints would accept as it is — a JSON
object with exactly the declared fields, of exactly the declared JSON types, sent as
``application/json``.  Anything else (malformed JSON, the wrong content type, an unknown, missing
or mistyped field, a body the parser refuses) goes to the declared endpoint untouched, which reads
it again and answers with the same status, code, detail and error positions as before, audit
event included.  So the checks here must never accept what Pydantic refuses, and must hand the
service exactly the values the declared endpoint would hand it; they need not reproduce any error.

What a taken request gets is what the declared endpoint would give it: the same authentication
(the same dependency, called in the same order: body first, then credentials), the same service
call (so the same authorisation, limits, per-item errors and the one audit event per batch, durable
before the response) and byte for byte the same response body.  ``tests/api/test_api_batch_fast.py``
checks this by running hostile and ordinary bodies through both paths.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Final

from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from keygate.api.errors import error_object
from keygate.core.errors import GatewayError, InvalidRequest
from keygate.core.wire import MAX_ENVELOPE_LEN, TEXT_PREFIX

__all__ = [
    "FastBatch",
    "decode_plaintexts",
    "envelope_or_text",
    "fast_route",
    "load",
    "parse_decrypt",
    "parse_encrypt",
    "parse_rewrap",
    "render_bytes",
    "render_envelopes",
    "render_texts",
]

#: ``work(request, body, credentials)`` runs in the thread pool; it returns the response, or None
#: when the request is not one the fast path takes (the declared endpoint then answers it)
FastBatch = Callable[[Request, bytes, Any], Response | None]

_JSON_TYPES: Final = frozenset({"application/json", "application/json; charset=utf-8"})
_loads: Final = json.loads


def fast_route(work: FastBatch, credentials: Callable[[Request], Awaitable[Any]]) -> type[APIRoute]:
    """An APIRoute class whose handler tries ``work`` before the declared endpoint.

    ``credentials`` is the declared endpoint's own security dependency (it only reads headers);
    ``work`` gets its result and must check the body before it uses them.
    """

    class FastBatchRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            declared = super().get_route_handler()

            async def handler(request: Request) -> Response:
                ctype = request.headers.get("content-type")
                if ctype is not None and ctype.lower() in _JSON_TYPES:
                    body = await request.body()  # cached: the declared endpoint reads it again
                    if body:
                        creds = await credentials(request)
                        response = await run_in_threadpool(work, request, body, creds)
                        if response is not None:
                            return response
                return await declared(request)

            return handler

    return FastBatchRoute


def load(body: bytes) -> Any:
    """The JSON document of a body, or None for anything the parser refuses (or ``null``)."""
    try:
        return _loads(body)
    except Exception:  # noqa: BLE001 - whatever it was, the declared endpoint answers it
        return None


# ---------------------------------------------------------------------- the batch shapes
# Pydantic's strict models (keygate.api.schemas): the request is an object with exactly tenant,
# purpose and items; tenant and purpose are strings; items is an array of objects.  JSON gives
# exact ``str``, ``dict`` and ``list`` instances, so ``__class__ is`` is the strict type check.


def _head(doc: Any) -> tuple[str, str, list[Any]] | None:
    if doc.__class__ is not dict or len(doc) != 3:
        return None
    tenant = doc.get("tenant")
    purpose = doc.get("purpose")
    items = doc.get("items")
    # three keys, and these three present with the right types: there is no other key
    if tenant.__class__ is not str or purpose.__class__ is not str or items.__class__ is not list:
        return None
    return tenant, purpose, items


def _items(items: list[Any], field: str, with_context: bool) -> list[Any] | None:
    """``[(context, value)]`` (or ``[value]`` without context), or None if any item is off-shape."""
    out: list[Any] = []
    append = out.append
    for item in items:
        if item.__class__ is not dict:
            return None
        value = item.get(field)
        if value.__class__ is not str:
            return None
        n = len(item)
        if n == 1:
            append(({}, value) if with_context else value)
            continue
        if n != 2 or not with_context:
            return None
        context = item.get("context")  # None when the second key is another one, or null
        if context.__class__ is not dict:
            return None
        for v in context.values():  # keys are always strings in JSON
            if v.__class__ is not str:
                return None
        append((context, value))
    return out


def parse_encrypt(doc: Any) -> tuple[str, str, list[tuple[dict[str, str], str]]] | None:
    head = _head(doc)
    if head is None:
        return None
    items = _items(head[2], "plaintext", True)
    return None if items is None else (head[0], head[1], items)


def parse_decrypt(doc: Any) -> tuple[str, str, list[tuple[dict[str, str], str]]] | None:
    head = _head(doc)
    if head is None:
        return None
    items = _items(head[2], "ciphertext", True)
    return None if items is None else (head[0], head[1], items)


def parse_rewrap(doc: Any) -> tuple[str, str, list[str]] | None:
    head = _head(doc)
    if head is None:
        return None
    items = _items(head[2], "ciphertext", False)
    return None if items is None else (head[0], head[1], items)


# ---------------------------------------------------------------------- base64
_a2b: Final = binascii.a2b_base64
_b2a: Final = binascii.b2a_base64


def decode_plaintexts(
    items: Sequence[tuple[Mapping[str, str], str]],
) -> tuple[list[tuple[Mapping[str, str], bytes]], dict[int, GatewayError]]:
    """Strict standard base64 (RFC 4648 §4) of every plaintext: ``(good items, {slot: error})``.

    The same decoding and error as the declared endpoint's ``_b64decode``: strict ``binascii``
    (no whitespace, no URL-safe letters, correct padding); a str that is not ASCII is refused.
    """
    good: list[tuple[Mapping[str, str], bytes]] = []
    append = good.append
    bad: dict[int, GatewayError] = {}
    a2b = _a2b
    for i, (context, text) in enumerate(items):
        try:
            append((context, a2b(text, strict_mode=True)))
        except (binascii.Error, ValueError):  # ValueError: a str that is not ASCII
            bad[i] = InvalidRequest("plaintext is not valid standard base64")
    return good, bad


# keygate.core.wire.from_text, restated for speed (its checks, in its order; see envelope_or_text)
_MAX_TEXT_LEN: Final = len(TEXT_PREFIX) + (MAX_ENVELOPE_LEN * 4 + 2) // 3
# base64url → standard alphabet; "+", "/" and "=" (which the text form never holds) become "!",
# which strict decoding refuses
_FROM_URLSAFE: Final = bytes.maketrans(b"-_+/=", b"+/!!!")
_URLSAFE: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: the 6-bit value of each base64url letter (0 for anything else; strict decoding refuses those)
_SEXTET: Final = bytes(
    _URLSAFE.find(bytes([c])) % 64 if bytes([c]) in _URLSAFE else 0 for c in range(256)
)
#: bits of the last letter that carry no data, by text length mod 4 (must be zero: canonical)
_SPARE_BITS: Final = (0, 0, 0x0F, 0x03)
_PAD: Final = (b"", b"", b"==", b"=")


def envelope_or_text(text: str) -> bytes | str:
    """The binary envelope of a well-formed ``kg1.`` text, else the text itself.

    For every string, either this returns exactly what ``from_text(text)`` returns, or it returns
    ``text`` unchanged and ``from_text`` raises — the service then calls it, so the error and its
    detail are the core's own.  (``from_text`` re-encodes the result to refuse non-canonical
    trailing bits; here the spare bits of the last letter are checked instead, which is the same
    condition once strict decoding has succeeded.)
    """
    if len(text) > _MAX_TEXT_LEN or not text.startswith(TEXT_PREFIX) or not text.isascii():
        return text
    raw = text[4:].encode("ascii")
    r = len(raw) & 3
    if r == 1 or (r and _SEXTET[raw[-1]] & _SPARE_BITS[r]):
        return text
    try:
        return _a2b(raw.translate(_FROM_URLSAFE) + _PAD[r], strict_mode=True)
    except binascii.Error:
        return text


# ---------------------------------------------------------------------- responses
# The declared endpoints answer json.dumps({"items": [...]}, ensure_ascii=False,
# separators=(",", ":")).  These build the same bytes without a dict per item.


def _error_slot(exc: GatewayError) -> bytes:
    return (
        b'{"error":'
        + json.dumps(error_object(exc), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        + b"}"
    )


def render_bytes(items: Sequence[Any], failed: int, key: str) -> bytes:
    """``{"items": [{key: base64(value)} | {"error": …}]}`` for bytes values (decrypt)."""
    b2a = _b2a
    head = b'{"' + key.encode() + b'":"'
    if not items:
        return b'{"items":[]}'
    if not failed:
        parts = [b2a(v, newline=False) for v in items]
        parts[0] = b'{"items":[' + head + parts[0]
        parts[-1] += b'"}]}'
        return (b'"},' + head).join(parts)
    parts = [
        _error_slot(v) if isinstance(v, GatewayError) else head + b2a(v, newline=False) + b'"}'
        for v in items
    ]
    return b'{"items":[' + b",".join(parts) + b"]}"


_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


def render_envelopes(items: Sequence[Any], failed: int, key: str) -> bytes:
    """``{"items": [{key: text form} | {"error": …}]}`` for binary envelopes (encrypt).

    The text form is ``to_text``'s: ``kg1.`` and unpadded base64url (translated and stripped of
    its padding in one pass), written as bytes without a str per item.
    """
    if not items:
        return b'{"items":[]}'
    b2a = _b2a
    table = _TO_URLSAFE
    head = b'{"' + key.encode() + b'":"' + TEXT_PREFIX.encode()
    if not failed:
        parts = [b2a(v, newline=False).translate(table, b"=") for v in items]
        parts[0] = b'{"items":[' + head + parts[0]
        parts[-1] += b'"}]}'
        return (b'"},' + head).join(parts)
    parts = [
        _error_slot(v)
        if isinstance(v, GatewayError)
        else head + b2a(v, newline=False).translate(table, b"=") + b'"}'
        for v in items
    ]
    return b'{"items":[' + b",".join(parts) + b"]}"


# Characters a JSON string may hold unescaped that a text envelope may contain: printable ASCII
# but '"' and '\'.  A text with anything else (rewrap hands back the caller's data part as it
# came) is left to json.dumps.
_PLAIN: Final = bytes(c for c in range(0x20, 0x7F) if c not in (0x22, 0x5C))


def render_texts(items: Sequence[Any], failed: int, key: str) -> bytes:
    """``{"items": [{key: text} | {"error": …}]}`` for str values (rewrap).

    A rewrapped text keeps the caller's data part as it came (rewrap cannot authenticate it), so
    the texts are checked: anything that JSON would have to escape goes to json.dumps.
    """
    if not items:
        return b'{"items":[]}'
    if not failed:
        head = '{"' + key + '":"'
        parts = list(items)
        parts[0] = '{"items":[' + head + parts[0]
        parts[-1] += '"}]}'
        try:
            raw = ('"},' + head).join(parts).encode("ascii")
        except UnicodeEncodeError:
            raw = b""
        # what remains once the plain characters are deleted must be the quotes of the frame:
        # 5 before the first value, 4 between two values and 1 after the last
        rest = raw.translate(None, _PLAIN)
        if raw and len(rest) == 4 * len(items) + 2 and rest.count(b'"') == len(rest):
            return raw
    return json.dumps(
        {
            "items": [
                {"error": error_object(v)} if isinstance(v, GatewayError) else {key: v}
                for v in items
            ]
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")
