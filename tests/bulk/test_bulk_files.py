"""``keygate bulk`` over JSON Lines, CSV and Parquet files: rewrap and re-encrypt, opaque values
and whole records, through the real CLI; every value checked by decrypting it again."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from bulk_support import TENANT, BulkEnv, read_jsonl, write_jsonl

from keygate.core.wire import from_text
from keygate.service import key_version_of

pytestmark = [pytest.mark.hsm]


def _version(value: str) -> int:
    return key_version_of(from_text(value))


def _opaque_rows(bulk: BulkEnv, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        rid = f"R-{i:06d}"
        rows.append(
            {
                "id": rid,
                "name": bulk.encrypt("resident", {"record_id": rid, "column": "name"}, f"氏名{i}"),
                "note": bulk.encrypt("resident", {"record_id": rid, "column": "note"}, f"メモ{i}"),
                "clear": i,
            }
        )
    return rows


def test_jsonl_rewrap_then_reencrypt(bulk: BulkEnv, tmp_path: Path) -> None:
    """Rewrap moves every value to the active version, byte-identical otherwise; re-encrypt
    with the row's context makes fresh DEKs; both keep every plaintext."""
    rows = _opaque_rows(bulk, 1200)
    src = tmp_path / "in.jsonl"
    write_jsonl(src, rows)
    new_version = bulk.rotate("resident")
    out = tmp_path / "out.jsonl"
    s = bulk.job(
        "rewrap", "-i", str(src), "-o", str(out), "-t", TENANT, "-p", "resident",
        "--fields", "name,note", "--batch-size", "300",
    )  # fmt: skip
    assert s["state"] == "done" and s["read"] == 1200 and s["changed"] == 1200
    assert s["failed"] == 0 and s["unchanged"] == 0
    # 1200 rows × 2 values at 500 per DEK: 5 distinct DEKs; one unwrap + one wrap each
    assert 0 < s["hsm_calls"] <= 2 * 5
    got = read_jsonl(out)
    assert len(got) == len(rows)
    for before, after in zip(rows, got, strict=True):
        assert after["id"] == before["id"] and after["clear"] == before["clear"]
        for col in ("name", "note"):
            assert _version(after[col]) == new_version
            assert after[col][-40:] == before[col][-40:]  # the data part is untouched
            ctx = {"record_id": before["id"], "column": col}
            assert bulk.decrypt("resident", ctx, after[col]) == bulk.decrypt(
                "resident", ctx, before[col]
            )
    # Every line of the output keeps its JSON formatting (the envelope is swapped in place).
    assert out.read_text().count("\n") == 1200
    assert not list(tmp_path.glob("*.kgpart-*"))

    out2 = tmp_path / "out2.jsonl"
    s = bulk.job(
        "reencrypt", "-i", str(out), "-o", str(out2), "-t", TENANT, "-p", "resident",
        "--fields", "name", "--fields", "note", "--context", "record_id=id",
        "--context-field", "column", "--workers", "2", "--batch-size", "250",
    )  # fmt: skip
    assert s["state"] == "done" and s["changed"] == 1200 and s["failed"] == 0
    assert s["deks_created"] >= 2
    for before, after in zip(rows, read_jsonl(out2), strict=True):
        for col in ("name", "note"):
            ctx = {"record_id": before["id"], "column": col}
            assert after[col] != before[col]
            assert bulk.decrypt("resident", ctx, after[col]) == bulk.decrypt(
                "resident", ctx, before[col]
            )


def test_jsonl_records_reencrypt_with_their_own_context(bulk: BulkEnv, tmp_path: Path) -> None:
    """Whole records encrypted by the record endpoints re-encrypt under their policy's
    purposes (個人番号 under mynumber) with the record endpoints' context, and decrypt through
    them afterwards."""
    recs = bulk.records(600, seed=7)
    src = tmp_path / "residents.jsonl"
    write_jsonl(src, [{"record_id": rid, "record": enc} for rid, _, enc in recs])
    out = tmp_path / "residents.out.jsonl"
    mn_version = bulk.rotate("mynumber")
    s = bulk.job(
        "reencrypt", "-i", str(src), "-o", str(out), "-t", TENANT, "--record-type", "resident",
        "--batch-size", "200",
    )  # fmt: skip
    assert s["state"] == "done" and s["read"] == 600 and s["failed"] == 0
    assert s["changed"] == 600
    for (rid, plain, enc), line in zip(recs, read_jsonl(out), strict=True):
        assert line["record_id"] == rid
        assert line["record"]["世帯番号"] == enc["世帯番号"]  # clear fields stay as they are
        assert line["record"]["氏名"] != enc["氏名"]
        if "個人番号" in enc:
            assert _version(line["record"]["個人番号"]) == mn_version
        assert bulk.decrypt_record(rid, line["record"]) == plain


def test_csv_rewrap_records_and_values(bulk: BulkEnv, tmp_path: Path) -> None:
    """CSV (with a BOM, quoted fields and a multi-line field) is rewrapped column by column;
    the header, clear columns and unchanged rows are copied byte for byte."""
    recs = bulk.records(300, seed=11)
    src = tmp_path / "residents.csv"
    names = ["record_id", "氏名", "住所", "個人番号", "世帯番号", "備考"]
    with src.open("w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for i, (rid, _, enc) in enumerate(recs):
            note = 'line one\nline "two"' if i % 7 == 0 else "memo, with comma"
            w.writerow([rid, enc["氏名"], enc.get("住所", ""), enc.get("個人番号", ""),
                        enc["世帯番号"], note])  # fmt: skip
    bulk.rotate("resident")
    bulk.rotate("mynumber")
    out = tmp_path / "residents.out.csv"
    s = bulk.job(
        "rewrap", "-i", str(src), "-o", str(out), "-t", TENANT, "--record-type", "resident",
        "--batch-size", "64",
    )  # fmt: skip
    # 備考 is not a field of the resident policy: it is passed through untouched.
    assert s["state"] == "done" and s["read"] == 300 and s["failed"] == 0, s
    assert out.read_bytes().startswith(b"\xef\xbb\xbf")
    with out.open(encoding="utf-8-sig", newline="") as f:
        got = list(csv.reader(f))
    assert got[0] == names
    active_r = bulk.gateway.keys.active_version(TENANT, "resident")
    active_m = bulk.gateway.keys.active_version(TENANT, "mynumber")
    for (rid, plain, _), row in zip(recs, got[1:], strict=True):
        assert row[0] == rid
        assert _version(row[1]) == active_r
        if row[3]:
            assert _version(row[3]) == active_m
        record = {"氏名": row[1], "世帯番号": row[4]}
        if row[2]:
            record["住所"] = row[2]
        if row[3]:
            record["個人番号"] = row[3]
        opened = bulk.decrypt_record(rid, record)
        assert opened["氏名"] == plain["氏名"]
        if "個人番号" in plain:
            assert opened["個人番号"] == plain["個人番号"]


def test_parquet_rewrap_and_reencrypt(bulk: BulkEnv, tmp_path: Path) -> None:
    """Parquet columns are transformed batch by batch; every other column and the schema stay."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n = 1500
    ids = [f"P-{i:05d}" for i in range(n)]
    values = [
        bulk.encrypt("resident", {"record_id": rid}, f"値{i}") if i % 10 else None
        for i, rid in enumerate(ids)
    ]
    table = pa.table({"id": ids, "secret": values, "n": list(range(n))})
    src = tmp_path / "in.parquet"
    pq.write_table(table, src, row_group_size=400)
    version = bulk.rotate("resident")
    out = tmp_path / "out.parquet"
    s = bulk.job(
        "rewrap", "-i", str(src), "-o", str(out), "-t", TENANT, "-p", "resident",
        "--columns", "secret", "--batch-size", "300",
    )  # fmt: skip
    assert s["state"] == "done" and s["read"] == n and s["changed"] == n - n // 10
    got = pq.read_table(out)
    assert got.schema == table.schema
    assert got.column("id").to_pylist() == ids and got.column("n").to_pylist() == list(range(n))
    out2 = tmp_path / "out2.parquet"
    s = bulk.job(
        "reencrypt", "-i", str(out), "-o", str(out2), "-t", TENANT, "-p", "resident",
        "--columns", "secret", "--context", "record_id=id",
    )  # fmt: skip
    assert s["state"] == "done" and s["failed"] == 0
    for rid, old, new in zip(
        ids, values, pq.read_table(out2).column("secret").to_pylist(), strict=True
    ):
        if old is None:
            assert new is None
            continue
        assert _version(new) == version and new != old
        ctx = {"record_id": rid}
        assert bulk.decrypt("resident", ctx, new) == bulk.decrypt("resident", ctx, old)


def test_output_exists_and_in_place_are_refused(bulk: BulkEnv, tmp_path: Path) -> None:
    """Jobs never write in place and never overwrite an existing output."""
    src = tmp_path / "a.jsonl"
    write_jsonl(src, [{"v": bulk.encrypt("resident", {}, "x")}])
    done = bulk.cli("bulk", "rewrap", "-i", str(src), "-o", str(src), "-t", TENANT, "-p",
                    "resident", "--fields", "v")  # fmt: skip
    assert done.returncode == 64 and "in place" in done.stderr and "Traceback" not in done.stderr
    other = tmp_path / "b.jsonl"
    other.write_text("")
    done = bulk.cli("bulk", "rewrap", "-i", str(src), "-o", str(other), "-t", TENANT, "-p",
                    "resident", "--fields", "v")  # fmt: skip
    assert done.returncode == 64 and "exists" in done.stderr
    assert json.loads(src.read_text())  # untouched


def test_rewrap_hsm_calls_per_distinct_dek(bulk: BulkEnv, tmp_path: Path) -> None:
    """Through the Python API, with a cold gateway (a fresh process's caches): rewrapping
    thousands of values costs one HSM unwrap and one wrap per distinct DEK, never per record."""
    from keygate.bootstrap import build_gateway
    from keygate.bulk import JobSpec, RunOptions, open_store, run_job
    from keygate.core.wire import split_text_header

    rows = _opaque_rows(bulk, 2600)  # 5200 values at 500 per DEK: 11 DEKs
    src = tmp_path / "in.jsonl"
    write_jsonl(src, rows)
    distinct = {split_text_header(r[c])[0] for r in rows for c in ("name", "note")}  # type: ignore[index]
    bulk.rotate("resident")
    cold = build_gateway(bulk.settings, start_refresher=False)
    store = open_store(bulk.settings.registry_url)
    try:
        before = cold.hsm.calls
        spec = JobSpec(
            operation="rewrap", kind="jsonl", tenant=TENANT, purpose="resident",
            fields=("name", "note"), input=str(src), output=str(tmp_path / "out.jsonl"),
        )  # fmt: skip
        summary = run_job(
            cold, store, spec, RunOptions(batch_size=500, progress="none"), actor="custodian:t"
        )
        calls = cold.hsm.calls - before
    finally:
        store.close()
        cold.close()
    assert summary.state == "done" and summary.counters["changed"] == 2600
    assert summary.counters["deks_opened"] == len(distinct) == 11
    assert summary.counters["hsm_calls"] == 2 * len(distinct)  # unwrap + wrap per DEK
    # The adapter saw the same (audit checkpoint signatures may add a call or two).
    assert 2 * len(distinct) <= calls <= 2 * len(distinct) + 3
