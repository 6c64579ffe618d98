"""Dual-control requests and approvals as values, and the exact bytes custodians sign.

Pure: no I/O, no clock, no randomness (ids and times are passed in).

The signed bytes
    A request is encoded as ::

        b"keygate-custody-request-v1\\0" || JSON {"action", "created_at", "expires_at", "id",
                                                  "params", "required", "requester"}

    and an approval (or a rejection) signs ::

        b"keygate-custody-approval-v1\\0" || JSON {"approver", "decision", "request"}

    where ``request`` is the SHA-256 (64 lower-case hex digits) of the request's bytes and
    ``decision`` is ``approve`` or ``reject``.  JSON here is UTF-8 with sorted keys, no spaces
    (separators ``,`` and ``:``), no ``\\u`` escapes for non-ASCII text and no floats; timestamps
    are RFC 3339 UTC with microseconds.  JSON is self-delimiting, so two different requests can
    never encode to the same bytes; the domain prefixes keep a custodian signature from ever
    being valid as anything else keygate signs (audit checkpoints use
    ``keygate-audit-checkpoint-v1``).  Because the request id, the action, every parameter, the
    requester, both times and the quorum are inside, an approval cannot be replayed onto another
    request, and a changed request row no longer verifies.

    A reviewer can check an approval offline from the audit trail alone: the ``custody.requested``
    event carries every field of the request and its digest, the ``custody.approved`` event the
    approver, the digest and the signature.

Changing this encoding is a **BACKWARDS INCOMPATIBLE** change: pending requests would no longer
verify.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from keygate.audit.events import format_timestamp
from keygate.core.errors import InvalidRequest

__all__ = [
    "APPROVAL_DOMAIN",
    "DECISIONS",
    "MAX_PARAMS_LEN",
    "REQUEST_DOMAIN",
    "STATUSES",
    "Approval",
    "CustodyRequest",
    "ParamValue",
    "approval_message",
    "canonical_json",
    "check_params",
    "is_request_id",
    "request_bytes",
    "request_digest",
]

REQUEST_DOMAIN: Final = b"keygate-custody-request-v1\x00"
APPROVAL_DOMAIN: Final = b"keygate-custody-approval-v1\x00"
#: what a custodian's signature says about a request
DECISIONS: Final = frozenset({"approve", "reject"})
#: a request's life: pending → executing → executed | failed; or pending → rejected | expired
STATUSES: Final = frozenset({"pending", "executing", "executed", "failed", "rejected", "expired"})
#: the canonical JSON of a request's parameters fits in one audit detail value
MAX_PARAMS_LEN: Final = 1000
_MAX_PARAMS: Final = 16
_MAX_TEXT: Final = 600
_PARAM_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_REQUEST_ID: Final = re.compile(r"kgr-[0-9a-f]{16}")

#: a parameter value: text, an integer, a boolean, or a list of text
ParamValue = str | int | bool | list[str]


def is_request_id(value: object) -> bool:
    """Whether ``value`` looks like a request id (``kgr-`` and 16 hex digits)."""
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


def _check_text(name: str, value: str) -> str:
    if len(value) > _MAX_TEXT:
        raise InvalidRequest(f"parameter {name} is longer than {_MAX_TEXT} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"parameter {name} is not valid text") from None
    # PEM public keys carry newlines; nothing else may carry control characters.
    if any(unicodedata.category(ch) == "Cc" and ch != "\n" for ch in value):
        raise InvalidRequest(f"parameter {name} must not contain control characters")
    return value


def check_params(params: Mapping[str, object]) -> dict[str, ParamValue]:
    """Parameters as signed: names ``[a-z][a-z0-9_]*``, values text, int, bool or list of text.

    Raises :class:`InvalidRequest` otherwise, or when their canonical JSON is longer than
    :data:`MAX_PARAMS_LEN` characters.
    """
    if not isinstance(params, Mapping):
        raise InvalidRequest("request parameters must be a mapping")
    if len(params) > _MAX_PARAMS:
        raise InvalidRequest(f"a request takes at most {_MAX_PARAMS} parameters")
    out: dict[str, ParamValue] = {}
    for name, value in params.items():
        checked: object = name
        if not isinstance(checked, str) or not _PARAM_NAME.fullmatch(checked):
            raise InvalidRequest(f"bad parameter name {name!r}")
        if isinstance(value, bool):
            out[name] = value
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise InvalidRequest(f"parameter {name} is out of range")
            out[name] = value
        elif isinstance(value, str):
            out[name] = _check_text(name, value)
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            out[name] = [_check_text(name, v) for v in value]
        else:
            raise InvalidRequest(f"parameter {name} must be text, an integer, a boolean or a list")
    if len(canonical_json(out)) > MAX_PARAMS_LEN:
        raise InvalidRequest(f"request parameters are longer than {MAX_PARAMS_LEN} characters")
    return out


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, no ``\\u`` escapes, no floats or NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


@dataclass(frozen=True, slots=True)
class Approval:
    """One custodian's signed decision on one request."""

    request_id: str
    custodian: str
    #: ``approve`` or ``reject``
    decision: str
    #: over :func:`approval_message` of the request, this custodian and this decision
    signature: bytes
    #: the custodian key that signed (SHA-256 of its SubjectPublicKeyInfo, hex)
    key_fingerprint: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CustodyRequest:
    """A sensitive change waiting for (or done after) M custodian approvals."""

    id: str
    action: str
    params: Mapping[str, ParamValue]
    #: a custodian's name if the requester signed it, else the CLI actor
    requester: str
    created_at: datetime
    expires_at: datetime
    #: approvals needed (the quorum M when the request was made)
    required: int
    status: str = "pending"
    status_at: datetime | None = None
    #: what the execution reported (e.g. the destruction's due time), or ``{}``
    result: Mapping[str, Any] = field(default_factory=dict)
    #: the error code when the execution failed
    code: str | None = None
    approvals: tuple[Approval, ...] = ()

    @property
    def digest(self) -> str:
        return request_digest(self)

    def signed_fields(self) -> dict[str, Any]:
        """The fields the custodians sign, as encoded."""
        return {
            "action": self.action,
            "created_at": format_timestamp(self.created_at),
            "expires_at": format_timestamp(self.expires_at),
            "id": self.id,
            "params": dict(self.params),
            "required": self.required,
            "requester": self.requester,
        }


def request_bytes(request: CustodyRequest) -> bytes:
    """The canonical, domain-separated encoding of a request."""
    return REQUEST_DOMAIN + canonical_json(request.signed_fields()).encode("utf-8")


def request_digest(request: CustodyRequest) -> str:
    """SHA-256 of :func:`request_bytes`, 64 lower-case hex digits."""
    return hashlib.sha256(request_bytes(request)).hexdigest()


def approval_message(request: CustodyRequest, approver: str, decision: str) -> bytes:
    """The bytes custodian ``approver`` signs to ``decision`` (approve/reject) ``request``."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {sorted(DECISIONS)}")
    body = {"approver": approver, "decision": decision, "request": request_digest(request)}
    return APPROVAL_DOMAIN + canonical_json(body).encode("utf-8")
