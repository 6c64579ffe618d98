"""Dual control from the real CLI, in subprocesses, as custodians use it.

One custodian environment per module (its own SoftHSM token, data directory and PIN file);
the tests run in order on it: enrolment (two directly, then by request, one of them with a key
on a PKCS#11 token of their own), refused direct commands, requests and approvals, refusals,
key destruction, concurrent approvals, and finally the no-secrets check over everything printed
and the exported audit trail.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from keygate.custody.store import destructions_table
from keygate.hsm.pkcs11 import Pkcs11Hsm
from keygate.hsm.softhsm import SoftHsmToken

REPO = Path(__file__).resolve().parents[2]
TENANT = "131016"
EXIT_USAGE, EXIT_NOINPUT, EXIT_NOPERM = 64, 66, 77
PASSPHRASES = {"alice": "alice-パスフレーズ-7Qx", "bob": "bob-passphrase-Zr4", "carol": "carol-9Kp"}


@dataclass
class Cli:
    env: dict[str, str]
    home: Path
    token: SoftHsmToken
    card: SoftHsmToken
    card_pin_file: Path
    #: every stdout and stderr the commands printed
    printed: list[str] = field(default_factory=list)
    app_token: str = ""
    #: tokens `request add-token` showed (once, on purpose)
    shown_tokens: list[str] = field(default_factory=list)

    def run(
        self, *args: str, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "keygate.cli.main", *args],
            env={**self.env, **(extra_env or {})},
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.printed += [done.stdout, done.stderr]
        return done

    def ok(
        self, *args: str, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = self.run(*args, extra_env=extra_env)
        assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
        return done

    def key(self, name: str) -> list[str]:
        """Signing options of custodian ``name``."""
        if name == "dave":
            return ["--as", "dave", "--pkcs11-label", "custodian/dave", "--pkcs11-token",
                    self.card.label, "--pin-file", str(self.card_pin_file)]  # fmt: skip
        return ["--as", name, "--key", str(self.home / f"{name}.pem"),
                "--passphrase-file", str(self.home / f"{name}.pass")]  # fmt: skip

    def request(self, *args: str, by: str = "alice") -> str:
        done = self.ok("request", *args, *self.key(by))
        request_id = done.stdout.splitlines()[0]
        assert request_id.startswith("kgr-"), done.stdout
        return request_id

    def approve(self, request_id: str, by: str) -> subprocess.CompletedProcess[str]:
        return self.run("approve", request_id, *self.key(by))


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["COLUMNS"] = "200"
    env["NO_COLOR"] = "1"
    return env


@pytest.fixture(scope="module")
def cli(make_token: Callable[[str], SoftHsmToken], tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """Initialised, with tenant 131016, a resident key, an application identity, custodians
    alice and bob (enrolled directly: dual control on) and carol and dave (by request)."""
    token = make_token("kg-cust-cli")
    card = make_token("kg-cust-card")
    home = tmp_path_factory.mktemp("custody-cli")
    pin_file = home / "hsm-pin"
    pin_file.write_text(token.user_pin + "\n", encoding="utf-8")
    pin_file.chmod(0o600)
    card_pin_file = home / "card-pin"
    card_pin_file.write_text(card.user_pin + "\n", encoding="utf-8")
    card_pin_file.chmod(0o600)
    env = {
        **_base_env(),
        **token.env,
        "KEYGATE_DATA_DIR": str(home / "data"),
        "KEYGATE_HSM_TOKEN_LABEL": token.label,
        "KEYGATE_HSM_PIN_FILE": str(pin_file),
        "KEYGATE_ACTOR": "custodian:cli-tests",
    }
    c = Cli(env, home, token, card, card_pin_file)
    c.ok("init")
    c.ok("tenant", "add", TENANT, "--name", "千代田区")
    c.ok("key", "create", TENANT, "resident")
    c.ok("key", "create", TENANT, "tax")
    c.app_token = c.ok(
        "token", "add", "juki-app", "-t", TENANT, "-p", "*", "-o", "encrypt", "-o", "decrypt"
    ).stdout.strip()

    for name, passphrase in PASSPHRASES.items():
        (home / f"{name}.pass").write_text(passphrase + "\n", encoding="utf-8")
    # alice and carol: passphrase from a file; bob: from the environment
    for name in PASSPHRASES:
        options = ["--passphrase-file", str(home / f"{name}.pass")] if name != "bob" else []
        pub = c.ok(
            "custodian", "keygen", name, "--out", str(home / f"{name}.pem"), *options,
            extra_env={"KEYGATE_CUSTODIAN_PASSPHRASE": PASSPHRASES["bob"]} if name == "bob"
            else None,
        )  # fmt: skip
        assert pub.stdout.startswith("-----BEGIN PUBLIC KEY-----") and "fingerprint" in pub.stderr
        (home / f"{name}.pub").write_text(pub.stdout, encoding="ascii")
    return c


@pytest.fixture(scope="module")
def enrolled(cli: Cli) -> Cli:
    """alice and bob enrolled directly; carol and dave by approved requests."""
    done = cli.ok("custodian", "add", "alice", "--public-key", str(cli.home / "alice.pub"))
    assert "bootstrap" in done.stdout
    done = cli.ok("custodian", "add", "bob", "--public-key", str(cli.home / "bob.pub"))
    assert "dual control is on" in done.stdout

    rid = cli.request("add-custodian", "carol", "--public-key", str(cli.home / "carol.pub"))
    assert "executed" in cli.approve(rid, "bob").stdout

    pub = cli.ok(
        "custodian", "keygen", "dave", "--pkcs11-label", "custodian/dave", "--pkcs11-token",
        cli.card.label, "--pin-file", str(cli.card_pin_file),
    )  # fmt: skip
    assert "BEGIN PUBLIC KEY" in pub.stdout and "ecdsa-p256" in pub.stderr
    (cli.home / "dave.pub").write_text(pub.stdout, encoding="ascii")
    rid = cli.request("add-custodian", "dave", "--public-key", str(cli.home / "dave.pub"))
    assert "executed" in cli.approve(rid, "carol").stdout
    listing = cli.ok("custodian", "list").stdout
    for name in ("alice", "bob", "carol", "dave", "ecdsa-p256", "dual control is on"):
        assert name in listing, name
    return cli


def test_keygen_writes_protected_key_files(cli: Cli) -> None:
    """keygen writes 0600 passphrase-protected PEM files, prints only the public key, and
    never overwrites an existing key file."""
    for name in PASSPHRASES:
        path = cli.home / f"{name}.pem"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    again = cli.run(
        "custodian", "keygen", "alice", "--out", str(cli.home / "alice.pem"),
        "--passphrase-file", str(cli.home / "alice.pass"),
    )  # fmt: skip
    assert again.returncode == EXIT_USAGE and "never overwrites" in again.stderr
    unprotected = cli.run("custodian", "keygen", "x", "--out", str(cli.home / "x.pem"))
    assert unprotected.returncode != 0 and "passphrase is needed" in unprotected.stderr
    assert not (cli.home / "x.pem").exists()


def test_direct_sensitive_commands_are_refused(enrolled: Cli) -> None:
    """With dual control on, tenant disable, token revoke/add and custodian add/remove refuse
    (exit 77) and name the request to make instead; key disable stays direct."""
    cases = [
        (("tenant", "disable", TENANT), f"keygate request disable-tenant {TENANT}"),
        (("tenant", "enable", TENANT), f"keygate request enable-tenant {TENANT}"),
        (("token", "revoke", "juki-app"), "keygate request revoke-token juki-app"),
        (("token", "add", "x-app", "-t", TENANT, "-p", "tax", "-o", "encrypt"),
         "keygate request add-token x-app"),
        (("custodian", "add", "eve", "--public-key", str(enrolled.home / "alice.pub")),
         "keygate request add-custodian eve"),
        (("custodian", "remove", "bob"), "keygate request remove-custodian bob"),
    ]  # fmt: skip
    for args, hint in cases:
        done = enrolled.run(*args)
        assert done.returncode == EXIT_NOPERM, (args, done.stdout, done.stderr)
        assert "FORBIDDEN" in done.stderr and hint in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    enrolled.ok("key", "disable", TENANT, "tax", "1")
    enrolled.ok("key", "enable", TENANT, "tax", "1")


def test_request_and_approve(enrolled: Cli) -> None:
    """A signed request waits for one more approval, shows in the lists, and executes on it;
    a custodian with a PKCS#11 key requests the reverse, approved by another."""
    rid = enrolled.request("disable-tenant", TENANT, "--reason", "incident 2026-11-22")
    pending = enrolled.ok("requests", "list", "--pending").stdout
    assert rid in pending and f"disable tenant {TENANT}" in pending and "1/2" in pending
    shown = enrolled.ok("requests", "show", rid).stdout
    assert "1 valid of 2" in shown and "incident 2026-11-22" in shown and "alice" in shown
    done = enrolled.approve(rid, "bob")
    assert done.returncode == 0 and "executed" in done.stdout, done.stderr
    assert "no" in next(
        line for line in enrolled.ok("tenant", "list").stdout.splitlines() if TENANT in line
    )
    assert rid not in enrolled.ok("requests", "list", "--pending").stdout

    rid = enrolled.request("submit", "enable-tenant", "--param", f"tenant={TENANT}", by="dave")
    assert "executed" in enrolled.approve(rid, "carol").stdout
    assert "yes" in next(
        line for line in enrolled.ok("tenant", "list").stdout.splitlines() if TENANT in line
    )


def test_add_token_by_request(enrolled: Cli) -> None:
    """request add-token prints the id, then the new token (line 2); the token works only
    after the approval."""
    done = enrolled.ok(
        "request", "add-token", "zei-app", "-t", TENANT, "-p", "tax", "-o", "encrypt",
        *enrolled.key("carol"),
    )  # fmt: skip
    rid, token = done.stdout.splitlines()
    assert token.startswith("kgt_") and token not in done.stderr
    enrolled.shown_tokens.append(token)
    assert "zei-app" in enrolled.ok("requests", "show", rid).stdout
    assert "zei-app" not in enrolled.ok("token", "list").stdout
    assert "executed" in enrolled.approve(rid, "alice").stdout
    assert "zei-app" in enrolled.ok("token", "list").stdout


def test_refused_approvals(enrolled: Cli) -> None:
    """Another custodian's key, the same custodian twice, a wrong passphrase, an unknown
    request and approvals after a veto are refused with clear errors and exit codes."""
    rid = enrolled.request("revoke-token", "juki-app")
    alice_key = ["--key", str(enrolled.home / "alice.pem"),
                 "--passphrase-file", str(enrolled.home / "alice.pass")]  # fmt: skip
    forged = enrolled.run("approve", rid, "--as", "carol", *alice_key)
    assert forged.returncode == EXIT_NOPERM and "does not verify" in forged.stderr
    twice = enrolled.approve(rid, "alice")
    assert twice.returncode == EXIT_USAGE and "already decided" in twice.stderr
    wrong = enrolled.run(
        "approve", rid, "--as", "bob", "--key", str(enrolled.home / "bob.pem"),
        extra_env={"KEYGATE_CUSTODIAN_PASSPHRASE": "not bob's passphrase"},
    )  # fmt: skip
    assert wrong.returncode == EXIT_USAGE and "wrong passphrase" in wrong.stderr
    unknown = enrolled.approve("kgr-0000000000000000", "bob")
    assert unknown.returncode == EXIT_NOINPUT and "NOT_FOUND" in unknown.stderr

    veto = enrolled.run("reject", rid, *enrolled.key("bob"))
    assert veto.returncode == 0 and "rejected" in veto.stdout
    late = enrolled.approve(rid, "carol")
    assert late.returncode == EXIT_USAGE and "rejected" in late.stderr
    assert "rejected" in enrolled.ok("requests", "show", rid).stdout


def _label(cli: Cli, version: int) -> str:
    line = next(
        line
        for line in cli.ok("key", "list", TENANT).stdout.splitlines()
        if "resident" in line and f" {version} " in line
    )
    return next(word for word in line.split() if word.startswith("kg/"))


def test_destroy_key(enrolled: Cli) -> None:
    """destroy-key: refused for the active version; approved, v1 is disabled and cannot be
    enabled; nothing is due for 7 days; after the waiting period destroy-due destroys the HSM
    object and the registry shows v1 destroyed."""
    active = enrolled.run("request", "destroy-key", TENANT, "resident", "1", *enrolled.key("alice"))
    assert active.returncode == EXIT_USAGE and "active version" in active.stderr
    enrolled.ok("key", "rotate", TENANT, "resident")
    label = _label(enrolled, 1)
    rid = enrolled.request("destroy-key", TENANT, "resident", "1")
    done = enrolled.approve(rid, "dave")
    assert done.returncode == 0 and "executed" in done.stdout and "due_at" in done.stdout
    listing = enrolled.ok("key", "destructions").stdout
    assert rid in listing and "scheduled" in listing
    assert "disabled" in next(
        line for line in enrolled.ok("key", "list", TENANT).stdout.splitlines() if label in line
    )
    enable = enrolled.run("key", "enable", TENANT, "resident", "1")
    assert enable.returncode == EXIT_NOPERM and f"cancel-destruction {rid}" in enable.stderr
    assert "no key destruction is due" in enrolled.ok("key", "destroy-due").stdout

    # Seven days pass (the database row is moved back instead of the clock forward).
    engine = sa.create_engine(f"sqlite:///{enrolled.home / 'data' / 'keygate.db'}")
    with engine.begin() as conn:
        conn.execute(
            sa.update(destructions_table)
            .where(destructions_table.c.request_id == rid)
            .values(due_at=datetime(2026, 1, 1, tzinfo=UTC))
        )
    engine.dispose()
    done = enrolled.ok("key", "destroy-due")
    assert "destroyed" in done.stdout and label in done.stdout
    assert "destroyed" in next(
        line for line in enrolled.ok("key", "list", TENANT).stdout.splitlines() if label in line
    )
    hsm = Pkcs11Hsm(enrolled.token.hsm_config())
    try:
        assert not hsm.kek_exists(label)
        assert hsm.kek_exists(_label(enrolled, 2))
    finally:
        hsm.close()
    again = enrolled.run("request", "destroy-key", TENANT, "resident", "1", *enrolled.key("bob"))
    assert again.returncode == EXIT_USAGE and "already destroyed" in again.stderr


@pytest.mark.slow
def test_concurrent_approvals_from_two_processes(enrolled: Cli) -> None:
    """bob and carol approve the same request at once: it executes once, the other is told."""
    rid = enrolled.request("disable-tenant", TENANT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "keygate.cli.main", "approve", rid, *enrolled.key(name)],
            env=enrolled.env,
            cwd=enrolled.home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("bob", "carol")
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        enrolled.printed += [out, err]
        results.append((proc.returncode, out, err))
    winners = [r for r in results if r[0] == 0 and "executed" in r[1]]
    losers = [r for r in results if r[0] == EXIT_USAGE]
    assert len(winners) == 1 and len(losers) == 1, results
    assert "is executing" in losers[0][2] or "is executed" in losers[0][2]
    rid = enrolled.request("enable-tenant", TENANT)
    assert "executed" in enrolled.approve(rid, "bob").stdout


def test_no_secrets_anywhere(enrolled: Cli) -> None:
    """No passphrase, PIN, private key or application token appears in anything the CLI
    printed or in the exported audit trail; the trail holds the signed approvals."""
    export = enrolled.home / "trail.jsonl"
    enrolled.ok("audit", "export", "--output", str(export))
    trail = export.read_text(encoding="utf-8")
    for action in ("custody.requested", "custody.approved", "custody.rejected",
                   "custody.executed", "custodian.added", "key.destruction_scheduled",
                   "key.destroyed"):  # fmt: skip
        assert f'"{action}"' in trail, action
    assert '"signature"' in trail
    key = enrolled.ok("audit", "public-key").stdout
    (enrolled.home / "audit-key.pem").write_text(key, encoding="ascii")
    verified = enrolled.ok(
        "audit", "verify", str(export), "--public-key", str(enrolled.home / "audit-key.pem")
    )
    assert "OK" in verified.stdout

    # Tokens are shown once, on purpose, by `token add` and `request add-token`: only the
    # trail is checked for them.
    secrets = [*PASSPHRASES.values(), "not bob's passphrase", enrolled.token.user_pin,
               enrolled.card.user_pin]  # fmt: skip
    from keygate.custody.credentials import Ed25519FileSigner

    for name, passphrase in PASSPHRASES.items():
        body = "".join(
            line
            for line in (enrolled.home / f"{name}.pem").read_text().splitlines()
            if not line.startswith("-----")
        )
        secrets += [body[:40], body[-40:]]
        signer = Ed25519FileSigner(enrolled.home / f"{name}.pem", passphrase.encode("utf-8"))
        raw = signer._key.private_bytes_raw()
        secrets += [raw.hex(), base64.b64encode(raw).decode()]
    printed = "\n".join(enrolled.printed)
    for secret in secrets:
        assert secret not in printed, secret[:6]
        assert secret not in trail, secret[:6]
    assert enrolled.shown_tokens
    for token in [enrolled.app_token, *enrolled.shown_tokens]:
        assert token not in trail
