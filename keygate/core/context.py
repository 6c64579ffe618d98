"""Canonical encoding of the encryption context, bound to every ciphertext as AES-GCM AAD.

The encoding is injective: two different (suite, tenant, purpose, context) tuples never give the
same bytes, whatever the strings contain.  Layout (then UTF-8):

    "kg1" NUL suite-id(decimal) NUL tenant NUL purpose
    then, for each context pair in code-point order of the keys:
    NUL key NUL len(value in code points, decimal) NUL value

Tenants, purposes and context keys are restricted to characters without NUL, and each value is
prefixed by its length, so a reader can always tell where a value ends.  The encoding is built
with plain string operations because it runs once per record on the hot path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from keygate.core.errors import InvalidRequest
from keygate.core.model import (
    MAX_CONTEXT_KEY_LEN,
    MAX_CONTEXT_PAIRS,
    MAX_CONTEXT_VALUE_LEN,
    AlgorithmSuite,
)

__all__ = ["aad_prefix", "encode_context", "validate_context_key"]

_KEY_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,%d}" % MAX_CONTEXT_KEY_LEN)  # noqa: UP031
# Keys already checked.  Context keys come from a small vocabulary ("record_id", "field" …), so
# remembering them saves a regex match per pair; the set is bounded so hostile input cannot grow it.
_KNOWN_KEYS: set[str] = set()
_KNOWN_KEYS_MAX: Final = 4096


def validate_context_key(key: object) -> str:
    """Return ``key`` if it is a valid context key, else raise InvalidRequest."""
    if key.__class__ is not str or not _KEY_RE.fullmatch(key):
        raise InvalidRequest(
            "context keys must match [A-Za-z0-9_.-]{1,%d}" % MAX_CONTEXT_KEY_LEN  # noqa: UP031
        )
    if len(_KNOWN_KEYS) < _KNOWN_KEYS_MAX:
        _KNOWN_KEYS.add(key)
    return key


def aad_prefix(suite: AlgorithmSuite, tenant: str, purpose: str) -> str:
    """The per-key part of the AAD; callers compute it once per tenant × purpose."""
    if "\x00" in tenant or "\x00" in purpose:
        raise InvalidRequest("tenant and purpose must not contain NUL")
    return f"kg1\x00{int(suite)}\x00{tenant}\x00{purpose}"


def encode_context(prefix: str, context: Mapping[str, str]) -> bytes:
    """Canonical AAD bytes for ``context`` under ``prefix`` (from :func:`aad_prefix`).

    Raises InvalidRequest for too many pairs, a bad key, a non-string or over-long value, or a
    string that cannot be encoded as UTF-8 (lone surrogates).
    """
    n = len(context)
    # Fast paths for the usual one- and two-pair contexts (record_id, field): one f-string, the
    # same bytes as the general loop below, which handles every irregular case and every error.
    if n == 2:
        (k1, v1), (k2, v2) = context.items()
        if k1.__class__ is str and k2.__class__ is str and k2 < k1:
            k1, v1, k2, v2 = k2, v2, k1, v1
        if (
            k1.__class__ is str
            and k2.__class__ is str
            and v1.__class__ is str
            and v2.__class__ is str
            and k1 in _KNOWN_KEYS
            and k2 in _KNOWN_KEYS
            and len(v1) <= MAX_CONTEXT_VALUE_LEN
            and len(v2) <= MAX_CONTEXT_VALUE_LEN
        ):
            try:
                return (
                    f"{prefix}\x00{k1}\x00{len(v1)}\x00{v1}\x00{k2}\x00{len(v2)}\x00{v2}".encode()
                )
            except UnicodeEncodeError:
                pass
    elif n == 1:
        ((k1, v1),) = context.items()
        if (
            k1.__class__ is str
            and v1.__class__ is str
            and k1 in _KNOWN_KEYS
            and len(v1) <= MAX_CONTEXT_VALUE_LEN
        ):
            try:
                return f"{prefix}\x00{k1}\x00{len(v1)}\x00{v1}".encode()
            except UnicodeEncodeError:
                pass
    elif n > MAX_CONTEXT_PAIRS:
        raise InvalidRequest(f"context has more than {MAX_CONTEXT_PAIRS} pairs")
    s = prefix
    known = _KNOWN_KEYS
    try:
        keys = sorted(context)
    except TypeError:
        raise InvalidRequest("context keys must be strings") from None
    for key in keys:
        value = context[key]
        if key.__class__ is not str or key not in known:
            validate_context_key(key)
        if value.__class__ is not str:
            raise InvalidRequest(f"context value for {key!r} must be a string")
        n = len(value)
        if n > MAX_CONTEXT_VALUE_LEN:
            raise InvalidRequest(
                f"context value for {key!r} is longer than {MAX_CONTEXT_VALUE_LEN} characters"
            )
        s += f"\x00{key}\x00{n}\x00{value}"
    try:
        return s.encode()
    except UnicodeEncodeError:
        raise InvalidRequest("context values must be valid Unicode text") from None
