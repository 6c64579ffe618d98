"""Export, offline verification and tampering, through the real ``keygate`` CLI.

A gateway wired by ``build_gateway`` (real SoftHSM token, SQLite) writes a small trail with a
checkpoint every 4 events; ``keygate audit export`` and ``keygate audit verify`` then run as
subprocesses, and every tamper case must be caught at its first bad line.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from audit_support import cli_env  # type: ignore[import-not-found]
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from keygate.audit.chain import chain_hash_bytes
from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.hsm.softhsm import SoftHsmToken
from keygate.policy.access import Principal
from keygate.testing.synthetic import SyntheticRecords

TENANT = "131016"
OTHER = "011002"
RECORD_ID = "R-000123"
EXIT_DATAERR = 65


@dataclass
class Trail:
    env: dict[str, str]
    home: Path
    export: Path
    pem: Path
    secrets: list[str]
    record_ids: list[str]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keygate.cli.main", *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self.run(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done


def _records(n: int) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i, (_, record) in enumerate(SyntheticRecords(seed=7).resident(n)):
        out.append((RECORD_ID if i == 0 else f"R-{900000 + i:06d}", record))
    return out


@pytest.fixture(scope="module")
def trail(audit_token: SoftHsmToken, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trail]:
    """A trail of about 30 events over two tenants, exported and with the public key saved."""
    home = tmp_path_factory.mktemp("audit-trail")
    env = cli_env(audit_token, home, KEYGATE_AUDIT_CHECKPOINT_EVENTS="4")
    trail = Trail(env, home, home / "export.jsonl", home / "audit.pem", [], [])
    trail.ok("init")
    settings = load_settings(
        data_dir=home / "data",
        hsm_token_label=audit_token.label,
        hsm_pin=audit_token.user_pin,
        audit_checkpoint_events=4,
    )
    gw = build_gateway(settings, start_refresher=False)
    try:
        app = Principal.from_grants(
            "juki-app", tenants=["*"], purposes=["*"], record_types=["*"], operations=["*"]
        )
        for tenant in (TENANT, OTHER):
            gw.add_tenant("custodian:test", tenant, name="千代田区")
            gw.create_key("custodian:test", tenant, "resident")
            gw.create_key("custodian:test", tenant, "mynumber")
        _, token = gw.add_identity(
            "custodian:test", "juki-app", tenants=["*"], purposes=["*"],
            record_types=["*"], operations=["*"],
        )  # fmt: skip
        assert token is not None
        trail.secrets.append(token)
        for n, (record_id, record) in enumerate(_records(6)):
            tenant = TENANT if n % 2 == 0 else OTHER
            sealed = gw.encrypt_record(app, f"req-{n}", "resident", tenant, record_id, record)
            trail.record_ids.append(record_id)
            trail.secrets += [str(record["個人番号"]), str(record["氏名"]), str(record["住所"])]
            if record_id == RECORD_ID:
                gw.decrypt_record(app, "req-read", "resident", tenant, record_id, sealed)
        batch = [(rid, rec) for rid, rec in _records(3)]
        gw.encrypt_record_batch(app, "req-batch", "resident", TENANT, batch)
    finally:
        gw.close()
    trail.ok("audit", "export", "--output", str(trail.export))
    trail.pem.write_text(trail.ok("audit", "public-key").stdout, encoding="ascii")
    yield trail


def _lines(trail: Trail) -> list[dict[str, Any]]:
    return [json.loads(line) for line in trail.export.read_text(encoding="utf-8").splitlines()]


def _verify(trail: Trail, lines: list[dict[str, Any]], name: str) -> tuple[int, str]:
    path = trail.home / f"{name}.jsonl"
    path.write_text(
        "".join(json.dumps(o, ensure_ascii=False, separators=(",", ":")) + "\n" for o in lines),
        encoding="utf-8",
    )
    done = trail.run("audit", "verify", str(path), "--public-key", str(trail.pem))
    return done.returncode, done.stdout + done.stderr


def _index(lines: list[dict[str, Any]], kind: str, nth: int = 0) -> int:
    return [i for i, o in enumerate(lines) if o["type"] == kind and not o.get("omitted")][nth]


def _rechain(lines: list[dict[str, Any]], start: int) -> None:
    """What a careful forger does: recompute seqs and hashes of every event from ``start``."""
    prev = lines[start - 1]["hash"] if lines[start - 1]["type"] != "header" else "00" * 32
    seq = lines[start - 1].get("seq", 0) if lines[start - 1]["type"] == "event" else None
    for obj in lines[start:]:
        if obj["type"] != "event":
            continue
        seq = obj["seq"] if seq is None else seq + 1
        canonical = json.dumps(
            obj["event"], sort_keys=True, ensure_ascii=False, separators=(",", ":")
        ).encode()
        obj.update(seq=seq, prev_hash=prev, hash=chain_hash_bytes(prev, canonical, seq))
        prev = obj["hash"]


def test_untouched_export_verifies(trail: Trail) -> None:
    """An untouched export verifies offline, ends at a checkpoint and has periodic ones."""
    lines = _lines(trail)
    assert lines[0]["type"] == "header" and lines[-1]["type"] == "checkpoint"
    cps = [o for o in lines if o["type"] == "checkpoint"]
    assert len(cps) >= 4  # every 4 events (15 in all), plus the export's own
    done = trail.ok("audit", "verify", str(trail.export), "--public-key", str(trail.pem))
    assert "OK" in done.stdout


def test_checkpoint_signature_verifies_with_cryptography(trail: Trail) -> None:
    """A checkpoint's DER signature verifies with `cryptography` and the printed PEM."""
    cp = next(o for o in _lines(trail) if o["type"] == "checkpoint")
    key = load_pem_public_key(trail.pem.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    body = json.dumps(
        {"hash": cp["hash"], "prev_seq": cp["prev_seq"], "seq": cp["seq"], "ts": cp["ts"]},
        sort_keys=True,
        separators=(",", ":"),
    )
    key.verify(
        base64.b64decode(cp["signature"]),
        b"keygate-audit-checkpoint-v1\x00" + body.encode(),
        ec.ECDSA(hashes.SHA256()),
    )


TamperFn = Callable[[list[dict[str, Any]]], int]


def _modify_field(lines: list[dict[str, Any]]) -> int:
    i = _index(lines, "event", 5)
    lines[i]["event"]["actor"] = "someone-else"
    return i


def _delete_event(lines: list[dict[str, Any]]) -> int:
    i = _index(lines, "event", 5)
    del lines[i]
    return i


def _delete_event_and_rechain(lines: list[dict[str, Any]]) -> int:
    i = _index(lines, "event", 5)
    del lines[i]
    _rechain(lines, i)
    return next(j for j in range(i, len(lines)) if lines[j]["type"] == "checkpoint")


def _insert_forged(lines: list[dict[str, Any]]) -> int:
    i = _index(lines, "event", 5)
    forged = json.loads(json.dumps(lines[i]))
    forged["event"]["event_id"] = "f" * 32
    forged["event"]["action"] = "key.destroyed"
    lines.insert(i + 1, forged)
    _rechain(lines, i + 1)
    return next(j for j in range(i + 1, len(lines)) if lines[j]["type"] == "checkpoint")


def _reorder(lines: list[dict[str, Any]]) -> int:
    i = _index(lines, "event", 8)
    j = i + 1
    while lines[j]["type"] != "event":
        j += 1
    lines[i], lines[j] = lines[j], lines[i]
    return i


def _modify_checkpoint(lines: list[dict[str, Any]]) -> int:
    i = _index(lines, "checkpoint", 1)
    lines[i]["ts"] = "2020-01-01T00:00:00.000000Z"
    return i


def _delete_checkpoint(lines: list[dict[str, Any]]) -> int:
    i = _index(lines, "checkpoint", 1)
    del lines[i]
    return next(j for j in range(i, len(lines)) if lines[j]["type"] == "checkpoint")


def _truncate_tail(lines: list[dict[str, Any]]) -> int:
    last_cp = max(i for i, o in enumerate(lines[:-1]) if o["type"] == "checkpoint")
    keep = last_cp + 2  # the checkpoint, then one event, then cut (the final checkpoint too)
    del lines[keep:]
    lines[0]["to_seq"] = lines[-1]["seq"]  # even with the header fixed up
    return last_cp + 1


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_modify_field, "modified"),
        (_delete_event, "expected seq"),
        (_delete_event_and_rechain, "checkpoint"),
        (_insert_forged, "checkpoint"),
        (_reorder, "expected seq"),
        (_modify_checkpoint, "signature does not verify"),
        (_delete_checkpoint, "a checkpoint was deleted"),
        (_truncate_tail, "unsigned tail"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_tampering_is_caught_at_the_first_bad_line(
    trail: Trail, tamper: TamperFn, reason: str
) -> None:
    """Each tamper case makes `keygate audit verify` exit 65 naming the first bad line and seq."""
    lines = _lines(trail)
    index = tamper(lines)
    code, output = _verify(trail, lines, tamper.__name__)
    assert code == EXIT_DATAERR, output
    assert f"line {index + 1} " in output, output
    assert reason in output, output
    assert "seq " in output
    assert "Traceback" not in output


def test_wrong_public_key_is_refused(trail: Trail, tmp_path: Path) -> None:
    """Checkpoints signed by another key fail verification."""
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pem = tmp_path / "other.pem"
    pem.write_bytes(other.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    done = trail.run("audit", "verify", str(trail.export), "--public-key", str(pem))
    assert done.returncode == EXIT_DATAERR
    assert "another key" in done.stderr


def test_tenant_filtered_export_verifies_without_other_tenants(trail: Trail) -> None:
    """A --tenant export verifies; other tenants' events appear only as hash stubs."""
    path = trail.home / "tenant.jsonl"
    trail.ok("audit", "export", "--tenant", TENANT, "--output", str(path))
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    events = [o for o in lines if o["type"] == "event" and not o.get("omitted")]
    stubs = [o for o in lines if o.get("omitted")]
    assert events and stubs
    assert all(o["event"]["tenant"] == TENANT for o in events)
    assert all(set(o) == {"type", "seq", "prev_hash", "hash", "omitted"} for o in stubs)
    assert OTHER not in path.read_text(encoding="utf-8").split('"header"', 1)[1].split("\n", 1)[1]
    trail.ok("audit", "verify", str(path), "--public-key", str(trail.pem))


def test_time_range_export_is_anchored_and_verifies(trail: Trail) -> None:
    """A --since export starts after a signed anchor checkpoint and verifies."""
    lines = _lines(trail)
    middle = [o for o in lines if o["type"] == "event"][12]["event"]["ts"]
    path = trail.home / "since.jsonl"
    trail.ok("audit", "export", "--since", middle.replace("Z", "+00:00"), "--output", str(path))
    got = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert got[1]["type"] == "checkpoint" and got[2]["seq"] == got[1]["seq"] + 1
    trail.ok("audit", "verify", str(path), "--public-key", str(trail.pem))
    del got[2]  # dropping the first event after the anchor is caught
    code, output = _verify(trail, got, "since-cut")
    assert code == EXIT_DATAERR and "line 3 " in output


def test_exports_reveal_no_secrets(trail: Trail) -> None:
    """No export format contains a token, plaintext, My Number or record id."""
    texts = [trail.export.read_text(encoding="utf-8")]
    for fmt in ("csv", "ocsf"):
        path = trail.home / f"all.{fmt}"
        trail.ok("audit", "export", "--format", fmt, "--output", str(path))
        texts.append(path.read_text(encoding="utf-8-sig"))
    assert trail.secrets and trail.record_ids
    for text in texts:
        for secret in trail.secrets + trail.record_ids:
            assert secret not in text
        assert "record_ref" in text


def test_who_touched_finds_a_record_by_pseudonym(trail: Trail) -> None:
    """`who-touched` lists the encrypt, decrypt and batch events of a record id."""
    done = trail.ok("audit", "who-touched", TENANT, RECORD_ID)
    assert "record.encrypt" in done.stdout and "record.decrypt" in done.stdout
    assert "req-batch" in done.stdout and "req-read" in done.stdout
    assert RECORD_ID not in trail.export.read_text(encoding="utf-8")
    other = trail.ok("audit", "who-touched", OTHER, RECORD_ID)
    assert "record." not in other.stdout  # the pseudonym depends on the tenant


def test_csv_has_bom_and_round_trips_japanese(trail: Trail) -> None:
    """The CSV export starts with a UTF-8 BOM and reads back Japanese text intact."""
    path = trail.home / "excel.csv"
    trail.ok("audit", "export", "--format", "csv", "--output", str(path))
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    assert any(r["action"] == "tenant.added" for r in rows)
    assert {r["type"] for r in rows} == {"event", "checkpoint"}
    assert "千代田区" not in raw.decode("utf-8-sig")  # tenant names are not in the trail…
    detail = next(r["detail"] for r in rows if r["action"] == "identity.added")
    assert json.loads(detail) == {"identity": "juki-app"}


def test_ocsf_export_maps_api_activity(trail: Trail) -> None:
    """The OCSF export is API Activity (6003) with the chain fields kept in `unmapped`."""
    path = trail.home / "ocsf.jsonl"
    trail.ok("audit", "export", "--format", "ocsf", "--output", str(path))
    objs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert objs and all(o["class_uid"] == 6003 for o in objs)
    decrypt = next(o for o in objs if o["api"]["operation"] == "record.decrypt")
    assert decrypt["activity_id"] == 2 and decrypt["type_uid"] == 600302
    assert decrypt["status_id"] == 1
    assert {"seq", "prev_hash", "hash"} <= set(decrypt["unmapped"])


def test_verify_imports_no_registry_or_hsm(trail: Trail) -> None:
    """`keygate audit verify` runs without importing SQLAlchemy, the registry or PKCS#11."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['keygate', 'audit', 'verify', sys.argv[1], '--public-key', sys.argv[2]]\n"
        "try:\n"
        "    runpy.run_module('keygate.cli.main', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = [m for m in ('sqlalchemy', 'pkcs11', 'keygate.keys.registry', 'keygate.hsm')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(trail.export), str(trail.pem)],
        env={k: v for k, v in trail.env.items() if not k.startswith(("KEYGATE_", "SOFTHSM"))},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
