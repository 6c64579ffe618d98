"""Group commit for the audit trail: callers block until their event is durable.

Concurrent requests hand their events to one writer thread, which appends whatever has queued up
in a single transaction (one fsync for many requests) and then releases every waiting caller.  A
caller whose event could not be written gets ``Unavailable``: the request fails closed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

from keygate.core.errors import Unavailable

__all__ = ["AuditWriter"]

log = structlog.get_logger(__name__)


class _Store(Protocol):
    def append(self, events: Sequence[Any]) -> None: ...


class _Pending:
    __slots__ = ("done", "error", "event")

    def __init__(self, event: object) -> None:
        self.event = event
        self.done = threading.Event()
        self.error: BaseException | None = None


class AuditWriter:
    """Durable, fail-closed audit writes with group commit."""

    def __init__(self, store: _Store, *, timeout_s: float = 5.0, max_batch: int = 1024) -> None:
        self._store = store
        self._timeout = timeout_s
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="keygate-audit", daemon=True)
        self._closed = False
        #: False after the last append failed; /readyz reports it
        self.healthy = True
        self.events_written = 0
        self._thread.start()

    def write(self, event: object) -> None:
        """Append one event and wait until it is durable; raises Unavailable otherwise."""
        self.write_many((event,))

    def write_many(self, events: Sequence[object]) -> None:
        if self._closed:
            raise Unavailable("audit trail is closed")
        pending = [_Pending(e) for e in events]
        for p in pending:
            self._queue.put(p)
        for p in pending:
            if not p.done.wait(self._timeout):
                self.healthy = False
                raise Unavailable("audit trail write timed out", retry_after=1)
            if p.error is not None:
                raise Unavailable("audit trail unavailable", retry_after=1)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                self._store.append([p.event for p in batch])
            except Exception as exc:  # noqa: BLE001 - any failure fails the waiting requests closed
                self.healthy = False
                log.error(  # noqa: TRY400 - the cause is named; its text could hold a URL
                    "audit.append_failed", error=type(exc).__name__, events=len(batch)
                )
                for p in batch:
                    p.error = exc
                    p.done.set()
                continue
            self.healthy = True
            self.events_written += len(batch)
            for p in batch:
                p.done.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=self._timeout)
