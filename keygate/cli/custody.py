"""Dual-control commands: ``keygate custodian …``, ``request …``, ``requests …``, ``approve``,
``reject``, ``key destroy-due`` and ``key destructions``.

Registered on the main app by :func:`register` (``keygate.cli.main`` passes its helpers in, so
this module never imports it: ``python -m keygate.cli.main`` would otherwise load it twice).

Custodian credentials:
  ``--key FILE``          an Ed25519 key file (``keygate custodian keygen NAME --out FILE``);
                          its passphrase from ``--passphrase-file``, else
                          ``KEYGATE_CUSTODIAN_PASSPHRASE``, else a prompt on a terminal
  ``--pkcs11-label L``    an ECDSA P-256 key on a PKCS#11 token (``--pkcs11-token``, the token
                          label; ``--pkcs11-module``, default: the gateway's HSM module); the
                          PIN from ``--pin-file``, else ``KEYGATE_CUSTODIAN_PIN``, else a prompt
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from keygate.core.errors import InvalidRequest

__all__ = ["register"]

custodian_app = typer.Typer(
    help="Key custodians (dual control): their keys, enrolment and removal.", no_args_is_help=True
)
request_app = typer.Typer(
    help="Ask for a sensitive change; it runs once M custodians have approved it.",
    no_args_is_help=True,
)
requests_app = typer.Typer(help="Dual-control requests: list and show.", no_args_is_help=True)


@dataclass
class _Helpers:
    run: Callable[[Callable[[Any], Any]], Any]
    actor: Callable[[], str]
    errors: Callable[[], contextlib.AbstractContextManager[None]]
    fail: Callable[[BaseException], typer.Exit]
    out: Any
    err: Any
    exit_codes: dict[str, int]


_h: _Helpers | None = None


def _helpers() -> _Helpers:
    if _h is None:  # pragma: no cover - register() runs when keygate.cli.main is imported
        raise RuntimeError("keygate.cli.custody.register() was not called")
    return _h


def register(
    app: typer.Typer,
    key_app: typer.Typer,
    *,
    run: Callable[[Callable[[Any], Any]], Any],
    actor: Callable[[], str],
    errors: Callable[[], contextlib.AbstractContextManager[None]],
    fail: Callable[[BaseException], typer.Exit],
    out: Any,
    err: Any,
    exit_codes: dict[str, int],
) -> None:
    """Add the dual-control commands to ``app`` (and ``key destroy-due``/``destructions``)."""
    global _h  # noqa: PLW0603 - one CLI per process
    _h = _Helpers(run, actor, errors, fail, out, err, exit_codes)
    app.add_typer(custodian_app, name="custodian")
    app.add_typer(request_app, name="request")
    app.add_typer(requests_app, name="requests")
    app.command("approve")(approve)
    app.command("reject")(reject)
    key_app.command("destroy-due")(key_destroy_due)
    key_app.command("destructions")(key_destructions)


# ---------------------------------------------------------------------- secrets from the user
def _secret(
    file: Path | None, env: str, prompt: str, *, confirm: bool = False, what: str
) -> bytes | None:
    """A passphrase or PIN: from ``file`` (first line), else ``$env``, else a terminal prompt;
    None when none is available (not on a terminal)."""
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidRequest(f"cannot read the {what} file {file}: {exc.strerror}") from None
        value = text.splitlines()[0] if text else ""
        if not value:
            raise InvalidRequest(f"the {what} file {file} is empty")
        return value.encode("utf-8")
    from_env = os.environ.get(env)
    if from_env:
        return from_env.encode("utf-8")
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass(prompt)
        if confirm and getpass.getpass("again: ") != first:
            raise InvalidRequest(f"the two {what}s differ")
        if not first:
            raise InvalidRequest(f"empty {what}")
        return first.encode("utf-8")
    return None


def _custodian_hsm(module: str | None, token: str | None, pin_file: Path | None) -> Any:
    """A PKCS#11 session on a custodian's token (closed by the caller)."""
    if not token:
        raise InvalidRequest("--pkcs11-label needs --pkcs11-token (the token's label)")
    from keygate.config import load_settings
    from keygate.hsm.pkcs11 import HsmConfig, Pkcs11Hsm
    from keygate.hsm.softhsm import find_softhsm_module

    pin = _secret(pin_file, "KEYGATE_CUSTODIAN_PIN", f"PIN of token {token}: ", what="PIN")
    if pin is None:
        raise InvalidRequest("the token's PIN is needed: --pin-file FILE or KEYGATE_CUSTODIAN_PIN")
    path = module or load_settings().hsm_module or find_softhsm_module()
    return Pkcs11Hsm(HsmConfig(module_path=path, token_label=token, pin=pin.decode("utf-8")))


@contextlib.contextmanager
def _signer(
    key: Path | None,
    label: str | None,
    token: str | None,
    module: str | None,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> Iterator[Any]:
    """The custodian's signer from ``--key`` or ``--pkcs11-label``."""
    from keygate.custody.credentials import (
        Ed25519FileSigner,
        Pkcs11Signer,
        key_file_is_encrypted,
    )

    if (key is None) == (label is None):
        raise InvalidRequest("give exactly one of --key FILE and --pkcs11-label LABEL")
    if key is not None:
        passphrase = None
        if key_file_is_encrypted(key):
            passphrase = _secret(
                passphrase_file,
                "KEYGATE_CUSTODIAN_PASSPHRASE",
                f"passphrase of {key}: ",
                what="passphrase",
            )
            if passphrase is None:
                raise InvalidRequest(
                    f"{key} is passphrase-protected: --passphrase-file FILE or "
                    "KEYGATE_CUSTODIAN_PASSPHRASE"
                )
        yield Ed25519FileSigner(key, passphrase)
        return
    assert label is not None  # noqa: S101 - checked above
    hsm = _custodian_hsm(module, token, pin_file)
    try:
        yield Pkcs11Signer(hsm, label)
    finally:
        hsm.close()


def _custody(gw: Any) -> Any:
    from keygate.config import load_settings
    from keygate.custody.service import Custody

    return Custody.from_settings(gw, load_settings())


def _when(dt: Any) -> str:
    """``2026-11-22 09:00:00Z`` (UTC), or empty."""
    if dt is None:
        return ""
    return str(dt.strftime("%Y-%m-%d %H:%M:%SZ"))


# common options
AsOpt = Annotated[
    str | None, typer.Option("--as", help="Your custodian name (you sign as this custodian).")
]
KeyOpt = Annotated[Path | None, typer.Option("--key", help="Your Ed25519 key file (PEM).")]
LabelOpt = Annotated[
    str | None, typer.Option("--pkcs11-label", help="Your ECDSA P-256 key's label on a token.")
]
TokenOpt = Annotated[
    str | None, typer.Option("--pkcs11-token", help="The label of the token holding your key.")
]
ModuleOpt = Annotated[
    str | None, typer.Option("--pkcs11-module", help="PKCS#11 module (default: the gateway's).")
]
PassOpt = Annotated[
    Path | None,
    typer.Option(help="File whose first line is the key file's passphrase."),
]
PinOpt = Annotated[Path | None, typer.Option(help="File whose first line is the token's PIN.")]
ReasonOpt = Annotated[
    str | None, typer.Option(help="Why (signed with the request, shown to approvers).")
]


# ---------------------------------------------------------------------- custodians
@custodian_app.command("keygen")
def custodian_keygen(
    name: Annotated[str, typer.Argument(help="The custodian's name, e.g. yamada.")],
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="Write an Ed25519 private key here (0600, never overwritten)."),
    ] = None,
    pkcs11_label: Annotated[
        str | None,
        typer.Option("--pkcs11-label", help="Instead: make an ECDSA P-256 key on a token."),
    ] = None,
    pkcs11_token: TokenOpt = None,
    pkcs11_module: ModuleOpt = None,
    passphrase_file: PassOpt = None,
    no_passphrase: Annotated[
        bool, typer.Option(help="Leave the key file unencrypted (not recommended).")
    ] = False,
    pin_file: PinOpt = None,
) -> None:
    """Make a custodian key; prints its public key (PEM) for `keygate custodian add`."""
    h = _helpers()
    from keygate.custody.actions import validate_custodian_name
    from keygate.custody.credentials import generate_ed25519_file, generate_pkcs11_key

    with h.errors():
        validate_custodian_name(name)
        if (out_file is None) == (pkcs11_label is None):
            raise InvalidRequest("give exactly one of --out FILE and --pkcs11-label LABEL")
        if out_file is not None:
            passphrase = None
            if not no_passphrase:
                passphrase = _secret(
                    passphrase_file,
                    "KEYGATE_CUSTODIAN_PASSPHRASE",
                    f"passphrase for {out_file}: ",
                    confirm=True,
                    what="passphrase",
                )
                if passphrase is None:
                    raise InvalidRequest(
                        "a passphrase is needed: --passphrase-file FILE, "
                        "KEYGATE_CUSTODIAN_PASSPHRASE, or --no-passphrase"
                    )
            key = generate_ed25519_file(out_file, passphrase)
            where = f"{out_file} (mode 0600{', passphrase-protected' if passphrase else ''})"
        else:
            assert pkcs11_label is not None  # noqa: S101 - checked above
            hsm = _custodian_hsm(pkcs11_module, pkcs11_token, pin_file)
            try:
                key = generate_pkcs11_key(hsm, pkcs11_label)
            finally:
                hsm.close()
            where = f"token {pkcs11_token!r}, label {pkcs11_label!r} (not extractable)"
    h.err.print(
        f"[green]made[/] {key.algorithm} key for custodian {name} in {where}; fingerprint "
        f"{key.fingerprint}. Register the public key below: keygate custodian add {name} "
        "--public-key FILE",
        highlight=False,
    )
    sys.stdout.write(key.public_key_pem)


def _read_public_key(path: Path) -> bytes:
    if str(path) == "-":
        return sys.stdin.buffer.read(8192)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from None


@custodian_app.command("add")
def custodian_add(
    name: str,
    public_key: Annotated[
        Path, typer.Option("--public-key", help="The custodian's public key (PEM file, - = stdin).")
    ],
) -> None:
    """Enrol a custodian.  Only until dual control is on (M custodians); then use
    `keygate request add-custodian`."""
    h = _helpers()
    pem = _read_public_key(public_key)
    rec = h.run(lambda gw: _custody(gw).add_custodian(h.actor(), name, pem))
    status = h.run(lambda gw: _custody(gw).status())
    h.out.print(
        f"[green]added[/] custodian {rec.name} ({rec.algorithm}, fingerprint {rec.fingerprint})",
        highlight=False,
    )
    _print_status(status)


def _print_status(status: Any) -> None:
    h = _helpers()
    if status.active:
        h.out.print(
            f"dual control is [bold]on[/]: {status.quorum} of {status.custodians} custodians "
            "approve sensitive changes (keygate request …)",
            highlight=False,
        )
        if status.custodians <= status.quorum:
            h.err.print(
                f"[yellow]warning[/] only {status.custodians} custodians for a quorum of "
                f"{status.quorum}: one lost key blocks every dual-control change; enrol a spare",
                highlight=False,
            )
    else:
        h.out.print(
            f"bootstrap: dual control comes on when {status.quorum} custodians are enrolled "
            f"({status.custodians} now); until then direct commands work",
            highlight=False,
        )


@custodian_app.command("list")
def custodian_list() -> None:
    """List custodians (removed ones too) and whether dual control is on."""
    h = _helpers()

    def collect(gw: Any) -> tuple[list[Any], Any]:
        c = _custody(gw)
        return c.custodians(), c.status()

    rows, status = h.run(collect)
    table = Table("custodian", "algorithm", "fingerprint", "added", "added by", "removed")
    for r in rows:
        table.add_row(
            r.name,
            r.algorithm,
            r.fingerprint[:32] + "…",
            _when(r.created_at),
            r.created_by,
            _when(r.removed_at) + (f" by {r.removed_by}" if r.removed_by else ""),
        )
    h.out.print(table)
    _print_status(status)


@custodian_app.command("remove")
def custodian_remove(name: str) -> None:
    """Remove a custodian.  Only until dual control is on; then use
    `keygate request remove-custodian`."""
    h = _helpers()
    h.run(lambda gw: _custody(gw).remove_custodian(h.actor(), name))
    h.out.print(f"[yellow]removed[/] custodian {name}", highlight=False)


# ---------------------------------------------------------------------- requests
def _make_request(
    action: str,
    params: dict[str, Any],
    *,
    as_name: str | None,
    key: Path | None,
    label: str | None,
    token: str | None,
    module: str | None,
    passphrase_file: Path | None,
    pin_file: Path | None,
    reason: str | None,
) -> Any:
    h = _helpers()
    from keygate.custody.canonical import approval_message

    if reason:
        params = {**params, "reason": reason}
    signing = as_name is not None
    if not signing and (key is not None or label is not None):
        raise h.fail(ValueError("--key/--pkcs11-label sign as a custodian: give --as NAME too"))
    with h.errors(), contextlib.ExitStack() as stack:
        signer = (
            stack.enter_context(_signer(key, label, token, module, passphrase_file, pin_file))
            if signing
            else None
        )

        def run(gw: Any) -> Any:
            custody = _custody(gw)
            req = custody.new_request(h.actor(), action, params, requester=as_name)
            sig = None
            if signer is not None:
                assert as_name is not None  # noqa: S101 - signing means --as
                sig = signer.sign(approval_message(req, as_name, "approve"))
            return custody.submit(h.actor(), req, signature=sig)

        outcome = h.run(run)
    _report(outcome, made=True)
    return outcome


def _report(outcome: Any, *, made: bool = False) -> None:
    """One request's state after a call; exits non-zero if its execution failed."""
    h = _helpers()
    from keygate.custody.actions import describe

    req = outcome.request
    what = describe(req)
    if made:
        sys.stdout.write(req.id + "\n")
        sys.stdout.flush()
    lines = [f"request {req.id}: {what}", f"approvals {outcome.approvals} of {req.required}"]
    if outcome.executed:
        result = ", ".join(f"{k} {v}" for k, v in req.result.items())
        lines.append(f"[green]executed[/]{': ' + result if result else ''}")
    elif outcome.error is not None:
        lines.append(f"[bold red]execution failed[/] [{outcome.error.code}] {outcome.error.detail}")
    elif req.status == "pending":
        lines.append(
            f"pending until {_when(req.expires_at)}; approve with: keygate approve {req.id} "
            "--as NAME --key FILE"
        )
    else:
        lines.append(req.status)
    (h.err if made else h.out).print("; ".join(lines), highlight=False)
    if outcome.error is not None:
        raise typer.Exit(h.exit_codes.get(outcome.error.code, 1))


@request_app.command("destroy-key")
def request_destroy_key(
    tenant: str,
    purpose: str,
    version: int,
    waiting_days: Annotated[
        int | None, typer.Option(help="Days before destruction (7–30; default: configured).")
    ] = None,
    as_name: AsOpt = None,
    key: KeyOpt = None,
    pkcs11_label: LabelOpt = None,
    pkcs11_token: TokenOpt = None,
    pkcs11_module: ModuleOpt = None,
    passphrase_file: PassOpt = None,
    pin_file: PinOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Schedule the destruction of a (non-active) key version: once approved it is disabled at
    once and destroyed in the HSM after the waiting period, unless cancelled."""
    params: dict[str, Any] = {"tenant": tenant, "purpose": purpose, "version": version}
    if waiting_days is not None:
        params["waiting_days"] = waiting_days
    _make_request(
        "destroy-key", params, as_name=as_name, key=key, label=pkcs11_label, token=pkcs11_token,
        module=pkcs11_module, passphrase_file=passphrase_file, pin_file=pin_file, reason=reason,
    )  # fmt: skip


@request_app.command("cancel-destruction")
def request_cancel_destruction(
    destroy_request: Annotated[str, typer.Argument(help="The destroy-key request's id.")],
    as_name: AsOpt = None,
    key: KeyOpt = None,
    pkcs11_label: LabelOpt = None,
    pkcs11_token: TokenOpt = None,
    pkcs11_module: ModuleOpt = None,
    passphrase_file: PassOpt = None,
    pin_file: PinOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Cancel a scheduled key destruction (during its waiting period)."""
    _make_request(
        "cancel-destruction", {"destroy_request": destroy_request}, as_name=as_name, key=key,
        label=pkcs11_label, token=pkcs11_token, module=pkcs11_module,
        passphrase_file=passphrase_file, pin_file=pin_file, reason=reason,
    )  # fmt: skip


def _tenant_request(action: str) -> Callable[..., None]:
    def command(
        tenant: str,
        as_name: AsOpt = None,
        key: KeyOpt = None,
        pkcs11_label: LabelOpt = None,
        pkcs11_token: TokenOpt = None,
        pkcs11_module: ModuleOpt = None,
        passphrase_file: PassOpt = None,
        pin_file: PinOpt = None,
        reason: ReasonOpt = None,
    ) -> None:
        _make_request(
            action, {"tenant": tenant}, as_name=as_name, key=key, label=pkcs11_label,
            token=pkcs11_token, module=pkcs11_module, passphrase_file=passphrase_file,
            pin_file=pin_file, reason=reason,
        )  # fmt: skip

    verb = "Disable" if action == "disable-tenant" else "Enable"
    command.__doc__ = f"{verb} a tenant once approved."
    return command


request_app.command("disable-tenant")(_tenant_request("disable-tenant"))
request_app.command("enable-tenant")(_tenant_request("enable-tenant"))


@request_app.command("add-token")
def request_add_token(
    name: Annotated[str, typer.Argument(help="Service identity name, e.g. juki-app.")],
    tenant: Annotated[
        list[str], typer.Option("--tenant", "-t", help="Allowed tenant (repeat; * = any).")
    ],
    purpose: Annotated[
        list[str], typer.Option("--purpose", "-p", help="Allowed purpose (repeat; * = any).")
    ],
    operation: Annotated[
        list[str],
        typer.Option("--operation", "-o", help="encrypt, decrypt, rewrap (repeat; * = all)."),
    ],
    record_type: Annotated[
        list[str] | None,
        typer.Option("--record-type", "-r", help="Allowed record type (repeat; * = any)."),
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option(help="Authenticate by this TLS client certificate (PEM) instead of a token."),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="Write the new token here (0600) instead of to stdout."),
    ] = None,
    as_name: AsOpt = None,
    key: KeyOpt = None,
    pkcs11_label: LabelOpt = None,
    pkcs11_token: TokenOpt = None,
    pkcs11_module: ModuleOpt = None,
    passphrase_file: PassOpt = None,
    pin_file: PinOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Register a service identity once approved.  The token is made now and shown to you
    once (stdout line 2, or --token-file); the request holds only its SHA-256, and the token
    works only after the approvals."""
    h = _helpers()
    from keygate.policy.access import certificate_key, hash_token, new_token

    secret: str | None = None
    with h.errors():
        if cert is not None:
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding

            der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
            credential = certificate_key(der)
        else:
            secret = new_token()
            credential = hash_token(secret)
    params: dict[str, Any] = {
        "name": name,
        "tenants": tenant,
        "purposes": purpose,
        "record_types": record_type or [],
        "operations": operation,
        "credential": credential,
    }
    _make_request(
        "add-token", params, as_name=as_name, key=key, label=pkcs11_label, token=pkcs11_token,
        module=pkcs11_module, passphrase_file=passphrase_file, pin_file=pin_file, reason=reason,
    )  # fmt: skip
    if secret is None:
        return
    if token_file is not None:
        with h.errors():
            from keygate.custody.credentials import write_new_file

            write_new_file(token_file, (secret + "\n").encode("ascii"))
        h.err.print(f"the token is in {token_file}; it works once the request is approved")
        return
    h.err.print("the token follows on stdout (line 2); it works once the request is approved")
    sys.stdout.write(secret + "\n")


@request_app.command("revoke-token")
def request_revoke_token(
    name: str,
    as_name: AsOpt = None,
    key: KeyOpt = None,
    pkcs11_label: LabelOpt = None,
    pkcs11_token: TokenOpt = None,
    pkcs11_module: ModuleOpt = None,
    passphrase_file: PassOpt = None,
    pin_file: PinOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Revoke a service identity once approved."""
    _make_request(
        "revoke-token", {"name": name}, as_name=as_name, key=key, label=pkcs11_label,
        token=pkcs11_token, module=pkcs11_module, passphrase_file=passphrase_file,
        pin_file=pin_file, reason=reason,
    )  # fmt: skip


@request_app.command("add-custodian")
def request_add_custodian(
    name: str,
    public_key: Annotated[
        Path, typer.Option("--public-key", help="The new custodian's public key (PEM file).")
    ],
    as_name: AsOpt = None,
    key: KeyOpt = None,
    pkcs11_label: LabelOpt = None,
    pkcs11_token: TokenOpt = None,
    pkcs11_module: ModuleOpt = None,
    passphrase_file: PassOpt = None,
    pin_file: PinOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Enrol another custodian once approved."""
    pem = _read_public_key(public_key).decode("ascii", "replace")
    _make_request(
        "add-custodian", {"name": name, "public_key": pem}, as_name=as_name, key=key,
        label=pkcs11_label, token=pkcs11_token, module=pkcs11_module,
        passphrase_file=passphrase_file, pin_file=pin_file, reason=reason,
    )  # fmt: skip


@request_app.command("remove-custodian")
def request_remove_custodian(
    name: str,
    as_name: AsOpt = None,
    key: KeyOpt = None,
    pkcs11_label: LabelOpt = None,
    pkcs11_token: TokenOpt = None,
    pkcs11_module: ModuleOpt = None,
    passphrase_file: PassOpt = None,
    pin_file: PinOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Remove a custodian once approved (never below the quorum)."""
    _make_request(
        "remove-custodian", {"name": name}, as_name=as_name, key=key, label=pkcs11_label,
        token=pkcs11_token, module=pkcs11_module, passphrase_file=passphrase_file,
        pin_file=pin_file, reason=reason,
    )  # fmt: skip


def _parse_param(text: str) -> tuple[str, Any]:
    """``name=text`` or ``name:=JSON`` (an integer, a boolean or a list of text)."""
    eq = text.find("=")
    if eq > 0 and text[eq - 1] == ":":
        name, raw = text[: eq - 1], text[eq + 1 :]
        try:
            return name, json.loads(raw)
        except ValueError:
            raise InvalidRequest(f"--param {name}:= needs JSON") from None
    if "=" not in text:
        raise InvalidRequest("--param takes name=text or name:=JSON")
    name, value = text.split("=", 1)
    return name, value


@request_app.command("submit")
def request_submit(
    action: Annotated[str, typer.Argument(help="A registered dual-control action.")],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-P", help="name=text or name:=JSON (repeat)."),
    ] = None,
    as_name: AsOpt = None,
    key: KeyOpt = None,
    pkcs11_label: LabelOpt = None,
    pkcs11_token: TokenOpt = None,
    pkcs11_module: ModuleOpt = None,
    passphrase_file: PassOpt = None,
    pin_file: PinOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Request any registered action by name with explicit parameters."""
    params = dict(_parse_param(p) for p in param or [])
    _make_request(
        action, params, as_name=as_name, key=key, label=pkcs11_label, token=pkcs11_token,
        module=pkcs11_module, passphrase_file=passphrase_file, pin_file=pin_file, reason=reason,
    )  # fmt: skip


# ---------------------------------------------------------------------- requests list/show
@requests_app.command("list")
def requests_list(
    pending: Annotated[bool, typer.Option("--pending", help="Only pending requests.")] = False,
) -> None:
    """List dual-control requests (expired ones are marked as such first)."""
    h = _helpers()
    from keygate.custody.actions import describe

    def collect(gw: Any) -> list[tuple[Any, int]]:
        c = _custody(gw)
        return [(r, c.valid_approvals(r)) for r in c.requests(pending_only=pending)]

    rows = h.run(collect)
    table = Table("request", "what", "requester", "status", "approvals", "created", "expires")
    table.columns[0].no_wrap = True
    for r, count in rows:
        table.add_row(
            r.id,
            describe(r),
            r.requester,
            r.status,
            f"{count}/{r.required}",
            _when(r.created_at),
            _when(r.expires_at),
        )
    h.out.print(table)


@requests_app.command("show")
def requests_show(request_id: str) -> None:
    """Everything about one request: parameters, approvals, digest, result."""
    h = _helpers()
    from keygate.custody.actions import describe

    def collect(gw: Any) -> tuple[Any, int]:
        c = _custody(gw)
        r = c.get(request_id)
        return r, c.valid_approvals(r)

    r, count = h.run(collect)
    h.out.print(f"request   {r.id}\nwhat      {describe(r)}", highlight=False)
    for name, value in (
        ("action", r.action),
        ("params", json.dumps(dict(r.params), ensure_ascii=False, sort_keys=True)),
        ("requester", r.requester),
        ("status", f"{r.status} (since {_when(r.status_at)})"),
        ("approvals", f"{count} valid of {r.required} needed"),
        ("created", _when(r.created_at)),
        ("expires", _when(r.expires_at)),
        ("digest", r.digest),
    ):
        h.out.print(f"{name:<9} {value}", highlight=False)
    if r.result:
        h.out.print(f"{'result':<9} {json.dumps(dict(r.result), ensure_ascii=False)}")
    if r.code:
        h.out.print(f"{'error':<9} {r.code}")
    table = Table("custodian", "decision", "when", "key fingerprint")
    for a in r.approvals:
        table.add_row(a.custodian, a.decision, _when(a.created_at), a.key_fingerprint[:32] + "…")
    h.out.print(table)


# ---------------------------------------------------------------------- approve / reject
def _decide(
    decision: str,
    request_id: str,
    as_name: str,
    key: Path | None,
    label: str | None,
    token: str | None,
    module: str | None,
    passphrase_file: Path | None,
    pin_file: Path | None,
    yes: bool,
) -> None:
    h = _helpers()
    from keygate.custody.actions import describe
    from keygate.custody.canonical import approval_message

    with h.errors(), _signer(key, label, token, module, passphrase_file, pin_file) as signer:

        def run(gw: Any) -> Any:
            custody = _custody(gw)
            req = custody.get(request_id)
            h.err.print(
                f"{decision} request {req.id}: {describe(req)} — requested by {req.requester} "
                f"at {_when(req.created_at)}; params "
                f"{json.dumps(dict(req.params), ensure_ascii=False, sort_keys=True)}; "
                f"digest {req.digest}",
                highlight=False,
            )
            if not yes and sys.stdin.isatty() and not typer.confirm(f"{decision} as {as_name}?"):
                raise typer.Abort()
            signature = signer.sign(approval_message(req, as_name, decision))
            return custody.decide(req.id, as_name, decision, signature)

        outcome = h.run(run)
    if decision == "reject":
        h.out.print(f"[yellow]rejected[/] request {outcome.request.id}", highlight=False)
        return
    _report(outcome)


def approve(
    request_id: str,
    as_name: Annotated[str, typer.Option("--as", help="Your custodian name.")],
    key: KeyOpt = None,
    pkcs11_label: LabelOpt = None,
    pkcs11_token: TokenOpt = None,
    pkcs11_module: ModuleOpt = None,
    passphrase_file: PassOpt = None,
    pin_file: PinOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask to confirm.")] = False,
) -> None:
    """Approve a request with your signature; the approval that completes the quorum executes
    it."""
    _decide("approve", request_id, as_name, key, pkcs11_label, pkcs11_token, pkcs11_module,
            passphrase_file, pin_file, yes)  # fmt: skip


def reject(
    request_id: str,
    as_name: Annotated[str, typer.Option("--as", help="Your custodian name.")],
    key: KeyOpt = None,
    pkcs11_label: LabelOpt = None,
    pkcs11_token: TokenOpt = None,
    pkcs11_module: ModuleOpt = None,
    passphrase_file: PassOpt = None,
    pin_file: PinOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask to confirm.")] = False,
) -> None:
    """Reject (veto) a request with your signature: it ends at once."""
    _decide("reject", request_id, as_name, key, pkcs11_label, pkcs11_token, pkcs11_module,
            passphrase_file, pin_file, yes)  # fmt: skip


# ---------------------------------------------------------------------- key destruction
def key_destroy_due() -> None:
    """Destroy every key version whose approved destruction is due (run it daily from cron):
    the registry marks it destroyed and its KEK is destroyed in the HSM."""
    h = _helpers()
    done = h.run(lambda gw: _custody(gw).destroy_due())
    failed = 0
    for d in done:
        rec = d.destruction
        ref = f"{rec.tenant}/{rec.purpose}/v{rec.version}"
        if d.ok:
            h.out.print(
                f"[red]destroyed[/] {ref} (HSM object {rec.hsm_label}; request {rec.request_id})",
                highlight=False,
            )
        else:
            failed += 1
            code = d.error.code if d.error is not None else "INTERNAL"
            detail = d.error.detail if d.error is not None else ""
            h.err.print(f"[bold red]error[/] {ref}: [{code}] {detail}", highlight=False)
    if not done:
        h.out.print("no key destruction is due")
    if failed:
        raise typer.Exit(1)


def key_destructions(
    all_: Annotated[
        bool, typer.Option("--all", help="Also cancelled, destroyed and failed ones.")
    ] = False,
) -> None:
    """List scheduled key destructions and their due times."""
    h = _helpers()
    rows = h.run(lambda gw: _custody(gw).destructions(open_only=not all_))
    table = Table("key version", "status", "due", "scheduled", "request", "cancelled by")
    table.columns[4].no_wrap = True
    for d in rows:
        table.add_row(
            f"{d.tenant}/{d.purpose}/v{d.version}",
            d.status,
            _when(d.due_at),
            _when(d.scheduled_at),
            d.request_id,
            d.cancel_request_id or "",
        )
    h.out.print(table)
