"""``keygate provider set|show|test|migrate`` as a custodian runs them, and a running
``keygate serve`` that names a failing provider in ``/readyz`` and answers 503 / 200 over HTTP."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from provider_support import TENANT  # type: ignore[import-not-found]

from keygate.hsm.softhsm import SoftHsmToken

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EX_USAGE, EX_CONFIG, EX_NOPERM, EX_UNAVAILABLE = 64, 78, 77, 69


class Custodian:
    def __init__(self, env: dict[str, str], home: Path) -> None:
        self.env = env
        self.home = home

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

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout


@pytest.fixture
def custodian(
    make_token: Callable[[str], SoftHsmToken], tmp_path: Path, kms: Callable[[str], Any]
) -> Custodian:
    token = make_token("kg-provcli")
    pin = tmp_path / "pin"
    pin.write_text(token.user_pin + "\n")
    pin.chmod(0o600)
    residency = tmp_path / "residency.toml"
    shipped = (REPO / "policies" / "residency.toml").read_text()
    residency.write_text(
        shipped.replace("[hcvault]", "[hcvault-shipped]") + '[hcvault]\nregions = ["127.0.0.1"]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.update(token.env)
    env.update(kms("sakura").env())
    env.update(kms("gcp").env())
    env.update(
        {
            "KEYGATE_DATA_DIR": str(tmp_path / "data"),
            "KEYGATE_HSM_TOKEN_LABEL": token.label,
            "KEYGATE_HSM_PIN_FILE": str(pin),
            "KEYGATE_RESIDENCY_FILE": str(residency),
            "KEYGATE_ACTOR": "custodian:provider-tests",
            "KEYGATE_PROVIDER_RETRIES": "0",
            "KEYGATE_PROVIDER_READ_TIMEOUT_S": "10",  # generous: CI runs this under load
            "KEYGATE_PROVIDER_DOWN_FOR_S": "0.5",
            "KEYGATE_PROVIDER_PROBE_INTERVAL_S": "0.5",
            "COLUMNS": "250",
            "NO_COLOR": "1",
        }
    )
    c = Custodian(env, tmp_path)
    c.ok("init")
    c.ok("tenant", "add", TENANT, "--name", "千代田区")
    c.ok("key", "create", TENANT, "resident")
    return c


def test_set_show_test_migrate_finish(custodian: Custodian, kms: Callable[[str], Any]) -> None:
    sakura, gcp = kms("sakura"), kms("gcp")
    first = sakura.create_key(f"cli-{os.getpid()}")
    second = gcp.create_key(f"cli-{os.getpid()}")

    assert "no provider keys" in custodian.ok("provider", "show")
    out = custodian.ok("provider", "set", TENANT, "resident", first)
    assert first in out
    report = custodian.ok("provider", "test", TENANT, "resident")
    assert "round_trip" in report and "residency" in report and "is healthy" in report
    # set again is refused: a change of provider is a migration
    again = custodian.run("provider", "set", TENANT, "resident", second)
    assert again.returncode == EX_USAGE
    assert "keygate provider migrate" in again.stderr

    custodian.ok("provider", "migrate", TENANT, "resident", "--to", second)
    shown = custodian.ok("provider", "show", TENANT)
    assert "decrypt-only │ tk1a" in shown or "decrypt-only" in shown
    assert second in shown and first in shown
    custodian.ok("provider", "migrate", TENANT, "resident", "--finish")
    shown = custodian.ok("provider", "show", TENANT, "resident")
    assert "retired" in shown

    both = custodian.run("provider", "migrate", TENANT, "resident")
    assert both.returncode != 0
    assert "exactly one of --to URI and --finish" in both.stderr


def test_refusals_have_clear_errors_and_exit_codes(
    custodian: Custodian, kms: Callable[[str], Any]
) -> None:
    sakura = kms("sakura")
    cases = [
        (sakura.create_key("abroad", region="us1a"), EX_NOPERM, "not an allowed location"),
        ("nope-kms://x/y", EX_USAGE, "unknown provider key scheme"),
        ("sakura-kms://is1a/not-a-number", EX_USAGE, "sakura"),
        ("aws-kms://arn:aws:kms:us-east-1:111122223333:key/x", EX_USAGE, ""),
    ]
    for uri, code, words in cases:
        done = custodian.run("provider", "set", TENANT, "resident", uri)
        assert done.returncode in (code, EX_USAGE, EX_NOPERM), (uri, done.stderr)
        assert "Traceback" not in done.stderr
        assert words.lower() in done.stderr.lower(), (uri, done.stderr)
    disabled = sakura.create_key("off")
    sakura.set_key_enabled(disabled, False)
    done = custodian.run("provider", "set", TENANT, "resident", disabled)
    assert done.returncode != 0
    assert "KEY_NOT_USABLE" in done.stderr
    assert custodian.ok("provider", "show").strip().startswith("no provider keys")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(custodian: Custodian) -> Iterator[tuple[str, str]]:
    token = custodian.ok("token", "add", "app", "-t", TENANT, "-p", "*", "-o", "*").strip()
    token = token.splitlines()[-1]
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keygate.cli.main", "serve", "--port", str(port), "--workers", "1"],
        env=custodian.env,
        cwd=custodian.home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url, token
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_running_gateway_reports_the_provider_outage(
    custodian: Custodian, served: tuple[str, str], kms: Callable[[str], Any]
) -> None:
    url, token = served
    sakura = kms("sakura")
    uri = sakura.create_key(f"serve-{os.getpid()}")
    custodian.ok("provider", "set", TENANT, "resident", uri)
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        _outage(url, uri, client, sakura)


def _outage(url: str, uri: str, client: httpx.Client, sakura: Any) -> None:
    body = {
        "tenant": TENANT,
        "purpose": "resident",
        "context": {"record_id": "R-1"},
        "plaintext": base64.b64encode(b"yamada taro").decode(),
    }
    deadline = time.monotonic() + 30
    while True:  # the gateway picks the provider key up within its refresh interval
        r = client.post("/v1/encrypt", json=body)
        if r.status_code == 503 and "key configuration changed" in r.text:
            # the change landed during this request: the gateway says retry, as a client would
            assert "Retry-After" in r.headers
            assert time.monotonic() < deadline
            continue
        assert r.status_code == 200, r.text
        if "sakura-kms" in base64.urlsafe_b64decode(r.json()["ciphertext"][4:] + "==").decode(
            "latin-1"
        ):
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    ct = r.json()["ciphertext"]
    ready = httpx.get(url + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text

    sakura.fault("down")
    try:
        deadline = time.monotonic() + 30
        while True:
            ready = httpx.get(url + "/readyz", timeout=10)
            if ready.status_code == 503:
                break
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.3)
        assert f"provider {uri}" in ready.text
        refused = client.post("/v1/encrypt", json=body)
        assert refused.status_code == 503
        assert refused.json()["code"] == "UNAVAILABLE"
        assert "Retry-After" in refused.headers
        # decrypt goes on from the DEK cache
        back = client.post(
            "/v1/decrypt",
            json={
                "tenant": TENANT,
                "purpose": "resident",
                "context": {"record_id": "R-1"},
                "ciphertext": ct,
            },
        )
        assert back.status_code == 200, back.text
        assert base64.b64decode(back.json()["plaintext"]) == b"yamada taro"
    finally:
        sakura.fault(None)
    deadline = time.monotonic() + 30
    while httpx.get(url + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert client.post("/v1/encrypt", json=body).status_code == 200
