"""What a bulk job does and to what: its operation, its source, and the values it touches.

A :class:`JobSpec` is plain data: it is stored with the job (as JSON, never with a database
password), pickled to worker processes, and hashed into a *fingerprint*.  Running the same command
again finds the unfinished job with the same fingerprint and resumes it.  Execution options
(workers, engine, batch size, error limit) are not part of the spec: a job may be resumed with
different ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from keygate.core.errors import InvalidRequest

__all__ = [
    "FILE_FORMATS",
    "OPERATIONS",
    "ContextRule",
    "JobSpec",
    "RunOptions",
    "dsn_for_psycopg",
    "format_of",
    "redact_dsn",
]

Operation = Literal["rewrap", "reencrypt", "migrate"]
OPERATIONS: Final = ("rewrap", "reencrypt", "migrate")
FILE_FORMATS: Final = ("jsonl", "csv", "parquet")
SOURCE_KINDS: Final = (*FILE_FORMATS, "postgresql")

_EXTENSIONS: Final = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True, slots=True)
class ContextRule:
    """One entry of the encryption context bound to each value (re-encryption only).

    ``kind`` says where the context value comes from: ``column`` (the value of another column or
    field of the same row), ``field`` (the name of the column or field being re-encrypted) or
    ``const`` (a fixed string).
    """

    key: str
    kind: Literal["column", "field", "const"]
    value: str = ""

    @classmethod
    def parse(cls, kind: str, text: str) -> ContextRule:
        if kind == "field":
            if not text or "=" in text:
                raise InvalidRequest("--context-field takes a context key, e.g. field")
            return cls(text, "field")
        key, eq, value = text.partition("=")
        if not eq or not key or not value:
            raise InvalidRequest(
                f"--context{'' if kind == 'column' else '-const'} takes KEY=VALUE, not {text!r}"
            )
        return cls(key, kind, value)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """The scope and operation of a bulk job (see the module docstring)."""

    operation: str
    #: ``jsonl`` | ``csv`` | ``parquet`` | ``postgresql``
    kind: str
    tenant: str
    #: the purpose of every value (opaque values); None with a record type
    purpose: str | None = None
    #: the fields (files) or columns (tables) holding text envelopes
    fields: tuple[str, ...] = ()
    #: whole records per this record type's policy instead of ``fields``
    record_type: str | None = None
    #: the field or column holding the record id (records; bound in the context)
    id_field: str | None = None
    #: JSON Lines: the field holding the record object ("" = the line itself, minus the id);
    #: PostgreSQL: the JSON/JSONB column holding it
    record_field: str | None = None
    context: tuple[ContextRule, ...] = ()
    # files
    input: str | None = None
    output: str | None = None
    # PostgreSQL
    dsn: str | None = field(default=None, compare=False)
    table: str | None = None
    key_column: str | None = None
    #: migrate: the provider key URI the tenant × purpose moves to
    to_uri: str | None = None

    @property
    def is_file(self) -> bool:
        return self.kind in FILE_FORMATS

    @property
    def is_records(self) -> bool:
        return self.record_type is not None

    def stored(self) -> dict[str, Any]:
        """The spec as JSON-ready data, with any database password removed."""
        data = asdict(self)
        data["context"] = [asdict(c) for c in self.context]
        data["fields"] = list(self.fields)
        if self.dsn is not None:
            data["dsn"] = redact_dsn(self.dsn)
        return data

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> JobSpec:
        data = dict(data)
        data["fields"] = tuple(data.get("fields") or ())
        data["context"] = tuple(ContextRule(**c) for c in data.get("context") or ())
        return cls(**data)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the stored spec: the same command finds the same job."""
        text = json.dumps(self.stored(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def with_dsn(self, dsn: str | None) -> JobSpec:
        return replace(self, dsn=dsn) if dsn else self

    def validate(self) -> None:
        """Refuse incoherent specs with one clear line (exit 64 in the CLI)."""
        if self.operation not in OPERATIONS:
            raise InvalidRequest(f"unknown bulk operation {self.operation!r}")
        if self.kind not in SOURCE_KINDS:
            raise InvalidRequest(f"unknown source kind {self.kind!r}")
        if self.record_type is None:
            if not self.purpose:
                raise InvalidRequest("give --purpose with --fields/--columns, or --record-type")
            if not self.fields:
                raise InvalidRequest("give the envelope --fields/--columns, or --record-type")
        else:
            if self.fields or self.purpose:
                raise InvalidRequest(
                    "--record-type takes the fields and purposes from the record-type policy: "
                    "leave out --fields/--columns and --purpose"
                )
            if self.kind == "postgresql" and not self.record_field:
                raise InvalidRequest("--record-type on a table needs --record-column")
        if len(set(self.fields)) != len(self.fields):
            raise InvalidRequest("a field or column is named twice")
        keys = [c.key for c in self.context]
        if len(set(keys)) != len(keys):
            raise InvalidRequest("a context key is given twice")
        if self.context and (self.record_type is not None or self.operation != "reencrypt"):
            raise InvalidRequest(
                "--context options apply to reencrypt of opaque values only (rewrap needs no "
                "context; records bind record_type, record_id and field as the API does)"
            )
        if self.is_file:
            if not self.input or not self.output:
                raise InvalidRequest("file jobs need --input and --output")
            if Path(self.input).resolve() == Path(self.output).resolve():
                raise InvalidRequest(
                    "--output must differ from --input (jobs never write in place)"
                )
        else:
            if not self.table or not self.key_column:
                raise InvalidRequest("table jobs need --dsn, --table and --key-column")
            if self.input or self.output:
                raise InvalidRequest("--input/--output are for file jobs, not with --table")
        if self.operation == "migrate" and not self.to_uri:
            raise InvalidRequest("migrate needs --to URI (the provider key to move to)")


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How a job runs; not part of its identity (a job may resume with other options)."""

    workers: int = 1
    engine: str = "local"
    address: str | None = None
    batch_size: int = 2000
    #: stop when more than this many records have failed (0: at the first)
    max_errors: int = 0
    #: checkpoint at most this often, in seconds (0: after every batch)
    checkpoint_interval_s: float = 1.0
    #: the longest JSON Lines line / CSV record, in bytes
    max_line_bytes: int = 4 << 20
    #: PostgreSQL lock_timeout per batch transaction, in seconds
    lock_timeout_s: float = 10.0
    #: batches in flight per worker (bounds memory)
    inflight_per_worker: int = 2
    #: progress: "auto" (a bar on a terminal), "bar", "lines" or "none"
    progress: str = "auto"

    def __post_init__(self) -> None:
        if self.workers < 1 or self.workers > 256:
            raise InvalidRequest("--workers must be 1..256")
        if self.engine not in ("local", "ray"):
            raise InvalidRequest("--engine must be local or ray")
        if not 1 <= self.batch_size <= 1_000_000:
            raise InvalidRequest("--batch-size must be 1..1000000")
        if self.max_errors < 0:
            raise InvalidRequest("--max-errors must be >= 0")


def format_of(path: str, given: str | None) -> str:
    if given:
        if given not in FILE_FORMATS:
            raise InvalidRequest(f"--format must be one of {', '.join(FILE_FORMATS)}")
        return given
    found = _EXTENSIONS.get(Path(path).suffix.lower())
    if found is None:
        raise InvalidRequest(f"cannot tell the format of {path}: give --format jsonl|csv|parquet")
    return found


def redact_dsn(dsn: str) -> str:
    """A DSN without its password (URL or key=value form)."""
    if "://" in dsn:
        from sqlalchemy.engine import make_url

        try:
            url = make_url(dsn)
        except Exception:  # noqa: BLE001 - a DSN SQLAlchemy cannot parse: keep nothing of it
            return "<unparsable dsn>"
        # URL.set(password=None) would keep the password: None means "unchanged" there.
        return str(url._replace(password=None).render_as_string(hide_password=False))
    parts = [p for p in dsn.split() if not p.lower().startswith("password=")]
    return " ".join(parts)


def dsn_for_psycopg(dsn: str) -> str:
    """libpq accepts ``postgresql://``; SQLAlchemy's ``postgresql+psycopg://`` is mapped to it."""
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres+psycopg://"):
        if dsn.startswith(prefix):
            return "postgresql://" + dsn[len(prefix) :]
    return dsn
