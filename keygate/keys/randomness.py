"""The system random source: nonces drawn from os.urandom in blocks, fork- and thread-safe.

``os.urandom`` costs about half a microsecond per call, as much as encrypting a small record, so
nonces are drawn 4096 at a time.  Each nonce is handed out exactly once: a list iterator's
``next`` is atomic under the GIL, and a forked child throws away the block it inherited (it would
otherwise repeat its parent's nonces under a shared DEK).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from typing import Final

from keygate.core.aead import DEK_LEN, NONCE_LEN

__all__ = ["SystemRandom"]

_BLOCK: Final = 4096


class SystemRandom:
    """Random 96-bit nonces and 256-bit DEKs from the kernel CSPRNG."""

    __slots__ = ("__weakref__", "_it", "_lock")

    def __init__(self) -> None:
        self._it: Iterator[bytes] = iter(())
        self._lock = threading.Lock()
        ref = weakref.ref(self)

        def _after_fork() -> None:
            obj = ref()
            if obj is not None:
                obj._it = iter(())
                obj._lock = threading.Lock()  # another thread may have held it at fork time

        os.register_at_fork(after_in_child=_after_fork)

    def nonce(self) -> bytes:
        try:
            return next(self._it)
        except StopIteration:
            return self._refill()

    def _refill(self) -> bytes:
        with self._lock:
            buf = os.urandom(NONCE_LEN * _BLOCK)
            it = iter([buf[i : i + NONCE_LEN] for i in range(0, len(buf), NONCE_LEN)])
            first = next(it)
            self._it = it
            return first

    def dek(self) -> bytes:
        return os.urandom(DEK_LEN)
