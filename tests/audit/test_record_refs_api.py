"""Who touched a record in a batch of 1000, end to end: HTTP API, real HSM pseudonym and
checkpoint keys, then the ``keygate`` CLI as a reviewer runs it (online, then offline on an
export); on SQLite and PostgreSQL.

The gateway is served with the API suite's helpers (``tests/api/api_support.py``: uvicorn on a
loopback port) with a batch limit above 1000 (the API suite's session gateway allows 100).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from audit_support import cli_env  # type: ignore[import-not-found]
from prometheus_client import CollectorRegistry

import keygate.api.app as app_module
from keygate.api.app import create_app
from keygate.api.metrics import Metrics
from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.hsm.softhsm import SoftHsmToken
from keygate.testing.synthetic import SyntheticRecords

pytestmark = [pytest.mark.hsm, pytest.mark.api, pytest.mark.slow]

TENANT = "131016"
EXIT_DATAERR = 65
BATCH = 1000


def _api_support() -> Any:
    name = "api_support"  # the API suite imports it by this name: share one module
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "api" / "api_support.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def record_id(i: int) -> str:
    return f"R-{i:06d}"


def test_who_touched_finds_a_record_in_the_middle_of_a_1000_record_batch(
    db_url: str,
    make_token: Callable[[str], SoftHsmToken],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 1000-record encrypt batch and decrypt batch over HTTP, then one single-record call:
    `who-touched` finds all three events of record 500 through the index, the export carries
    all 1000 refs and verifies, the offline search of the export finds the same events, no
    record id is stored or exported, and a ref changed in the database is reported (exit 65)."""
    monkeypatch.setattr(app_module, "Metrics", lambda: Metrics(registry=CollectorRegistry()))
    token = make_token("kg-refs-api")
    settings = load_settings(
        data_dir=tmp_path / "data", database_url=db_url, hsm_token_label=token.label,
        hsm_pin=token.user_pin, hsm_pin_file=None, max_batch_items=2 * BATCH,
        max_body_bytes=16 << 20,
    )  # fmt: skip
    records = [r for _, r in SyntheticRecords(seed=11).resident(BATCH)]
    ids = [record_id(i) for i in range(BATCH)]
    target = ids[500]
    gw = build_gateway(settings)
    try:
        gw.add_tenant("custodian:t", TENANT, name="千代田区")
        for purpose in ("resident", "mynumber"):
            gw.create_key("custodian:t", TENANT, purpose)
        _, app_token = gw.add_identity(
            "custodian:t", "juki-app", tenants=[TENANT], purposes=["*"], record_types=["*"],
            operations=["*"],
        )  # fmt: skip
        with (
            _api_support().serve(create_app(settings, gateway=gw)) as url,
            httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {app_token}"}, timeout=120
            ) as client,
        ):
            items = [{"record_id": i, "record": r} for i, r in zip(ids, records, strict=True)]
            r = client.post(
                "/v1/records/resident/encrypt/batch",
                json={"tenant": TENANT, "items": items},
                headers={"X-Request-ID": "req-enc-1000"},
            )
            assert r.status_code == 200, r.text[:500]
            sealed = [slot["record"] for slot in r.json()["items"]]
            items = [{"record_id": i, "record": s} for i, s in zip(ids, sealed, strict=True)]
            r = client.post(
                "/v1/records/resident/decrypt/batch",
                json={"tenant": TENANT, "items": items},
                headers={"X-Request-ID": "req-dec-1000"},
            )
            assert r.status_code == 200, r.text[:500]
            assert [slot["record"] for slot in r.json()["items"]] == records
            r = client.post(
                "/v1/records/resident/decrypt",
                json={"tenant": TENANT, "record_id": target, "record": sealed[500]},
                headers={"X-Request-ID": "req-one"},
            )
            assert r.status_code == 200, r.text
        target_ref = gw.audit_keys.record_ref(TENANT, target)
        other_ref = gw.audit_keys.record_ref(TENANT, ids[7])
    finally:
        gw.close()

    env = cli_env(token, tmp_path, KEYGATE_DATABASE_URL=db_url)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keygate.cli.main", *args], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip

    def ok(*args: str) -> subprocess.CompletedProcess[str]:
        done = run(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    found = ok("audit", "who-touched", TENANT, target)
    assert f"record_ref {target_ref}: 3 event(s)" in found.stderr
    for request_id in ("req-enc-1000", "req-dec-1000", "req-one"):
        assert request_id in found.stdout
    assert "TAMPERED" not in found.stdout + found.stderr
    assert "0 event(s)" in ok("audit", "who-touched", "011002", target).stderr  # other tenant

    export, pem = tmp_path / "trail.jsonl", tmp_path / "audit.pem"
    ok("audit", "export", "--output", str(export))
    pem.write_text(ok("audit", "public-key").stdout, encoding="ascii")
    verified = ok("audit", "verify", str(export), "--public-key", str(pem))
    assert "OK" in verified.stdout
    text = export.read_text(encoding="utf-8")
    lines = [json.loads(x) for x in text.splitlines()]
    batch_lines = [o for o in lines if o["type"] == "event" and o["event"]["items"] == BATCH]
    assert len(batch_lines) == 2
    for line in batch_lines:
        assert len(line["record_refs"]) == BATCH and target_ref in line["record_refs"]
        assert line["event"]["detail"]["record_refs_count"] == BATCH
        assert "record_refs" not in line["event"]["detail"]  # not inline above 15

    offline = ok(
        "audit", "who-touched", "--ref", target_ref, "--export", str(export),
        "--public-key", str(pem),
    )  # fmt: skip
    assert "3 event(s) in 1 file(s), verified" in offline.stderr
    assert all(r in offline.stdout for r in ("req-enc-1000", "req-dec-1000", "req-one"))

    # No record id anywhere: not in the export, not in any audit row.
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = [
                str(tuple(row))
                for table in ("kg_audit_events", "kg_audit_record_refs")
                for row in conn.execute(sa.text(f"SELECT * FROM {table}"))  # noqa: S608
            ]
        assert len(stored) > 2 * BATCH
        for rid in (target, ids[0], ids[-1], ids[7]):
            assert rid not in text
            assert not any(rid in row for row in stored)

        # A ref of the encrypt batch changed in the database: who-touched says so, loudly.
        with engine.begin() as conn:
            changed = conn.execute(
                sa.text("UPDATE kg_audit_record_refs SET ref = :new WHERE ref = :old"),
                {"old": bytes.fromhex(other_ref), "new": bytes(32)},
            )
            assert changed.rowcount == 2  # the encrypt and the decrypt batch
    finally:
        engine.dispose()
    tampered = run("audit", "who-touched", TENANT, target)
    assert tampered.returncode == EXIT_DATAERR, (tampered.stdout, tampered.stderr)
    assert tampered.stdout.count("TAMPERED") == 2
    assert "a record ref was modified" in tampered.stderr
    assert "Traceback" not in tampered.stderr
