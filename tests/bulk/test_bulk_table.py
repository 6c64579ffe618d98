"""``keygate bulk`` over a PostgreSQL table in place: keyset-paginated, locked batch
transactions, envelope columns and JSONB records, verify and retire."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from bulk_support import TENANT, BulkEnv

from keygate.core.wire import from_text
from keygate.service import key_version_of

psycopg = pytest.importorskip("psycopg")

pytestmark = [pytest.mark.hsm, pytest.mark.postgres]


def _version(value: str) -> int:
    return key_version_of(from_text(value))


def _values_table(bulk: BulkEnv, dsn: str, n: int) -> dict[int, dict[str, str | None]]:
    """``items(id bigint, a text, b text, other text)``; b is null on every fifth row."""
    rows: dict[int, dict[str, str | None]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, a text, b text, other text)")
        with conn.cursor() as cur, cur.copy("COPY items (id, a, b, other) FROM STDIN") as copy:
            for i in range(1, n + 1):
                a = bulk.encrypt("resident", {"id": str(i)}, f"a{i}")
                b = bulk.encrypt("resident", {"id": str(i)}, f"b{i}") if i % 5 else None
                rows[i] = {"a": a, "b": b}
                copy.write_row((i, a, b, f"clear {i}"))
    return rows


def _read(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql).fetchall())


def test_table_rewrap_verify_retire(bulk: BulkEnv, pg_dsn: str) -> None:
    """Rewrap in place, verify counts per version, retire refuses while an old value remains
    and disables the old version once none does."""
    rows = _values_table(bulk, pg_dsn, 2500)
    old = bulk.gateway.keys.active_version(TENANT, "resident")
    new = bulk.rotate("resident")
    s = bulk.job(
        "rewrap", "--dsn", pg_dsn, "--table", "public.items", "--key-column", "id",
        "-t", TENANT, "-p", "resident", "--columns", "a,b", "--batch-size", "400",
        "--workers", "2",
    )  # fmt: skip
    assert s["state"] == "done" and s["read"] == 2500 and s["changed"] == 2500, s
    assert s["failed"] == 0
    for i, a, b, other in _read(pg_dsn, "SELECT id, a, b, other FROM items ORDER BY id"):
        assert other == f"clear {i}"
        assert _version(a) == new and bulk.decrypt("resident", {"id": str(i)}, a) == f"a{i}"
        if rows[i]["b"] is None:
            assert b is None
        else:
            assert _version(b) == new and bulk.decrypt("resident", {"id": str(i)}, b) == f"b{i}"

    # Put one old value back (a restored backup row, say): verify sees it, retire refuses.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE items SET a = %s WHERE id = 7", (rows[7]["a"],))
    done = bulk.cli("bulk", "verify", s["job"], "--retire", "--json")
    assert done.returncode == 65, (done.stdout, done.stderr)
    result = json.loads(done.stdout)
    assert result["census"][f"{TENANT}/resident/v{old}/hsm"] == 1
    assert result["retired"] == [] and "1 ciphertexts in scope" in result["refused"][0]
    assert "refused" in done.stderr
    bulk.refresh()
    states = {
        v.version: v.state.value for v in bulk.gateway.registry.list_versions(TENANT, "resident")
    }
    assert states[old] == "decrypt-only"

    # Run the same command again: a new job rewraps the straggler; retire then succeeds.
    s2 = bulk.job(
        "rewrap", "--dsn", pg_dsn, "--table", "public.items", "--key-column", "id",
        "-t", TENANT, "-p", "resident", "--columns", "a,b", "--batch-size", "400",
    )  # fmt: skip
    assert s2["job"] != s["job"] and s2["changed"] == 1 and s2["unchanged"] == 2499
    # --decrypt needs the context the values were bound to: without it every value fails.
    done = bulk.cli("bulk", "verify", s2["job"], "--decrypt", "--json")
    assert done.returncode == 65 and json.loads(done.stdout)["decrypt_failed"] == 2500
    done = bulk.cli("bulk", "verify", s2["job"], "--decrypt", "--context", "id=id", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["decrypt_failed"] == 0
    done = bulk.cli("bulk", "verify", s2["job"], "--retire", "--json")
    assert done.returncode == 0, (done.stdout, done.stderr)
    result = json.loads(done.stdout)
    assert result["census"] == {f"{TENANT}/resident/v{new}/hsm": 2500 + 2000}
    assert result["retired"] == [f"{TENANT}/resident v{old}"]
    bulk.refresh()
    states = {
        v.version: v.state.value for v in bulk.gateway.registry.list_versions(TENANT, "resident")
    }
    assert states[old] == "disabled"
    bulk.gateway.set_key_state("custodian:bulk-tests", TENANT, "resident", old, enabled=True)


def test_table_records_reencrypt_jsonb(bulk: BulkEnv, pg_dsn: str) -> None:
    """A JSONB column of records re-encrypts per the policy, with the record endpoints'
    context (record id from the id column), and decrypts through them afterwards."""
    recs = bulk.records(700, seed=21)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE residents (pk serial PRIMARY KEY, rid text, rec jsonb)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO residents (rid, rec) VALUES (%s, %s::jsonb)",
                [(rid, json.dumps(enc, ensure_ascii=False)) for rid, _, enc in recs],
            )
    s = bulk.job(
        "reencrypt", "--dsn", pg_dsn, "--table", "residents", "--key-column", "pk",
        "-t", TENANT, "--record-type", "resident", "--record-column", "rec",
        "--id-column", "rid", "--batch-size", "150", "--workers", "2",
    )  # fmt: skip
    assert s["state"] == "done" and s["read"] == 700 and s["changed"] == 700 and s["failed"] == 0
    got = _read(pg_dsn, "SELECT rid, rec FROM residents ORDER BY pk")
    for (rid, plain, enc), (rid2, rec) in zip(recs, got, strict=True):
        assert rid == rid2 and rec["氏名"] != enc["氏名"]
        assert bulk.decrypt_record(rid, rec) == plain
    done = bulk.cli("bulk", "verify", s["job"], "--decrypt", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["records"] == 700 and result["decrypt_failed"] == 0


def test_concurrent_application_writes_are_not_overwritten(bulk: BulkEnv, pg_dsn: str) -> None:
    """Rows the application updates while the job runs keep the application's value."""
    _values_table(bulk, pg_dsn, 3000)
    bulk.rotate("resident")
    stop = threading.Event()
    written: dict[int, str] = {}

    def app() -> None:
        # Keeps writing (cycling through the table) until the job has finished.
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            i, n = 0, 0
            while not stop.is_set():
                i = (i + 37) % 3000 + 1
                n += 1
                value = bulk.encrypt("resident", {"id": str(i)}, f"app {i} #{n}")
                conn.execute("UPDATE items SET a = %s WHERE id = %s", (value, i))
                written[i] = f"app {i} #{n}"
                time.sleep(0.001)

    thread = threading.Thread(target=app)
    thread.start()
    try:
        s = bulk.job(
            "rewrap", "--dsn", pg_dsn, "--table", "items", "--key-column", "id",
            "-t", TENANT, "-p", "resident", "--columns", "a", "--batch-size", "100",
        )  # fmt: skip
    finally:
        stop.set()
        thread.join()
    assert s["state"] == "done" and s["failed"] == 0
    current = dict(_read(pg_dsn, "SELECT id, a FROM items"))
    assert len(written) > 100
    for i, text in written.items():
        assert bulk.decrypt("resident", {"id": str(i)}, current[i]) == text
