"""Verification of a job's scope, and retiring the key versions nothing in it uses any more.

``keygate bulk verify JOB`` reads the job's scope again — the output file of a finished file job,
the table of a table job (without locking its rows) — and counts the ciphertexts per tenant ×
purpose × key version × wrap chain, from their headers only (no key is touched).  With
``--decrypt`` it also decrypts every value (with its context) and counts the failures.

``--retire`` then disables every *decrypt-only* version of the job's tenant × purposes that no
ciphertext in scope uses; if any ciphertext in scope still uses one, nothing is disabled and the
refusal names the count.  Disabling is reversible (``keygate key enable``); the scope is only the
job's data, so other copies elsewhere (backups, other tables) are the custodian's to check.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from keygate.audit.events import AuditEvent
from keygate.bulk.files import CsvSource, JsonlSource, ParquetSource
from keygate.bulk.spec import ContextRule, JobSpec
from keygate.bulk.store import JobRecord, JobStore, RecordError
from keygate.bulk.transform import Scope
from keygate.bulk.worker import BulkWorker
from keygate.core.errors import GatewayError, InvalidRequest
from keygate.core.model import KeyState
from keygate.core.wire import parse_header, split_text_header

__all__ = ["INVALID", "VerifyResult", "header_label", "parse_label", "verify_job"]

INVALID: Final = "invalid"
_LABELS: dict[str, str] = {}
_MAX_LABELS: Final = 100_000


def header_label(text: str) -> str:
    """``tenant/purpose/vN/chain`` of a text envelope (header only), or ``invalid``."""
    split = split_text_header(text)
    if split is None:
        return INVALID
    chars = split[0]
    label = _LABELS.get(chars)
    if label is not None:
        return label
    try:
        header = binascii.a2b_base64(
            chars.encode("ascii").replace(b"-", b"+").replace(b"_", b"/"), strict_mode=True
        )
        parsed = parse_header(header + bytes(28))
    except (binascii.Error, UnicodeEncodeError, GatewayError):
        return INVALID
    chain = "hsm"
    for layer in parsed.chain[1:]:
        chain += f"+{layer.mechanism.name.lower()}:{layer.key_id.decode('utf-8', 'replace')}"
    ref = parsed.key_ref
    label = f"{ref.tenant}/{ref.purpose}/v{ref.version}/{chain}"
    if len(_LABELS) >= _MAX_LABELS:
        _LABELS.clear()
    _LABELS[chars] = label
    return label


def parse_label(label: str) -> tuple[str, str, int, str] | None:
    parts = label.split("/", 3)
    if len(parts) != 4 or not parts[2].startswith("v"):
        return None
    return parts[0], parts[1], int(parts[2][1:]), parts[3]


@dataclass(slots=True)
class VerifyResult:
    job_id: str
    records: int = 0
    values: int = 0
    census: dict[str, int] = field(default_factory=dict)
    #: records that could not be read (malformed, not an envelope …)
    failed_records: int = 0
    #: with --decrypt: records whose values did not all decrypt
    decrypt_failed: int = 0
    decrypted: bool = False
    errors: list[RecordError] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def per_version(self) -> dict[tuple[str, str, int], int]:
        out: dict[tuple[str, str, int], int] = {}
        for label, n in self.census.items():
            parsed = parse_label(label)
            if parsed is not None:
                key = parsed[:3]
                out[key] = out.get(key, 0) + n
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "records": self.records,
            "values": self.values,
            "census": dict(sorted(self.census.items())),
            "failed_records": self.failed_records,
            "decrypted": self.decrypted,
            "decrypt_failed": self.decrypt_failed,
            "retired": self.retired,
            "refused": self.refused,
            "errors": [e.line() for e in self.errors[:20]],
        }


def _scan(
    gateway: Any, spec: JobSpec, worker: BulkWorker, result: VerifyResult, batch_size: int
) -> None:
    scope = worker.scope
    if spec.kind == "postgresql":
        from keygate.bulk.pg import TableSource, connect
        from keygate.bulk.tasks import TableTask

        assert spec.dsn is not None  # noqa: S101 - validated
        conn = connect(spec.dsn)
        try:
            table = TableSource(conn, spec, lock=False)
            lo: Any = None
            seq = 0
            while (hi := table.next_bound(lo, batch_size)) is not None:
                seq += 1
                _merge(result, worker.run(TableTask(seq, lo, hi)))
                lo = hi
        finally:
            conn.close()
        return
    assert spec.output is not None  # noqa: S101 - validated
    path = spec.output
    if spec.kind == "jsonl":
        reader: Any = JsonlSource(path, 64 << 20)
    elif spec.kind == "csv":
        req: tuple[str, ...] = () if scope.policy is not None else spec.fields
        reader = CsvSource(path, 64 << 20, req)
    else:
        optional = (*scope.policy.fields, spec.id_field or "record_id") if scope.policy else ()
        reader = ParquetSource(
            path, () if scope.policy else spec.fields, (*optional, *scope.context_columns)
        )
    for step in reader.steps({}, batch_size):
        _merge(result, worker.run(step.task))
        if spec.kind == "parquet":
            reader.pending.pop(step.task.seq, None)


def _merge(result: VerifyResult, batch: Any) -> None:
    result.records += batch.read
    for label, n in batch.census.items():
        result.census[label] = result.census.get(label, 0) + n
        result.values += n
    for e in batch.errors:
        if e.code == "DECRYPTION_FAILED" and result.decrypted:
            result.decrypt_failed += 1
        else:
            result.failed_records += 1
        if len(result.errors) < 20:
            result.errors.append(e)


def verify_job(
    gateway: Any,
    store: JobStore,
    job: JobRecord,
    *,
    actor: str,
    decrypt: bool = False,
    retire: bool = False,
    version: int | None = None,
    dsn: str | None = None,
    context: tuple[ContextRule, ...] | None = None,
    batch_size: int = 5000,
) -> VerifyResult:
    """Count the ciphertexts in the job's scope; optionally retire unused old key versions.

    ``--decrypt`` binds the job's own context rules (re-encryption jobs, records), or
    ``context`` when given (a rewrap job of opaque values records none).
    """
    spec = JobSpec.from_stored(job.spec)
    spec = spec.with_dsn(dsn or spec.dsn)
    if context is not None:
        spec = replace(spec, context=context)
    if spec.is_file and job.state != "done":
        raise InvalidRequest(
            f"bulk job {job.id} is {job.state}: its output is not complete; finish it first"
        )
    operation = "check" if decrypt else "census"
    worker = BulkWorker(
        spec, job_id=job.id, actor=actor, operation=operation, gateway=gateway, audit=False
    )
    result = VerifyResult(job.id, decrypted=decrypt)
    try:
        _scan(gateway, spec, worker, result, batch_size)
    finally:
        worker.close()
    if retire:
        _retire(gateway, spec, worker.scope, result, actor, version)
    store.set_verify(job.id, result.as_dict())
    gateway.audit_event(
        AuditEvent(
            action="bulk.verified",
            outcome="ok" if not result.refused else "denied",
            actor=actor,
            request_id=f"bulk-{job.id}-verify",
            tenant=spec.tenant,
            purpose=spec.purpose,
            record_type=spec.record_type,
            items=result.records,
            items_failed=min(result.records, result.failed_records + result.decrypt_failed),
            detail={
                "job": job.id,
                "values": result.values,
                "census": ",".join(f"{k}={v}" for k, v in sorted(result.census.items()))[:1024],
                "retired": ",".join(result.retired)[:1024],
                "refused": len(result.refused),
            },
        )
    )
    return result


def _retire(
    gateway: Any,
    spec: JobSpec,
    scope: Scope,
    result: VerifyResult,
    actor: str,
    only: int | None,
) -> None:
    counts = result.per_version()
    snapshot = gateway.keys.snapshot
    candidates: list[tuple[str, int]] = []
    for purpose in sorted(scope.purposes):
        for rec in snapshot.versions.get((spec.tenant, purpose), ()):
            if rec.state is not KeyState.DECRYPT_ONLY:
                continue
            if only is not None and rec.version != only:
                continue
            n = counts.get((spec.tenant, purpose, rec.version), 0)
            if n:
                result.refused.append(
                    f"{spec.tenant}/{purpose} v{rec.version}: {n} ciphertexts in scope still use it"
                )
            else:
                candidates.append((purpose, rec.version))
    if only is not None and not candidates and not result.refused:
        raise InvalidRequest(
            f"no decrypt-only version {only} of {spec.tenant} in the job's purposes"
        )
    if result.refused:
        return  # all or nothing
    for purpose, v in candidates:
        gateway.set_key_state(actor, spec.tenant, purpose, v, enabled=False)
        result.retired.append(f"{spec.tenant}/{purpose} v{v}")


def versions_in_scope(gateway: Any, spec: JobSpec, scope: Scope) -> Mapping[str, Any]:
    snapshot = gateway.keys.snapshot
    return {p: snapshot.versions.get((spec.tenant, p), ()) for p in sorted(scope.purposes)}
