"""Helpers of the bulk suite: the custodian environment a test runs ``keygate bulk`` in, and the
data it makes through an in-process Gateway on the same registry and token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keygate.core.wire import from_text, to_text
from keygate.hsm.softhsm import SoftHsmToken
from keygate.policy.access import ANY, Principal
from keygate.service import Gateway
from keygate.testing.synthetic import SyntheticRecords

REPO = Path(__file__).resolve().parents[2]
TENANT = "131016"
OTHER_TENANT = "271004"
ADMIN = Principal.from_grants(
    "bulk-tests", tenants=[ANY], purposes=[ANY], record_types=[ANY], operations=[ANY]
)


@dataclass
class BulkEnv:
    """A custodian's environment and an in-process gateway on the same registry and token."""

    home: Path
    env: dict[str, str]
    token: SoftHsmToken
    gateway: Gateway
    settings: Any = None

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``keygate ARGS…``; never raises on the exit code."""
        return subprocess.run(
            [sys.executable, "-m", "keygate.cli.main", *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "keygate.cli.main", *args],
            env=self.env,
            cwd=self.home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self.cli(*args)
        assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
        return done

    def job(self, *args: str, expect: int = 0) -> dict[str, Any]:
        """Run a bulk job command with --json and return its summary."""
        done = self.cli("bulk", *args, "--json", "--progress", "none")
        assert done.returncode == expect, (args, done.returncode, done.stdout, done.stderr)
        summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return summary

    def refresh(self) -> None:
        self.gateway.keys.refresh(force=True)

    def rotate(self, purpose: str, tenant: str = TENANT) -> int:
        rec = self.gateway.rotate_key("custodian:bulk-tests", tenant, purpose)
        return int(rec.version)

    # -- data ---------------------------------------------------------------------------------
    def encrypt(
        self, purpose: str, context: dict[str, str], text: str, tenant: str = TENANT
    ) -> str:
        return to_text(self.gateway.keys.encrypt(tenant, purpose, context, text.encode()))

    def decrypt(
        self, purpose: str, context: dict[str, str], value: str, tenant: str = TENANT
    ) -> str:
        return self.gateway.keys.decrypt(tenant, purpose, context, from_text(value)).decode()

    def records(self, n: int, seed: int = 1) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """``n`` synthetic resident records: (record id, plaintext record, encrypted record)."""
        plain = list(SyntheticRecords(seed).resident(n))
        out: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        for start in range(0, n, 1000):
            chunk = plain[start : start + 1000]
            result = self.gateway.encrypt_record_batch(
                ADMIN, "test", "resident", TENANT, [(rid, rec) for rid, rec in chunk]
            )
            assert result.failed == 0
            out.extend((rid, rec, enc) for (rid, rec), enc in zip(chunk, result.items, strict=True))
        return out

    def decrypt_record(self, rid: str, record: dict[str, Any]) -> dict[str, Any]:
        return self.gateway.decrypt_record(ADMIN, "test", "resident", TENANT, rid, record)


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["COLUMNS"] = "200"
    env["NO_COLOR"] = "1"
    return env


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
