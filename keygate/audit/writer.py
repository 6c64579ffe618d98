"""Group commit for the audit trail: callers block until their event is durable.

Concurrent requests hand their events to one writer thread, which appends whatever has queued up
in a single transaction (one fsync for many requests) and then releases every waiting caller.  A
caller whose event could not be written gets ``Unavailable``: the request fails closed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

from keygate.core.errors import Unavailable

__all__ = ["AuditWriter", "Checkpointer"]

log = structlog.get_logger(__name__)


class _Store(Protocol):
    def append(self, events: Sequence[Any]) -> Any: ...


class Checkpointer:
    """Signs the chain head every ``every_events`` events, and at least every ``every_s``
    seconds while events arrive.  Called by the writer thread after each append.

    A failed checkpoint is logged and retried at the next opportunity; it never fails the
    append (the events are already durable and chained; ``keygate audit verify`` reports events
    no checkpoint covers, and every export first signs the head).
    """

    def __init__(
        self,
        store: Any,
        signer: Callable[[int, str, int, str], tuple[str, str]],
        *,
        every_events: int = 1000,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        prepare: Callable[[], object] | None = None,
        retry_s: float = 5.0,
    ) -> None:
        if every_events < 1 or not every_s > 0:
            raise ValueError("checkpoint intervals must be positive")
        self._store = store
        self._signer = signer
        self._every_events = every_events
        self._every_s = every_s
        self._clock = clock
        self._last_seq: int | None = None
        self._last_time = clock()
        #: runs before the append lock is taken (the signer must not need the lock itself)
        self._prepare = prepare
        self._retry_s = retry_s
        self._retry_at = 0.0
        self.checkpoints_made = 0
        self.failures = 0

    def after_append(self, head_seq: int) -> None:
        now = self._clock()
        try:
            if self._last_seq is None:
                last = self._store.last_checkpoint()
                self._last_seq = last.seq if last is not None else 0
            due = head_seq - self._last_seq >= self._every_events or (
                head_seq > self._last_seq and now - self._last_time >= self._every_s
            )
            if not due or now < self._retry_at:
                return
            self._last_time = now
            if self._prepare is not None:
                self._prepare()  # e.g. make sure the signing key exists: outside the lock
            cp = self._store.checkpoint(self._signer)
            if cp is not None:
                self._last_seq = cp.seq
                self.checkpoints_made += 1
        except Exception as exc:  # noqa: BLE001 - logged; retried after retry_s
            # Back off: the writer thread must not retry a failing checkpoint on every append.
            self._last_time = now
            self._retry_at = now + self._retry_s
            self.failures += 1
            log.warning("audit.checkpoint_failed", error=type(exc).__name__)


class _Pending:
    __slots__ = ("done", "error", "event")

    def __init__(self, event: object) -> None:
        self.event = event
        self.done = threading.Event()
        self.error: BaseException | None = None


class AuditWriter:
    """Durable, fail-closed audit writes with group commit."""

    def __init__(
        self,
        store: _Store,
        *,
        timeout_s: float = 5.0,
        max_batch: int = 1024,
        checkpointer: Checkpointer | None = None,
    ) -> None:
        self._store = store
        self._checkpointer = checkpointer
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
                head = self._store.append([p.event for p in batch])
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
            if self._checkpointer is not None and isinstance(head, tuple):
                self._checkpointer.after_append(head[0])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=self._timeout)
