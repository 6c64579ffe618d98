"""Worker process settings (keygate.api._process): glibc's malloc thresholds."""

from __future__ import annotations

import platform

import pytest

from keygate.api._process import MMAP_THRESHOLD, TRIM_THRESHOLD, tune_malloc

pytestmark = pytest.mark.unit


def test_tune_malloc_applies_on_glibc_only() -> None:
    """The thresholds are accepted by glibc (and nothing happens on another C library)."""
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
    assert tune_malloc() is tune_malloc()  # idempotent


def test_thresholds_stay_within_what_glibc_allows() -> None:
    """The mmap threshold is within glibc's maximum (32 MiB on 64-bit) and below the trim
    threshold, and both sit above the largest buffers of a usual 1000-item batch."""
    assert 2 << 20 <= MMAP_THRESHOLD <= 32 << 20
    assert MMAP_THRESHOLD <= TRIM_THRESHOLD
