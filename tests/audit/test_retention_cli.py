"""`keygate audit segments list|archive|prune` and multi-file `verify`, as a custodian and a
reviewer run them, against a real gateway (SQLite, SoftHSM checkpoint key)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from audit_support import cli_env  # type: ignore[import-not-found]

from keygate.audit.events import AuditEvent
from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.hsm.softhsm import SoftHsmToken

pytestmark = [pytest.mark.hsm]

EXIT_USAGE = 64
EXIT_DATAERR = 65


def test_segments_archive_prune_and_verify_from_the_cli(
    audit_token: SoftHsmToken, tmp_path: Path
) -> None:
    """Three two-year-old months are refused for pruning until archived, then archived to
    files that verify together with a later export from seq 1, and pruned; the pruned trail
    verifies from its anchor, and missing or reordered archives are reported."""
    env = cli_env(audit_token, tmp_path, KEYGATE_AUDIT_RETENTION_DAYS="365")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keygate.cli.main", *args], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    def ok(*args: str) -> str:
        done = run(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout + done.stderr

    settings = load_settings(
        data_dir=tmp_path / "data", hsm_token_label=audit_token.label,
        hsm_pin=audit_token.user_pin,
    )  # fmt: skip
    gw = build_gateway(settings, start_refresher=False)
    try:
        store, keys = gw.audit_store, gw.audit_keys
        assert store.count() == 0
        keys.prepare()
        now = datetime.now(UTC)
        for month in range(3):  # three old months, three events and one checkpoint each
            ts = now - timedelta(days=800 - 31 * month)
            store.append(
                [
                    AuditEvent(
                        action="crypto.decrypt",
                        outcome="ok",
                        actor="juki-app",
                        request_id=f"old-{month}-{i}",
                        tenant="131016",
                        purpose="resident",
                        ts=ts,
                    )
                    for i in range(3)
                ]
            )
            store.checkpoint(keys.sign_checkpoint, now=ts + timedelta(hours=1))
        gw.add_tenant("custodian:test", "131016")
        gw.create_key("custodian:test", "131016", "resident")
        store.checkpoint(keys.sign_checkpoint)
    finally:
        gw.close()

    listed = ok("audit", "segments", "list")
    assert listed.count("expired") == 3 and "open" in listed
    assert "retention: 365 days" in listed

    refused = run("audit", "segments", "prune")
    assert refused.returncode == EXIT_USAGE, refused.stderr
    assert "not archived" in refused.stderr and "Traceback" not in refused.stderr

    archived = ok("audit", "segments", "archive")
    assert archived.count("archived") == 3
    files = sorted((tmp_path / "data" / "audit-archive").glob("keygate-audit-*.jsonl"))
    assert len(files) == 3

    dry = ok("audit", "segments", "prune", "--dry-run")
    assert dry.count("would prune") == 3
    pruned = ok("audit", "segments", "prune")
    assert pruned.count("pruned") >= 3 and "starts after the signed checkpoint at seq 9" in pruned
    assert "nothing to prune" in ok("audit", "segments", "prune")

    export, pem = tmp_path / "now.jsonl", tmp_path / "audit.pem"
    ok("audit", "export", "-o", str(export))
    pem.write_text(run("audit", "public-key").stdout, encoding="ascii")
    alone = ok("audit", "verify", str(export), "--public-key", str(pem))
    assert "starts after the signed checkpoint at seq 9" in alone
    assert "seq 1..3 pruned" in alone and "seq 7..9 pruned" in alone

    together = ok("audit", "verify", *map(str, files), str(export), "--public-key", str(pem))
    assert "across 4 files" in together and "seq 1.." in together

    swapped = run("audit", "verify", str(files[1]), str(files[0]), str(files[2]), str(export),
                  "--public-key", str(pem))  # fmt: skip
    assert swapped.returncode == EXIT_DATAERR
    assert f"{files[0]} line 2 (seq 1)" in swapped.stderr and "out of order" in swapped.stderr

    gap = run("audit", "verify", str(files[0]), str(files[2]), str(export), "--public-key",
              str(pem))  # fmt: skip
    assert gap.returncode == EXIT_DATAERR and "missing" in gap.stderr

    assert "10.." in ok("audit", "segments", "list")
    report = tmp_path / "report.html"
    assert "verified" in ok("audit", "report", "--out", str(report))
    page = report.read_text(encoding="utf-8")
    assert "Pruning records" in page and "<td>audit.pruned</td>" in page
