"""Threads share one lock per module; forked children reconnect on their own."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from keygate.core.errors import ProviderUnavailable
from keygate.core.model import WrapMechanism
from keygate.hsm import Pkcs11Hsm
from keygate.hsm import pkcs11 as hsm_module

pytestmark = pytest.mark.hsm

THREADS = 8
ROUNDS = 150


def test_eight_threads_wrap_and_unwrap_concurrently(
    hsm: Pkcs11Hsm, adapters: Callable[..., Pkcs11Hsm], kek: str
) -> None:
    """8 threads on two adapters (GCM and RFC 3394) wrap and unwrap at once, all correctly."""
    kw = adapters(mechanism=WrapMechanism.HSM_AES_KW)
    before = {id(hsm): hsm.calls, id(kw): kw.calls}
    start = threading.Barrier(THREADS)

    def worker(index: int) -> int:
        adapter = hsm if index % 2 == 0 else kw
        start.wait()
        good = 0
        for round_ in range(ROUNDS):
            dek = os.urandom(32)
            aad = f"thread-{index}/round-{round_}".encode()
            mechanism, blob = adapter.wrap_dek(kek, dek, aad=aad)
            if adapter.unwrap_dek(kek, mechanism, blob, aad=aad) == dek:
                good += 1
        return good

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(worker, range(THREADS)))
    assert results == [ROUNDS] * THREADS
    per_adapter = (THREADS // 2) * ROUNDS * 2
    assert hsm.calls - before[id(hsm)] == per_adapter
    assert kw.calls - before[id(kw)] == per_adapter
    hsm.check()


def test_lock_timeout_gives_provider_unavailable(
    adapters: Callable[..., Pkcs11Hsm], kek: str, main_token: object
) -> None:
    """If the token lock is held longer than lock_timeout_s, the call fails as retryable."""
    adapter = adapters(lock_timeout_s=0.05)
    adapter.check()
    lock = hsm_module._REGISTRY.get(adapter.config.module_path).lock
    with lock, pytest.raises(ProviderUnavailable, match="busy") as info:
        adapter.wrap_dek(kek, os.urandom(32), aad=b"")
    assert info.value.retry_after is not None
    adapter.wrap_dek(kek, os.urandom(32), aad=b"")


def test_forked_child_reconnects_and_parent_keeps_working(hsm: Pkcs11Hsm, kek: str) -> None:
    """A forked child drops the inherited session, re-initialises and works; the parent too."""
    dek = os.urandom(32)
    mechanism, blob = hsm.wrap_dek(kek, dek, aad=b"fork")
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            ok = hsm.unwrap_dek(kek, mechanism, blob, aad=b"fork") == dek
            child_dek = os.urandom(32)
            m2, b2 = hsm.wrap_dek(kek, child_dek, aad=b"child")
            ok = ok and hsm.unwrap_dek(kek, m2, b2, aad=b"child") == child_dek
            code = 0 if ok else 2
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert hsm.unwrap_dek(kek, mechanism, blob, aad=b"fork") == dek
    assert hsm.wrap_dek(kek, dek, aad=b"")[0] is mechanism
