"""``keygate demo``: the whole story on the embedded default, over real HTTP.

1. a SoftHSM token, a SQLite registry, tenants, keys and service identities;
2. ``keygate serve`` with several workers on a free loopback port;
3. synthetic 住民記録 / 税 / 個人番号 records encrypted by the record endpoints;
4. a key rotation picked up by the running gateway without a restart;
5. every ciphertext rewrapped to the new version (header rewrite only), then decrypted and compared;
6. a caller without the ``mynumber`` purpose, and one from another tenant, shown what they get;
7. the audit trail exported as JSON Lines and summarised.

With ``--provider URI`` every key of the first tenant gets a cloud KMS outer wrap (the provider
only ever sees HSM-wrapped DEKs); with ``--migrate-to URI`` its resident data then moves to another
provider key by header rewrite, and the old one is retired.  The final ciphertexts are left in
``ciphertexts.jsonl`` in the demo directory.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from keygate.core.errors import ConfigurationError, Unavailable

__all__ = ["run_demo"]

TENANT = "131016"  # 千代田区
OTHER_TENANT = "271004"  # 大阪市
BATCH = 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server(env: dict[str, str], port: int, workers: int, log_path: Path) -> Iterator[str]:
    cmd = [
        sys.executable,
        "-m",
        "keygate.cli.main",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise Unavailable(
                        f"the gateway exited with code {proc.returncode}; see {log_path}"
                    )
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise Unavailable(f"the gateway did not become ready; see {log_path}")
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _post(client: httpx.Client, path: str, body: Any) -> Any:
    r = client.post(path, json=body)
    if r.status_code != 200:
        raise Unavailable(f"{path} answered {r.status_code}: {r.text[:300]}")
    return r.json()


def _batches(items: list[Any], size: int = BATCH) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


_PASSED_THROUGH = ("KEYGATE_POLICIES_DIR", "KEYGATE_HSM_MODULE", "KEYGATE_RESIDENCY_FILE")
#: provider adapter settings (endpoints, credentials) reach the demo's gateway
_PROVIDER_PREFIXES = (
    "KEYGATE_PROVIDER_",
    "KEYGATE_AWS_",
    "KEYGATE_GCP_",
    "KEYGATE_AZURE_",
    "KEYGATE_OCI_",
    "KEYGATE_VAULT_",
    "KEYGATE_SAKURA_",
)


def _passed(name: str) -> bool:
    return (
        not name.startswith("KEYGATE_")
        or name in _PASSED_THROUGH
        or name.startswith(_PROVIDER_PREFIXES)
    )


def _outer_uri(text: str) -> str:
    """The provider key URI of a text envelope's outer wrap ('hsm-only' when none)."""
    from keygate.core.wire import from_text, parse_header

    chain = parse_header(from_text(text)).chain
    return chain[-1].key_id.decode() if len(chain) > 1 else "hsm-only"


def _migrate(
    admin: Any,
    app: httpx.Client,
    actor: str,
    encrypted: dict[str, list[tuple[str, dict[str, Any]]]],
    probe: dict[str, Any],
    migrate_to: str,
    console: Console,
) -> None:
    """Move every key of TENANT to another provider key by header rewrite, then retire the old."""
    purposes = ("resident", "tax", "mynumber")
    for purpose in purposes:
        admin.provider_migrate(actor, TENANT, purpose, migrate_to)
    t0 = time.perf_counter()
    while _outer_uri(_post(app, "/v1/encrypt", probe)["ciphertext"]) != migrate_to:
        if time.perf_counter() - t0 > 30:
            raise Unavailable("the gateway did not pick up the provider migration")
        time.sleep(0.2)
    # every encrypted field, grouped by the purpose (KEK) it is under
    places: dict[str, list[tuple[str, int, str]]] = {p: [] for p in purposes}
    for rtype, rows in encrypted.items():
        policy = admin.policies[rtype]
        for i, (_, rec) in enumerate(rows):
            for field, value in rec.items():
                fp = policy.field_for(field)
                if fp.treatment.value == "encrypt" and isinstance(value, str):
                    places[fp.purpose or policy.default_purpose].append((rtype, i, field))
    before: Counter[str] = Counter()
    moved = 0
    t0 = time.perf_counter()
    for purpose, where in places.items():
        texts = [encrypted[rtype][i][1][field] for rtype, i, field in where]
        before.update(_outer_uri(t) for t in texts)
        new: list[str] = []
        for chunk in _batches(texts, 5000):
            res = _post(
                app,
                "/v1/rewrap/batch",
                {"tenant": TENANT, "purpose": purpose, "items": [{"ciphertext": c} for c in chunk]},
            )
            new += [item["ciphertext"] for item in res["items"]]
        for (rtype, i, field), text in zip(where, new, strict=True):
            encrypted[rtype][i][1][field] = text
        moved += sum(_outer_uri(t) == migrate_to for t in new)
    dt = time.perf_counter() - t0
    for purpose in purposes:
        admin.provider_finish(actor, TENANT, purpose)
    total = sum(before.values())
    console.print(
        f"5b. migrated {TENANT} from {', '.join(sorted(before))} to {migrate_to}: "
        f"{moved} of {total} field ciphertexts rewrapped in {dt:.2f} s "
        "(headers only, no re-encryption); the old provider key is retired"
    )
    if moved != total:
        raise Unavailable(f"{total - moved} ciphertexts were not migrated")


def run_demo(
    directory: Path,
    *,
    records: int,
    workers: int,
    console: Console,
    provider: str | None = None,
    migrate_to: str | None = None,
) -> None:
    from keygate.hsm.softhsm import find_softhsm_module, init_softhsm_token
    from keygate.testing.synthetic import SyntheticRecords

    t_start = time.perf_counter()
    console.rule("[bold]keygate demo[/] — データは日本に、鍵は行政に")
    find_softhsm_module()  # a clear error with an install hint when SoftHSM is missing
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, mode=0o700)
    pin = secrets.token_hex(8)
    pin_file = directory / "hsm-pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(0o600)
    token = init_softhsm_token(
        directory / "softhsm", label="keygate-demo", user_pin=pin, so_pin=secrets.token_hex(8)
    )
    env = {
        # A clean slate: none of the caller's KEYGATE_* settings (its database, its HSM) leaks
        # into the demo, except where the policies and the PKCS#11 module live.
        **{k: v for k, v in os.environ.items() if _passed(k)},
        **token.env,
        "KEYGATE_DATA_DIR": str(directory / "data"),
        "KEYGATE_HSM_TOKEN_LABEL": token.label,
        "KEYGATE_HSM_PIN_FILE": str(pin_file),
        "KEYGATE_LOG_FORMAT": "json",
    }
    os.environ.update(env)
    console.print(f"1. SoftHSM token [bold]{token.label}[/] and SQLite registry in {directory}")

    from keygate.bootstrap import build_gateway
    from keygate.config import load_settings

    admin = build_gateway(load_settings(), start_refresher=False)
    actor = "custodian:demo"
    try:
        admin.add_tenant(actor, TENANT, name="千代田区")
        admin.add_tenant(actor, OTHER_TENANT, name="大阪市")
        for tenant in (TENANT, OTHER_TENANT):
            for purpose in ("resident", "tax", "mynumber"):
                admin.create_key(actor, tenant, purpose)
        _, app_token = admin.add_identity(
            actor,
            "juki-app",
            tenants=[TENANT],
            purposes=["*"],
            record_types=["*"],
            operations=["*"],
        )
        _, clerk_token = admin.add_identity(
            actor,
            "madoguchi-viewer",
            tenants=[TENANT],
            purposes=["resident", "tax"],
            record_types=["resident", "tax"],
            operations=["decrypt"],
        )
        _, osaka_token = admin.add_identity(
            actor,
            "osaka-app",
            tenants=[OTHER_TENANT],
            purposes=["*"],
            record_types=["*"],
            operations=["*"],
        )
        console.print(
            f"   tenants {TENANT} (千代田区) and {OTHER_TENANT} (大阪市); "
            "KEKs resident/tax/mynumber v1 in the HSM "
            f"({admin.hsm.mechanism.name}); identities juki-app, madoguchi-viewer, osaka-app"
        )
        if provider is not None:
            for purpose in ("resident", "tax", "mynumber"):
                admin.provider_set(actor, TENANT, purpose, provider)
            console.print(
                f"   provider key for {TENANT}: {provider} — DEKs are wrapped by the HSM first, "
                "so the provider only ever sees HSM-wrapped DEKs (residency checked, round trip ok)"
            )
        port = _free_port()
        with _server(env, port, workers, directory / "gateway.log") as url:
            console.print(
                f"2. gateway up at {url} with {workers} worker processes "
                f"(log: {directory / 'gateway.log'})"
            )
            app = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {app_token}"}, timeout=60
            )
            gen = SyntheticRecords(seed=2026)
            data = {"resident": list(gen.resident(records)), "tax": list(gen.tax(records))}
            encrypted: dict[str, list[tuple[str, dict[str, Any]]]] = {}
            t0 = time.perf_counter()
            for rtype, rows in data.items():
                enc: list[tuple[str, dict[str, Any]]] = []
                for chunk in _batches(rows):
                    body = {
                        "tenant": TENANT,
                        "items": [{"record_id": rid, "record": rec} for rid, rec in chunk],
                    }
                    res = _post(app, f"/v1/records/{rtype}/encrypt/batch", body)
                    for (rid, _), item in zip(chunk, res["items"], strict=True):
                        if "error" in item:
                            raise Unavailable(
                                f"record {rid}: {item['error']['code']} {item['error']['detail']}"
                            )
                        enc.append((rid, item["record"]))
                encrypted[rtype] = enc
            dt = time.perf_counter() - t0
            n = sum(len(v) for v in data.values())
            console.print(
                f"3. encrypted {n} synthetic records over HTTP in {dt:.2f} s "
                f"({n / dt:,.0f} records/s)"
            )
            sample_id, sample = data["resident"][0]
            table = Table("field", "plaintext (synthetic)", "stored by the application")
            for field, value in sample.items():
                stored = str(encrypted["resident"][0][1][field])
                table.add_row(field, str(value), stored if len(stored) < 40 else stored[:37] + "…")
            console.print(table)

            admin.rotate_key(actor, TENANT, "resident")
            t0 = time.perf_counter()
            probe = {
                "tenant": TENANT,
                "purpose": "resident",
                "plaintext": base64.b64encode(b"probe").decode(),
            }
            while _post(app, "/v1/encrypt", probe)["key_version"] != 2:
                if time.perf_counter() - t0 > 30:
                    raise Unavailable("the gateway did not pick up the rotation")
                time.sleep(0.2)
            console.print(
                f"4. rotated {TENANT}/resident to v2; the running gateway encrypts under v2 after "
                f"{time.perf_counter() - t0:.1f} s, without a restart"
            )

            # 5. rewrap every resident-purpose field ciphertext (header rewrite only).
            policy = admin.policies["resident"]
            places: list[tuple[int, str]] = []
            texts: list[str] = []
            for i, (_, rec) in enumerate(encrypted["resident"]):
                for field, value in rec.items():
                    fp = policy.field_for(field)
                    if (
                        fp.treatment.value == "encrypt"
                        and (fp.purpose or policy.default_purpose) == "resident"
                    ):
                        places.append((i, field))
                        texts.append(value)
            t0 = time.perf_counter()
            rewrapped: list[str] = []
            for chunk in _batches(texts, 5000):
                res = _post(
                    app,
                    "/v1/rewrap/batch",
                    {
                        "tenant": TENANT,
                        "purpose": "resident",
                        "items": [{"ciphertext": c} for c in chunk],
                    },
                )
                rewrapped += [item["ciphertext"] for item in res["items"]]
            dt = time.perf_counter() - t0
            changed = sum(a != b for a, b in zip(texts, rewrapped, strict=True))
            body_same = sum(
                base64.urlsafe_b64decode(a[4:] + "==")[-40:]
                == base64.urlsafe_b64decode(b[4:] + "==")[-40:]
                for a, b in zip(texts, rewrapped, strict=True)
            )
            for (i, field), new in zip(places, rewrapped, strict=True):
                encrypted["resident"][i][1][field] = new
            console.print(
                f"5. rewrapped {len(texts)} field ciphertexts to v2 in {dt:.2f} s: "
                f"{changed} headers rewritten, "
                f"{body_same} with the data ciphertext untouched"
            )
            if migrate_to is not None:
                _migrate(admin, app, actor, encrypted, probe, migrate_to, console)
            metrics = httpx.get(url + "/metrics").text
            hsm_calls = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("keygate_hsm_calls_total")
            )
            console.print(
                f"   HSM operations so far (all workers): {hsm_calls:.0f} for {n} records "
                "— once per DEK, not per record"
            )

            t0 = time.perf_counter()
            mismatches = 0
            first_error = ""
            for rtype, rows in encrypted.items():
                originals = dict(data[rtype])
                for chunk in _batches(rows):
                    body = {
                        "tenant": TENANT,
                        "items": [{"record_id": rid, "record": rec} for rid, rec in chunk],
                    }
                    res = _post(app, f"/v1/records/{rtype}/decrypt/batch", body)
                    for (rid, _), item in zip(chunk, res["items"], strict=True):
                        if "error" in item or item["record"] != originals[rid]:
                            mismatches += 1
                            if "error" in item and not first_error:
                                first_error = f" (first: {item['error']['code']})"
            dt = time.perf_counter() - t0
            if mismatches:
                raise Unavailable(
                    f"{mismatches} records did not decrypt to their original{first_error}"
                )
            console.print(
                f"6. decrypted all {n} records in {dt:.2f} s: every one equals its original"
            )

            clerk = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {clerk_token}"}, timeout=30
            )
            res = clerk.post(
                "/v1/records/resident/decrypt",
                json={
                    "tenant": TENANT,
                    "record_id": sample_id,
                    "record": encrypted["resident"][0][1],
                },
            )
            seen = res.json()["record"]
            console.print(
                f"7. madoguchi-viewer (no 'mynumber' purpose) reads 氏名={seen.get('氏名')!r}; "
                f"個人番号 stays {str(seen.get('個人番号'))[:16]}…"
            )
            osaka = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {osaka_token}"}, timeout=30
            )
            ct = texts[0]
            r1 = osaka.post(
                "/v1/decrypt",
                json={"tenant": TENANT, "purpose": "resident", "context": {}, "ciphertext": ct},
            )
            r2 = osaka.post(
                "/v1/decrypt",
                json={
                    "tenant": OTHER_TENANT,
                    "purpose": "resident",
                    "context": {},
                    "ciphertext": ct,
                },
            )
            console.print(
                f"   osaka-app asking for 千代田区's data: {r1.status_code} {r1.json()['code']}; "
                f"passing it off as its own tenant: {r2.status_code} {r2.json()['code']}"
            )
            app.close()
            clerk.close()
            osaka.close()
        with (directory / "ciphertexts.jsonl").open("w", encoding="utf-8") as stream:
            for rtype, rows in encrypted.items():
                for rid, rec in rows:
                    row = {"type": rtype, "record_id": rid, "record": rec}
                    stream.write(json.dumps(row, ensure_ascii=False) + "\n")

        # 8. What a security reviewer does: export the chained trail, get the checkpoint key,
        # verify offline — with the real CLI, as a reviewer would run it.
        export = directory / "audit.jsonl"
        public_key = directory / "audit-key.pem"
        cli = [sys.executable, "-m", "keygate.cli.main"]
        for args in (
            ["audit", "export", "--format", "jsonl", "--output", str(export)],
            ["audit", "public-key"],
            ["audit", "verify", str(export), "--public-key", str(public_key)],
        ):
            done = subprocess.run(  # noqa: S603 - our own CLI, fixed arguments
                [*cli, *args], env=env, capture_output=True, text=True, check=False, timeout=120
            )
            if done.returncode != 0:
                raise Unavailable(
                    f"keygate {' '.join(args[:2])} failed: {done.stderr.strip()[-300:]}"
                )
            if args[1] == "public-key":
                public_key.write_text(done.stdout, encoding="utf-8")
            verdict = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        counts: Counter[tuple[str, str]] = Counter()
        for line in export.read_text(encoding="utf-8").splitlines():
            item = json.loads(line)
            if item.get("type") == "event" and "event" in item:
                counts[(item["event"]["action"], item["event"]["outcome"])] += 1
        table = Table("audit action", "outcome", "events")
        for (action, outcome), count in sorted(counts.items()):
            table.add_row(action, outcome, str(count))
        console.print(
            f"8. audit trail exported to {export} (hash-chained, HSM-signed checkpoints):"
        )
        console.print(table)
        console.print(f"   keygate audit verify, offline with {public_key.name}: {verdict}")
        dump = export.read_text(encoding="utf-8") + (directory / "gateway.log").read_text(
            encoding="utf-8", errors="replace"
        )
        leaked = [t for t in (app_token, clerk_token, osaka_token, pin) if t and t in dump]
        leaked += [rid for rid, rec in data["resident"][:50] if str(rec.get("個人番号")) in dump]
        if leaked:
            raise ConfigurationError(
                "a secret or plaintext value appears in the audit export or the gateway log"
            )
        console.print(
            "   checked: no token, PIN or My Number appears in the audit export or the gateway log"
        )
    finally:
        admin.close()
    console.rule(f"[green]demo finished in {time.perf_counter() - t_start:.1f} s[/]")
