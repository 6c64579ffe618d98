"""Provider migration: rewrap to another cloud KMS key, with both provider servers on loopback.

``python -m bench.migrate [--quick] [--json FILE]`` (``python -m bench`` runs it in a child
process, because SoftHSM reads its configuration once per process).

What is measured: N text envelopes (1 KiB records, the form applications store) made under
provider key A (moto's AWS KMS server, real AWS wire protocol), then moved to provider key B (a
real OpenBao transit server) by ``KeyManager.rewrap_text_many`` — a header rewrite — starting
from a cold DEK cache, as a fresh bulk worker would.  Reported: records/s (median of the rounds),
provider calls and HSM calls per million records, and the same run with the binary form.  Every
output is checked: it names B, and a sample decrypts to its plaintext.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.core.wire import from_text, parse_header, to_text
from keygate.hsm.softhsm import init_softhsm_token, write_softhsm_conf
from keygate.logging import configure_logging
from keygate.policy.residency import ResidencyPolicy
from keygate.providers.base import ProviderOptions
from keygate.providers.guard import ProviderSet
from keygate.testing.kms.aws import MotoKmsServer
from keygate.testing.kms.vault import OpenBaoServer

TENANT, PURPOSE, ACTOR = "131016", "resident", "bench"
CONTEXT = {"record_id": "R-000001", "field": "本籍"}


def _residency() -> ResidencyPolicy:
    shipped = ResidencyPolicy.load()
    regions = dict(shipped.regions)
    regions["hcvault"] = frozenset({"127.0.0.1"})  # the loopback OpenBao of this run
    return ResidencyPolicy(regions=regions, source="bench")


def run(records: int, rounds: int, dek_max_records: int, batch: int) -> dict[str, Any]:
    configure_logging(fmt="console", level="warning")
    directory = Path(tempfile.mkdtemp(prefix="kg-bench-migrate-"))
    os.environ["SOFTHSM2_CONF"] = str(write_softhsm_conf(directory))
    token = init_softhsm_token(directory, label="bench-migrate", user_pin="1234", so_pin="5678")
    results: dict[str, Any] = {
        "records": records,
        "rounds": rounds,
        "dek_max_records": dek_max_records,
        "record_size": 1024,
        "from": "aws-kms (moto server, loopback)",
        "to": "hcvault (OpenBao transit, loopback)",
    }
    with MotoKmsServer() as aws, OpenBaoServer() as bao:
        providers = ProviderSet(
            ProviderOptions(),
            _residency(),
            settings={aws.scheme: aws.settings(), bao.scheme: bao.settings()},
        )
        settings = load_settings(
            data_dir=directory / "data",
            hsm_token_label=token.label,
            hsm_pin=token.user_pin,
            hsm_pin_file=None,
            dek_max_records=dek_max_records,
        )
        gw = build_gateway(settings, start_refresher=False, providers=providers)
        try:
            gw.add_tenant(ACTOR, TENANT, name="千代田区")
            gw.create_key(ACTOR, TENANT, PURPOSE)
            plaintexts = [os.urandom(1024) for _ in range(min(records, 1000))]
            text_rates, bin_rates = [], []
            calls: dict[str, float] = {}
            for r in range(rounds):
                old = aws.create_key(f"bench-{r}-{os.getpid()}")
                new = bao.create_key(f"bench-{r}-{os.getpid()}")
                if r == 0:
                    gw.provider_set(ACTOR, TENANT, PURPOSE, old)
                else:
                    gw.provider_migrate(ACTOR, TENANT, PURPOSE, old)
                envelopes = []
                for start in range(0, records, batch):
                    items = [
                        (CONTEXT, plaintexts[i % len(plaintexts)])
                        for i in range(start, min(records, start + batch))
                    ]
                    envelopes += gw.keys.encrypt_many(TENANT, PURPOSE, items)
                texts = [to_text(e) for e in envelopes]  # type: ignore[arg-type]
                gw.provider_migrate(ACTOR, TENANT, PURPOSE, new)
                # cold: what a fresh bulk worker starts with
                gw.keys._opened.clear()
                before = dict(gw.providers.counts)
                hsm_before = gw.keys.stats.hsm_wraps + gw.keys.stats.hsm_unwraps
                t0 = time.perf_counter()
                moved: list[Any] = []
                for start in range(0, records, batch):
                    moved += gw.keys.rewrap_text_many(TENANT, PURPOSE, texts[start : start + batch])
                text_rates.append(records / (time.perf_counter() - t0))
                after = gw.providers.counts
                if r == 0:
                    n = records / 1e6
                    calls = {
                        "provider_unwraps_per_million": (after["unwrap"] - before["unwrap"]) / n,
                        "provider_wraps_per_million": (after["wrap"] - before["wrap"]) / n,
                        "hsm_calls_per_million": (
                            gw.keys.stats.hsm_wraps + gw.keys.stats.hsm_unwraps - hsm_before
                        )
                        / n,
                        "deks": len({e[: parse_header(e).length] for e in envelopes}),  # type: ignore[index, arg-type]
                    }
                if not all(isinstance(m, str) for m in moved):
                    raise SystemExit("a rewrap failed")
                for i in range(0, records, max(1, records // 20)):
                    env = from_text(moved[i])
                    if parse_header(env).chain[-1].key_id.decode() != new:
                        raise SystemExit("a rewrapped envelope does not name the new key")
                    plain = gw.keys.decrypt(TENANT, PURPOSE, CONTEXT, env)
                    if plain != plaintexts[i % len(plaintexts)]:
                        raise SystemExit("a rewrapped envelope does not decrypt")
                # binary form, warm rewrap map from a fresh migration back to a new A-side key
                back = aws.create_key(f"bench-back-{r}-{os.getpid()}")
                gw.provider_migrate(ACTOR, TENANT, PURPOSE, back)
                binary = [from_text(t) for t in moved]
                gw.keys._opened.clear()
                t0 = time.perf_counter()
                for start in range(0, records, batch):
                    gw.keys.rewrap_many(TENANT, PURPOSE, binary[start : start + batch])
                bin_rates.append(records / (time.perf_counter() - t0))
            results.update(
                text_records_per_s=statistics.median(text_rates),
                binary_records_per_s=statistics.median(bin_rates),
                text_rates=text_rates,
                binary_rates=bin_rates,
                **calls,
            )
        finally:
            gw.close()
    return results


def markdown(res: dict[str, Any]) -> str:
    return "\n".join(
        [
            "### Provider migration (rewrap to another cloud KMS key, cold DEK cache)",
            f"{res['records']:,} × 1 KiB text envelopes, {res['deks']} DEKs "
            f"({res['dek_max_records']:,} records per DEK), {res['from']} → {res['to']}; "
            f"median of {res['rounds']} rounds",
            "",
            "| form | records/s | provider unwraps / M | provider wraps / M | HSM calls / M |",
            "|---|--:|--:|--:|--:|",
            f"| text (`kg1.…`) | {res['text_records_per_s']:,.0f} | "
            f"{res['provider_unwraps_per_million']:.0f} | "
            f"{res['provider_wraps_per_million']:.0f} | {res['hsm_calls_per_million']:.0f} |",
            f"| binary | {res['binary_records_per_s']:,.0f} | (same per DEK) | | |",
            "",
            "Goal: rewrap ≥ 1,000,000 records/s per core; provider and HSM calls per DEK, "
            "never per record.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.migrate", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run (numbers mean nothing)")
    p.add_argument("--records", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--dek-max-records", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    records = args.records or (2_000 if args.quick else 200_000)
    rounds = args.rounds or (1 if args.quick else 5)
    dek_max = 500 if args.quick and args.dek_max_records == 50_000 else args.dek_max_records
    res = run(records, rounds, dek_max, args.batch)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2), encoding="utf-8")
    sys.stdout.write(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
