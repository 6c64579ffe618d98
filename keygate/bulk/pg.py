"""A PostgreSQL table as a bulk job's source: columns, keyset pages, locked batch transactions.

Locking (see docs/bulk.md): each batch is one transaction that reads its rows with
``SELECT … WHERE key > lo AND key <= hi ORDER BY key FOR UPDATE``, transforms them, writes back
the rows that changed and commits.  The rows are locked from the read to the commit, so an
application ``UPDATE`` of one of them either committed before the read (and its value is what the
job transforms) or waits for the commit (and then overwrites the job's value with its own, made
under the active key).  No application write is ever lost, and no stale value is written back.
Locks are taken in key order; ``lock_timeout`` bounds the wait behind a long application
transaction, and a batch that hits it (or a deadlock) is retried.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Final

from keygate.bulk.spec import JobSpec, dsn_for_psycopg, redact_dsn
from keygate.core.errors import ConfigurationError, InvalidRequest, NotFound, Unavailable

__all__ = ["TableSource", "connect"]

_RETRIES: Final = 6


def connect(dsn: str) -> Any:
    """A psycopg connection in autocommit mode (transactions are explicit)."""
    try:
        import psycopg
    except ImportError:
        raise ConfigurationError(
            "table jobs need psycopg: pip install 'keygate[postgres]'"
        ) from None
    try:
        return psycopg.connect(dsn_for_psycopg(dsn), autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise Unavailable(
            f"cannot connect to {redact_dsn(dsn)}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        ) from None


@contextlib.contextmanager
def _db_errors(what: str) -> Iterator[None]:
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise Unavailable(f"{what}: {type(exc).__name__}: {first}") from exc


class TableSource:
    """One table of a job: identifiers quoted, column types known, SQL prepared."""

    def __init__(self, conn: Any, spec: JobSpec, *, lock: bool = True) -> None:
        from psycopg import sql

        assert spec.table is not None and spec.key_column is not None  # noqa: S101 - validated
        self.conn = conn
        self.spec = spec
        self.table = sql.Identifier(*spec.table.split("."))
        with _db_errors(f"read the columns of {spec.table}"):
            regclass = self.table.as_string(conn)
            try:
                rows = conn.execute(
                    "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                    "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                    (regclass,),
                ).fetchall()
            except Exception as exc:
                import psycopg

                if isinstance(exc, psycopg.errors.UndefinedTable):
                    raise NotFound(f"no table {spec.table}") from None
                raise
        self.types = dict(rows)
        self.key = spec.key_column
        self.id_column = spec.id_field or spec.key_column
        if spec.record_type is not None:
            assert spec.record_field is not None  # noqa: S101 - validated
            self.value_columns: tuple[str, ...] = (spec.record_field,)
            extra: tuple[str, ...] = (self.id_column,) if self.id_column != self.key else ()
        else:
            self.value_columns = spec.fields
            extra = tuple(
                r.value for r in spec.context if r.kind == "column" and r.value not in spec.fields
            )
        self.read_columns = (self.key, *self.value_columns, *(c for c in extra if c != self.key))
        for column in self.read_columns:
            if column not in self.types:
                raise InvalidRequest(f"table {spec.table} has no column {column!r}")
        key_type = sql.SQL(self.types[self.key])
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in self.read_columns)
        k = sql.Identifier(self.key)
        for_update = sql.SQL(" FOR UPDATE" if lock else "")
        self._select_first = sql.SQL(
            "SELECT {cols} FROM {t} WHERE {k} <= %s::{kt} ORDER BY {k}{fu}"
        ).format(cols=cols, t=self.table, k=k, kt=key_type, fu=for_update)
        self._select = sql.SQL(
            "SELECT {cols} FROM {t} WHERE {k} > %s::{kt} AND {k} <= %s::{kt} ORDER BY {k}{fu}"
        ).format(cols=cols, t=self.table, k=k, kt=key_type, fu=for_update)
        self._scan_first = sql.SQL("SELECT {cols} FROM {t} ORDER BY {k} LIMIT %s").format(
            cols=cols, t=self.table, k=k
        )
        self._scan = sql.SQL(
            "SELECT {cols} FROM {t} WHERE {k} > %s::{kt} ORDER BY {k} LIMIT %s"
        ).format(cols=cols, t=self.table, k=k, kt=key_type)
        self._bound_first = sql.SQL("SELECT {k} FROM {t} ORDER BY {k} OFFSET %s LIMIT 1").format(
            t=self.table, k=k
        )
        self._bound = sql.SQL(
            "SELECT {k} FROM {t} WHERE {k} > %s::{kt} ORDER BY {k} OFFSET %s LIMIT 1"
        ).format(t=self.table, k=k, kt=key_type)
        self._last_first = sql.SQL("SELECT {k} FROM {t} ORDER BY {k} DESC LIMIT 1").format(
            t=self.table, k=k
        )
        self._last = sql.SQL(
            "SELECT {k} FROM {t} WHERE {k} > %s::{kt} ORDER BY {k} DESC LIMIT 1"
        ).format(t=self.table, k=k, kt=key_type)
        sets = sql.SQL(", ").join(
            sql.SQL("{c} = %s::{t}").format(c=sql.Identifier(c), t=sql.SQL(self.types[c]))
            for c in self.value_columns
        )
        self._update = sql.SQL("UPDATE {t} SET {sets} WHERE {k} = %s::{kt}").format(
            t=self.table, sets=sets, k=k, kt=key_type
        )

    # -- coordinator ----------------------------------------------------------------------------
    def next_bound(self, lo: Any, batch_size: int) -> Any:
        """The key ending the batch after ``lo`` (its ``batch_size``-th key, or the last one);
        None when no row follows ``lo``."""
        with _db_errors(f"page through {self.spec.table}"):
            if lo is None:
                row = self.conn.execute(self._bound_first, (batch_size - 1,)).fetchone()
                if row is None:
                    row = self.conn.execute(self._last_first).fetchone()
            else:
                row = self.conn.execute(self._bound, (lo, batch_size - 1)).fetchone()
                if row is None:
                    row = self.conn.execute(self._last, (lo,)).fetchone()
        return None if row is None else row[0]

    def estimate_rows(self) -> int | None:
        with _db_errors(f"count {self.spec.table}"):
            row = self.conn.execute(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                (self.table.as_string(self.conn),),
            ).fetchone()
        if row is None or row[0] is None or row[0] < 0:
            return None
        return int(row[0])

    def scan(self, batch_size: int) -> Iterator[list[tuple[Any, ...]]]:
        """Every row in key order, a page at a time (no locks: verification)."""
        lo: Any = None
        while True:
            with _db_errors(f"read {self.spec.table}"):
                if lo is None:
                    rows = self.conn.execute(self._scan_first, (batch_size,)).fetchall()
                else:
                    rows = self.conn.execute(self._scan, (lo, batch_size)).fetchall()
            if not rows:
                return
            yield rows
            lo = rows[-1][0]

    # -- workers --------------------------------------------------------------------------------
    def locked_batch(self, lo: Any, hi: Any, lock_timeout_s: float, work: Any) -> Any:
        """Run ``work(rows) -> (updates, result)`` in one transaction over the locked rows of
        ``(lo, hi]``; write ``updates`` (``[(values…, key)]``) and commit.  Retries on lock
        timeouts, deadlocks and serialization failures."""
        import psycopg
        from psycopg import errors

        retryable = (
            errors.LockNotAvailable,
            errors.DeadlockDetected,
            errors.SerializationFailure,
        )
        for attempt in range(_RETRIES):
            try:
                with self.conn.transaction():
                    self.conn.execute(
                        f"SET LOCAL lock_timeout = {max(1, int(lock_timeout_s * 1000))}"
                    )
                    if lo is None:
                        rows = self.conn.execute(self._select_first, (hi,)).fetchall()
                    else:
                        rows = self.conn.execute(self._select, (lo, hi)).fetchall()
                    updates, result = work(rows)
                    if updates:
                        with self.conn.cursor() as cur:
                            cur.executemany(self._update, updates)
            except retryable:
                if attempt == _RETRIES - 1:
                    raise Unavailable(
                        f"rows {lo!r}..{hi!r} of {self.spec.table} stayed locked by other "
                        f"transactions ({_RETRIES} attempts)"
                    ) from None
                time.sleep(min(2.0, 0.05 * 2**attempt))
            except psycopg.Error as exc:
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                raise Unavailable(
                    f"batch of {self.spec.table}: {type(exc).__name__}: {first}"
                ) from exc
            else:
                return result
        raise AssertionError("unreachable")  # pragma: no cover
