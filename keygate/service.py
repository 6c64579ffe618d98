"""Use cases: encrypt, decrypt, rewrap, records, and the custodians' key administration.

The one place that orchestrates.  The API and the CLI call these methods; both get the same
authorisation checks, the same audit events and the same errors.  Every call writes its audit
event durably before it returns; when that fails the call fails with ``Unavailable`` and its
result is thrown away (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from keygate.audit.events import AuditEvent
from keygate.audit.pseudonym import MAX_BATCH_REFS, record_refs_detail
from keygate.audit.writer import AuditWriter
from keygate.core.errors import (
    ConfigurationError,
    DecryptionFailed,
    Forbidden,
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ValidationFailed,
)
from keygate.core.model import KeyState
from keygate.core.wire import from_text, to_text
from keygate.keys.manager import KeyManager
from keygate.policy.access import (
    ANY,
    OPERATIONS,
    Principal,
    certificate_key,
    hash_token,
    new_token,
    validate_identity_name,
    validate_purpose,
)
from keygate.policy.records import RecordPolicy, Treatment, is_valid_record_type
from keygate.policy.tenants import validate_tenant
from keygate.providers.base import ProviderKeyDisabled

__all__ = ["BatchResult", "Gateway", "ReadinessReport"]

log = structlog.get_logger(__name__)

MAX_RECORD_ID_LEN: Final = 128
_U32: Final = struct.Struct(">I")


@dataclass(slots=True)
class BatchResult:
    """Per-item results in request order: a value, or the error for that item."""

    items: list[Any]
    failed: int


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    ready: bool
    checks: dict[str, str] = field(default_factory=dict)


def key_version_of(envelope: bytes) -> int:
    """The KEK version named by a binary envelope header (already validated by its producer)."""
    pos = 4 + 1 + envelope[4]
    pos += 1 + envelope[pos]
    return int(_U32.unpack_from(envelope, pos)[0])


def _check_record_id(record_id: object) -> str:
    if (
        record_id.__class__ is not str
        or not 1 <= len(record_id) <= MAX_RECORD_ID_LEN
        or "\x00" in record_id
    ):
        raise InvalidRequest(f"record_id must be a string of 1..{MAX_RECORD_ID_LEN} characters")
    return record_id


class Gateway:
    """keygate's use cases over a key manager, a registry, an HSM and an audit writer."""

    def __init__(
        self,
        *,
        registry: Any,
        hsm: Any,
        keys: KeyManager,
        audit: AuditWriter,
        audit_store: Any,
        policies: Mapping[str, RecordPolicy],
        audit_keys: Any = None,
        providers: Any = None,
        max_batch_items: int = 10_000,
        default_dek_max_records: int = 1 << 20,
        default_dek_max_age_s: float = 600.0,
        dual_control: Any = None,
    ) -> None:
        self.registry = registry
        self.hsm = hsm
        self.keys = keys
        self.audit = audit
        self.audit_store = audit_store
        #: the audit trail's HSM keys (checkpoints, record-id pseudonyms); None = no pseudonyms
        self.audit_keys = audit_keys
        #: the cloud KMS adapters (:class:`keygate.providers.guard.ProviderSet`); None: HSM only
        self.providers = providers
        self.policies = dict(policies)
        self.max_batch_items = max_batch_items
        self.default_dek_max_records = default_dek_max_records
        self.default_dek_max_age_s = default_dek_max_age_s
        #: :class:`keygate.custody.guard.DualControlGuard`: refuses direct sensitive changes
        #: once dual control is on; None = no dual control
        self.dual_control = dual_control

    def _direct(self, change: str, **params: Any) -> None:
        """Refuse a direct sensitive change while dual control is on (keygate.custody)."""
        if self.dual_control is not None:
            self.dual_control.check_direct(change, **params)

    # ------------------------------------------------------------------ audit helpers
    @contextmanager
    def _audited(
        self, action: str, actor: str, request_id: str, **fields: Any
    ) -> Iterator[dict[str, Any]]:
        """Run the body, then write one audit event with its outcome (fail closed)."""
        out: dict[str, Any] = {}
        try:
            yield out
        except GatewayError as exc:
            outcome = (
                "denied" if isinstance(exc, Forbidden) or exc.code == "UNAUTHENTICATED" else "error"
            )
            self._write(action, actor, request_id, outcome=outcome, code=exc.code, **fields, **out)
            raise
        except Exception:
            self._write(
                action, actor, request_id, outcome="error", code="INTERNAL", **fields, **out
            )
            raise
        self._write(action, actor, request_id, outcome="ok", **fields, **out)

    def _write(self, action: str, actor: str, request_id: str, **fields: Any) -> None:
        detail = fields.pop("detail", {})
        event = AuditEvent(
            action=action, actor=actor, request_id=request_id, detail=detail, **fields
        )
        self.audit.write(event)

    def audit_event(self, event: AuditEvent) -> None:
        """Write an event built elsewhere (the API's authentication failures)."""
        self.audit.write(event)

    # ------------------------------------------------------------------ authentication
    def authenticate(self, token: str) -> Principal | None:
        """The principal a bearer token belongs to, or None (revoked, unknown)."""
        return self._principal(hash_token(token))

    def _principal(self, key: str) -> Principal | None:
        identity = self.keys.snapshot.identities_by_hash.get(key)
        if identity is None:
            return None
        return Principal(
            identity.name,
            identity.tenants,
            identity.purposes,
            identity.record_types,
            identity.operations,
        )

    def authenticate_certificate(self, der: bytes) -> Principal | None:
        """The principal a TLS client certificate (DER) is registered to, or None."""
        return self._principal(certificate_key(der))

    # ------------------------------------------------------------------ opaque values
    def _check_scope(
        self, p: Principal, operation: str, tenant: object, purpose: object
    ) -> tuple[str, str]:
        validate_tenant(tenant)
        validate_purpose(purpose)
        p.require(operation, tenant, purpose)  # type: ignore[arg-type]
        return tenant, purpose  # type: ignore[return-value]

    def _check_batch(self, items: Sequence[object]) -> None:
        if len(items) > self.max_batch_items:
            raise PayloadTooLarge(f"a batch holds at most {self.max_batch_items} items")

    def encrypt(
        self,
        p: Principal,
        request_id: str,
        tenant: str,
        purpose: str,
        context: Mapping[str, str],
        plaintext: bytes,
    ) -> tuple[str, int]:
        with self._audited(
            "crypto.encrypt", p.name, request_id, tenant=_tenant(tenant), purpose=_purpose(purpose)
        ) as a:
            tenant, purpose = self._check_scope(p, "encrypt", tenant, purpose)
            envelope = self.keys.encrypt(tenant, purpose, context, plaintext)
            version = key_version_of(envelope)
            a["key_version"] = version
        return to_text(envelope), version

    def decrypt(
        self,
        p: Principal,
        request_id: str,
        tenant: str,
        purpose: str,
        context: Mapping[str, str],
        ciphertext: str,
    ) -> bytes:
        with self._audited(
            "crypto.decrypt", p.name, request_id, tenant=_tenant(tenant), purpose=_purpose(purpose)
        ) as a:
            tenant, purpose = self._check_scope(p, "decrypt", tenant, purpose)
            envelope = from_text(ciphertext)
            plaintext = self.keys.decrypt(tenant, purpose, context, envelope)
            a["key_version"] = key_version_of(envelope)
        return plaintext

    def encrypt_batch(
        self,
        p: Principal,
        request_id: str,
        tenant: str,
        purpose: str,
        items: Sequence[tuple[Mapping[str, str], bytes]],
        *,
        text: bool = True,
    ) -> BatchResult:
        """Encrypt a batch; the items are text envelopes, or with ``text=False`` the binary
        envelopes (the API's batch fast path writes their text form straight into its answer)."""
        with self._audited(
            "crypto.encrypt",
            p.name,
            request_id,
            tenant=_tenant(tenant),
            purpose=_purpose(purpose),
            items=len(items),
        ) as a:
            self._check_batch(items)
            tenant, purpose = self._check_scope(p, "encrypt", tenant, purpose)
            raw = self.keys.encrypt_many(tenant, purpose, items)
            if text:
                result = _texts(raw)
            else:
                failed = sum(isinstance(r, GatewayError) for r in raw)
                result = BatchResult(raw, failed)
            a["items_failed"] = result.failed
            if result.failed < len(items):
                a["key_version"] = self.keys.active_version(tenant, purpose)
        return result

    def decrypt_batch(
        self,
        p: Principal,
        request_id: str,
        tenant: str,
        purpose: str,
        items: Sequence[tuple[Mapping[str, str], str | bytes]],
    ) -> BatchResult:
        """Decrypt text envelopes; an item may also carry its binary envelope (bytes) already
        decoded from the text form (the API's batch fast path does that)."""
        with self._audited(
            "crypto.decrypt",
            p.name,
            request_id,
            tenant=_tenant(tenant),
            purpose=_purpose(purpose),
            items=len(items),
        ) as a:
            self._check_batch(items)
            tenant, purpose = self._check_scope(p, "decrypt", tenant, purpose)
            decoded: list[Any] = []
            undecodable = 0
            for context, text in items:
                if text.__class__ is bytes:
                    decoded.append((context, text))
                    continue
                try:
                    decoded.append((context, from_text(text)))  # type: ignore[arg-type]
                except GatewayError as exc:
                    decoded.append(exc)
                    undecodable += 1
            out: list[Any]
            if not undecodable:
                out = self.keys.decrypt_many(tenant, purpose, decoded)
            else:
                good = [d for d in decoded if not isinstance(d, GatewayError)]
                opened = iter(self.keys.decrypt_many(tenant, purpose, good))
                out = [d if isinstance(d, GatewayError) else next(opened) for d in decoded]
            failed = sum(isinstance(o, GatewayError) for o in out)
            a["items_failed"] = failed
        return BatchResult(out, failed)

    def rewrap_batch(
        self, p: Principal, request_id: str, tenant: str, purpose: str, ciphertexts: Sequence[str]
    ) -> BatchResult:
        with self._audited(
            "crypto.rewrap",
            p.name,
            request_id,
            tenant=_tenant(tenant),
            purpose=_purpose(purpose),
            items=len(ciphertexts),
        ) as a:
            self._check_batch(ciphertexts)
            tenant, purpose = self._check_scope(p, "rewrap", tenant, purpose)
            out: list[Any] = list(self.keys.rewrap_text_many(tenant, purpose, ciphertexts))
            failed = sum(isinstance(o, GatewayError) for o in out)
            a["items_failed"] = failed
            if failed < len(out):
                a["key_version"] = self.keys.active_version(tenant, purpose)
        return BatchResult(out, failed)

    # ------------------------------------------------------------------ records
    def _policy(self, p: Principal, record_type: str) -> RecordPolicy:
        if not is_valid_record_type(record_type):
            raise InvalidRequest("record type must match [a-z][a-z0-9_-]{0,63}")
        p.require_record_type(record_type)
        policy = self.policies.get(record_type)
        if policy is None:
            raise NotFound(f"unknown record type {record_type}")
        return policy

    def _record_scope(
        self, p: Principal, operation: str, tenant: object, record_type: str
    ) -> tuple[str, RecordPolicy]:
        validate_tenant(tenant)
        if not p.may(operation, tenant):  # type: ignore[arg-type]
            p.require(operation, tenant)  # type: ignore[arg-type]
        return tenant, self._policy(p, record_type)  # type: ignore[return-value]

    def _encrypt_record(
        self, p: Principal, tenant: str, policy: RecordPolicy, record_id: object, record: object
    ) -> dict[str, Any]:
        record_id = _check_record_id(record_id)
        if not isinstance(record, Mapping):
            raise InvalidRequest("record must be a JSON object")
        policy.validate(record)
        out: dict[str, Any] = {}
        for name, value in record.items():
            fp = policy.field_for(name)
            if fp.treatment is Treatment.CLEAR:
                out[name] = value
                continue
            purpose = fp.purpose or policy.default_purpose
            if not p.may_purpose(purpose):
                raise Forbidden(f"identity {p.name} is not allowed purpose {purpose}")
            plaintext = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
            context = {"record_type": policy.record_type, "record_id": record_id, "field": name}
            out[name] = to_text(self.keys.encrypt(tenant, purpose, context, plaintext))
        return out

    def _decrypt_record(
        self, p: Principal, tenant: str, policy: RecordPolicy, record_id: object, record: object
    ) -> tuple[dict[str, Any], int]:
        record_id = _check_record_id(record_id)
        if not isinstance(record, Mapping):
            raise InvalidRequest("record must be a JSON object")
        out: dict[str, Any] = {}
        withheld = 0
        for name, value in record.items():
            fp = policy.field_for(name)
            if fp.treatment is Treatment.CLEAR:
                out[name] = value
                continue
            purpose = fp.purpose or policy.default_purpose
            if not p.may_purpose(purpose):
                out[name] = value  # not this caller's to read: stays encrypted
                withheld += 1
                continue
            if not isinstance(value, str):
                raise ValidationFailed(f"field {name!r} must hold a keygate ciphertext")
            context = {"record_type": policy.record_type, "record_id": record_id, "field": name}
            plaintext = self.keys.decrypt(tenant, purpose, context, from_text(value))
            try:
                out[name] = json.loads(plaintext)
            except ValueError:
                raise DecryptionFailed() from None
        return out, withheld

    def _record_one(
        self,
        action: str,
        operation: str,
        fn: Callable[..., Any],
        p: Principal,
        request_id: str,
        record_type: str,
        tenant: str,
        record_id: str,
        record: Mapping[str, Any],
    ) -> Any:
        with self._audited(
            action, p.name, request_id, tenant=_tenant(tenant), record_type=_t(record_type)
        ) as a:
            detail: dict[str, Any] = {}
            a["detail"] = detail
            # Pseudonymise first, so that refused attempts on a record are findable as well.
            a["record_refs"] = self._add_record_refs(detail, tenant, [record_id])
            tenant, policy = self._record_scope(p, operation, tenant, record_type)
            result = fn(p, tenant, policy, record_id, record)
            if isinstance(result, tuple):  # decrypt also says how many fields it withheld
                result, withheld = result
                detail["fields_withheld"] = withheld
        return result

    def _add_record_refs(
        self, detail: dict[str, Any], tenant: object, record_ids: Sequence[object]
    ) -> tuple[str, ...]:
        """The pseudonyms of ``record_ids`` (never the ids), for the audit event.

        Returns every record's pseudonym (distinct), whatever the batch size: the event's
        ``record_refs``, stored beside it in ``kg_audit_record_refs``.  ``detail`` gets
        ``record_refs_count`` and ``record_refs_digest`` (the chained event commits to the set)
        and, for at most ``MAX_BATCH_REFS`` records, the refs inline for readability: one
        record ``record_ref``, a batch ``record_refs`` (comma-separated, in request order).  A
        pseudonym costs one HSM call per tenant per process, then a software HMAC per record.
        Invalid tenants or record ids are skipped (the request fails on them anyway).
        """
        if self.audit_keys is None or _tenant(tenant) is None:
            return ()
        valid = []
        for record_id in record_ids:
            try:
                rid = _check_record_id(record_id)
                rid.encode("utf-8")  # a lone surrogate is refused later, as INVALID_REQUEST
            except (GatewayError, UnicodeEncodeError):
                continue
            valid.append(rid)
        if not valid:
            return ()
        refs = self.audit_keys.record_refs(tenant, valid)
        detail.update(record_refs_detail(refs))
        if len(record_ids) == 1:
            detail["record_ref"] = refs[0]
        elif len(record_ids) <= MAX_BATCH_REFS:
            detail["record_refs"] = ",".join(refs)
        return tuple(set(refs))

    def encrypt_record(
        self,
        p: Principal,
        request_id: str,
        record_type: str,
        tenant: str,
        record_id: str,
        record: Mapping[str, Any],
    ) -> dict[str, Any]:
        return self._record_one(  # type: ignore[no-any-return]
            "record.encrypt", "encrypt", self._encrypt_record,
            p, request_id, record_type, tenant, record_id, record,
        )  # fmt: skip

    def decrypt_record(
        self,
        p: Principal,
        request_id: str,
        record_type: str,
        tenant: str,
        record_id: str,
        record: Mapping[str, Any],
    ) -> dict[str, Any]:
        return self._record_one(  # type: ignore[no-any-return]
            "record.decrypt", "decrypt", self._decrypt_record,
            p, request_id, record_type, tenant, record_id, record,
        )  # fmt: skip

    def _record_batch(
        self,
        action: str,
        operation: str,
        fn: Callable[..., Any],
        p: Principal,
        request_id: str,
        record_type: str,
        tenant: str,
        items: Sequence[tuple[object, object]],
    ) -> BatchResult:
        with self._audited(
            action,
            p.name,
            request_id,
            tenant=_tenant(tenant),
            record_type=_t(record_type),
            items=len(items),
        ) as a:
            self._check_batch(items)
            detail: dict[str, Any] = {}
            a["detail"] = detail
            a["record_refs"] = self._add_record_refs(detail, tenant, [rid for rid, _ in items])
            tenant, policy = self._record_scope(p, operation, tenant, record_type)
            out: list[Any] = []
            for record_id, record in items:
                try:
                    r = fn(p, tenant, policy, record_id, record)
                    out.append(r[0] if isinstance(r, tuple) else r)
                except GatewayError as exc:
                    out.append(exc)
            failed = sum(isinstance(o, GatewayError) for o in out)
            a["items_failed"] = failed
        return BatchResult(out, failed)

    def encrypt_record_batch(
        self,
        p: Principal,
        request_id: str,
        record_type: str,
        tenant: str,
        items: Sequence[tuple[object, object]],
    ) -> BatchResult:
        return self._record_batch(
            "record.encrypt",
            "encrypt",
            self._encrypt_record,
            p,
            request_id,
            record_type,
            tenant,
            items,
        )

    def decrypt_record_batch(
        self,
        p: Principal,
        request_id: str,
        record_type: str,
        tenant: str,
        items: Sequence[tuple[object, object]],
    ) -> BatchResult:
        return self._record_batch(
            "record.decrypt",
            "decrypt",
            self._decrypt_record,
            p,
            request_id,
            record_type,
            tenant,
            items,
        )

    # ------------------------------------------------------------------ administration
    def add_tenant(self, actor: str, tenant: str, *, name: str = "") -> Any:
        with self._audited("tenant.added", actor, _rid(), tenant=_tenant(tenant)):
            kind = validate_tenant(tenant)
            return self.registry.add_tenant(tenant, kind=str(kind), name=name or tenant)

    def set_tenant_enabled(self, actor: str, tenant: str, enabled: bool) -> Any:
        action = "tenant.enabled" if enabled else "tenant.disabled"
        with self._audited(action, actor, _rid(), tenant=_tenant(tenant)):
            validate_tenant(tenant)
            self._direct(action, tenant=tenant)
            rec = self.registry.set_tenant_enabled(tenant, enabled)
        self.keys.refresh(force=True)
        return rec

    def _new_label(self, tenant: str, purpose: str, version: int) -> str:
        """A unique HSM object label; readable when it fits in 64 characters."""
        suffix = secrets.token_hex(4)
        label = f"kg/{tenant}/{purpose}/v{version}/{suffix}"
        if len(label) > 64:
            digest = hashlib.sha256(f"{tenant}/{purpose}".encode()).hexdigest()[:16]
            label = f"kg/{digest}/v{version}/{suffix}"
        return label

    def create_key(
        self,
        actor: str,
        tenant: str,
        purpose: str,
        *,
        dek_max_records: int | None = None,
        dek_max_age_s: float | None = None,
    ) -> Any:
        with self._audited(
            "key.created",
            actor,
            _rid(),
            tenant=_tenant(tenant),
            purpose=_purpose(purpose),
            key_version=1,
        ):
            validate_tenant(tenant)
            validate_purpose(purpose)
            if self.registry.get_tenant(tenant) is None:
                raise NotFound(f"unknown tenant {tenant}")
            label = self._new_label(tenant, purpose, 1)
            self.hsm.create_kek(label)
            try:
                rec = self.registry.create_key(
                    tenant,
                    purpose,
                    hsm_label=label,
                    dek_max_records=dek_max_records or self.default_dek_max_records,
                    dek_max_age_s=dek_max_age_s or self.default_dek_max_age_s,
                )
            except GatewayError:
                self.hsm.destroy_kek(label)
                raise
        self.keys.refresh(force=True)
        return rec

    def rotate_key(self, actor: str, tenant: str, purpose: str) -> Any:
        with self._audited(
            "key.rotated", actor, _rid(), tenant=_tenant(tenant), purpose=_purpose(purpose)
        ) as a:
            validate_tenant(tenant)
            validate_purpose(purpose)
            versions = self.registry.list_versions(tenant, purpose)
            if not versions:
                raise NotFound(f"no key for {tenant}/{purpose}")
            label = self._new_label(tenant, purpose, versions[-1].version + 1)
            self.hsm.create_kek(label)
            try:
                rec = self.registry.add_version(tenant, purpose, hsm_label=label)
            except GatewayError:
                self.hsm.destroy_kek(label)
                raise
            a["key_version"] = rec.version
        self.keys.refresh(force=True)
        return rec

    def set_key_state(
        self, actor: str, tenant: str, purpose: str, version: int, *, enabled: bool
    ) -> Any:
        action = "key.enabled" if enabled else "key.disabled"
        with self._audited(
            action,
            actor,
            _rid(),
            tenant=_tenant(tenant),
            purpose=_purpose(purpose),
            key_version=version if version >= 1 else None,
        ):
            validate_tenant(tenant)
            validate_purpose(purpose)
            current = self.registry.get_version(tenant, purpose, version)
            if current is None:
                raise NotFound(f"no key version {tenant}/{purpose}/v{version}")
            self._direct(action, tenant=tenant, purpose=purpose, version=version)
            if enabled:
                # The registry decides between active and decrypt-only when re-enabling.
                rec = self.registry.set_version_state(tenant, purpose, version, KeyState.ACTIVE)
            else:
                rec = self.registry.set_version_state(tenant, purpose, version, KeyState.DISABLED)
        self.keys.refresh(force=True)
        return rec

    def add_identity(
        self,
        actor: str,
        name: str,
        *,
        tenants: Sequence[str],
        purposes: Sequence[str],
        record_types: Sequence[str],
        operations: Sequence[str],
        certificate_der: bytes | None = None,
        token_hash: str | None = None,
    ) -> tuple[Any, str | None]:
        """Register a service identity.  Returns its bearer token (shown once), or None when it
        authenticates by TLS client certificate instead, or by a credential hash made earlier
        (``token_hash``: an approved dual-control request; the token was shown to its maker)."""
        with self._audited("identity.added", actor, _rid(), detail={"identity": _t(name) or "?"}):
            validate_identity_name(name)
            self._direct("identity.added", name=name)
            for t in tenants:
                if t != ANY:
                    validate_tenant(t)
            for pu in purposes:
                if pu != ANY:
                    validate_purpose(pu)
            for rt in record_types:
                if rt != ANY and not is_valid_record_type(rt):
                    raise InvalidRequest(f"bad record type {rt!r}")
            unknown = set(operations) - OPERATIONS - {ANY}
            if unknown:
                raise InvalidRequest(f"unknown operations: {', '.join(sorted(unknown))}")
            token: str | None = None
            if certificate_der is not None:
                credential = certificate_key(certificate_der)
            elif token_hash is not None:
                credential = token_hash
            else:
                token = new_token()
                credential = hash_token(token)
            rec = self.registry.add_identity(
                name,
                token_hash=credential,
                tenants=list(tenants),
                purposes=list(purposes),
                record_types=list(record_types),
                operations=list(operations),
            )
        self.keys.refresh(force=True)
        return rec, token

    def revoke_identity(self, actor: str, name: str) -> Any:
        with self._audited("identity.revoked", actor, _rid(), detail={"identity": _t(name) or "?"}):
            self._direct("identity.revoked", name=name)
            rec = self.registry.revoke_identity(name)
        self.keys.refresh(force=True)
        return rec

    # ------------------------------------------------------------------ providers (outer wrap)
    def _need_providers(self) -> Any:
        if self.providers is None:
            raise ConfigurationError("this gateway has no provider adapters configured")
        return self.providers

    def _checked_provider_key(self, tenant: str, purpose: str, uri: str) -> Any:
        """Residency, then a real round trip: a key that cannot wrap is never configured."""
        providers = self._need_providers()
        key = providers.check(uri)
        status = providers.describe(uri)
        if not status.enabled:
            raise ProviderKeyDisabled(f"provider key {uri} is {status.state}")
        _round_trip(providers, uri, tenant, purpose)
        return key

    def provider_set(self, actor: str, tenant: str, purpose: str, uri: str) -> list[Any]:
        """Give tenant × purpose its (first) provider key: new DEKs get the outer wrap."""
        with self._audited(
            "provider.set",
            actor,
            _rid(),
            tenant=_tenant(tenant),
            purpose=_purpose(purpose),
            detail={"provider": _uri(uri)},
        ):
            self._direct("provider.set", tenant=tenant, purpose=purpose)
            validate_tenant(tenant)
            validate_purpose(purpose)
            key = self._checked_provider_key(tenant, purpose, uri)
            recs = self.registry.switch_provider_key(
                tenant, purpose, key.uri, scheme=key.scheme, region=key.region, first=True
            )
        self.keys.refresh(force=True)
        return list(recs)

    def provider_migrate(self, actor: str, tenant: str, purpose: str, uri: str | None) -> list[Any]:
        """Switch tenant × purpose to another provider key (``None``: the HSM layer alone).

        New DEKs are wrapped by the new key at once; existing ciphertexts move by rewrap (the
        API's ``/v1/rewrap/batch`` or ``keygate bulk rewrap``) — a header rewrite, no
        re-encryption.  The old key keeps unwrapping until :meth:`provider_finish`.
        """
        current = None
        snap = self.keys.snapshot
        if _tenant(tenant) and _purpose(purpose):
            prov = snap.active_provider(tenant, purpose)
            current = prov.uri if prov is not None else None
        with self._audited(
            "provider.migrated",
            actor,
            _rid(),
            tenant=_tenant(tenant),
            purpose=_purpose(purpose),
            detail={"from_provider": current or "hsm-only", "to_provider": _uri(uri) or "hsm-only"},
        ):
            self._direct("provider.migrated", tenant=tenant, purpose=purpose)
            validate_tenant(tenant)
            validate_purpose(purpose)
            if uri is None:
                recs = self.registry.switch_provider_key(tenant, purpose, None)
            else:
                key = self._checked_provider_key(tenant, purpose, uri)
                recs = self.registry.switch_provider_key(
                    tenant, purpose, key.uri, scheme=key.scheme, region=key.region
                )
        self.keys.refresh(force=True)
        return list(recs)

    def provider_finish(self, actor: str, tenant: str, purpose: str) -> list[Any]:
        """End a migration: the old provider keys are retired (never called again)."""
        with self._audited(
            "provider.migration_finished",
            actor,
            _rid(),
            tenant=_tenant(tenant),
            purpose=_purpose(purpose),
        ) as a:
            self._direct("provider.migration_finished", tenant=tenant, purpose=purpose)
            validate_tenant(tenant)
            validate_purpose(purpose)
            recs = self.registry.finish_provider_migration(tenant, purpose)
            a["detail"] = {"retired": ", ".join(r.uri for r in recs)[:1024]}
        self.keys.refresh(force=True)
        return list(recs)

    def provider_test(self, actor: str, tenant: str, purpose: str, uri: str) -> dict[str, Any]:
        """A health report of one provider key: residency, metadata, a timed round trip."""
        report: dict[str, Any] = {"uri": uri}
        with self._audited(
            "provider.tested",
            actor,
            _rid(),
            tenant=_tenant(tenant),
            purpose=_purpose(purpose),
            detail={"provider": _uri(uri)},
        ):
            validate_tenant(tenant)
            validate_purpose(purpose)
            providers = self._need_providers()
            key = providers.check(uri)
            report.update(scheme=key.scheme, region=key.region, residency="ok")
            t0 = time.perf_counter()
            status = providers.describe(uri)
            report.update(
                describe_ms=round((time.perf_counter() - t0) * 1000, 1),
                state=status.state,
                enabled=status.enabled,
                algorithm=status.algorithm,
                reported_region=status.region,
            )
            report.update(_round_trip(providers, uri, tenant, purpose), round_trip="ok")
        return report

    # ------------------------------------------------------------------ operations
    def readiness(self) -> ReadinessReport:
        checks: dict[str, str] = {}
        for name, probe in (
            ("hsm", self.hsm.check),
            ("registry", self.registry.ping),
            ("audit", self._audit_probe),
        ):
            try:
                probe()
                checks[name] = "ok"
            except GatewayError as exc:
                checks[name] = f"unavailable: {exc.detail}"
            except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
                checks[name] = f"unavailable: {type(exc).__name__}"
        checks.update(self._provider_checks())
        return ReadinessReport(all(v == "ok" for v in checks.values()), checks)

    def _provider_checks(self) -> dict[str, str]:
        """``provider <uri>`` → ok / unavailable, for every active provider key and every key
        this process holds DEKs under (probed at most every probe interval)."""
        if self.providers is None:
            return {}
        try:
            self.keys.probe_providers()
        except Exception:  # noqa: BLE001 - readiness reports, never raises
            log.warning("readiness.probe_failed")
        uris = self.keys.provider_uris_in_use()
        for recs in self.keys.snapshot.providers.values():
            uris.update(r.uri for r in recs if r.state.value == "active")
        checks: dict[str, str] = {}
        for uri in sorted(uris):
            health = self.providers.guard(uri).health()
            if health.ok:
                checks[f"provider {uri}"] = "ok"
            else:
                last = self.providers.guard(uri).last_error
                checks[f"provider {uri}"] = "unavailable: " + (
                    last.detail if last is not None else health.error
                )
        return checks

    def _audit_probe(self) -> None:
        self.audit_store.ping()
        if not self.audit.healthy:
            raise ConfigurationError("the last audit write failed")

    def close(self) -> None:
        self.keys.stop()
        self.audit.close()
        for thing in (self.hsm, self.registry, self.audit_store, self.providers):
            if thing is None:
                continue
            try:
                thing.close()
            except Exception:  # noqa: BLE001, S112 - closing is best effort
                continue


def _texts(raw: Sequence[bytes | GatewayError]) -> BatchResult:
    out: list[Any] = []
    failed = 0
    for r in raw:
        if isinstance(r, GatewayError):
            out.append(r)
            failed += 1
        else:
            out.append(to_text(r))
    return BatchResult(out, failed)


def _t(value: object) -> str | None:
    """A value safe to put in an audit field: short printable text, else None."""
    if isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable():
        return value
    return None


def _tenant(value: object) -> str | None:
    """A tenant for an audit field only when it is a valid tenant id: a My Number sent as the
    tenant by mistake must not land in the trail."""
    try:
        validate_tenant(value)
    except GatewayError:
        return None
    return value  # type: ignore[return-value]


def _purpose(value: object) -> str | None:
    try:
        return validate_purpose(value)
    except GatewayError:
        return None


def _round_trip(providers: Any, uri: str, tenant: str, purpose: str) -> dict[str, Any]:
    """Wrap and unwrap 60 random bytes (an HSM-wrapped DEK's size) with the provider key;
    raises unless the same bytes come back.  Returns the timings and the wrapped size."""
    probe = secrets.token_bytes(60)
    aad = f"keygate/v1 probe\x00{tenant}\x00{purpose}".encode()
    t0 = time.perf_counter()
    wrapped = providers.wrap(uri, probe, aad=aad)
    t1 = time.perf_counter()
    back = providers.unwrap(uri, wrapped, aad=aad)
    t2 = time.perf_counter()
    if back != probe:
        raise DecryptionFailed(f"provider key {uri} did not give back what it wrapped")
    return {
        "wrap_ms": round((t1 - t0) * 1000, 1),
        "unwrap_ms": round((t2 - t1) * 1000, 1),
        "wrapped_bytes": len(wrapped),
    }


def _uri(value: object) -> str | None:
    """A provider key URI for an audit field (bounded; None if not a string)."""
    return value[:512] if isinstance(value, str) else None


def _rid() -> str:
    return "cli-" + secrets.token_hex(8)
