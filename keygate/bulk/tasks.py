"""The messages between a bulk job's coordinator and its workers (small, picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keygate.bulk.store import RecordError

__all__ = [
    "BatchResult",
    "ColumnsTask",
    "CsvTask",
    "LinesTask",
    "Oversized",
    "TableTask",
    "Task",
]


@dataclass(frozen=True, slots=True)
class Oversized:
    """A line too long to process: copied unchanged from the input by the coordinator."""

    offset: int
    length: int


@dataclass(slots=True)
class LinesTask:
    """JSON Lines: raw lines (bytes, newline included) or :class:`Oversized` markers."""

    seq: int
    first_line: int
    lines: list[bytes | Oversized]


@dataclass(slots=True)
class CsvTask:
    """CSV: raw records (bytes; a quoted field may span lines), parsed by the worker."""

    seq: int
    first_row: int
    header: list[str]
    records: list[bytes | Oversized]


@dataclass(slots=True)
class ColumnsTask:
    """Parquet: the columns the job reads, as Python lists of equal length."""

    seq: int
    first_row: int
    columns: dict[str, list[Any]]


@dataclass(slots=True)
class TableTask:
    """PostgreSQL: the rows with ``lo < key <= hi`` (``lo`` None: from the start)."""

    seq: int
    lo: Any
    hi: Any


Task = LinesTask | CsvTask | ColumnsTask | TableTask


@dataclass(slots=True)
class BatchResult:
    seq: int
    #: JSON Lines / CSV: pieces to append (bytes, or Oversized to copy); Parquet: new columns
    output: Any = None
    read: int = 0
    changed: int = 0
    failed: int = 0
    errors: list[RecordError] = field(default_factory=list)
    hsm_calls: int = 0
    deks_created: int = 0
    deks_opened: int = 0
    #: PostgreSQL: rows written back (the others were unchanged or failed)
    updated: int = 0
    #: verification: values per key version and wrap chain (see keygate.bulk.verify)
    census: dict[str, int] = field(default_factory=dict)

    @property
    def unchanged(self) -> int:
        return self.read - self.changed - self.failed
