"""``--engine ray``: the same job on Ray actors (a private local Ray cluster on loopback; Ray
2.x no longer has a local mode), each actor keeping one Gateway and HSM session."""

from __future__ import annotations

from pathlib import Path

import pytest
from bulk_support import TENANT, BulkEnv, read_jsonl, write_jsonl

pytestmark = [pytest.mark.hsm, pytest.mark.slow]


def test_ray_engine_rewrap(bulk: BulkEnv, tmp_path: Path) -> None:
    """Two Ray actors rewrap a JSON Lines file; the output is complete and in input order."""
    pytest.importorskip("ray")
    rows = [
        {"id": f"R{i}", "v": bulk.encrypt("resident", {"id": f"R{i}"}, f"value {i}")}
        for i in range(900)
    ]
    src = tmp_path / "in.jsonl"
    write_jsonl(src, rows)
    version = bulk.rotate("resident")
    out = tmp_path / "out.jsonl"
    s = bulk.job(
        "reencrypt", "-i", str(src), "-o", str(out), "-t", TENANT, "-p", "resident",
        "--fields", "v", "--context", "id=id", "--engine", "ray", "--workers", "2",
        "--batch-size", "100",
    )  # fmt: skip
    assert s["state"] == "done" and s["read"] == 900 and s["changed"] == 900 and s["failed"] == 0
    assert s["deks_created"] >= 2  # each actor makes its own DEKs
    got = read_jsonl(out)
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    bulk.refresh()
    for before, after in zip(rows, got, strict=True):
        ctx = {"id": before["id"]}
        assert bulk.decrypt("resident", ctx, after["v"]) == bulk.decrypt(
            "resident", ctx, before["v"]
        )
        assert bulk.gateway.keys.active_version(TENANT, "resident") == version
