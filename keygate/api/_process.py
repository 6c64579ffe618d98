"""Memory settings of a gateway worker process (glibc only; elsewhere nothing happens).

A batch request of 1000 values of 1 KiB makes a handful of buffers of 1.5 MB each (the body, its
text, the response).  glibc serves blocks that large with ``mmap`` and gives them back with
``munmap`` when they are freed (and trims the heap top back to the kernel), so every request
page-faults its buffers in again: measured, about a fifth of a worker's CPU time under the batch
benchmark went to the kernel for that.  Raising the mmap threshold and the trim threshold keeps
such blocks in the process for reuse.  Blocks above ``MMAP_THRESHOLD`` (only the largest batches
come near it) still go straight back to the kernel, and the heap gives back anything beyond
``TRIM_THRESHOLD`` of free space at its top, so what a worker keeps stays bounded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Final

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

MMAP_THRESHOLD: Final = 8 << 20
TRIM_THRESHOLD: Final = 64 << 20
_M_TRIM_THRESHOLD: Final = -1  # malloc.h
_M_MMAP_THRESHOLD: Final = -3


def tune_malloc() -> bool:
    """Apply the thresholds to this process; True when glibc accepted both."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
