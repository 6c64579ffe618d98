"""The cryptographic core of a bulk job: find the envelopes of a row, transform them in batches.

A row (a JSON line, a CSV row, a Parquet row, a table row) holds *cells*: text envelopes, each
with its purpose and, for re-encryption, its encryption context.  :class:`Scope` finds them,
either in the named fields/columns (opaque values of one tenant × purpose) or in a whole record
per its record-type policy (each encrypted field under its own purpose: 個人番号 under
``mynumber``, the rest under ``resident``).  :class:`Transformer` transforms the cells of a whole
batch at once, grouped by purpose, through the key manager's batch methods:

- ``rewrap`` / ``migrate``: :meth:`KeyManager.rewrap_text_many` — header characters swapped, the
  HSM (and provider) called once per distinct DEK, never per record;
- ``reencrypt``: :meth:`KeyManager.decrypt_many` then :meth:`KeyManager.encrypt_many` under fresh
  DEKs, with the same context;
- ``check``: decrypt only (``keygate bulk verify --decrypt``);
- ``census``: nothing (``keygate bulk verify`` counts the cells' key versions).

Contexts are exactly those the API binds: records encrypted through the record endpoints carry
``{"record_type", "record_id", "field"}``; opaque values carry what ``--context`` rules name.

A row is processed atomically: if any of its cells fails, the row is left exactly as it was and
the first error is reported for it.  Error messages name the field and the rule, never a value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from keygate.bulk.spec import JobSpec
from keygate.core.errors import DecryptionFailed, GatewayError, InvalidRequest, ValidationFailed
from keygate.core.wire import from_text, to_text
from keygate.keys.manager import KeyManager
from keygate.policy.records import RecordPolicy, Treatment

__all__ = ["MAX_RECORD_ID_LEN", "CellBatch", "RowError", "Scope", "Transformer"]

#: as the record endpoints (keygate.service)
MAX_RECORD_ID_LEN: Final = 128

_EMPTY: Final[Mapping[str, str]] = {}


class RowError(Exception):
    """A row that cannot be processed; ``field`` names where, ``error`` says why."""

    def __init__(self, error: GatewayError, field_name: str | None = None) -> None:
        super().__init__(error.detail)
        self.error = error
        self.field_name = field_name


@dataclass(slots=True)
class CellBatch:
    """The cells of a batch of rows, as parallel lists (cheap to build and to group)."""

    rows: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    purposes: list[str] = field(default_factory=list)
    contexts: list[Mapping[str, str]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def add(self, row: int, name: str, purpose: str, context: Mapping[str, str], text: str) -> None:
        self.rows.append(row)
        self.names.append(name)
        self.purposes.append(purpose)
        self.contexts.append(context)
        self.texts.append(text)

    def truncate(self, n: int) -> None:
        """Drop the cells added after the first ``n`` (a row that failed half-way)."""
        del self.rows[n:], self.names[n:], self.purposes[n:], self.contexts[n:], self.texts[n:]

    def __len__(self) -> int:
        return len(self.texts)


def _record_id(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_RECORD_ID_LEN or "\x00" in value:
        raise ValidationFailed(
            f"the record id must be a string of 1..{MAX_RECORD_ID_LEN} characters"
        )
    return value


def _context_text(value: object, column: str) -> str:
    if value is None or value == "":
        raise InvalidRequest(f"context column {column!r} is empty")
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return str(value)


class Scope:
    """Which values of a row a job transforms, under which purpose and context."""

    def __init__(
        self,
        spec: JobSpec,
        policies: Mapping[str, RecordPolicy],
        *,
        operation: str | None = None,
    ) -> None:
        self.spec = spec
        self.tenant = spec.tenant
        #: decrypting operations bind the context; rewrap never decrypts
        self.needs_context = (operation or spec.operation) in ("reencrypt", "check")
        self.policy: RecordPolicy | None = None
        if spec.record_type is not None:
            policy = policies.get(spec.record_type)
            if policy is None:
                raise InvalidRequest(f"unknown record type {spec.record_type!r}")
            self.policy = policy
        self.fields = spec.fields
        self.purpose = spec.purpose or ""
        self.context_rules = spec.context
        #: the columns a table or Parquet job must read besides the envelope columns
        self.context_columns = tuple(r.value for r in spec.context if r.kind == "column")

    @property
    def purposes(self) -> frozenset[str]:
        if self.policy is not None:
            return self.policy.purposes
        return frozenset({self.purpose})

    # -- opaque values ------------------------------------------------------------------------
    def value_cells(self, cells: CellBatch, row: int, get: Callable[[str], Any]) -> None:
        """Add the cells of the named fields of one row; ``get(name)`` reads a field or column.

        Raises :class:`RowError` (and adds nothing) when the row cannot be processed.
        """
        start = len(cells)
        if not self.needs_context or not self.context_rules:
            # The common case (rewrap; re-encryption without a context): no per-row context.
            for name in self.fields:
                value = get(name)
                if value is None or value == "":
                    continue
                if value.__class__ is not str:
                    cells.truncate(start)
                    raise RowError(
                        ValidationFailed("must hold a keygate text envelope (kg1.…)"), name
                    )
                cells.rows.append(row)
                cells.names.append(name)
                cells.purposes.append(self.purpose)
                cells.contexts.append(_EMPTY)
                cells.texts.append(value)
            return
        try:
            shared: dict[str, str] = {}
            for rule in self.context_rules:
                if rule.kind == "column":
                    shared[rule.key] = _context_text(get(rule.value), rule.value)
                elif rule.kind == "const":
                    shared[rule.key] = rule.value
            per_field = [r.key for r in self.context_rules if r.kind == "field"]
            for name in self.fields:
                value = get(name)
                if value is None or value == "":
                    continue
                if value.__class__ is not str:
                    raise RowError(  # noqa: TRY301 - a row error, caught with the others below
                        ValidationFailed("must hold a keygate text envelope (kg1.…)"), name
                    )
                context: Mapping[str, str] = shared
                if per_field:
                    context = {**shared, **dict.fromkeys(per_field, name)}
                cells.add(row, name, self.purpose, context, value)
        except RowError:
            cells.truncate(start)
            raise
        except GatewayError as exc:
            cells.truncate(start)
            raise RowError(exc) from None

    # -- records ------------------------------------------------------------------------------
    def record_cells(self, cells: CellBatch, row: int, record: object, record_id: object) -> None:
        """Add the cells of a whole record per its policy (see the module docstring)."""
        policy = self.policy
        assert policy is not None  # noqa: S101 - only called for record-type jobs
        start = len(cells)
        name = None
        try:
            if not isinstance(record, Mapping):
                raise ValidationFailed("the record must be a JSON object")
            rid = _record_id(record_id) if self.needs_context else ""
            for name, value in record.items():
                fp = policy.field_for(name)
                if fp.treatment is Treatment.CLEAR or value is None:
                    continue
                if value.__class__ is not str:
                    raise ValidationFailed("must hold a keygate text envelope (kg1.…)")
                context = (
                    {"record_type": policy.record_type, "record_id": rid, "field": name}
                    if self.needs_context
                    else _EMPTY
                )
                cells.add(row, name, fp.purpose or policy.default_purpose, context, value)
        except GatewayError as exc:
            cells.truncate(start)
            raise RowError(exc, name) from None


class Transformer:
    """Transforms the cells of a batch (see the module docstring)."""

    def __init__(self, keys: KeyManager, operation: str, tenant: str) -> None:
        if operation not in ("rewrap", "migrate", "reencrypt", "check", "census"):
            raise ValueError(f"unknown operation {operation}")
        self.keys = keys
        self.operation = operation
        self.tenant = tenant

    def apply(self, cells: CellBatch) -> list[str | GatewayError]:
        """New texts (or the error) for every cell, in order."""
        n = len(cells)
        if n == 0:
            return []
        if self.operation == "census":
            return list(cells.texts)
        purposes = cells.purposes
        first = purposes[0]
        if all(p == first for p in purposes):
            return self._run(first, cells.texts, cells.contexts)
        out: list[str | GatewayError] = [DecryptionFailed()] * n
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(purposes):
            groups.setdefault(p, []).append(i)
        for purpose, idx in groups.items():
            results = self._run(
                purpose, [cells.texts[i] for i in idx], [cells.contexts[i] for i in idx]
            )
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out

    def _run(
        self, purpose: str, texts: Sequence[str], contexts: Sequence[Mapping[str, str]]
    ) -> list[str | GatewayError]:
        if self.operation in ("rewrap", "migrate"):
            return self.keys.rewrap_text_many(self.tenant, purpose, texts)
        decoded: list[Any] = []
        for text in texts:
            try:
                decoded.append(from_text(text))
            except GatewayError as exc:
                decoded.append(exc)
        good = [(c, d) for c, d in zip(contexts, decoded, strict=True) if d.__class__ is bytes]
        opened = iter(self.keys.decrypt_many(self.tenant, purpose, good))
        plain: list[Any] = [d if isinstance(d, GatewayError) else next(opened) for d in decoded]
        if self.operation == "check":
            return [
                p if isinstance(p, GatewayError) else t for p, t in zip(plain, texts, strict=True)
            ]
        todo = [(c, p) for c, p in zip(contexts, plain, strict=True) if p.__class__ is bytes]
        sealed = iter(self.keys.encrypt_many(self.tenant, purpose, todo))
        out: list[str | GatewayError] = []
        for p in plain:
            if isinstance(p, GatewayError):
                out.append(p)
                continue
            env = next(sealed)
            out.append(env if isinstance(env, GatewayError) else to_text(env))
        return out
