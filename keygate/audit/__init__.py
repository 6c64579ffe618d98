"""Audit events, the tamper-evident chain and the append-only audit store.

``AuditStore`` is imported lazily (it pulls in SQLAlchemy and the registry), so that the offline
verifier (:mod:`keygate.audit.verify`) can import this package with nothing but the standard
library and ``cryptography``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keygate.audit.events import (
    DENIED_DETAIL_KEYS,
    OUTCOMES,
    AuditEvent,
    canonical_bytes,
    format_timestamp,
    redact_check,
)

if TYPE_CHECKING:
    from keygate.audit.store import AuditStore

__all__ = [
    "DENIED_DETAIL_KEYS",
    "OUTCOMES",
    "AuditEvent",
    "AuditStore",
    "canonical_bytes",
    "format_timestamp",
    "redact_check",
]


def __getattr__(name: str) -> Any:
    if name == "AuditStore":
        from keygate.audit.store import AuditStore  # noqa: PLC0415 - lazy on purpose (above)

        return AuditStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
