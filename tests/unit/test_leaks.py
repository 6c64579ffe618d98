"""The leak finder used by the provider tests must find a secret in every wire form."""

from __future__ import annotations

import base64
import json
import os

import pytest

from keygate.testing.leaks import encodings_of, find_secrets

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("prefix_len", range(6))
@pytest.mark.parametrize(
    "encode",
    [
        lambda b: b,
        lambda b: b.hex().encode(),
        base64.b64encode,
        lambda b: base64.urlsafe_b64encode(b).rstrip(b"="),
        lambda b: json.dumps({"plaintext": base64.b64encode(b).decode()}).encode(),
    ],
)
def test_a_secret_inside_a_longer_value_is_found(prefix_len: int, encode: object) -> None:
    secret = os.urandom(32)
    carried = os.urandom(prefix_len) + secret + os.urandom(7)
    wire = b"POST /encrypt HTTP/1.1\r\n\r\n" + encode(carried)  # type: ignore[operator]
    found = find_secrets(wire, [os.urandom(32), secret])
    assert [index for index, _ in found] == [1]


def test_nothing_is_found_in_unrelated_traffic() -> None:
    secrets = [os.urandom(32) for _ in range(50)]
    wire = base64.b64encode(os.urandom(100_000)) + os.urandom(100_000)
    assert find_secrets(wire, secrets) == []


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="shorter"):
        encodings_of(b"1234567")
