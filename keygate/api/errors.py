"""The one table from error codes to HTTP statuses, and problem+json (RFC 9457) bodies."""

from __future__ import annotations

import json
from typing import Any, Final

from starlette.responses import Response

from keygate.core.errors import GatewayError

__all__ = ["STATUS_BY_CODE", "TITLE_BY_CODE", "error_object", "problem_response"]

STATUS_BY_CODE: Final[dict[str, int]] = {
    "INVALID_REQUEST": 400,
    "INVALID_TENANT": 400,
    "UNAUTHENTICATED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "KEY_NOT_USABLE": 409,
    "KEY_DESTROYED": 410,
    "PAYLOAD_TOO_LARGE": 413,
    "DECRYPTION_FAILED": 422,
    "VALIDATION_FAILED": 422,
    "UNAVAILABLE": 503,
    "CONFIGURATION": 503,
    "INTERNAL": 500,
}
TITLE_BY_CODE: Final[dict[str, str]] = {
    "INVALID_REQUEST": "Invalid request",
    "INVALID_TENANT": "Invalid tenant",
    "UNAUTHENTICATED": "Unauthenticated",
    "FORBIDDEN": "Forbidden",
    "NOT_FOUND": "Not found",
    "METHOD_NOT_ALLOWED": "Method not allowed",
    "KEY_NOT_USABLE": "Key not usable",
    "KEY_DESTROYED": "Key destroyed",
    "PAYLOAD_TOO_LARGE": "Payload too large",
    "DECRYPTION_FAILED": "Decryption failed",
    "VALIDATION_FAILED": "Validation failed",
    "UNAVAILABLE": "Service unavailable",
    "CONFIGURATION": "Service unavailable",
    "INTERNAL": "Internal error",
}
TYPE_BASE: Final = "https://keygate.example/errors/"


def _public_code(code: str) -> str:
    # A configuration problem is the operator's, not the caller's: callers see UNAVAILABLE.
    return "UNAVAILABLE" if code == "CONFIGURATION" else code


def error_object(exc: GatewayError) -> dict[str, Any]:
    """The problem fields of one error (used whole, or inside a batch item's slot)."""
    code = _public_code(exc.code)
    detail = exc.detail
    if exc.code == "CONFIGURATION":
        detail = "the gateway is not configured correctly; see its logs"
    obj = {
        "type": TYPE_BASE + code.lower().replace("_", "-"),
        "title": TITLE_BY_CODE.get(code, exc.title),
        "status": STATUS_BY_CODE.get(code, 500),
        "code": code,
        "detail": detail,
    }
    # An extension member: which of several causes behind one code (provider-credentials,
    # provider-key-disabled, provider-timeout, residency …).  Clients may ignore it.
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        obj["reason"] = reason
    return obj


def problem_response(
    code: str,
    detail: str,
    request_id: str,
    *,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
    reason: str | None = None,
    retryable: bool = True,
) -> Response:
    """A problem+json response.  A 503 gets ``Retry-After`` (``retry_after``, else 1 s) unless
    ``retryable`` is false: a provider refusing keygate's credentials, or a provider key that
    does not exist, will not fix itself in a second, and clients must not be told to retry."""
    code = _public_code(code)
    status = STATUS_BY_CODE.get(code, 500)
    body = {
        "type": TYPE_BASE + code.lower().replace("_", "-"),
        "title": TITLE_BY_CODE.get(code, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
        "request_id": request_id,
    }
    if reason:
        body["reason"] = reason
    h = dict(headers or {})
    if retry_after is not None:
        h["Retry-After"] = str(max(1, round(retry_after)))
    elif status == 503 and retryable:
        h["Retry-After"] = "1"
    if status == 401:
        h.setdefault("WWW-Authenticate", 'Bearer realm="keygate"')
    return Response(
        json.dumps(body, ensure_ascii=False),
        status_code=status,
        media_type="application/problem+json",
        headers=h,
    )
