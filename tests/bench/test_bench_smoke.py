"""Smoke test of the benchmark: ``python -m bench --quick`` runs end to end and reports sanely.

No speed assertions: the quick mode's numbers are noise.  It checks that every scenario ran, that
every rate is positive, and that no scenario called the HSM more often than it had distinct DEKs,
except rewrap, which with a cold DEK cache needs one unwrap (old KEK) and one wrap (new KEK) per
DEK and is held to that bound instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keygate.core.errors import ConfigurationError
from keygate.hsm import find_softhsm_module

pytestmark = [pytest.mark.slow, pytest.mark.hsm]

REPO_ROOT = Path(__file__).resolve().parents[2]
#: the quick mode is meant to finish in well under a minute; leave room for a loaded CI machine
TIMEOUT_S = 120

OPS = ("encrypt", "decrypt", "rewrap", "reencrypt")
SIZES = (64, 1024)
APIS = ("single", "batch")
CONTEXTS = ("none", "per-record")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The JSON of one `python -m bench --quick` run in a subprocess."""
    try:
        find_softhsm_module()
    except ConfigurationError as exc:
        if os.environ.get("KEYGATE_REQUIRE_HSM"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("bench") / "latest.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.pop("SOFTHSM2_CONF", None)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"bench failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert "## Goals" in done.stdout
    return json.loads(out.read_text(encoding="utf-8"))


def test_every_scenario_ran(quick_results: dict) -> None:
    """Every operation × size × API × context scenario ran, in quick mode with two rounds."""
    ids = {s["id"] for s in quick_results["scenarios"]}
    expected = {
        f"{op}/{'64B' if size == 64 else '1KiB'}/{api}/{ctx}"
        for op in OPS
        for size in SIZES
        for api in APIS
        for ctx in CONTEXTS
    }
    assert ids == expected
    assert quick_results["config"]["quick"] is True
    assert quick_results["config"]["rounds"] == 2


def test_rates_are_positive(quick_results: dict) -> None:
    """Every scenario reports positive rates for both sides and one time per round."""
    for s in quick_results["scenarios"]:
        assert s["rounds"] == 2, s["id"]
        for side in ("plain", "keygate"):
            assert s[side]["records_per_s"] > 0, (s["id"], side)
            assert s[side]["mb_per_s"] > 0, (s["id"], side)
            assert len(s[side]["round_seconds"]) == 2, (s["id"], side)
        assert s["ratio_keygate_to_plain"] > 0, s["id"]


def test_hsm_calls_are_per_dek_not_per_record(quick_results: dict) -> None:
    """HSM calls stay within one per distinct DEK (two for a cold rewrap), never one per record."""
    for s in quick_results["scenarios"]:
        hsm = s["hsm"]
        assert hsm["distinct_deks"] >= 1, s["id"]
        # the adapter's counter and the key manager's agree
        assert hsm["adapter_calls"] == hsm["key_manager_wraps"] + hsm["key_manager_unwraps"]
        bound = hsm["distinct_deks"] * (2 if s["op"] == "rewrap" else 1)
        assert hsm["adapter_calls"] <= bound, (s["id"], hsm)
        assert hsm["adapter_calls"] < hsm["records_total"], s["id"]


def test_machine_facts_and_goals_are_recorded(quick_results: dict) -> None:
    """The machine facts and every goal's verdict are in the JSON."""
    m = quick_results["machine"]
    for key in ("cpu_model", "cores_usable", "python", "cryptography", "softhsm"):
        assert m.get(key), key
    goals = quick_results["goals"]
    assert {g["goal"] for g in goals} >= {
        "rewrap ≥ 1,000,000 records/s per core",
        "HSM calls ≤ distinct DEKs",
    }
    assert all(g["status"] for g in goals)
