"""Audit events and the append-only audit store."""

from keygate.audit.events import (
    DENIED_DETAIL_KEYS,
    OUTCOMES,
    AuditEvent,
    canonical_bytes,
    format_timestamp,
    redact_check,
)
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
