"""Find secret bytes in captured traffic, in every form a wire protocol might carry them.

A provider API carries binary data as raw bytes (gRPC/protobuf), standard or URL-safe base64
(JSON REST APIs), or hex.  Base64 of a secret that sits inside a longer value depends on the
secret's offset modulo 3, so each of the three alignments is searched for (the characters that
encode only the secret's own bits).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

__all__ = ["encodings_of", "find_secrets"]

_MIN_LEN = 8


def _b64_cores(secret: bytes, encode: object) -> list[bytes]:
    """The base64 characters fully determined by ``secret`` at each of the 3 offsets mod 3."""
    cores = []
    for k in range(3):
        text = encode(b"\x00" * k + secret)  # type: ignore[operator]
        # Skip the characters that mix in the k prefix bytes, and the last 2 that may mix in
        # whatever follows the secret.
        start = (k * 8 + 5) // 6
        core = text.rstrip(b"=")[start:-2]
        if len(core) >= _MIN_LEN:
            cores.append(core)
    return cores


def encodings_of(secret: bytes) -> list[bytes]:
    """``secret`` as raw bytes, lower/upper hex and standard/URL-safe base64 (all alignments)."""
    if len(secret) < _MIN_LEN:
        raise ValueError("secrets shorter than 8 bytes would match by chance")
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    forms += _b64_cores(secret, base64.b64encode)
    forms += _b64_cores(secret, base64.urlsafe_b64encode)
    return forms


def find_secrets(haystack: bytes, secrets: Iterable[bytes]) -> list[tuple[int, str]]:
    """Every (index of the secret, form) found in ``haystack``; empty when nothing leaked."""
    found = []
    for i, secret in enumerate(secrets):
        for form in encodings_of(secret):
            if form in haystack:
                found.append((i, "raw" if form == secret else form[:12].decode("latin-1")))
                break
    return found
