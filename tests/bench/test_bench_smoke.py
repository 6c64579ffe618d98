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
TIMEOUT_S = 300

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
    results = json.loads(out.read_text(encoding="utf-8"))
    migrate = out.with_name("latest-migrate.json")
    results["_migrate"] = (
        json.loads(migrate.read_text(encoding="utf-8")) if migrate.exists() else None
    )
    results["_stdout"] = done.stdout
    return results  # type: ignore[no-any-return]


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


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


def test_peer_rows_exist_when_installed(quick_results: dict) -> None:
    """Each installed peer has encrypt and decrypt rows at both sizes, with ratios to keygate;
    a peer whose package is missing is named in the skipped lines instead."""
    from bench.peers import PEERS

    rows = {r["id"]: r for r in quick_results["peers"] or []}
    for name, (_label, module, _factory) in PEERS.items():
        if not _importable(module):
            assert any(s.startswith(f"{name}:") for s in quick_results["skipped"]), name
            continue
        for op in ("encrypt", "decrypt"):
            for size in ("64B", "1KiB"):
                row = rows[f"peer/{name}/{op}/{size}"]
                assert row["records_per_s"] > 0, row["id"]
                assert row["ratios_to_peer"]["keygate batch"] > 0, row["id"]
                assert row["ratios_to_peer"]["keygate single"] > 0, row["id"]


def test_http_rows_exist(quick_results: dict) -> None:
    """keygate's server (2 workers and 1) has batch and single-record rows; with OpenBao
    installed it has batch and single rows too, and the HTTP goal is evaluated against it."""
    import shutil

    http = quick_results["http"]
    assert http is not None
    targets = ["keygate-2w", "keygate-1w"]
    bao = shutil.which("bao") is not None and _importable("hvac")
    if bao:
        targets.append("openbao")
    else:
        assert any(s.startswith("openbao:") for s in quick_results["skipped"])
    batch = {r["id"]: r for r in http["batch"]}
    single = {r["id"]: r for r in http["single"]}
    for t in targets:
        for op in ("encrypt", "decrypt", "rewrap"):
            assert batch[f"http-batch/{t}/{op}/1KiB"]["records_per_s"] > 0
        for op in ("encrypt", "decrypt"):
            for c in (1, 8, 32):
                row = single[f"http-single/{t}/{op}/c{c}"]
                assert row["requests"] > 0 and row["errors"] == 0
                assert 0 < row["p50_ms"] <= row["p99_ms"]
    http_goals = [g for g in quick_results["goals"] if g["goal"].startswith("HTTP batch")]
    assert len(http_goals) == (6 if bao else 0)


def test_chart_written_next_to_json(quick_results: dict) -> None:
    """The PNG chart is written next to the JSON when matplotlib is installed."""
    chart = quick_results["chart"]
    if not _importable("matplotlib"):
        assert chart is None
        return
    path = Path(chart)
    assert path.suffix == ".png" and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_provider_migration_ran_with_calls_per_dek(quick_results: dict) -> None:
    res = quick_results["_migrate"]
    assert res is not None, quick_results["_stdout"][-2000:]
    assert "Provider migration" in quick_results["_stdout"]
    assert res["text_records_per_s"] > 0
    assert res["binary_records_per_s"] > 0
    per_dek = res["deks"] / res["records"] * 1e6
    # one unwrap at the old provider and one wrap at the new one per DEK, never per record
    assert res["provider_unwraps_per_million"] == pytest.approx(per_dek)
    assert res["provider_wraps_per_million"] == pytest.approx(per_dek)
    assert res["hsm_calls_per_million"] <= 2 * per_dek + 1e-9


def test_hotpath_ablations_run() -> None:
    """``python -m bench.hotpath --quick`` runs: its copies of the key manager's loops use only
    what the key manager still has (a stale copy fails here, not in someone's profiling)."""
    try:
        find_softhsm_module()
    except ConfigurationError as exc:
        if os.environ.get("KEYGATE_REQUIRE_HSM"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.pop("SOFTHSM2_CONF", None)
    done = subprocess.run(
        [sys.executable, "-m", "bench.hotpath", "--quick"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"hotpath failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    for table in ("## encrypt, 64 B", "## decrypt, 1024 B", "## rewrap, 1024 B"):
        assert table in done.stdout
    lines = done.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "step" not in line]
    assert len(rows) >= 30
    assert all(int(row.rsplit("|", 2)[1].strip().replace(",", "")) > 0 for row in rows)
