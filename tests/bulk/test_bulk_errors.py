"""Bad input gets clear per-record errors, counted and reported; the job goes on or stops per
``--max-errors``; failed records are copied unchanged; nothing secret reaches logs or audit."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest
from bulk_support import OTHER_TENANT, TENANT, BulkEnv, read_jsonl

pytestmark = [pytest.mark.hsm]


def _lines(bulk: BulkEnv, n: int) -> list[str]:
    return [
        json.dumps({"id": i, "v": bulk.encrypt("resident", {}, f"秘密の値-{i}")}) for i in range(n)
    ]


def test_bad_jsonl_lines_are_reported_and_copied(bulk: BulkEnv, tmp_path: Path) -> None:
    """A malformed line, a non-envelope, another tenant's envelope, a wrong type and an
    oversized line each fail on their own with a clear error; the rest is rewrapped."""
    good = _lines(bulk, 20)
    foreign = bulk.encrypt("resident", {}, "他の団体", tenant=OTHER_TENANT)
    bad = [
        '{"id": 100, "v": "kg1.AAAA',  # malformed JSON
        json.dumps({"id": 101, "v": "not an envelope"}),
        json.dumps({"id": 102, "v": foreign}),
        json.dumps({"id": 103, "v": 42}),
        json.dumps({"id": 104, "v": "x" * 5000}),  # oversized (limit below)
        "[1, 2, 3]",
    ]
    lines = good[:10] + bad + [""] + good[10:]
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    bulk.rotate("resident")
    out = tmp_path / "bad.out.jsonl"
    args = ["rewrap", "-i", str(src), "-o", str(out), "-t", TENANT, "-p", "resident",
            "--fields", "v", "--max-line-bytes", "2000", "--batch-size", "7"]  # fmt: skip

    stopped = bulk.job(*args, expect=65)
    assert stopped["state"] == "failed" and "more than --max-errors 0" in stopped["stop_reason"]
    assert not out.exists()

    done = bulk.cli("bulk", *args, "--max-errors", "10", "--json", "--progress", "none")
    assert done.returncode == 65, done.stderr  # finished, but some records failed
    s = json.loads(done.stdout)
    assert s["resumed"] and s["state"] == "done"
    assert s["read"] == 26 and s["failed"] == 6 and s["changed"] == 20
    errors = "\n".join(s["errors"])
    for expected in (
        "line 11: [INVALID_REQUEST] not valid JSON",
        "line 12, v: [DECRYPTION_FAILED] not a keygate v1 envelope",
        "line 13, v: [DECRYPTION_FAILED]",
        "line 14, v: [VALIDATION_FAILED] must hold a keygate text envelope",
        "line 15: [PAYLOAD_TOO_LARGE] line is longer than 2000 bytes",
        "line 16: [INVALID_REQUEST] not a JSON object",
    ):
        assert expected in errors, (expected, errors)
    # Failed and blank lines are copied byte for byte; the rest is rewrapped.
    out_lines = out.read_text(encoding="utf-8").split("\n")
    assert out_lines[10:17] == [*bad, ""]
    assert "他の団体" not in out.read_text()
    status = bulk.ok("bulk", "status", s["job"]).stdout
    assert "line 12, v: [DECRYPTION_FAILED]" in status


def test_csv_wrong_column_and_wrong_width(bulk: BulkEnv, tmp_path: Path) -> None:
    """A column the header lacks stops the job before it starts; a row of the wrong width is a
    per-record error and is copied unchanged."""
    src = tmp_path / "t.csv"
    with src.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "secret"])
        w.writerow(["1", bulk.encrypt("resident", {}, "a")])
        w.writerow(["2", bulk.encrypt("resident", {}, "b"), "extra"])
        w.writerow(["3", bulk.encrypt("resident", {}, "c")])
    out = tmp_path / "t.out.csv"
    done = bulk.cli("bulk", "rewrap", "-i", str(src), "-o", str(out), "-t", TENANT, "-p",
                    "resident", "--columns", "secrets")  # fmt: skip
    assert done.returncode == 64 and "has no column 'secrets'" in done.stderr
    assert "Traceback" not in done.stderr
    s = bulk.job("rewrap", "-i", str(src), "-o", str(out), "-t", TENANT, "-p", "resident",
                 "--columns", "secret", "--max-errors", "5", expect=65)  # fmt: skip
    assert s["read"] == 3 and s["failed"] == 1
    assert "row 2: [INVALID_REQUEST] has 3 fields where the header has 2" in s["errors"][0]
    assert src.read_text().splitlines()[2] == out.read_text().splitlines()[2]


def test_unknown_key_or_tenant_fails_before_any_work(bulk: BulkEnv, tmp_path: Path) -> None:
    """A purpose without a key, an invalid tenant or a missing input: one line, no job."""
    src = tmp_path / "x.jsonl"
    src.write_text("{}\n")
    cases = [
        (["-t", TENANT, "-p", "tax"], 66, "NOT_FOUND"),
        (["-t", "131017", "-p", "resident"], 64, "INVALID_TENANT"),
    ]
    for extra, code, text in cases:
        done = bulk.cli("bulk", "rewrap", "-i", str(src), "-o", str(tmp_path / "y.jsonl"),
                        *extra, "--fields", "v")  # fmt: skip
        assert done.returncode == code and text in done.stderr, (extra, done.stderr)
        assert "Traceback" not in done.stderr
    missing, other = str(tmp_path / "missing.jsonl"), str(tmp_path / "z.jsonl")
    done = bulk.cli("bulk", "rewrap", "-i", missing, "-o", other, "-t", TENANT, "-p", "resident",
                    "--fields", "v")  # fmt: skip
    assert done.returncode == 66 and "no input file" in done.stderr


def test_migrate_calls_the_gateway_provider_migration(bulk: BulkEnv, tmp_path: Path) -> None:
    """``migrate`` goes through ``Gateway.provider_migrate`` before any record is touched; a
    URI the provider layer refuses stops the command with one line, and no job starts."""
    src = tmp_path / "m.jsonl"
    src.write_text(json.dumps({"v": bulk.encrypt("resident", {}, "m")}) + "\n")
    done = bulk.cli("bulk", "migrate", "-i", str(src), "-o", str(tmp_path / "m2.jsonl"),
                    "-t", TENANT, "-p", "resident", "--fields", "v",
                    "--to", "aws-kms://arn:aws:kms:ap-northeast-1:111122223333:key/x")  # fmt: skip
    # No adapters configured (78), or the provider layer refuses this key URI (64): one line.
    assert done.returncode in (64, 78), done.stderr
    assert "provider" in done.stderr or "key URI" in done.stderr
    assert "Traceback" not in done.stderr and "started" not in done.stderr
    assert not (tmp_path / "m2.jsonl").exists()


def test_provider_migrate_hook() -> None:
    """The one call into the provider layer: the Gateway's method, or a clear error."""
    from keygate.bulk.migrate import provider_migrate
    from keygate.core.errors import ConfigurationError

    calls: list[tuple[object, ...]] = []

    class WithProviders:
        def provider_migrate(self, *args: object) -> list[object]:
            calls.append(args)
            return []

    provider_migrate(WithProviders(), "a", TENANT, "resident", "vault-transit://k")
    provider_migrate(WithProviders(), "a", TENANT, "resident", "hsm-only")
    assert calls == [
        ("a", TENANT, "resident", "vault-transit://k"),
        ("a", TENANT, "resident", None),
    ]
    with pytest.raises(ConfigurationError, match="provider migration is not available"):
        provider_migrate(object(), "a", TENANT, "resident", "vault-transit://k")


def test_no_plaintext_in_logs_or_audit(bulk: BulkEnv, tmp_path: Path) -> None:
    """A reencrypt with failures writes start, batch and finish audit events with counts only:
    no plaintext, ciphertext or PIN in the trail or the command's output."""
    lines = _lines(bulk, 30)
    lines.insert(5, json.dumps({"id": 999, "v": "kg1.tampered-秘密"}))
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "a.out.jsonl"
    done = bulk.cli("--verbose", "bulk", "reencrypt", "-i", str(src), "-o", str(out),
                    "-t", TENANT, "-p", "resident", "--fields", "v", "--max-errors", "3",
                    "--batch-size", "10", "--progress", "lines")  # fmt: skip
    assert done.returncode == 65, done.stderr
    job = next(line.split()[2] for line in done.stderr.splitlines() if line.startswith("bulk job "))
    with sqlite3.connect(bulk.home / "data" / "keygate.db") as conn:
        events = conn.execute(
            "SELECT action, outcome, items, items_failed, detail FROM kg_audit_events "
            "WHERE request_id LIKE ?",
            (f"bulk-{job}%",),
        ).fetchall()
        trail = "\n".join(
            str(row) for row in conn.execute("SELECT * FROM kg_audit_events").fetchall()
        )
        stored_errors = conn.execute(
            "SELECT position, field, code, detail FROM kg_bulk_errors WHERE job_id = ?", (job,)
        ).fetchall()
    actions = [e[0] for e in events]
    assert actions[0] == "bulk.started" and actions[-1] == "bulk.finished"
    assert actions.count("bulk.batch") == 4
    assert sum(e[2] for e in events if e[0] == "bulk.batch") == 31
    assert sum(e[3] for e in events if e[0] == "bulk.batch") == 1
    pin = (bulk.home / "hsm-pin").read_text().strip()
    texts = [trail, done.stdout, done.stderr, repr(stored_errors), out.read_text()[:0]]
    for secret in ("秘密の値", "秘密", pin, json.loads(lines[0])["v"]):
        for text in texts:
            assert secret not in text
    assert read_jsonl(out)[5] == {"id": 999, "v": "kg1.tampered-秘密"}  # copied unchanged


def test_status_and_list(bulk: BulkEnv, tmp_path: Path) -> None:
    """``bulk list`` and ``bulk status`` show jobs, counters and checkpoints."""
    src = tmp_path / "s.jsonl"
    src.write_text("\n".join(_lines(bulk, 5)) + "\n")
    s = bulk.job("rewrap", "-i", str(src), "-o", str(tmp_path / "s2.jsonl"), "-t", TENANT,
                 "-p", "resident", "--fields", "v")  # fmt: skip
    listing = bulk.ok("bulk", "list").stdout
    assert s["job"] in listing and "done" in listing
    status = json.loads(bulk.ok("bulk", "status", s["job"], "--json").stdout)
    assert status["state"] == "done" and status["counters"]["read"] == 5
    assert status["checkpoint"]["eof"] is True
    done = bulk.cli("bulk", "status", "nosuchjob")
    assert done.returncode == 66 and "no bulk job" in done.stderr
