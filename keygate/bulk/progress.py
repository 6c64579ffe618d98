"""Progress of a bulk job: a Rich bar on a terminal (records, records/s, ETA), plain periodic
lines otherwise (logs, CI), or nothing."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

__all__ = ["Progress", "make_progress"]


class Progress(Protocol):
    def start(self, total: int | None, done: int, records: int) -> None: ...
    def advance(self, units: int, records: int) -> None: ...
    def stop(self) -> None: ...


class _Silent:
    def start(self, total: int | None, done: int, records: int) -> None:
        return

    def advance(self, units: int, records: int) -> None:
        return

    def stop(self) -> None:
        return


class _Lines:
    """``bulk JOB: 120000 records, 30000 records/s, 45%, ETA 12 s`` every ``every_s`` seconds."""

    def __init__(self, job_id: str, unit: str, stream: TextIO, every_s: float = 5.0) -> None:
        self.job_id = job_id
        self.unit = unit
        self.stream = stream
        self.every_s = every_s
        self.total: int | None = None
        self.done = 0
        self.records = 0
        self._t0 = time.monotonic()
        self._last = self._t0
        self._records0 = 0
        self._done0 = 0

    def start(self, total: int | None, done: int, records: int) -> None:
        self.total, self.done, self.records = total, done, records
        self._records0, self._done0 = records, done
        self._t0 = self._last = time.monotonic()

    def advance(self, units: int, records: int) -> None:
        self.done += units
        self.records += records
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = max(now - self._t0, 1e-9)
        rate = (self.records - self._records0) / elapsed
        text = f"bulk {self.job_id}: {self.records} records, {rate:,.0f} records/s"
        if self.total:
            share = min(1.0, self.done / self.total)
            speed = (self.done - self._done0) / elapsed
            eta = (self.total - self.done) / speed if speed > 0 else None
            text += f", {share:.0%}" + (f", ETA {eta:.0f} s" if eta is not None else "")
        print(text, file=self.stream, flush=True)

    def stop(self) -> None:
        self._print(time.monotonic())


class _Bar:
    def __init__(self, job_id: str, unit: str, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.unit = unit
        self.records = 0
        self._t0 = time.monotonic()
        self._records0 = 0
        self._progress = Progress(
            TextColumn(f"bulk {job_id}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[records]} records"),
            TextColumn("{task.fields[rate]} records/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task: Any = None

    def start(self, total: int | None, done: int, records: int) -> None:
        self.records = self._records0 = records
        self._t0 = time.monotonic()
        self._progress.start()
        self._task = self._progress.add_task(
            "bulk", total=total, completed=done, records=f"{records:,}", rate="-"
        )

    def advance(self, units: int, records: int) -> None:
        self.records += records
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self.records - self._records0) / elapsed
        self._progress.update(
            self._task, advance=units, records=f"{self.records:,}", rate=f"{rate:,.0f}"
        )

    def stop(self) -> None:
        self._progress.stop()


def make_progress(mode: str, job_id: str, unit: str, stream: TextIO | None = None) -> Progress:
    stream = stream or sys.stderr
    if mode == "none":
        return _Silent()
    if mode == "bar" or (mode == "auto" and stream.isatty()):
        from rich.console import Console

        return _Bar(job_id, unit, Console(file=stream))
    return _Lines(job_id, unit, stream)
