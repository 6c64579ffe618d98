"""File sources and sinks: JSON Lines, CSV and Parquet, streamed, resumable, never in place.

Sources read the input a batch at a time from a checkpointed position (a byte offset for JSON Lines
and CSV, a row number for Parquet), so memory stays flat however large the input.

Sinks write ``OUTPUT.kgpart-<job>`` next to the output (a directory of row-group parts for
Parquet), append each batch in input order, and :meth:`sync` it (``fsync``) before the checkpoint
that covers it is committed.  On resume the partial output is cut back to the checkpointed length
(or part count), so every byte in it corresponds to a checkpointed input position.  When the input
is exhausted the sink is completed and renamed to the output path (``rename`` is atomic; the
directory is ``fsync``-ed), so the output path only ever holds a complete file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from keygate.bulk.tasks import ColumnsTask, CsvTask, LinesTask, Oversized, Task
from keygate.core.errors import ConfigurationError, InvalidRequest, NotFound

__all__ = [
    "CsvSource",
    "JsonlSource",
    "ParquetSink",
    "ParquetSource",
    "StreamSink",
    "fsync_dir",
    "input_identity",
    "temp_output",
]

_BOM: Final = b"\xef\xbb\xbf"
_COPY_CHUNK: Final = 1 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_output(output: str, job_id: str) -> Path:
    out = Path(output)
    return out.with_name(f"{out.name}.kgpart-{job_id}")


def input_identity(path: str) -> dict[str, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"no input file {path}") from None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass(slots=True)
class Step:
    """One batch read from a source, and the source position just after it."""

    task: Task
    position: dict[str, Any]
    #: progress units consumed (bytes for JSON Lines and CSV, rows for Parquet)
    units: int


def _read_line(stream: Any, limit: int) -> tuple[bytes | None, int]:
    """The next line (newline included) if it is at most ``limit`` bytes, else None; and the
    number of bytes consumed either way."""
    raw = stream.readline(limit + 1)
    if len(raw) <= limit or raw.endswith(b"\n"):
        return raw, len(raw)
    consumed = len(raw)
    while True:
        chunk = stream.readline(_COPY_CHUNK)
        consumed += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return None, consumed


class JsonlSource:
    """JSON Lines, a line per record (blank lines are copied and not counted)."""

    unit = "bytes"

    def __init__(self, path: str, max_line_bytes: int) -> None:
        self.path = path
        self.max_line = max_line_bytes
        self.total = os.path.getsize(path)

    def prologue(self) -> bytes:
        return b""

    def steps(self, position: dict[str, Any], batch_size: int) -> Iterator[Step]:
        offset = int(position.get("input_offset", 0))
        line_no = int(position.get("lines", 0))
        seq = int(position.get("batches", 0))
        with open(self.path, "rb") as stream:
            stream.seek(offset)
            while True:
                lines: list[bytes | Oversized] = []
                start_offset, first = offset, line_no + 1
                while len(lines) < batch_size:
                    raw, consumed = _read_line(stream, self.max_line)
                    if consumed == 0:
                        break
                    lines.append(raw if raw is not None else Oversized(offset, consumed))
                    offset += consumed
                    line_no += 1
                if not lines:
                    return
                seq += 1
                yield Step(
                    LinesTask(seq, first, lines),
                    {"input_offset": offset, "lines": line_no, "batches": seq},
                    offset - start_offset,
                )


class CsvSource:
    """CSV (RFC 4180, UTF-8, optional BOM) with a header row; a quoted field may span lines."""

    unit = "bytes"

    def __init__(self, path: str, max_line_bytes: int, required: tuple[str, ...]) -> None:
        import csv
        import io

        self.path = path
        self.max_line = max_line_bytes
        self.total = os.path.getsize(path)
        with open(path, "rb") as stream:
            raw, self._header_len = self._record(stream)
        if not raw:
            raise InvalidRequest(f"{path}: empty CSV file (no header row)")
        self._header_raw = raw
        try:
            text = raw.removeprefix(_BOM).decode("utf-8")
            self.header = next(csv.reader(io.StringIO(text, newline="")))
        except (UnicodeDecodeError, csv.Error, StopIteration):
            raise InvalidRequest(f"{path}: the header row is not valid CSV (UTF-8)") from None
        missing = [c for c in required if c not in self.header]
        if missing:
            raise InvalidRequest(
                f"{path}: the CSV header has no column {', '.join(map(repr, missing))}"
            )
        if len(set(self.header)) != len(self.header):
            raise InvalidRequest(f"{path}: the CSV header names a column twice")

    def _record(self, stream: Any) -> tuple[bytes | None, int]:
        """One CSV record: lines joined while a quoted field is open (odd number of quotes)."""
        parts: list[bytes] = []
        consumed = 0
        quotes = 0
        while True:
            raw, n = _read_line(stream, self.max_line - consumed)
            consumed += n
            if n == 0:
                break
            if raw is None:
                # Too long: skip to the end of the record as far as quotes can tell.
                return None, consumed
            parts.append(raw)
            quotes += raw.count(b'"')
            if quotes % 2 == 0:
                break
        return b"".join(parts), consumed

    def prologue(self) -> bytes:
        return self._header_raw

    def steps(self, position: dict[str, Any], batch_size: int) -> Iterator[Step]:
        offset = int(position.get("input_offset", self._header_len))
        row_no = int(position.get("rows", 0))
        seq = int(position.get("batches", 0))
        with open(self.path, "rb") as stream:
            stream.seek(offset)
            while True:
                records: list[bytes | Oversized] = []
                start_offset, first = offset, row_no + 1
                while len(records) < batch_size:
                    raw, consumed = self._record(stream)
                    if consumed == 0:
                        break
                    records.append(raw if raw is not None else Oversized(offset, consumed))
                    offset += consumed
                    row_no += 1
                if not records:
                    return
                seq += 1
                yield Step(
                    CsvTask(seq, first, self.header, records),
                    {"input_offset": offset, "rows": row_no, "batches": seq},
                    offset - start_offset,
                )


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigurationError("Parquet needs pyarrow: pip install 'keygate[parquet]'") from None
    return pa, pq


class ParquetSource:
    """Parquet, read a record batch at a time; the job's columns go to the workers."""

    unit = "rows"

    def __init__(self, path: str, columns: tuple[str, ...], optional: tuple[str, ...]) -> None:
        _, pq = _pyarrow()
        self.path = path
        try:
            self.file = pq.ParquetFile(path)
        except OSError as exc:
            raise InvalidRequest(f"{path}: not a readable Parquet file ({exc})") from None
        self.schema = self.file.schema_arrow
        names = set(self.schema.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise InvalidRequest(
                f"{path}: the Parquet schema has no column {', '.join(map(repr, missing))}"
            )
        self.columns = tuple(c for c in (*columns, *optional) if c in names)
        self.columns = tuple(dict.fromkeys(self.columns))
        self.total = self.file.metadata.num_rows
        self.pending: dict[int, Any] = {}

    def prologue(self) -> bytes:
        return b""

    def steps(self, position: dict[str, Any], batch_size: int) -> Iterator[Step]:
        done = int(position.get("rows", 0))
        seq = int(position.get("batches", 0))
        meta = self.file.metadata
        start_group, skip = 0, done
        while start_group < meta.num_row_groups and skip >= meta.row_group(start_group).num_rows:
            skip -= meta.row_group(start_group).num_rows
            start_group += 1
        groups = list(range(start_group, meta.num_row_groups))
        if not groups:
            return
        row = done
        for read in self.file.iter_batches(batch_size=batch_size, row_groups=groups):
            batch = read
            if skip:
                if skip >= read.num_rows:
                    skip -= read.num_rows
                    continue
                batch = read.slice(skip)
                skip = 0
            seq += 1
            columns = {c: batch.column(c).to_pylist() for c in self.columns}
            self.pending[seq] = batch
            first = row + 1
            row += batch.num_rows
            yield Step(
                ColumnsTask(seq, first, columns),
                {"rows": row, "batches": seq},
                batch.num_rows,
            )


class StreamSink:
    """The partial output of a JSON Lines or CSV job (see the module docstring)."""

    def __init__(self, temp: Path, input_path: str) -> None:
        self.temp = temp
        self.input_path = input_path
        self._stream: Any = None
        self._input: Any = None

    def open(self, length: int | None, prologue: bytes) -> None:
        if length is None:  # a new job
            self._stream = open(self.temp, "wb")  # noqa: SIM115 - closed in close()
            self._stream.write(prologue)
        else:
            if not self.temp.exists():
                raise NotFound(
                    f"the partial output {self.temp} of this job is gone; start the job again"
                )
            self._stream = open(self.temp, "r+b")  # noqa: SIM115 - closed in close()
            self._stream.truncate(length)
            self._stream.seek(length)

    def write(self, step: Step, output: list[Any]) -> int:
        written = 0
        for piece in output:
            if isinstance(piece, Oversized):
                written += self._copy(piece)
            else:
                self._stream.write(piece)
                written += len(piece)
        return written

    def _copy(self, piece: Oversized) -> int:
        if self._input is None:
            self._input = open(self.input_path, "rb")  # noqa: SIM115 - closed in close()
        self._input.seek(piece.offset)
        left = piece.length
        while left:
            chunk = self._input.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise InvalidRequest("the input file shrank while the job was running")
            self._stream.write(chunk)
            left -= len(chunk)
        return piece.length

    def sync(self) -> dict[str, Any]:
        self._stream.flush()
        os.fsync(self._stream.fileno())
        return {"output_length": self._stream.tell()}

    def finish(self, output: Path) -> None:
        self.close()
        os.replace(self.temp, output)
        fsync_dir(output.parent)

    def close(self) -> None:
        for stream in (self._stream, self._input):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stream = self._input = None


class ParquetSink:
    """The partial output of a Parquet job: one fsync-ed part file (one row group) per batch;
    assembled into one Parquet file (same row groups) when the input is exhausted."""

    def __init__(self, temp: Path, source: ParquetSource) -> None:
        self.temp = temp
        self.parts = temp.with_name(temp.name + ".d")
        self.source = source
        self.count = 0

    def _part(self, n: int) -> Path:
        return self.parts / f"part-{n:08d}.parquet"

    def open(self, parts: int | None, prologue: bytes) -> None:
        del prologue
        if parts is None:
            if self.parts.exists():
                shutil.rmtree(self.parts)
            self.parts.mkdir(parents=True)
            self.count = 0
            return
        if not self.parts.is_dir():
            raise NotFound(f"the partial output {self.parts} of this job is gone; start again")
        for path in list(self.parts.iterdir()):
            stem = path.stem
            keep = (
                path.suffix == ".parquet"
                and stem.startswith("part-")
                and stem[5:].isdigit()
                and int(stem[5:]) <= parts
            )
            if not keep:  # written after the checkpoint, or a half-written temporary
                path.unlink()
        self.count = parts

    def write(self, step: Step, output: dict[str, list[Any]]) -> int:
        pa, pq = _pyarrow()
        batch = self.source.pending.pop(step.task.seq)
        if output:
            arrays = []
            for i, name in enumerate(batch.schema.names):
                if name in output:
                    arrays.append(pa.array(output[name], type=batch.schema.field(i).type))
                else:
                    arrays.append(batch.column(i))
            batch = pa.RecordBatch.from_arrays(arrays, schema=batch.schema)
        self.count += 1
        path = self._part(self.count)
        tmp = path.with_suffix(".tmp")
        pq.write_table(pa.Table.from_batches([batch]), tmp, row_group_size=max(1, batch.num_rows))
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
        return int(batch.nbytes)

    def sync(self) -> dict[str, Any]:
        fsync_dir(self.parts)
        return {"parts": self.count}

    def finish(self, output: Path) -> None:
        _, pq = _pyarrow()
        schema = self.source.schema
        with pq.ParquetWriter(self.temp, schema) as writer:
            for n in range(1, self.count + 1):
                part = pq.ParquetFile(self._part(n))
                for g in range(part.metadata.num_row_groups):
                    writer.write_table(part.read_row_group(g))
        with open(self.temp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(self.temp, output)
        fsync_dir(output.parent)
        shutil.rmtree(self.parts, ignore_errors=True)

    def close(self) -> None:
        return
