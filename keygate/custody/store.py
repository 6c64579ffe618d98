"""Dual-control tables in the registry's database, on the registry's own engine.

``kg_custodians``            custodians: name, public key, fingerprint (unique), added/removed
``kg_custody_requests``      requests: action, parameters (canonical JSON), requester, times,
                             quorum, status, execution result
``kg_custody_approvals``     one signed decision per custodian per request
``kg_key_destructions``      scheduled key destructions: version, due time, status
``kg_custody_meta``          ``activated_at``: when dual control came on (it never goes off)

Concurrency
    Every write runs in :meth:`CustodyStore.write`: on SQLite a ``BEGIN IMMEDIATE`` transaction
    (the database's one write lock, shared with the registry), on PostgreSQL a
    transaction-scoped advisory lock taken first thing (READ COMMITTED then shows every later
    statement what the previous holder committed).  Writers of all processes queue; the service
    layer makes its decisions (count approvals, claim a request for execution, claim a due
    destruction) inside one such transaction with conditional updates, so a request executes
    once however many custodians approve at the same moment.

The tables are created on first use (idempotent), so an existing registry needs no migration.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keygate.custody.canonical import Approval, CustodyRequest
from keygate.keys.registry import (
    MAX_ID_LEN,
    UTCDateTime,
)

__all__ = [
    "CustodianRecord",
    "CustodyStore",
    "DestructionRecord",
    "custody_metadata",
]

#: advisory lock serialising custody writes on PostgreSQL ("kgcustod")
_WRITE_LOCK_ID: Final = 0x6B67637573746F64
#: the registry's and the audit store's schema lock ("kgschema")
_SCHEMA_LOCK_ID: Final = 0x6B67736368656D61
_ACTIVATED: Final = "activated_at"

custody_metadata: Final = sa.MetaData()

custodians_table: Final = sa.Table(
    "kg_custodians",
    custody_metadata,
    sa.Column("name", sa.String(MAX_ID_LEN), primary_key=True),
    sa.Column("algorithm", sa.String(16), nullable=False),
    sa.Column("public_key", sa.Text(), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("removed_at", UTCDateTime(), nullable=True),
    sa.Column("removed_by", sa.String(128), nullable=True),
    # One key, one custodian: the same key under two names would count twice.
    sa.UniqueConstraint("fingerprint", name="uq_kg_custodians_fingerprint"),
    sa.CheckConstraint("algorithm IN ('ed25519', 'ecdsa-p256')", name="ck_kg_custodians_alg"),
)

requests_table: Final = sa.Table(
    "kg_custody_requests",
    custody_metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("action", sa.String(64), nullable=False),
    #: canonical JSON of the parameters, exactly as signed
    sa.Column("params", sa.Text(), nullable=False),
    sa.Column("requester", sa.String(128), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("required", sa.Integer(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_at", UTCDateTime(), nullable=False),
    sa.Column("result", sa.Text(), nullable=False),
    sa.Column("code", sa.String(64), nullable=True),
    sa.CheckConstraint("required >= 1", name="ck_kg_custody_requests_required"),
)
sa.Index("ix_kg_custody_requests_status", requests_table.c.status)

approvals_table: Final = sa.Table(
    "kg_custody_approvals",
    custody_metadata,
    sa.Column(
        "request_id", sa.String(32), sa.ForeignKey("kg_custody_requests.id"), primary_key=True
    ),
    sa.Column("custodian", sa.String(MAX_ID_LEN), primary_key=True),
    sa.Column("decision", sa.String(16), nullable=False),
    #: base64
    sa.Column("signature", sa.Text(), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint("decision IN ('approve', 'reject')", name="ck_kg_custody_decision"),
)

destructions_table: Final = sa.Table(
    "kg_key_destructions",
    custody_metadata,
    #: the destroy-key request that scheduled it
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(MAX_ID_LEN), nullable=False),
    sa.Column("purpose", sa.String(MAX_ID_LEN), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("hsm_label", sa.String(MAX_ID_LEN), nullable=False),
    #: the version's state before it was disabled for the waiting period (restored on cancel)
    sa.Column("previous_state", sa.String(16), nullable=False),
    sa.Column("scheduled_at", UTCDateTime(), nullable=False),
    sa.Column("due_at", UTCDateTime(), nullable=False),
    #: scheduled → destroying → destroyed; scheduled → cancelled; destroying → failed
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_at", UTCDateTime(), nullable=False),
    sa.Column("cancel_request_id", sa.String(32), nullable=True),
    sa.Column("code", sa.String(64), nullable=True),
)
sa.Index(
    "ix_kg_key_destructions_version",
    destructions_table.c.tenant,
    destructions_table.c.purpose,
    destructions_table.c.version,
)

meta_table: Final = sa.Table(
    "kg_custody_meta",
    custody_metadata,
    sa.Column("name", sa.String(MAX_ID_LEN), primary_key=True),
    sa.Column("value", sa.Text(), nullable=False),
)


@dataclass(frozen=True, slots=True)
class CustodianRecord:
    name: str
    algorithm: str
    public_key_pem: str
    fingerprint: str
    created_at: datetime
    created_by: str
    removed_at: datetime | None
    removed_by: str | None

    @property
    def is_active(self) -> bool:
        return self.removed_at is None


@dataclass(frozen=True, slots=True)
class DestructionRecord:
    request_id: str
    tenant: str
    purpose: str
    version: int
    hsm_label: str
    previous_state: str
    scheduled_at: datetime
    due_at: datetime
    status: str
    status_at: datetime
    cancel_request_id: str | None
    code: str | None


def _custodian(row: sa.Row[Any]) -> CustodianRecord:
    return CustodianRecord(
        name=row.name,
        algorithm=row.algorithm,
        public_key_pem=row.public_key,
        fingerprint=row.fingerprint,
        created_at=row.created_at,
        created_by=row.created_by,
        removed_at=row.removed_at,
        removed_by=row.removed_by,
    )


def _approval(row: sa.Row[Any]) -> Approval:
    return Approval(
        request_id=row.request_id,
        custodian=row.custodian,
        decision=row.decision,
        signature=base64.b64decode(row.signature),
        key_fingerprint=row.fingerprint,
        created_at=row.created_at,
    )


def _destruction(row: sa.Row[Any]) -> DestructionRecord:
    return DestructionRecord(
        request_id=row.request_id,
        tenant=row.tenant,
        purpose=row.purpose,
        version=int(row.version),
        hsm_label=row.hsm_label,
        previous_state=row.previous_state,
        scheduled_at=row.scheduled_at,
        due_at=row.due_at,
        status=row.status,
        status_at=row.status_at,
        cancel_request_id=row.cancel_request_id,
        code=row.code,
    )


class CustodyStore:
    """The dual-control tables, on the engine of a :class:`~keygate.keys.registry.Registry`."""

    def __init__(self, registry: Any) -> None:
        # The registry's own transactions: one pool, one database, and for ``sqlite://`` the very
        # same connection (the registry's guard serialises its users).
        self._registry = registry
        self._ready = False

    def __repr__(self) -> str:
        return f"CustodyStore({self._registry!r})"

    # -- plumbing -------------------------------------------------------------------------------

    def _transaction(
        self, what: str, *, write: bool
    ) -> contextlib.AbstractContextManager[Connection]:
        return self._registry.transaction(  # type: ignore[no-any-return]
            what, write=write, advisory_lock=_WRITE_LOCK_ID
        )

    def create_schema(self) -> None:
        """Create the tables if they do not exist (idempotent, safe across processes)."""
        with self._transaction("create custody schema", write=True) as conn:
            if self._registry.on_postgresql:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_ID)))
            custody_metadata.create_all(conn, checkfirst=True)
        self._ready = True

    def _ensure(self) -> None:
        if not self._ready:
            self.create_schema()

    @contextlib.contextmanager
    def write(self, what: str) -> Iterator[Connection]:
        """One serialised write transaction (every process queues for it)."""
        self._ensure()
        with self._transaction(what, write=True) as conn:
            yield conn

    @contextlib.contextmanager
    def read(self, what: str) -> Iterator[Connection]:
        self._ensure()
        with self._transaction(what, write=False) as conn:
            yield conn

    # -- custodians -----------------------------------------------------------------------------

    @staticmethod
    def custodian(conn: Connection, name: str) -> CustodianRecord | None:
        row = conn.execute(
            sa.select(custodians_table).where(custodians_table.c.name == name)
        ).first()
        return None if row is None else _custodian(row)

    @staticmethod
    def custodians(conn: Connection, *, active_only: bool = False) -> list[CustodianRecord]:
        query = sa.select(custodians_table).order_by(custodians_table.c.name)
        if active_only:
            query = query.where(custodians_table.c.removed_at.is_(None))
        return [_custodian(r) for r in conn.execute(query).all()]

    @staticmethod
    def custodian_by_fingerprint(conn: Connection, fp: str) -> CustodianRecord | None:
        row = conn.execute(
            sa.select(custodians_table).where(custodians_table.c.fingerprint == fp)
        ).first()
        return None if row is None else _custodian(row)

    @staticmethod
    def insert_custodian(conn: Connection, record: CustodianRecord) -> None:
        conn.execute(
            sa.insert(custodians_table).values(
                name=record.name,
                algorithm=record.algorithm,
                public_key=record.public_key_pem,
                fingerprint=record.fingerprint,
                created_at=record.created_at,
                created_by=record.created_by,
                removed_at=None,
                removed_by=None,
            )
        )

    @staticmethod
    def mark_removed(conn: Connection, name: str, *, at: datetime, by: str) -> bool:
        done = conn.execute(
            sa.update(custodians_table)
            .where(custodians_table.c.name == name, custodians_table.c.removed_at.is_(None))
            .values(removed_at=at, removed_by=by)
        )
        return bool(done.rowcount == 1)

    # -- activation -----------------------------------------------------------------------------

    @staticmethod
    def activated_at(conn: Connection) -> str | None:
        value = conn.execute(
            sa.select(meta_table.c.value).where(meta_table.c.name == _ACTIVATED)
        ).scalar_one_or_none()
        return None if value is None else str(value)

    @staticmethod
    def activate(conn: Connection, at: str) -> None:
        if CustodyStore.activated_at(conn) is None:
            conn.execute(sa.insert(meta_table).values(name=_ACTIVATED, value=at))

    # -- requests -------------------------------------------------------------------------------

    @staticmethod
    def insert_request(conn: Connection, request: CustodyRequest, params_json: str) -> None:
        conn.execute(
            sa.insert(requests_table).values(
                id=request.id,
                action=request.action,
                params=params_json,
                requester=request.requester,
                created_at=request.created_at,
                expires_at=request.expires_at,
                required=request.required,
                status="pending",
                status_at=request.created_at,
                result="{}",
                code=None,
            )
        )

    @staticmethod
    def request(conn: Connection, request_id: str) -> CustodyRequest | None:
        row = conn.execute(
            sa.select(requests_table).where(requests_table.c.id == request_id)
        ).first()
        if row is None:
            return None
        approvals = conn.execute(
            sa.select(approvals_table)
            .where(approvals_table.c.request_id == request_id)
            .order_by(approvals_table.c.created_at, approvals_table.c.custodian)
        ).all()
        return CustodyStore._request(row, tuple(_approval(a) for a in approvals))

    @staticmethod
    def _request(row: sa.Row[Any], approvals: tuple[Approval, ...]) -> CustodyRequest:
        return CustodyRequest(
            id=row.id,
            action=row.action,
            params=json.loads(row.params),
            requester=row.requester,
            created_at=row.created_at,
            expires_at=row.expires_at,
            required=int(row.required),
            status=row.status,
            status_at=row.status_at,
            result=json.loads(row.result),
            code=row.code,
            approvals=approvals,
        )

    @staticmethod
    def requests(
        conn: Connection, *, statuses: tuple[str, ...] | None = None
    ) -> list[CustodyRequest]:
        query = sa.select(requests_table).order_by(requests_table.c.created_at, requests_table.c.id)
        if statuses is not None:
            query = query.where(requests_table.c.status.in_(statuses))
        rows = conn.execute(query).all()
        ids = [r.id for r in rows]
        grouped: dict[str, list[Approval]] = {}
        if ids:
            for a in conn.execute(
                sa.select(approvals_table)
                .where(approvals_table.c.request_id.in_(ids))
                .order_by(approvals_table.c.created_at, approvals_table.c.custodian)
            ).all():
                grouped.setdefault(a.request_id, []).append(_approval(a))
        return [CustodyStore._request(r, tuple(grouped.get(r.id, ()))) for r in rows]

    @staticmethod
    def set_status(
        conn: Connection,
        request_id: str,
        *,
        expect: str,
        status: str,
        at: datetime,
        result: str | None = None,
        code: str | None = None,
    ) -> bool:
        """Move a request from ``expect`` to ``status``; False if it was not in ``expect``."""
        values: dict[str, Any] = {"status": status, "status_at": at, "code": code}
        if result is not None:
            values["result"] = result
        done = conn.execute(
            sa.update(requests_table)
            .where(requests_table.c.id == request_id, requests_table.c.status == expect)
            .values(**values)
        )
        return bool(done.rowcount == 1)

    @staticmethod
    def insert_approval(conn: Connection, approval: Approval) -> None:
        conn.execute(
            sa.insert(approvals_table).values(
                request_id=approval.request_id,
                custodian=approval.custodian,
                decision=approval.decision,
                signature=base64.b64encode(approval.signature).decode("ascii"),
                fingerprint=approval.key_fingerprint,
                created_at=approval.created_at,
            )
        )

    # -- destructions ---------------------------------------------------------------------------

    @staticmethod
    def insert_destruction(conn: Connection, record: DestructionRecord) -> None:
        conn.execute(
            sa.insert(destructions_table).values(
                request_id=record.request_id,
                tenant=record.tenant,
                purpose=record.purpose,
                version=record.version,
                hsm_label=record.hsm_label,
                previous_state=record.previous_state,
                scheduled_at=record.scheduled_at,
                due_at=record.due_at,
                status=record.status,
                status_at=record.status_at,
                cancel_request_id=None,
                code=None,
            )
        )

    @staticmethod
    def destruction(conn: Connection, request_id: str) -> DestructionRecord | None:
        row = conn.execute(
            sa.select(destructions_table).where(destructions_table.c.request_id == request_id)
        ).first()
        return None if row is None else _destruction(row)

    @staticmethod
    def destructions(
        conn: Connection,
        *,
        statuses: tuple[str, ...] | None = None,
        version: tuple[str, str, int] | None = None,
        due_by: datetime | None = None,
    ) -> list[DestructionRecord]:
        t = destructions_table
        query = sa.select(t).order_by(t.c.due_at, t.c.request_id)
        if statuses is not None:
            query = query.where(t.c.status.in_(statuses))
        if version is not None:
            query = query.where(
                t.c.tenant == version[0], t.c.purpose == version[1], t.c.version == version[2]
            )
        if due_by is not None:
            query = query.where(t.c.due_at <= due_by)
        return [_destruction(r) for r in conn.execute(query).all()]

    @staticmethod
    def reclaim_destruction(
        conn: Connection, request_id: str, *, stale_before: datetime, at: datetime
    ) -> bool:
        """Take over a destruction left ``destroying`` since before ``stale_before`` (its
        process presumably died); False if it is not (or no longer) stale."""
        t = destructions_table
        done = conn.execute(
            sa.update(t)
            .where(
                t.c.request_id == request_id,
                t.c.status == "destroying",
                t.c.status_at <= stale_before,
            )
            .values(status_at=at)
        )
        return bool(done.rowcount == 1)

    @staticmethod
    def set_destruction_status(
        conn: Connection,
        request_id: str,
        *,
        expect: tuple[str, ...],
        status: str,
        at: datetime,
        cancel_request_id: str | None = None,
        code: str | None = None,
    ) -> bool:
        t = destructions_table
        values: dict[str, Any] = {"status": status, "status_at": at, "code": code}
        if cancel_request_id is not None:
            values["cancel_request_id"] = cancel_request_id
        done = conn.execute(
            sa.update(t)
            .where(t.c.request_id == request_id, t.c.status.in_(expect))
            .values(**values)
        )
        return bool(done.rowcount == 1)
