"""Concurrent final approvals from several processes execute the request exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from custody_support import CHIYODA, Env

REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import json, sys, time
from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.core.errors import GatewayError
from keygate.custody import Custody

start, rid, name, sig = float(sys.argv[1]), sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])
settings = load_settings()
gw = build_gateway(settings, start_refresher=False)
custody = Custody.from_settings(gw, settings)
custody.get(rid)  # warm up: connections, schema check
time.sleep(max(0.0, start - time.time()))
try:
    outcome = custody.approve(rid, name, sig)
    print(json.dumps({"ok": True, "executed": outcome.executed}))
except GatewayError as exc:
    print(json.dumps({"ok": False, "code": exc.code, "detail": exc.detail}))
finally:
    gw.close()
"""


@pytest.mark.slow
def test_concurrent_final_approvals_execute_once(env: Env) -> None:
    """Four custodians each able to complete the quorum approve at the same instant from four
    processes: one execution, one tenant.disabled event, three clear refusals."""
    env.clock.now = datetime.now(UTC)  # the children use the real clock
    for name in ("dave", "erin"):
        env.enrol_by_request(name)
    req, outcome = env.request("disable-tenant", {"tenant": CHIYODA}, by="alice")
    assert outcome.approvals == 1
    current = env.custody.get(req.id)
    child_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "KEYGATE_DATA_DIR": str(env.settings.data_dir),
        "KEYGATE_HSM_TOKEN_LABEL": env.token.label,
        "KEYGATE_HSM_PIN": env.token.user_pin,
        "KEYGATE_LOG_LEVEL": "warning",
    }
    child_env.pop("KEYGATE_HSM_PIN_FILE", None)
    start = time.time() + 8
    procs = []
    for name in ("bob", "carol", "dave", "erin"):
        signature = env.keys[name].approval(current, name).hex()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(start), req.id, name, signature],
                env=child_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    executed = [r for r in results if r["ok"] and r["executed"]]
    refused = [r for r in results if not r["ok"]]
    assert len(executed) == 1, results
    assert len(refused) == 3, results
    for r in refused:
        assert r["code"] == "INVALID_REQUEST"
        assert "is executing" in r["detail"] or "is executed" in r["detail"], r
    assert env.custody.get(req.id).status == "executed"
    assert len(env.events("custody.executed", req.id)) == 1
    changed = [e for e in env.events("tenant.disabled") if e.outcome == "ok"]
    assert len(changed) == 1 and changed[0].actor == f"custody:{req.id}"
    approvals = [e for e in env.events("custody.approved", req.id) if e.outcome == "ok"]
    assert len(approvals) == 2  # alice's (with the request) and the winner's
