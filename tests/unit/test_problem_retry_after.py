"""503 answers say when to retry, except when retrying cannot help (a provider refusing
keygate's credentials, a provider key that does not exist)."""

from __future__ import annotations

import json

import pytest

from keygate.api.errors import error_object, problem_response
from keygate.core.errors import GatewayError, Unavailable
from keygate.providers.base import (
    ProviderAuthFailed,
    ProviderKeyNotFound,
    ProviderTimeout,
    ProviderUnavailable,
)

pytestmark = pytest.mark.unit


def respond(exc: GatewayError, *, retryable: bool) -> tuple[int, dict[str, str], dict[str, object]]:
    obj = error_object(exc)
    r = problem_response(
        obj["code"],
        obj["detail"],
        "req-1",
        retry_after=exc.retry_after,
        reason=obj.get("reason"),
        retryable=retryable,
    )
    return r.status_code, dict(r.headers), json.loads(r.body)


@pytest.mark.parametrize(
    "exc",
    [ProviderUnavailable("down"), ProviderTimeout("slow"), Unavailable("audit trail")],
    ids=lambda e: type(e).__name__,
)
def test_transient_503s_carry_retry_after(exc: GatewayError) -> None:
    status, headers, _ = respond(exc, retryable=True)
    assert status == 503
    assert headers["retry-after"] == "1"


def test_a_known_retry_after_wins() -> None:
    status, headers, _ = respond(ProviderUnavailable("down", retry_after=4.4), retryable=True)
    assert (status, headers["retry-after"]) == (503, "4")


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ProviderAuthFailed("AWS KMS: credentials refused"), "provider-credentials"),
        (ProviderKeyNotFound("AWS KMS: no such key"), "provider-key-not-found"),
    ],
)
def test_permanent_provider_refusals_say_why_and_do_not_ask_for_a_retry(
    exc: GatewayError, reason: str
) -> None:
    status, headers, body = respond(exc, retryable=False)
    assert status == 503
    assert "retry-after" not in headers
    assert body["code"] == "UNAVAILABLE"
    assert body["reason"] == reason
