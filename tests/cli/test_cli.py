"""The real ``keygate`` CLI in subprocesses: custodian commands, ``serve`` and ``demo``.

Every command runs as ``python -m keygate.cli.main …`` with the environment a custodian would set:
KEYGATE_DATA_DIR, KEYGATE_HSM_TOKEN_LABEL, KEYGATE_HSM_PIN_FILE (mode 0600) and SOFTHSM2_CONF
pointing at a SoftHSM token of this module's own.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from keygate.hsm.softhsm import SoftHsmToken

REPO = Path(__file__).resolve().parents[2]
TENANT = "131016"
EXIT_USAGE = 64
EXIT_NOINPUT = 66


@dataclass
class Cli:
    env: dict[str, str]
    data_dir: Path
    token: SoftHsmToken

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``keygate args…`` and return the finished process (never raises on exit codes)."""
        return subprocess.run(
            [sys.executable, "-m", "keygate.cli.main", *args],
            env=self.env,
            cwd=self.data_dir.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a command that must succeed."""
        done = self.run(*args)
        assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
        return done


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["COLUMNS"] = "200"  # rich tables and messages unwrapped
    env["NO_COLOR"] = "1"
    return env


@pytest.fixture(scope="module")
def cli(make_token: Callable[[str], SoftHsmToken], tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """A custodian environment: its own token, data directory and PIN file; initialised."""
    token = make_token("kg-cli")
    home = tmp_path_factory.mktemp("cli")
    pin_file = home / "hsm-pin"
    pin_file.write_text(token.user_pin + "\n", encoding="utf-8")
    pin_file.chmod(0o600)
    env = {
        **_base_env(),
        **token.env,
        "KEYGATE_DATA_DIR": str(home / "data"),
        "KEYGATE_HSM_TOKEN_LABEL": token.label,
        "KEYGATE_HSM_PIN_FILE": str(pin_file),
        "KEYGATE_ACTOR": "custodian:cli-tests",
    }
    c = Cli(env, home / "data", token)
    done = c.ok("init")
    assert "ok" in done.stdout and token.label in done.stdout
    c.ok("tenant", "add", TENANT, "--name", "千代田区")
    return c


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_tenant_add_and_list(cli: Cli) -> None:
    """Tenants are added (LG code or slug) and listed with their names and kinds."""
    done = cli.ok("tenant", "add", "digital-agency", "--name", "デジタル庁")
    assert "digital-agency" in done.stdout
    listing = cli.ok("tenant", "list").stdout
    for text in ("131016", "千代田区", "digital-agency", "デジタル庁", "lgcode", "slug"):
        assert text in listing, text


def test_tenant_add_invalid_check_digit(cli: Cli) -> None:
    """A bad check digit exits 64 with a one-line error and no traceback; --verbose adds one."""
    done = cli.run("tenant", "add", "131017")
    assert done.returncode == EXIT_USAGE, (done.stdout, done.stderr)
    assert done.stdout == ""
    lines = _error_lines(done.stderr)
    assert "Traceback" not in done.stderr
    assert lines and "INVALID_TENANT" in lines[0] and "check digit" in lines[0]
    assert all("INVALID_TENANT" not in line for line in lines[1:])
    assert len(lines) <= 2  # the error, and a hint about --verbose

    verbose = cli.run("--verbose", "tenant", "add", "131017")
    assert verbose.returncode == EXIT_USAGE
    assert "Traceback" in verbose.stderr
    assert "INVALID_TENANT" in verbose.stderr


def test_unknown_tenant_exits_66(cli: Cli) -> None:
    """Creating a key for a valid but unregistered tenant exits 66 (EX_NOINPUT)."""
    done = cli.run("key", "create", "281000", "resident")
    assert done.returncode == EXIT_NOINPUT, (done.stdout, done.stderr)
    assert "NOT_FOUND" in done.stderr
    assert "Traceback" not in done.stderr


def test_key_life_cycle(cli: Cli) -> None:
    """Keys are created, rotated, listed, disabled and enabled again from the CLI."""
    done = cli.ok("key", "create", TENANT, "resident")
    assert "v1" in done.stdout
    done = cli.ok("key", "rotate", TENANT, "resident")
    assert "v2" in done.stdout

    listing = cli.ok("key", "list", TENANT).stdout
    rows = [line for line in listing.splitlines() if TENANT in line and "resident" in line]
    assert len(rows) == 2
    assert "decrypt-only" in rows[0] and "active" in rows[1]

    done = cli.ok("key", "disable", TENANT, "resident", "1")
    assert "disabled" in done.stdout
    done = cli.ok("key", "enable", TENANT, "resident", "1")
    assert "decrypt-only" in done.stdout  # enabling never demotes the active v2


def test_token_add_list_revoke(cli: Cli) -> None:
    """``token add`` prints the token as the only stdout line; revoke marks the identity; list
    never shows a token."""
    done = cli.ok(
        "token", "add", "juki-app", "-t", TENANT, "-p", "resident", "-p", "tax", "-o", "encrypt",
        "-o", "decrypt", "-r", "resident",
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    token = lines[0]
    assert token.startswith("kgt_") and len(token) > 40
    assert token not in done.stderr

    cli.ok("token", "revoke", "juki-app")
    listing = cli.ok("token", "list").stdout
    assert token not in listing and token.removeprefix("kgt_") not in listing
    row = next(line for line in listing.splitlines() if "juki-app" in line)
    assert "20" in row.split("juki-app", 1)[1]  # a revocation timestamp

    bad = cli.run("token", "add", "bad-ops", "-t", TENANT, "-p", "*", "-o", "delete")
    assert bad.returncode == EXIT_USAGE
    assert bad.stdout == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(cli: Cli) -> Iterator[str]:
    """``keygate serve`` with two workers on a free port; stopped by its PID afterwards."""
    port = _free_port()
    log = (cli.data_dir.parent / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "keygate.cli.main", "serve", "--port", str(port), "--workers", "2"],
        env=cli.env,
        cwd=cli.data_dir.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (cli.data_dir.parent / "serve.log").read_text()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "keygate serve did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers (its own group)
            proc.wait()
        log.close()


def _encrypt(client: httpx.Client) -> httpx.Response:
    body = {"tenant": TENANT, "purpose": "tax", "plaintext": base64.b64encode(b"cli").decode()}
    return client.post("/v1/encrypt", json=body)


def _until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``condition`` held for 8 calls in a row (both workers), or fail."""
    start = time.monotonic()
    streak = 0
    while streak < 8:
        streak = streak + 1 if condition() else 0
        assert time.monotonic() - start < timeout, "not within the expected time"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.slow
def test_serve_picks_up_rotation_and_revocation(cli: Cli, server: str) -> None:
    """A running two-worker gateway encrypts under a key rotated by the CLI and refuses a token
    revoked by the CLI within seconds, without a restart."""
    cli.ok("key", "create", TENANT, "tax")
    token = cli.ok(
        "token", "add", "serve-app", "-t", TENANT, "-p", "tax", "-o", "encrypt", "-o", "decrypt"
    ).stdout.strip()
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {token}"}) as client:
        _until(lambda: _encrypt(client).status_code == 200, 10)
        first = _encrypt(client).json()["key_version"]

        cli.ok("key", "rotate", TENANT, "tax")
        _until(lambda: _encrypt(client).json().get("key_version") == first + 1, 10)

        cli.ok("token", "revoke", "serve-app")
        _until(lambda: _encrypt(client).status_code == 401, 10)
        r = _encrypt(client)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "UNAUTHENTICATED"

    metrics = httpx.get(server + "/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "keygate_http_requests_total" in metrics.text
    assert "keygate_hsm_calls_total{" in metrics.text


@pytest.mark.slow
def test_demo(tmp_path: Path) -> None:
    """``keygate demo --records 50`` runs the whole story over HTTP and exits 0."""
    directory = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "keygate.cli.main", "demo", "--records", "50",
         "--directory", str(directory)],
        env=_base_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    for step in ("1.", "2.", "3.", "4.", "5.", "6.", "7.", "8."):
        assert any(line.lstrip().startswith(step) for line in done.stdout.splitlines()), step
    assert "demo finished" in done.stdout
    assert (directory / "audit.jsonl").is_file()
