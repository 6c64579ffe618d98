"""Where batches run: in the coordinator, in a local process pool, or on Ray actors.

Every executor keeps one :class:`~keygate.bulk.worker.BulkWorker` per worker for the whole job,
so each worker opens its HSM session and fills its DEK caches once.  The coordinator keeps at most
``workers × inflight_per_worker`` batches in flight and takes results back in input order, so
memory stays bounded whatever the input's size.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from keygate.bulk.spec import JobSpec, RunOptions
from keygate.bulk.tasks import BatchResult, Task
from keygate.bulk.worker import BulkWorker, init_process, run_in_process
from keygate.core.errors import ConfigurationError, GatewayError, Unavailable

__all__ = ["Executor", "make_executor"]

#: environment variables workers need (Ray workers do not inherit the driver's environment)
_ENV_PREFIXES = ("KEYGATE_", "SOFTHSM2_CONF", "PGPASSWORD", "PGPASSFILE", "PGSSL")


class Executor(Protocol):
    def submit(self, task: Task) -> Any: ...
    def result(self, handle: Any) -> BatchResult: ...
    def close(self) -> None: ...


class _Inline:
    """``--workers 1``: the coordinator's own Gateway does the work (no extra process)."""

    def __init__(self, worker: BulkWorker) -> None:
        self.worker = worker

    def submit(self, task: Task) -> Any:
        return task

    def result(self, handle: Any) -> BatchResult:
        return self.worker.run(handle)

    def close(self) -> None:
        self.worker.close()


class _Pool:
    """A spawned process pool (never fork: a PKCS#11 session does not survive it)."""

    def __init__(
        self, spec: JobSpec, job_id: str, actor: str, operation: str, options: RunOptions
    ) -> None:
        self.pool = ProcessPoolExecutor(
            max_workers=options.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_process,
            initargs=(
                spec,
                job_id,
                actor,
                operation,
                {
                    "max_line_bytes": options.max_line_bytes,
                    "lock_timeout_s": options.lock_timeout_s,
                    "parent_pid": os.getpid(),
                },
            ),
        )

    def submit(self, task: Task) -> Future[BatchResult]:
        return self.pool.submit(run_in_process, task)

    def result(self, handle: Future[BatchResult]) -> BatchResult:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return handle.result()
        except BrokenProcessPool:
            raise Unavailable("a bulk worker process died; run the job again to resume") from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _RayWorker:
    """The Ray actor: one BulkWorker (one Gateway, one HSM session) for the job's lifetime."""

    def __init__(
        self, spec: JobSpec, job_id: str, actor: str, operation: str, options: dict[str, Any]
    ) -> None:
        from keygate.logging import configure_logging

        configure_logging(fmt="console", level="warning")
        self.worker = BulkWorker(spec, job_id=job_id, actor=actor, operation=operation, **options)

    def run(self, task: Task) -> BatchResult:
        return self.worker.run(task)

    def close(self) -> None:
        self.worker.close()


class _Ray:
    def __init__(
        self, spec: JobSpec, job_id: str, actor: str, operation: str, options: RunOptions
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigurationError("--engine ray needs ray: pip install 'keygate[ray]'") from None
        self.ray = ray
        env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "ignore_reinit_error": True,
            "runtime_env": {"env_vars": env},
        }
        address = options.address
        if address in (None, "", "local"):
            # A private single-node cluster on loopback, sized for the workers asked for.
            kwargs.update(num_cpus=options.workers, _node_ip_address="127.0.0.1")
        else:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; one clear line instead
            raise Unavailable(f"cannot start or reach Ray at {address or 'local'}: {exc}") from None
        remote: Any = ray.remote(num_cpus=1)(_RayWorker)
        opts = {"max_line_bytes": options.max_line_bytes, "lock_timeout_s": options.lock_timeout_s}
        self.actors: list[Any] = [
            remote.remote(spec, job_id, actor, operation, opts) for _ in range(options.workers)
        ]
        self._next = 0

    def submit(self, task: Task) -> Any:
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        return actor.run.remote(task)

    def result(self, handle: Any) -> BatchResult:
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self.ray.get(handle)  # type: ignore[no-any-return]
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, GatewayError):
                raise cause from None
            raise
        except RayActorError:
            raise Unavailable("a Ray bulk worker died; run the job again to resume") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort
            self.ray.get([a.close.remote() for a in self.actors], timeout=30)
        self.ray.shutdown()


def make_executor(
    spec: JobSpec,
    job_id: str,
    actor: str,
    operation: str,
    options: RunOptions,
    gateway: Any,
) -> Executor:
    if options.engine == "ray":
        return _Ray(spec, job_id, actor, operation, options)
    if options.workers == 1:
        return _Inline(
            BulkWorker(
                spec,
                job_id=job_id,
                actor=actor,
                operation=operation,
                gateway=gateway,
                max_line_bytes=options.max_line_bytes,
                lock_timeout_s=options.lock_timeout_s,
            )
        )
    return _Pool(spec, job_id, actor, operation, options)
