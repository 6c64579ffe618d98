"""What a dual-control request can do: a registry of actions, name → (validator, executor).

A validator checks and normalises a request's parameters against the current state; it runs
when the request is made *and again* just before the approved request executes (the state may
have changed in between).  It may fill in derived parameters (a custodian key's fingerprint, the
version a destruction concerns) so that the custodians sign exactly what will happen.  An
executor makes the change; it runs at most once per request, on behalf of the request (the
gateway's dual-control guard lets its changes through), and returns a small result that is
stored with the request and put into the ``custody.executed`` audit event.

Registering another action is one call::

    register_action("set-residency", validate=check_residency, execute=apply_residency,
                    describe=lambda p: f"set residency of {p['tenant']} to {p['region']}")

after which ``keygate request submit set-residency --param tenant=131016 --param region=…``
and ``keygate approve`` work for it like for the built-in ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from keygate.audit.events import DetailValue, format_timestamp
from keygate.core.errors import InvalidRequest, NotFound
from keygate.core.model import KeyState
from keygate.custody.canonical import CustodyRequest, ParamValue, is_request_id
from keygate.custody.credentials import parse_public_key
from keygate.custody.store import CustodianRecord, CustodyStore, DestructionRecord
from keygate.policy.access import ANY, OPERATIONS, validate_identity_name, validate_purpose
from keygate.policy.records import is_valid_record_type
from keygate.policy.tenants import validate_tenant

__all__ = [
    "ACTIONS",
    "MAX_WAITING_DAYS",
    "MIN_WAITING_DAYS",
    "Action",
    "ActionContext",
    "describe",
    "register_action",
    "validate_custodian_name",
]

#: the waiting period of a key destruction, in days (DESIGN: configurable, 7–30)
MIN_WAITING_DAYS: Final = 7
MAX_WAITING_DAYS: Final = 30
_CUSTODIAN_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_CREDENTIAL: Final = re.compile(r"(cert-sha256:)?[0-9a-f]{64}")
_ACTION_NAME: Final = re.compile(r"[a-z][a-z0-9-]{0,47}")

Params = dict[str, ParamValue]


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What validators and executors may use."""

    gateway: Any
    store: CustodyStore
    now: datetime
    #: the configured quorum M
    quorum: int
    #: the configured default waiting period of a key destruction
    destruction_wait_days: int
    #: the request being executed (None while a new request is validated)
    request: CustodyRequest | None
    #: writes one audit event on behalf of the request: (action, fields) → None
    audit: Callable[..., None]

    @property
    def actor(self) -> str:
        """Who the changes are made by in the audit trail: ``custody:<request id>``."""
        return f"custody:{self.request.id}" if self.request is not None else "custody"

    @property
    def executing(self) -> bool:
        return self.request is not None


Validator = Callable[[ActionContext, Params], Params]
Executor = Callable[[ActionContext, Params], Mapping[str, DetailValue]]


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    validate: Validator
    execute: Executor
    #: one line for people (``keygate requests list``)
    describe: Callable[[Mapping[str, ParamValue]], str] | None = None


#: every action a request can name
ACTIONS: Final[dict[str, Action]] = {}


def register_action(
    name: str,
    *,
    validate: Validator,
    execute: Executor,
    describe: Callable[[Mapping[str, ParamValue]], str] | None = None,
    replace: bool = False,
) -> Action:
    """Make ``name`` a dual-control action (``keygate request submit NAME --param k=v …``)."""
    if not _ACTION_NAME.fullmatch(name):
        raise ValueError("action names must match [a-z][a-z0-9-]{0,47}")
    if name in ACTIONS and not replace:
        raise ValueError(f"action {name!r} is already registered")
    action = Action(name, validate, execute, describe)
    ACTIONS[name] = action
    return action


def describe(request: CustodyRequest, actions: Mapping[str, Action] = ACTIONS) -> str:
    """One line saying what ``request`` does."""
    action = actions.get(request.action)
    if action is not None and action.describe is not None:
        try:
            return action.describe(request.params)
        except (KeyError, TypeError, ValueError):
            pass
    args = " ".join(f"{k}={v}" for k, v in sorted(request.params.items()) if k != "reason")
    return f"{request.action} {args}".strip()


# -- parameter helpers ---------------------------------------------------------------------------


def _text(params: Mapping[str, ParamValue], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"parameter {name} is required (text)")
    return value


def _int(params: Mapping[str, ParamValue], name: str) -> int:
    value = params.get(name)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"parameter {name} is required (an integer)")
    return value


def _texts(params: Mapping[str, ParamValue], name: str, *, required: bool = True) -> list[str]:
    value = params.get(name, [])
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"parameter {name} must be a list of text")
    if required and not value:
        raise InvalidRequest(f"parameter {name} needs at least one value")
    return sorted(set(value))


def _common(params: Mapping[str, ParamValue]) -> Params:
    """The parameters every action accepts: an optional free-text ``reason``."""
    out: Params = {}
    reason = params.get("reason")
    if reason is not None and reason != "":
        if not isinstance(reason, str) or len(reason) > 200 or not reason.isprintable():
            raise InvalidRequest("reason must be printable text of at most 200 characters")
        out["reason"] = reason
    return out


def _only(params: Mapping[str, ParamValue], allowed: set[str]) -> None:
    unknown = set(params) - allowed - {"reason"}
    if unknown:
        raise InvalidRequest(f"unknown parameters: {', '.join(sorted(unknown))}")


def validate_custodian_name(name: object) -> str:
    if not isinstance(name, str) or not _CUSTODIAN_NAME.fullmatch(name):
        raise InvalidRequest("custodian names must match [A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
    return name


# -- tenants -------------------------------------------------------------------------------------


def _tenant_validator(enabled: bool) -> Validator:
    def validate(ctx: ActionContext, params: Params) -> Params:
        _only(params, {"tenant"})
        tenant = _text(params, "tenant")
        validate_tenant(tenant)
        rec = ctx.gateway.registry.get_tenant(tenant)
        if rec is None:
            raise NotFound(f"unknown tenant {tenant}")
        if rec.enabled == enabled:
            raise InvalidRequest(
                f"tenant {tenant} is already {'enabled' if enabled else 'disabled'}"
            )
        return {"tenant": tenant, **_common(params)}

    return validate


def _tenant_executor(enabled: bool) -> Executor:
    def execute(ctx: ActionContext, params: Params) -> Mapping[str, DetailValue]:
        tenant = _text(params, "tenant")
        ctx.gateway.set_tenant_enabled(ctx.actor, tenant, enabled)
        return {"tenant": tenant, "enabled": enabled}

    return execute


# -- service identities (access) -----------------------------------------------------------------


def _identity(ctx: ActionContext, name: str) -> Any:
    for rec in ctx.gateway.registry.list_identities():
        if rec.name == name:
            return rec
    return None


def _validate_add_token(ctx: ActionContext, params: Params) -> Params:
    _only(params, {"name", "tenants", "purposes", "record_types", "operations", "credential"})
    name = validate_identity_name(_text(params, "name"))
    tenants = _texts(params, "tenants")
    purposes = _texts(params, "purposes")
    record_types = _texts(params, "record_types", required=False)
    operations = _texts(params, "operations")
    for t in tenants:
        if t != ANY:
            validate_tenant(t)
    for p in purposes:
        if p != ANY:
            validate_purpose(p)
    for rt in record_types:
        if rt != ANY and not is_valid_record_type(rt):
            raise InvalidRequest(f"bad record type {rt!r}")
    unknown = set(operations) - OPERATIONS - {ANY}
    if unknown:
        raise InvalidRequest(f"unknown operations: {', '.join(sorted(unknown))}")
    credential = _text(params, "credential")
    if not _CREDENTIAL.fullmatch(credential):
        raise InvalidRequest(
            "credential must be the SHA-256 of the token or cert-sha256:<certificate SHA-256>"
        )
    if _identity(ctx, name) is not None:
        raise InvalidRequest(f"identity {name!r} already exists")
    return {
        "name": name,
        "tenants": tenants,
        "purposes": purposes,
        "record_types": record_types,
        "operations": operations,
        "credential": credential,
        **_common(params),
    }


def _execute_add_token(ctx: ActionContext, params: Params) -> Mapping[str, DetailValue]:
    name = _text(params, "name")
    ctx.gateway.add_identity(
        ctx.actor,
        name,
        tenants=_texts(params, "tenants"),
        purposes=_texts(params, "purposes"),
        record_types=_texts(params, "record_types", required=False),
        operations=_texts(params, "operations"),
        token_hash=_text(params, "credential"),
    )
    return {"identity": name}


def _validate_revoke_token(ctx: ActionContext, params: Params) -> Params:
    _only(params, {"name"})
    name = validate_identity_name(_text(params, "name"))
    rec = _identity(ctx, name)
    if rec is None:
        raise NotFound(f"identity {name!r} not found")
    if rec.revoked_at is not None:
        raise InvalidRequest(f"identity {name!r} is already revoked")
    return {"name": name, **_common(params)}


def _execute_revoke_token(ctx: ActionContext, params: Params) -> Mapping[str, DetailValue]:
    name = _text(params, "name")
    ctx.gateway.revoke_identity(ctx.actor, name)
    return {"identity": name}


# -- key destruction -----------------------------------------------------------------------------


def _version_params(params: Mapping[str, ParamValue]) -> tuple[str, str, int]:
    tenant = _text(params, "tenant")
    validate_tenant(tenant)
    purpose = validate_purpose(_text(params, "purpose"))
    version = _int(params, "version")
    if version < 1:
        raise InvalidRequest("key version must be a positive integer")
    return tenant, purpose, version


def _open_destructions(ctx: ActionContext, ref: tuple[str, str, int]) -> list[DestructionRecord]:
    with ctx.store.read("read scheduled key destructions") as conn:
        return ctx.store.destructions(conn, statuses=("scheduled", "destroying"), version=ref)


def _validate_destroy_key(ctx: ActionContext, params: Params) -> Params:
    _only(params, {"tenant", "purpose", "version", "waiting_days"})
    tenant, purpose, version = _version_params(params)
    days = _int(params, "waiting_days") if "waiting_days" in params else ctx.destruction_wait_days
    if not MIN_WAITING_DAYS <= days <= MAX_WAITING_DAYS:
        raise InvalidRequest(
            f"the waiting period of a key destruction is {MIN_WAITING_DAYS} to "
            f"{MAX_WAITING_DAYS} days, not {days}"
        )
    rec = ctx.gateway.registry.get_version(tenant, purpose, version)
    ref = f"{tenant}/{purpose}/v{version}"
    if rec is None:
        raise NotFound(f"no key version {ref}")
    if rec.state is KeyState.ACTIVE:
        raise InvalidRequest(
            f"key version {ref} is the active version and cannot be destroyed; rotate the key "
            "and rewrap its ciphertexts first"
        )
    if rec.state is KeyState.DESTROYED:
        raise InvalidRequest(f"key version {ref} is already destroyed")
    open_ = [
        d
        for d in _open_destructions(ctx, (tenant, purpose, version))
        if ctx.request is None or d.request_id != ctx.request.id
    ]
    if open_:
        raise InvalidRequest(
            f"key version {ref} is already scheduled for destruction by request "
            f"{open_[0].request_id}"
        )
    return {
        "tenant": tenant,
        "purpose": purpose,
        "version": version,
        "waiting_days": days,
        **_common(params),
    }


def _execute_destroy_key(ctx: ActionContext, params: Params) -> Mapping[str, DetailValue]:
    assert ctx.request is not None  # noqa: S101 - executors run for a request
    tenant, purpose, version = _version_params(params)
    days = _int(params, "waiting_days")
    gw = ctx.gateway
    rec = gw.registry.get_version(tenant, purpose, version)
    if rec is None:
        raise NotFound(f"no key version {tenant}/{purpose}/v{version}")
    previous = rec.state
    if previous is not KeyState.DISABLED:
        # Disabled for the waiting period: whatever still needs this version fails loudly now,
        # while the destruction can still be cancelled.
        gw.set_key_state(ctx.actor, tenant, purpose, version, enabled=False)
    due = ctx.now + timedelta(days=days)
    record = DestructionRecord(
        request_id=ctx.request.id,
        tenant=tenant,
        purpose=purpose,
        version=version,
        hsm_label=rec.hsm_label,
        previous_state=previous.value,
        scheduled_at=ctx.now,
        due_at=due,
        status="scheduled",
        status_at=ctx.now,
        cancel_request_id=None,
        code=None,
    )
    with ctx.store.write(f"schedule destruction of {tenant}/{purpose}/v{version}") as conn:
        if ctx.store.destructions(
            conn, statuses=("scheduled", "destroying"), version=(tenant, purpose, version)
        ):
            raise InvalidRequest(f"key version {tenant}/{purpose}/v{version} is already scheduled")
        ctx.store.insert_destruction(conn, record)
    ctx.audit(
        "key.destruction_scheduled",
        tenant=tenant,
        purpose=purpose,
        key_version=version,
        detail={
            "custody_request": ctx.request.id,
            "due_at": format_timestamp(due),
            "waiting_days": days,
            "previous_state": previous.value,
        },
    )
    return {"due_at": format_timestamp(due), "previous_state": previous.value}


def _validate_cancel(ctx: ActionContext, params: Params) -> Params:
    _only(params, {"destroy_request", "tenant", "purpose", "version"})
    rid = _text(params, "destroy_request")
    if not is_request_id(rid):
        raise InvalidRequest("destroy_request must be the id of a destroy-key request")
    with ctx.store.read("read a scheduled key destruction") as conn:
        d = ctx.store.destruction(conn, rid)
    if d is None:
        raise NotFound(f"request {rid} scheduled no key destruction")
    for name, value in (("tenant", d.tenant), ("purpose", d.purpose), ("version", d.version)):
        if name in params and params[name] != value and str(params[name]) != str(value):
            raise InvalidRequest(f"request {rid} concerns {d.tenant}/{d.purpose}/v{d.version}")
    if d.status != "scheduled":
        raise InvalidRequest(
            f"the destruction of {d.tenant}/{d.purpose}/v{d.version} by request {rid} is "
            f"{d.status}; only a scheduled destruction can be cancelled"
        )
    return {
        "destroy_request": rid,
        "tenant": d.tenant,
        "purpose": d.purpose,
        "version": d.version,
        **_common(params),
    }


def _execute_cancel(ctx: ActionContext, params: Params) -> Mapping[str, DetailValue]:
    assert ctx.request is not None  # noqa: S101 - executors run for a request
    rid = _text(params, "destroy_request")
    with ctx.store.write(f"cancel the destruction scheduled by {rid}") as conn:
        d = ctx.store.destruction(conn, rid)
        if d is None or not ctx.store.set_destruction_status(
            conn,
            rid,
            expect=("scheduled",),
            status="cancelled",
            at=ctx.now,
            cancel_request_id=ctx.request.id,
        ):
            state = d.status if d is not None else "unknown"
            raise InvalidRequest(f"the destruction scheduled by {rid} is {state}, not scheduled")
    restored = KeyState.DISABLED.value
    gw = ctx.gateway
    if d.previous_state == KeyState.DECRYPT_ONLY.value:
        rec = gw.registry.get_version(d.tenant, d.purpose, d.version)
        if rec is not None and rec.state is KeyState.DISABLED:
            gw.registry.set_version_state(d.tenant, d.purpose, d.version, KeyState.DECRYPT_ONLY)
            gw.keys.refresh(force=True)
            restored = KeyState.DECRYPT_ONLY.value
    ctx.audit(
        "key.destruction_cancelled",
        tenant=d.tenant,
        purpose=d.purpose,
        key_version=d.version,
        detail={
            "custody_request": ctx.request.id,
            "destroy_request": rid,
            "restored_state": restored,
        },
    )
    return {"destroy_request": rid, "state": restored}


# -- custodians ----------------------------------------------------------------------------------


def _validate_add_custodian(ctx: ActionContext, params: Params) -> Params:
    _only(params, {"name", "public_key", "algorithm", "fingerprint"})
    name = validate_custodian_name(_text(params, "name"))
    key = parse_public_key(_text(params, "public_key"))
    for field, value in (("algorithm", key.algorithm), ("fingerprint", key.fingerprint)):
        if field in params and params[field] != value:
            raise InvalidRequest(f"parameter {field} does not match the public key")
    with ctx.store.read("read custodians") as conn:
        if ctx.store.custodian(conn, name) is not None:
            raise InvalidRequest(f"custodian name {name!r} is taken (names are never reused)")
        other = ctx.store.custodian_by_fingerprint(conn, key.fingerprint)
    if other is not None:
        raise InvalidRequest(f"this key is already registered (custodian {other.name!r})")
    return {
        "name": name,
        "public_key": key.public_key_pem,
        "algorithm": key.algorithm,
        "fingerprint": key.fingerprint,
        **_common(params),
    }


def _execute_add_custodian(ctx: ActionContext, params: Params) -> Mapping[str, DetailValue]:
    name = _text(params, "name")
    key = parse_public_key(_text(params, "public_key"))
    record = CustodianRecord(
        name=name,
        algorithm=key.algorithm,
        public_key_pem=key.public_key_pem,
        fingerprint=key.fingerprint,
        created_at=ctx.now,
        created_by=ctx.actor,
        removed_at=None,
        removed_by=None,
    )
    with ctx.store.write(f"add custodian {name}") as conn:
        ctx.store.insert_custodian(conn, record)
    ctx.audit(
        "custodian.added",
        detail={"custodian": name, "algorithm": key.algorithm, "key_fingerprint": key.fingerprint},
    )
    return {"custodian": name, "key_fingerprint": key.fingerprint}


def _validate_remove_custodian(ctx: ActionContext, params: Params) -> Params:
    _only(params, {"name"})
    name = validate_custodian_name(_text(params, "name"))
    with ctx.store.read("read custodians") as conn:
        rec = ctx.store.custodian(conn, name)
        active = len(ctx.store.custodians(conn, active_only=True))
    if rec is None:
        raise NotFound(f"custodian {name!r} not found")
    if not rec.is_active:
        raise InvalidRequest(f"custodian {name!r} was already removed")
    if active - 1 < ctx.quorum:
        raise InvalidRequest(
            f"removing {name!r} would leave {active - 1} custodians for a quorum of "
            f"{ctx.quorum}; enrol a replacement first (keygate request add-custodian)"
        )
    return {"name": name, **_common(params)}


def _execute_remove_custodian(ctx: ActionContext, params: Params) -> Mapping[str, DetailValue]:
    name = _text(params, "name")
    with ctx.store.write(f"remove custodian {name}") as conn:
        if not ctx.store.mark_removed(conn, name, at=ctx.now, by=ctx.actor):
            raise InvalidRequest(f"custodian {name!r} was already removed")
    ctx.audit("custodian.removed", detail={"custodian": name})
    return {"custodian": name}


register_action(
    "destroy-key",
    validate=_validate_destroy_key,
    execute=_execute_destroy_key,
    describe=lambda p: (
        f"destroy key {p['tenant']}/{p['purpose']}/v{p['version']} after {p['waiting_days']} days"
    ),
)
register_action(
    "cancel-destruction",
    validate=_validate_cancel,
    execute=_execute_cancel,
    describe=lambda p: (
        f"cancel the destruction of {p['tenant']}/{p['purpose']}/v{p['version']} "
        f"({p['destroy_request']})"
    ),
)
register_action(
    "disable-tenant",
    validate=_tenant_validator(enabled=False),
    execute=_tenant_executor(enabled=False),
    describe=lambda p: f"disable tenant {p['tenant']}",
)
register_action(
    "enable-tenant",
    validate=_tenant_validator(enabled=True),
    execute=_tenant_executor(enabled=True),
    describe=lambda p: f"enable tenant {p['tenant']}",
)
register_action(
    "add-token",
    validate=_validate_add_token,
    execute=_execute_add_token,
    describe=lambda p: (
        f"add service identity {p['name']}: tenants {','.join(p['tenants'])}; purposes "  # type: ignore[arg-type]
        f"{','.join(p['purposes'])}; operations {','.join(p['operations'])}"  # type: ignore[arg-type]
    ),
)
register_action(
    "revoke-token",
    validate=_validate_revoke_token,
    execute=_execute_revoke_token,
    describe=lambda p: f"revoke service identity {p['name']}",
)
register_action(
    "add-custodian",
    validate=_validate_add_custodian,
    execute=_execute_add_custodian,
    describe=lambda p: (
        f"add custodian {p['name']} ({p['algorithm']}, key {str(p['fingerprint'])[:16]}…)"
    ),
)
register_action(
    "remove-custodian",
    validate=_validate_remove_custodian,
    execute=_execute_remove_custodian,
    describe=lambda p: f"remove custodian {p['name']}",
)


# -- provider keys (the cloud KMS outer wrap; residency) -----------------------------------------


def _provider_validator(kind: str) -> Validator:
    def validate(ctx: ActionContext, params: Params) -> Params:
        needs_uri = kind != "finish"
        _only(params, {"tenant", "purpose", "uri"} if needs_uri else {"tenant", "purpose"})
        tenant = _text(params, "tenant")
        purpose = _text(params, "purpose")
        validate_tenant(tenant)
        validate_purpose(purpose)
        if ctx.gateway.registry.get_key(tenant, purpose) is None:
            raise NotFound(f"no key for {tenant}/{purpose}")
        out: Params = {"tenant": tenant, "purpose": purpose}
        if needs_uri:
            uri = _text(params, "uri")
            if not (kind == "migrate" and uri == "hsm-only"):
                ctx.gateway.providers.check(uri)  # syntax and residency, before anyone signs
            out["uri"] = uri
        return {**out, **_common(params)}

    return validate


def _provider_executor(kind: str) -> Executor:
    def execute(ctx: ActionContext, params: Params) -> Mapping[str, DetailValue]:
        tenant, purpose = _text(params, "tenant"), _text(params, "purpose")
        if kind == "set":
            ctx.gateway.provider_set(ctx.actor, tenant, purpose, _text(params, "uri"))
        elif kind == "migrate":
            uri = _text(params, "uri")
            ctx.gateway.provider_migrate(
                ctx.actor, tenant, purpose, None if uri == "hsm-only" else uri
            )
        else:
            ctx.gateway.provider_finish(ctx.actor, tenant, purpose)
        return {"tenant": tenant, "purpose": purpose, "provider": str(params.get("uri", ""))}

    return execute


register_action(
    "provider-set",
    validate=_provider_validator("set"),
    execute=_provider_executor("set"),
    describe=lambda p: f"give {p['tenant']}/{p['purpose']} the provider key {p['uri']}",
)
register_action(
    "provider-migrate",
    validate=_provider_validator("migrate"),
    execute=_provider_executor("migrate"),
    describe=lambda p: f"migrate {p['tenant']}/{p['purpose']} to the provider key {p['uri']}",
)
register_action(
    "provider-finish",
    validate=_provider_validator("finish"),
    execute=_provider_executor("finish"),
    describe=lambda p: f"retire the old provider keys of {p['tenant']}/{p['purpose']}",
)
