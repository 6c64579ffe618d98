"""``keygate bulk migrate`` between two providers on their local servers: a JSON Lines file of
envelopes under provider A comes out under provider B, data parts untouched, every value still
decrypting; run twice (as after a crash before the job was recorded), the switch is not redone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from provider_support import ACTOR, TENANT  # type: ignore[import-not-found]

from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.core.wire import from_text, parse_header, to_text
from keygate.hsm.softhsm import SoftHsmToken

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_bulk_migrate_file_between_providers(
    kms: Callable[[str], Any],
    make_token: Callable[[str], SoftHsmToken],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = kms("sakura"), kms("gcp")
    old, new = a.create_key(f"bulk-{os.getpid()}"), b.create_key(f"bulk-{os.getpid()}")
    token = make_token("kg-bulkmig")
    pin = tmp_path / "pin"
    pin.write_text(token.user_pin + "\n")
    pin.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.update(token.env)
    env.update(a.env())
    env.update(b.env())
    env.update(
        KEYGATE_DATA_DIR=str(tmp_path / "data"),
        KEYGATE_HSM_TOKEN_LABEL=token.label,
        KEYGATE_HSM_PIN_FILE=str(pin),
        KEYGATE_ACTOR="custodian:bulk-migrate",
        PYTHONPATH=str(REPO),
    )
    for name, value in {**a.env(), **b.env()}.items():
        monkeypatch.setenv(name, value)  # the in-process gateway's adapters read these
    settings = load_settings(
        data_dir=tmp_path / "data",
        hsm_token_label=token.label,
        hsm_pin_file=pin,
        dek_max_records=300,
    )
    gw = build_gateway(settings, start_refresher=False)
    try:
        gw.add_tenant(ACTOR, TENANT, name="千代田区")
        gw.create_key(ACTOR, TENANT, "resident", dek_max_records=300)
        gw.provider_set(ACTOR, TENANT, "resident", old)
        rows = []
        for i in range(1000):
            ctx = {"record_id": f"R-{i:06d}"}
            env_bytes = gw.keys.encrypt(TENANT, "resident", ctx, f"山田 {i}".encode())
            rows.append({"id": f"R-{i:06d}", "name": to_text(env_bytes)})
        src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        a_start, b_start = a.calls.copy(), b.calls.copy()

        cmd = [sys.executable, "-m", "keygate.cli.main", "bulk", "migrate", "-i", str(src)]
        cmd += ["-o", str(out), "-t", TENANT, "-p", "resident", "--fields", "name"]
        cmd += ["--to", new, "--json", "--progress", "none", "--batch-size", "250"]
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["state"] == "done"
        assert summary["read"] == summary["changed"] == 1000
        assert summary["failed"] == 0
        # per DEK (4 of them), never per record: unwraps at A, wraps at B (+ migrate's probe)
        a_calls = sum(a.calls.values()) - sum(a_start.values())
        b_calls = sum(b.calls.values()) - sum(b_start.values())
        assert 0 < a_calls <= 4 + 2
        assert 0 < b_calls <= 4 + 4

        moved = [json.loads(line) for line in out.read_text().splitlines()]
        gw.keys.refresh(force=True)
        for before, after in zip(rows, moved, strict=True):
            envelope = from_text(after["name"])
            assert parse_header(envelope).chain[-1].key_id.decode() == new
            assert after["name"][-30:] == before["name"][-30:]
            ctx = {"record_id": before["id"]}
            assert gw.keys.decrypt(TENANT, "resident", ctx, envelope).decode() == (
                f"山田 {int(before['id'][2:])}"
            )
        # The same command again: the switch is already made, the job finds nothing to change.
        out.unlink()
        again = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert again.returncode == 0, again.stderr[-3000:]
        states = {r.uri: r.state.value for r in gw.registry.list_provider_keys(TENANT)}
        assert states == {old: "decrypt-only", new: "active"}
    finally:
        gw.close()
