"""A full demo run with a provider, then a migration to another provider, on real servers.

``keygate demo --provider OLD-KEY --migrate-to NEW-KEY`` runs as a custodian would run it (a
subprocess: SoftHSM token, registry, ``keygate serve`` with two workers, records over HTTP,
rotation, rewrap, provider migration by header rewrite, audit export and offline verify).  Both
provider servers record every request body they received: moto's KMS (AWS wire protocol) → a
real OpenBao, then Google → Azure and OCI → Sakura on our wire-protocol servers, so every provider
takes part in a full demo run.  Afterwards a second process opens the demo's token and registry,
decrypts every record **with the old provider switched off**, and lists the DEKs; the test then
checks that no DEK and no plaintext field value reached either provider, in any encoding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keygate.core.wire import from_text, parse_header
from keygate.testing.leaks import find_secrets
from keygate.testing.synthetic import SyntheticRecords

pytestmark = pytest.mark.slow

RECORDS = 150  # per record type (resident, tax)

_VERIFY = textwrap.dedent(
    """
    import json, sys
    from keygate.bootstrap import build_gateway
    from keygate.config import load_settings
    from keygate.core.envelope import REWRAP_CAPABILITY
    from keygate.core.wire import from_text, header_length
    from keygate.policy.access import Principal

    gw = build_gateway(load_settings(), start_refresher=False)
    p = Principal.from_grants(
        "verifier", tenants=["*"], purposes=["*"], record_types=["*"], operations=["*"]
    )
    out = {"records": {}, "deks": {}}
    with open(sys.argv[1], encoding="utf-8") as stream:
        lines = stream.read().splitlines()
    for line in lines:
        row = json.loads(line)
        rec = gw.decrypt_record(p, "verify", row["type"], "131016", row["record_id"], row["record"])
        out["records"][row["type"] + "/" + row["record_id"]] = rec
        for value in row["record"].values():
            if isinstance(value, str) and value.startswith("kg1."):
                env = from_text(value)
                header = env[: header_length(env)]
                if header.hex() not in out["deks"]:
                    purpose = env[6 + env[4] : 6 + env[4] + env[5 + env[4]]].decode()
                    key = gw.keys.open_key("131016", purpose, env)
                    out["deks"][header.hex()] = key.dek_for_rewrap(REWRAP_CAPABILITY).hex()
    gw.close()
    json.dump(out, sys.stdout, ensure_ascii=False)
    """
)


def _outer(text: str) -> str:
    chain = parse_header(from_text(text)).chain
    return chain[-1].key_id.decode() if len(chain) > 1 else "hsm-only"


@pytest.mark.parametrize(("src", "dst"), [("aws", "vault"), ("gcp", "azure"), ("oci", "sakura")])
def test_demo_with_a_provider_then_migration_to_another(
    src: str, dst: str, kms: Callable[[str], Any], tmp_path: Path
) -> None:
    aws, bao = kms(src), kms(dst)  # the old and the new provider's servers
    old, new = aws.create_key(f"demo-{os.getpid()}"), bao.create_key(f"demo-{os.getpid()}")
    aws_start, bao_start = len(aws.received), len(bao.received)
    residency = tmp_path / "residency.toml"
    shipped = (Path(__file__).resolve().parents[2] / "policies" / "residency.toml").read_text()
    residency.write_text(
        shipped.replace("[hcvault]", "[hcvault-shipped]") + '\n[hcvault]\nregions = ["127.0.0.1"]\n'
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KEYGATE_", "SOFTHSM2_CONF", "AWS_", "VAULT_"))
    }
    env.update(aws.env())
    env.update(bao.env())
    env["KEYGATE_RESIDENCY_FILE"] = str(residency)
    directory = tmp_path / "demo"
    cmd = [sys.executable, "-m", "keygate.cli.main", "demo", "--directory", str(directory)]
    cmd += ["--records", str(RECORDS), "--workers", "2", "--provider", old, "--migrate-to", new]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "5b. migrated" in done.stdout
    assert "audit verify" in done.stdout

    rows = [
        json.loads(line)
        for line in (directory / "ciphertexts.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert Counter(r["type"] for r in rows) == {"resident": RECORDS, "tax": RECORDS}
    outers: Counter[tuple[str, str]] = Counter()
    for row in rows:
        for value in row["record"].values():
            if isinstance(value, str) and value.startswith("kg1."):
                purpose = parse_header(from_text(value)).key_ref.purpose
                outers[(purpose, _outer(value))] += 1
    # every field of the tenant moved to OpenBao by header rewrite
    assert set(outers) == {("resident", new), ("tax", new), ("mynumber", new)}
    assert sum(outers.values()) > 2 * RECORDS

    # The old provider is not needed any more: switch it off, then a second process opens the
    # demo's token and registry and decrypts every record.
    verify_env = {
        **env,
        "SOFTHSM2_CONF": str(directory / "softhsm" / "softhsm2.conf"),
        "KEYGATE_DATA_DIR": str(directory / "data"),
        "KEYGATE_HSM_TOKEN_LABEL": "keygate-demo",
        "KEYGATE_HSM_PIN_FILE": str(directory / "hsm-pin"),
        "KEYGATE_PROVIDER_RETRIES": "0",
    }
    aws.fault("down")
    try:
        everything = _run_verify(verify_env, directory / "ciphertexts.jsonl")
    finally:
        aws.fault(None)

    gen = SyntheticRecords(seed=2026)
    originals = {
        **{f"resident/{rid}": rec for rid, rec in gen.resident(RECORDS)},
        **{f"tax/{rid}": rec for rid, rec in gen.tax(RECORDS)},
    }
    assert everything["records"] == json.loads(json.dumps(originals, ensure_ascii=False))

    deks = [bytes.fromhex(d) for d in everything["deks"].values()]
    assert len(deks) >= 3
    plaintexts = {
        str(value).encode()
        for rec in originals.values()
        for value in rec.values()
        if len(str(value).encode()) >= 8
    }
    for server, start in ((aws, aws_start), (bao, bao_start)):
        received = b"".join(server.received[start:])
        assert received
        assert find_secrets(received, deks) == []
        assert find_secrets(received, sorted(plaintexts)) == []
        for value in plaintexts:  # JSON bodies may carry text \\u-escaped
            assert json.dumps(value.decode()).encode()[1:-1] not in received


def _run_verify(env: dict[str, str], rows: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _VERIFY, str(rows)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]
