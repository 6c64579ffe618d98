"""Who may do what: service identities, their bearer tokens, and the authorisation check."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from keygate.core.errors import Forbidden, InvalidRequest

__all__ = [
    "OPERATIONS",
    "Principal",
    "certificate_key",
    "hash_token",
    "new_token",
    "validate_identity_name",
    "validate_purpose",
]

#: operations an identity can be granted
OPERATIONS: Final = frozenset({"encrypt", "decrypt", "rewrap"})
ANY: Final = "*"
TOKEN_PREFIX: Final = "kgt_"  # noqa: S105 - a prefix, not a secret
_PURPOSE_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def new_token() -> str:
    """A fresh bearer token: 256 random bits, shown once, stored only as its hash."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 of a bearer token (tokens are 256-bit random, so a fast hash is enough)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def certificate_key(der: bytes) -> str:
    """The registry key of a TLS client certificate: its SHA-256 fingerprint."""
    return "cert-sha256:" + hashlib.sha256(der).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def validate_purpose(purpose: object) -> str:
    if purpose.__class__ is not str or not _PURPOSE_RE.fullmatch(purpose):
        raise InvalidRequest("purpose must match [a-z][a-z0-9_-]{0,63}")
    return purpose


def validate_identity_name(name: object) -> str:
    if name.__class__ is not str or not _NAME_RE.fullmatch(name):
        raise InvalidRequest("identity names must match [A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
    return name


def _allowed(granted: frozenset[str], value: str) -> bool:
    return ANY in granted or value in granted


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a named service identity and what it may do."""

    name: str
    tenants: frozenset[str]
    purposes: frozenset[str]
    record_types: frozenset[str]
    operations: frozenset[str]

    @classmethod
    def from_grants(
        cls,
        name: str,
        *,
        tenants: Iterable[str],
        purposes: Iterable[str],
        record_types: Iterable[str],
        operations: Iterable[str],
    ) -> Principal:
        return cls(
            name,
            frozenset(tenants),
            frozenset(purposes),
            frozenset(record_types),
            frozenset(operations),
        )

    def may(self, operation: str, tenant: str, purpose: str | None = None) -> bool:
        return (
            _allowed(self.operations, operation)
            and _allowed(self.tenants, tenant)
            and (purpose is None or _allowed(self.purposes, purpose))
        )

    def may_purpose(self, purpose: str) -> bool:
        return _allowed(self.purposes, purpose)

    def may_record_type(self, record_type: str) -> bool:
        return _allowed(self.record_types, record_type)

    def require(self, operation: str, tenant: str, purpose: str | None = None) -> None:
        """Raise Forbidden unless this caller may do ``operation`` on tenant (× purpose)."""
        if not _allowed(self.operations, operation):
            raise Forbidden(f"identity {self.name} may not {operation}")
        if not _allowed(self.tenants, tenant):
            raise Forbidden(f"identity {self.name} is not allowed tenant {tenant}")
        if purpose is not None and not _allowed(self.purposes, purpose):
            raise Forbidden(f"identity {self.name} is not allowed purpose {purpose}")

    def require_record_type(self, record_type: str) -> None:
        if not _allowed(self.record_types, record_type):
            raise Forbidden(f"identity {self.name} is not allowed record type {record_type}")
