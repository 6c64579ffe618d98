"""Dual control: custodians, M-of-N signed approvals, and scheduled key destruction.

The rules (docs/dual-control.md tells the story for people):

- **Custodians** are enrolled by public key.  While fewer than M custodians have ever been
  enrolled (the *bootstrap*), ``keygate custodian add``/``remove`` and every direct admin
  command work as before.  Enrolling the M-th custodian switches dual control on, for good
  (``kg_custody_meta.activated_at``): from then on custodians are added and removed, tenants
  enabled and disabled and service identities added and revoked only by approved requests.
- **A request** names an action and its parameters (:mod:`keygate.custody.actions`), is
  validated against the current state, and expires after ``request_ttl_s``.  Whoever makes it
  is its requester; a custodian who makes it *and signs it* gives the first approval.
- **An approval** is a custodian's signature over :func:`~keygate.custody.canonical.
  approval_message`.  It counts only if the custodian is enrolled and not removed, the
  signature verifies under the key registered for them *now*, and they have not decided on this
  request before.  Every stored signature is verified again whenever approvals are counted, so
  a removed custodian's earlier approval stops counting and a changed request row stops
  verifying.  One signed rejection by any custodian ends the request (a veto).
- **Execution**: the approval that brings the count of valid approvals to M claims the request
  (``pending`` → ``executing``, a conditional update inside the one serialised write
  transaction), so it executes exactly once however many custodians approve at the same moment,
  in however many processes.  The action is validated once more and then executed; the request
  ends ``executed`` or ``failed``.  If the process dies between claim and end, the request stays
  ``executing`` and is never run again by itself (at most once; see the docs).
- **Key destruction** is scheduled by an approved ``destroy-key`` request: the version (never the
  active one) is disabled at once and destroyed by :meth:`Custody.destroy_due` once the waiting
  period (7–30 days) has passed, unless an approved ``cancel-destruction`` request came first.

Every request, approval (with its signature), rejection, expiry, execution and destruction is an
audit event in the chained trail, written after the change is committed; if it cannot be
written the call fails with ``Unavailable`` (the change stands; the trail is never skipped
silently).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog

from keygate.audit.events import AuditEvent, DetailValue, format_timestamp
from keygate.core.errors import (
    ConfigurationError,
    Forbidden,
    GatewayError,
    InvalidRequest,
    NotFound,
)
from keygate.core.model import KeyState
from keygate.custody.actions import (
    ACTIONS,
    MAX_WAITING_DAYS,
    MIN_WAITING_DAYS,
    Action,
    ActionContext,
    validate_custodian_name,
)
from keygate.custody.canonical import (
    DECISIONS,
    Approval,
    CustodyRequest,
    ParamValue,
    approval_message,
    canonical_json,
    check_params,
    is_request_id,
)
from keygate.custody.credentials import CustodianKey, parse_public_key, verify_signature
from keygate.custody.guard import CustodyStatus, DualControlGuard, executing
from keygate.custody.store import CustodianRecord, CustodyStore, DestructionRecord
from keygate.policy.tenants import validate_tenant

__all__ = ["DEFAULT_REQUEST_TTL_S", "STALE_CLAIM_S", "Custody", "DestructionOutcome", "Outcome"]

log = structlog.get_logger(__name__)

DEFAULT_REQUEST_TTL_S: Final = 24 * 3600.0
#: a destruction ``destroying`` for longer than this is taken over by the next destroy-due run
STALE_CLAIM_S: Final = 600.0
_MAX_TTL_S: Final = 30 * 86_400.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a request, approval or rejection led to."""

    request: CustodyRequest
    #: distinct valid approvals counted
    approvals: int
    #: whether this call executed the request
    executed: bool = False
    #: the execution's error, if it failed
    error: GatewayError | None = None


@dataclass(frozen=True, slots=True)
class DestructionOutcome:
    destruction: DestructionRecord
    ok: bool
    error: GatewayError | None = None


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _safe(value: object) -> str:
    """A name safe for an audit field: short printable text, else ``?``."""
    if isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable():
        return value
    return "?"


def _b64(sig: bytes) -> str:
    return base64.b64encode(sig).decode("ascii")


class Custody:
    """Dual-control use cases over a :class:`~keygate.service.Gateway` and a
    :class:`~keygate.custody.store.CustodyStore`."""

    def __init__(
        self,
        gateway: Any,
        store: CustodyStore | None = None,
        *,
        quorum: int = 2,
        allow_single_custodian: bool = False,
        request_ttl_s: float = DEFAULT_REQUEST_TTL_S,
        destruction_wait_days: int = MIN_WAITING_DAYS,
        clock: Callable[[], datetime] = _utcnow,
        actions: Mapping[str, Action] = ACTIONS,
    ) -> None:
        checked: object = quorum
        if isinstance(checked, bool) or not isinstance(checked, int) or checked < 1:
            raise ConfigurationError("the dual-control quorum must be a positive integer")
        if quorum < 2 and not allow_single_custodian:
            raise ConfigurationError(
                "the dual-control quorum must be at least 2; a quorum of 1 needs the explicit "
                "single-custodian development mode (KEYGATE_CUSTODY_ALLOW_SINGLE_CUSTODIAN=true)"
            )
        if not MIN_WAITING_DAYS <= destruction_wait_days <= MAX_WAITING_DAYS:
            raise ConfigurationError(
                f"the key destruction waiting period must be {MIN_WAITING_DAYS} to "
                f"{MAX_WAITING_DAYS} days"
            )
        if not 60 <= request_ttl_s <= _MAX_TTL_S:
            raise ConfigurationError("the request lifetime must be 60 s to 30 days")
        self.gateway = gateway
        if store is None:
            guard = getattr(gateway, "dual_control", None)
            store = guard.store if guard is not None else CustodyStore(gateway.registry)
        self.store = store
        self.quorum = quorum
        self.request_ttl_s = float(request_ttl_s)
        self.destruction_wait_days = destruction_wait_days
        self.clock = clock
        self.actions = actions
        self.guard = DualControlGuard(store, quorum=quorum)

    @classmethod
    def from_settings(cls, gateway: Any, settings: Any, **overrides: Any) -> Custody:
        """A :class:`Custody` configured by :class:`~keygate.config.Settings`."""
        kwargs: dict[str, Any] = {
            "quorum": settings.custody_quorum,
            "allow_single_custodian": settings.custody_allow_single_custodian,
            "request_ttl_s": settings.custody_request_ttl_s,
            "destruction_wait_days": settings.custody_destruction_wait_days,
        }
        kwargs.update(overrides)
        return cls(gateway, **kwargs)

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None:
            raise ValueError("the custody clock must return aware datetimes")
        return now.astimezone(UTC)

    # ------------------------------------------------------------------ audit
    def _audit(
        self,
        action: str,
        actor: str,
        request_id: str,
        *,
        outcome: str = "ok",
        code: str | None = None,
        tenant: str | None = None,
        purpose: str | None = None,
        key_version: int | None = None,
        detail: Mapping[str, DetailValue] | None = None,
    ) -> None:
        self.gateway.audit_event(
            AuditEvent(
                action=action,
                outcome=outcome,
                actor=actor[:128],
                request_id=request_id,
                tenant=tenant,
                purpose=purpose,
                key_version=key_version,
                code=code,
                detail=dict(detail or {}),
                ts=self._now(),
            )
        )

    @staticmethod
    def _scope(params: Mapping[str, ParamValue]) -> dict[str, Any]:
        """Audit scope fields (tenant, purpose, key_version) of a request, when valid."""
        out: dict[str, Any] = {}
        tenant = params.get("tenant")
        try:
            validate_tenant(tenant)
            out["tenant"] = tenant
        except GatewayError:
            pass
        purpose = params.get("purpose")
        if isinstance(purpose, str) and 0 < len(purpose) <= 64 and purpose.isprintable():
            out["purpose"] = purpose
        version = params.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version >= 1:
            out["key_version"] = version
        return out

    def _request_detail(self, req: CustodyRequest) -> dict[str, DetailValue]:
        return {
            "custody_action": req.action,
            "params": canonical_json(dict(req.params)),
            "requester": req.requester,
            "created_at": format_timestamp(req.created_at),
            "expires_at": format_timestamp(req.expires_at),
            "required": req.required,
            "request_digest": req.digest,
        }

    # ------------------------------------------------------------------ status and custodians
    def status(self) -> CustodyStatus:
        return self.guard.status()

    def custodians(self, *, include_removed: bool = True) -> list[CustodianRecord]:
        with self.store.read("list custodians") as conn:
            return self.store.custodians(conn, active_only=not include_removed)

    def add_custodian(self, actor: str, name: str, public_key_pem: bytes | str) -> CustodianRecord:
        """Enrol a custodian directly: only during the bootstrap (before dual control is on).

        Enrolling the M-th custodian switches dual control on.
        """
        detail: dict[str, DetailValue] = {"custodian": _safe(name)}
        rid = "cli-" + secrets.token_hex(8)
        try:
            validate_custodian_name(name)
            key: CustodianKey = parse_public_key(public_key_pem)
            detail.update(algorithm=key.algorithm, key_fingerprint=key.fingerprint)
            now = self._now()
            record = CustodianRecord(
                name, key.algorithm, key.public_key_pem, key.fingerprint, now, actor, None, None
            )
            with self.store.write(f"add custodian {name}") as conn:
                self._refuse_if_active(conn, "custodian.added", name=name)
                if self.store.custodian(conn, name) is not None:
                    raise InvalidRequest(
                        f"custodian name {name!r} is taken (names are never reused)"
                    )
                other = self.store.custodian_by_fingerprint(conn, key.fingerprint)
                if other is not None:
                    raise InvalidRequest(
                        f"this key is already registered (custodian {other.name!r})"
                    )
                self.store.insert_custodian(conn, record)
                count = len(self.store.custodians(conn, active_only=True))
                if count >= self.quorum:
                    self.store.activate(conn, format_timestamp(now))
                    detail["dual_control"] = "on"
        except GatewayError as exc:
            outcome = "denied" if isinstance(exc, Forbidden) else "error"
            self._audit(
                "custodian.added", actor, rid, outcome=outcome, code=exc.code, detail=detail
            )
            raise
        self._audit("custodian.added", actor, rid, detail=detail)
        return record

    def remove_custodian(self, actor: str, name: str) -> None:
        """Remove a custodian directly: only during the bootstrap."""
        rid = "cli-" + secrets.token_hex(8)
        detail: dict[str, DetailValue] = {"custodian": _safe(name)}
        try:
            validate_custodian_name(name)
            with self.store.write(f"remove custodian {name}") as conn:
                self._refuse_if_active(conn, "custodian.removed", name=name)
                if self.store.custodian(conn, name) is None:
                    raise NotFound(f"custodian {name!r} not found")
                if not self.store.mark_removed(conn, name, at=self._now(), by=actor):
                    raise InvalidRequest(f"custodian {name!r} was already removed")
        except GatewayError as exc:
            outcome = "denied" if isinstance(exc, Forbidden) else "error"
            self._audit(
                "custodian.removed", actor, rid, outcome=outcome, code=exc.code, detail=detail
            )
            raise
        self._audit("custodian.removed", actor, rid, detail=detail)

    def _refuse_if_active(self, conn: Any, change: str, **params: Any) -> None:
        active = self.store.activated_at(conn) is not None or (
            len(self.store.custodians(conn, active_only=True)) >= self.quorum
        )
        if active and not self.guard.is_executing():
            count = len(self.store.custodians(conn, active_only=True))
            raise self.guard.refusal(change, count, **params)

    # ------------------------------------------------------------------ requests
    def _context(self, request: CustodyRequest | None, now: datetime) -> ActionContext:
        def audit(action: str, **fields: Any) -> None:
            assert request is not None  # noqa: S101 - only executors write events
            self._audit(action, f"custody:{request.id}", request.id, **fields)

        return ActionContext(
            gateway=self.gateway,
            store=self.store,
            now=now,
            quorum=self.quorum,
            destruction_wait_days=self.destruction_wait_days,
            request=request,
            audit=audit,
        )

    def _registered(self, name: str) -> Action:
        action = self.actions.get(name)
        if action is None:
            raise ConfigurationError(
                f"dual-control action {name!r} is not registered in this process"
            )
        return action

    def _action(self, name: str) -> Action:
        action = self.actions.get(name)
        if action is None:
            known = ", ".join(sorted(self.actions))
            raise InvalidRequest(f"unknown dual-control action {name!r} (known: {known})")
        return action

    def new_request(
        self, actor: str, action: str, params: Mapping[str, object], *, requester: str | None = None
    ) -> CustodyRequest:
        """Validate and build a request (not stored yet: sign it, then :meth:`submit` it).

        ``requester`` is the custodian who will sign it, or None for an unsigned request made
        by ``actor``.
        """
        now = self._now()
        if not isinstance(action, str):
            raise InvalidRequest("the action must be text")
        act = self._action(action)
        normalised = check_params(act.validate(self._context(None, now), check_params(params)))
        if requester is not None:
            validate_custodian_name(requester)
        who = requester if requester is not None else actor
        if not 0 < len(who) <= 128 or not who.isprintable():
            raise InvalidRequest("the requester must be printable text of at most 128 characters")
        return CustodyRequest(
            id="kgr-" + secrets.token_hex(8),
            action=action,
            params=normalised,
            requester=who,
            created_at=now,
            expires_at=now + timedelta(seconds=self.request_ttl_s),
            required=self.quorum,
        )

    def submit(
        self,
        actor: str,
        request: CustodyRequest,
        *,
        signature: bytes | None = None,
    ) -> Outcome:
        """Store a request made by :meth:`new_request`; with the requester's signature (over
        ``approval_message(request, request.requester, "approve")``) it is their approval."""
        now = self._now()
        claimed = False
        refusal: GatewayError | None = None
        approval: Approval | None = None
        detail = self._request_detail(request)
        scope = self._scope(request.params)
        with self.store.write(f"submit request {request.id}") as conn:
            active = self.store.custodians(conn, active_only=True)
            if len(active) < request.required:
                refusal = InvalidRequest(
                    f"a quorum of {request.required} needs at least {request.required} enrolled "
                    f"custodians; {len(active)} are enrolled (keygate custodian add)"
                )
            elif signature is not None:
                approval, refusal = self._check_approval(
                    conn, request, request.requester, "approve", signature, now
                )
            if refusal is None:
                self.store.insert_request(conn, request, canonical_json(dict(request.params)))
                if approval is not None:
                    self.store.insert_approval(conn, approval)
                count = self._count(conn, request)
                if count >= request.required:
                    claimed = self.store.set_status(
                        conn, request.id, expect="pending", status="executing", at=now
                    )
        if refusal is not None:
            self._audit(
                "custody.requested",
                actor,
                request.id,
                outcome="denied" if isinstance(refusal, Forbidden) else "error",
                code=refusal.code,
                detail=detail,
                **scope,
            )
            raise refusal
        self._audit("custody.requested", actor, request.id, detail=detail, **scope)
        if approval is not None:
            self._audit_approval(request, approval, scope)
        return self._after(request.id, claimed, scope)

    def _check_approval(
        self,
        conn: Any,
        request: CustodyRequest,
        custodian: str,
        decision: str,
        signature: bytes,
        now: datetime,
    ) -> tuple[Approval | None, GatewayError | None]:
        rec = self.store.custodian(conn, custodian)
        if rec is None or not rec.is_active:
            why = "was removed" if rec is not None else "is not an enrolled custodian"
            return None, Forbidden(f"{custodian!r} {why}; the decision is refused")
        key = CustodianKey(rec.algorithm, rec.public_key_pem, rec.fingerprint)
        if not verify_signature(key, approval_message(request, custodian, decision), signature):
            return None, Forbidden(
                f"the signature does not verify under custodian {custodian!r}'s registered key "
                f"for request {request.id} ({decision})"
            )
        if any(a.custodian == custodian for a in request.approvals):
            return None, InvalidRequest(
                f"custodian {custodian!r} has already decided on request {request.id}"
            )
        return Approval(request.id, custodian, decision, signature, rec.fingerprint, now), None

    def _count(self, conn: Any, request: CustodyRequest) -> int:
        """Distinct valid approvals of ``request``, every signature verified again now."""
        stored = self.store.request(conn, request.id)
        if stored is None:
            return 0
        custodians = {c.name: c for c in self.store.custodians(conn, active_only=True)}
        valid = set()
        for a in stored.approvals:
            rec = custodians.get(a.custodian)
            if a.decision != "approve" or rec is None or rec.fingerprint != a.key_fingerprint:
                continue
            key = CustodianKey(rec.algorithm, rec.public_key_pem, rec.fingerprint)
            if verify_signature(key, approval_message(stored, a.custodian, "approve"), a.signature):
                valid.add(a.custodian)
        return len(valid)

    def _audit_approval(
        self, request: CustodyRequest, approval: Approval, scope: Mapping[str, Any]
    ) -> None:
        action = "custody.approved" if approval.decision == "approve" else "custody.rejected"
        self._audit(
            action,
            f"custodian:{approval.custodian}",
            request.id,
            detail={
                "custody_action": request.action,
                "approver": approval.custodian,
                "decision": approval.decision,
                "request_digest": request.digest,
                "signature": _b64(approval.signature),
                "key_fingerprint": approval.key_fingerprint,
            },
            **scope,
        )

    def decide(self, request_id: str, custodian: str, decision: str, signature: bytes) -> Outcome:
        """Record custodian ``custodian``'s signed ``decision`` (approve/reject) on a request;
        execute it if this approval completes the quorum."""
        if decision not in DECISIONS:
            raise InvalidRequest(f"decision must be one of {', '.join(sorted(DECISIONS))}")
        if not is_request_id(request_id):
            raise InvalidRequest("request ids look like kgr-0123456789abcdef")
        now = self._now()
        claimed = expired = False
        refusal: GatewayError | None = None
        approval: Approval | None = None
        with self.store.write(f"{decision} request {request_id}") as conn:
            request = self.store.request(conn, request_id)
            if request is None:
                raise NotFound(f"no request {request_id}")
            if request.status == "pending" and now >= request.expires_at:
                expired = self.store.set_status(
                    conn, request_id, expect="pending", status="expired", at=now
                )
                refusal = InvalidRequest(
                    f"request {request_id} expired at "
                    f"{request.expires_at.isoformat(timespec='seconds')}; make a new one"
                )
            elif request.status != "pending":
                refusal = InvalidRequest(
                    f"request {request_id} is {request.status}; it takes no more decisions"
                )
            else:
                approval, refusal = self._check_approval(
                    conn, request, custodian, decision, signature, now
                )
            if approval is not None:
                self.store.insert_approval(conn, approval)
                if decision == "reject":
                    self.store.set_status(
                        conn, request_id, expect="pending", status="rejected", at=now
                    )
                elif self._count(conn, request) >= request.required:
                    claimed = self.store.set_status(
                        conn, request_id, expect="pending", status="executing", at=now
                    )
        scope = self._scope(request.params)
        if expired:
            self._audit_expired(request, scope)
        if refusal is not None:
            self._audit(
                "custody.approved" if decision == "approve" else "custody.rejected",
                f"custodian:{_safe(custodian)}",
                request_id,
                outcome="denied" if isinstance(refusal, Forbidden) else "error",
                code=refusal.code,
                detail={
                    "custody_action": request.action,
                    "approver": _safe(custodian),
                    "decision": decision,
                    "request_digest": request.digest,
                    "signature": _b64(bytes(signature))[:200],
                },
                **scope,
            )
            raise refusal
        assert approval is not None  # noqa: S101 - no refusal means a recorded approval
        self._audit_approval(request, approval, scope)
        return self._after(request_id, claimed, scope)

    def approve(self, request_id: str, custodian: str, signature: bytes) -> Outcome:
        return self.decide(request_id, custodian, "approve", signature)

    def reject(self, request_id: str, custodian: str, signature: bytes) -> Outcome:
        return self.decide(request_id, custodian, "reject", signature)

    def _audit_expired(self, request: CustodyRequest, scope: Mapping[str, Any]) -> None:
        self._audit(
            "custody.expired",
            "custody",
            request.id,
            detail={
                "custody_action": request.action,
                "expires_at": format_timestamp(request.expires_at),
                "request_digest": request.digest,
            },
            **scope,
        )

    def _after(self, request_id: str, claimed: bool, scope: Mapping[str, Any]) -> Outcome:
        with self.store.read(f"read request {request_id}") as conn:
            request = self.store.request(conn, request_id)
            assert request is not None  # noqa: S101 - stored above
            count = self._count(conn, request)
        if not claimed:
            return Outcome(request, count)
        return self._execute(request, count, scope)

    def _execute(self, request: CustodyRequest, count: int, scope: Mapping[str, Any]) -> Outcome:
        now = self._now()
        error: GatewayError | None = None
        result: Mapping[str, DetailValue] = {}
        try:
            action = self._registered(request.action)
            ctx = self._context(request, now)
            with executing(request.id):
                action.validate(ctx, dict(request.params))  # the state may have changed
                result = dict(action.execute(ctx, dict(request.params)))
        except GatewayError as exc:
            error = exc
        except Exception as exc:
            error = GatewayError(f"{request.action} failed ({type(exc).__name__})")
            log.exception("custody.execution_failed", request=request.id)
        status = "executed" if error is None else "failed"
        done = self._now()
        with self.store.write(f"finish request {request.id}") as conn:
            self.store.set_status(
                conn,
                request.id,
                expect="executing",
                status=status,
                at=done,
                result=canonical_json(result),
                code=error.code if error is not None else None,
            )
        detail: dict[str, DetailValue] = {
            "custody_action": request.action,
            "request_digest": request.digest,
            "approvals": count,
            "result": canonical_json(result)[:1000],
        }
        if error is not None:
            detail["error"] = error.detail[:500]
        self._audit(
            "custody.executed",
            f"custody:{request.id}",
            request.id,
            outcome="ok" if error is None else "error",
            code=error.code if error is not None else None,
            detail=detail,
            **scope,
        )
        final = replace(request, status=status, status_at=done, result=result,
                        code=error.code if error is not None else None)  # fmt: skip
        return Outcome(final, count, executed=error is None, error=error)

    def get(self, request_id: str) -> CustodyRequest:
        if not is_request_id(request_id):
            raise InvalidRequest("request ids look like kgr-0123456789abcdef")
        self.expire_due()
        with self.store.read(f"read request {request_id}") as conn:
            request = self.store.request(conn, request_id)
        if request is None:
            raise NotFound(f"no request {request_id}")
        return request

    def requests(self, *, pending_only: bool = False) -> list[CustodyRequest]:
        self.expire_due()
        with self.store.read("list requests") as conn:
            return self.store.requests(conn, statuses=("pending",) if pending_only else None)

    def valid_approvals(self, request: CustodyRequest) -> int:
        with self.store.read(f"read request {request.id}") as conn:
            return self._count(conn, request)

    def expire_due(self) -> list[CustodyRequest]:
        """Mark pending requests past their expiry time ``expired`` (one audit event each)."""
        now = self._now()
        expired: list[CustodyRequest] = []
        with self.store.read("find expired requests") as conn:
            due = [
                r for r in self.store.requests(conn, statuses=("pending",)) if now >= r.expires_at
            ]
        if not due:
            return expired
        with self.store.write("expire requests") as conn:
            for r in due:
                if self.store.set_status(conn, r.id, expect="pending", status="expired", at=now):
                    expired.append(r)
        for r in expired:
            self._audit_expired(r, self._scope(r.params))
        return expired

    # ------------------------------------------------------------------ destruction
    def destructions(self, *, open_only: bool = False) -> list[DestructionRecord]:
        with self.store.read("list key destructions") as conn:
            return self.store.destructions(
                conn, statuses=("scheduled", "destroying") if open_only else None
            )

    def destroy_due(self) -> list[DestructionOutcome]:
        """Destroy every key version whose waiting period is over: the registry marks it
        destroyed (gateways answer 410 for its ciphertexts within seconds) and the KEK is
        destroyed in the HSM.  Safe to run from cron in several places at once."""
        now = self._now()
        with self.store.write("claim due key destructions") as conn:
            claimed = []
            for d in self.store.destructions(conn, statuses=("scheduled",), due_by=now):
                if self.store.set_destruction_status(
                    conn, d.request_id, expect=("scheduled",), status="destroying", at=now
                ):
                    claimed.append(d)
            # Destructions left half done (a process died, or the HSM or the registry was
            # unavailable) are taken over once their claim is stale, by one run only.
            stale_before = now - timedelta(seconds=STALE_CLAIM_S)
            retry = [
                d
                for d in self.store.destructions(conn, statuses=("destroying",))
                if d.request_id not in {c.request_id for c in claimed}
                and self.store.reclaim_destruction(
                    conn, d.request_id, stale_before=stale_before, at=now
                )
            ]
        return [self._destroy(d) for d in [*claimed, *retry]]

    def _destroy(self, d: DestructionRecord) -> DestructionOutcome:
        gw = self.gateway
        ref = f"{d.tenant}/{d.purpose}/v{d.version}"
        error: GatewayError | None = None
        try:
            rec = gw.registry.get_version(d.tenant, d.purpose, d.version)
            if rec is None:
                raise NotFound(f"no key version {ref}")
            if rec.hsm_label != d.hsm_label:
                raise InvalidRequest(f"key version {ref} no longer names HSM object {d.hsm_label}")
            if rec.state is KeyState.ACTIVE:
                raise InvalidRequest(
                    f"key version {ref} is the active version; it is not destroyed"
                )
            if rec.state is not KeyState.DESTROYED:
                gw.registry.set_version_state(d.tenant, d.purpose, d.version, KeyState.DESTROYED)
            gw.keys.refresh(force=True)
            if gw.hsm.kek_exists(d.hsm_label):
                try:
                    gw.hsm.destroy_kek(d.hsm_label)
                except GatewayError:
                    if gw.hsm.kek_exists(d.hsm_label):
                        raise
        except GatewayError as exc:
            error = exc
        now = self._now()
        with self.store.write(f"finish destruction of {ref}") as conn:
            if error is None:
                self.store.set_destruction_status(
                    conn, d.request_id, expect=("destroying",), status="destroyed", at=now
                )
            elif error.code != "UNAVAILABLE":
                # An unavailable HSM or registry is retried by the next run; anything else ends it.
                self.store.set_destruction_status(
                    conn,
                    d.request_id,
                    expect=("destroying",),
                    status="failed",
                    at=now,
                    code=error.code,
                )
        self._audit(
            "key.destroyed",
            f"custody:{d.request_id}",
            d.request_id,
            outcome="ok" if error is None else "error",
            code=error.code if error is not None else None,
            tenant=d.tenant,
            purpose=d.purpose,
            key_version=d.version,
            detail={
                "custody_request": d.request_id,
                "hsm_label": d.hsm_label,
                "scheduled_at": format_timestamp(d.scheduled_at),
                "due_at": format_timestamp(d.due_at),
                **({"error": error.detail[:500]} if error is not None else {}),
            },
        )
        with self.store.read(f"read destruction {d.request_id}") as conn:
            final = self.store.destruction(conn, d.request_id) or d
        return DestructionOutcome(final, error is None, error)
