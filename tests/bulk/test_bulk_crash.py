"""Crash safety: ``keygate bulk`` killed with SIGKILL at random moments, several times, then run
again; every record must come out exactly once, decrypting to its original plaintext, and every
record must stay decryptable at every moment in between."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from bulk_support import TENANT, BulkEnv, read_jsonl, write_jsonl

pytestmark = [pytest.mark.hsm, pytest.mark.slow]

KILLS = 4
#: batches a job may checkpoint between reaching its kill point and being killed (with 4 kills the
#: jobs below, of 75 and 80 batches, are always killed before their end)
MAX_RUN_ON = 5


def _progress(bulk: BulkEnv) -> dict[str, Any] | None:
    """The newest job's checkpoint, read straight from the registry (no keygate code)."""
    db = bulk.home / "data" / "keygate.db"
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute(
                "SELECT id, state, checkpoint, counters FROM kg_bulk_jobs "
                "ORDER BY created_at DESC LIMIT 1"
            ).fetchone()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    return {"id": row[0], "state": row[1], "checkpoint": json.loads(row[2]),
            "counters": json.loads(row[3])}  # fmt: skip


def _kill_mid_job(bulk: BulkEnv, args: list[str], rng: random.Random, seen: int) -> int:
    """Start the job, wait until it has checkpointed past ``seen`` batches (or a random short
    time), SIGKILL it at a random moment after that; returns the batches checkpointed."""
    proc: subprocess.Popen[str] = bulk.spawn(*args)
    try:
        deadline = time.monotonic() + 60
        wait_for = seen + rng.randint(1, 3)
        while time.monotonic() < deadline and proc.poll() is None:
            p = _progress(bulk)
            if (
                p is not None
                and p["state"] == "running"
                and int(p["checkpoint"].get("batches", 0)) >= wait_for
            ):
                break
            time.sleep(0.01)
        # A random moment after that: up to 0.25 s, but never more than MAX_RUN_ON further
        # batches, so that on a fast machine the kills still land mid-job (not after its end).
        reached = int(p["checkpoint"].get("batches", 0)) if p is not None else 0
        kill_at = time.monotonic() + rng.uniform(0, 0.25)
        while time.monotonic() < kill_at and proc.poll() is None:
            p = _progress(bulk)
            if p is not None and int(p["checkpoint"].get("batches", 0)) >= reached + MAX_RUN_ON:
                break
            time.sleep(0.005)
        assert proc.poll() is None, ("the job ended before it was killed", proc.communicate())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    p = _progress(bulk)
    assert p is not None
    return int(p["checkpoint"].get("batches", 0))


def test_jsonl_records_survive_sigkill(bulk: BulkEnv, tmp_path: Path) -> None:
    """A rewrap of whole records over JSON Lines with two worker processes, SIGKILLed four
    times at random moments, finishes on the next run: nothing lost, nothing duplicated."""
    rng = random.Random(5)
    recs = bulk.records(3000, seed=31)
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"record_id": rid, "record": enc} for rid, _, enc in recs])
    before = src.read_bytes()
    bulk.rotate("resident")
    bulk.rotate("mynumber")
    out = tmp_path / "out.jsonl"
    args = [
        "bulk", "rewrap", "-i", str(src), "-o", str(out), "-t", TENANT,
        "--record-type", "resident", "--batch-size", "40", "--checkpoint-interval", "0",
        "--workers", "2", "--progress", "none",
    ]  # fmt: skip
    seen = 0
    for _ in range(KILLS):
        seen = _kill_mid_job(bulk, args, rng, seen)
        assert not out.exists()
        # The checkpointed prefix of the partial output is whole records, each still opening.
        p = _progress(bulk)
        assert p is not None
        partial = next(tmp_path.glob("out.jsonl.kgpart-*"))
        prefix = partial.read_bytes()[: p["checkpoint"]["output_length"]]
        lines = prefix.decode("utf-8").splitlines()
        assert len(lines) == p["checkpoint"]["lines"]
        for (rid, plain, _), line in zip(recs, lines, strict=False):
            obj = json.loads(line)
            assert obj["record_id"] == rid
            assert bulk.decrypt_record(rid, obj["record"]) == plain
    done = bulk.cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["resumed"] is True and summary["state"] == "done"
    assert summary["read"] == 3000 and summary["failed"] == 0
    assert summary["changed"] == 3000  # counted exactly once across the runs
    assert src.read_bytes() == before
    got = read_jsonl(out)
    assert [g["record_id"] for g in got] == [rid for rid, _, _ in recs]
    for (rid, plain, _), obj in zip(recs, got, strict=True):
        assert bulk.decrypt_record(rid, obj["record"]) == plain
    assert not list(tmp_path.glob("*.kgpart-*"))


@pytest.mark.postgres
def test_table_reencrypt_survives_sigkill(bulk: BulkEnv, pg_dsn: str) -> None:
    """A re-encryption of a table in place, SIGKILLed four times at random moments: every row
    decrypts to its original value after each kill and after the final run."""
    psycopg = pytest.importorskip("psycopg")
    rng = random.Random(9)
    n = 4000
    plain = {i: f"住所 {i}" for i in range(1, n + 1)}
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (k integer PRIMARY KEY, v text NOT NULL)")
        with conn.cursor() as cur, cur.copy("COPY t (k, v) FROM STDIN") as copy:
            for i, text in plain.items():
                copy.write_row((i, bulk.encrypt("resident", {"k": str(i)}, text)))

    def check_all() -> dict[int, str]:
        with psycopg.connect(pg_dsn) as conn:
            rows = dict(conn.execute("SELECT k, v FROM t").fetchall())
        assert len(rows) == n
        for k, v in rows.items():
            assert bulk.decrypt("resident", {"k": str(k)}, v) == plain[k]
        return rows

    original = check_all()
    bulk.rotate("resident")
    args = [
        "bulk", "reencrypt", "--dsn", pg_dsn, "--table", "t", "--key-column", "k", "-t", TENANT,
        "-p", "resident", "--columns", "v", "--context", "k=k", "--batch-size", "50",
        "--checkpoint-interval", "0", "--progress", "none",
    ]  # fmt: skip
    seen = 0
    for _ in range(KILLS):
        seen = _kill_mid_job(bulk, args, rng, seen)
        check_all()
    done = bulk.cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["resumed"] is True and summary["state"] == "done"
    final = check_all()
    assert all(final[k] != original[k] for k in final)  # every row was re-encrypted
    # Batches after a checkpoint run again after a crash: at most a few per kill.
    assert n <= summary["changed"] <= n + KILLS * 2 * 50
