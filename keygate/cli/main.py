"""``keygate``: the admin CLI for key custodians.

Every command acts on the same registry and HSM as running gateways, which pick changes up within
seconds (they poll the registry's generation counter).  Errors print one clear line and exit with
a stable code; a stack trace only with ``--verbose``.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from keygate.core.errors import GatewayError

__all__ = ["EXIT_CODES", "app", "main"]

#: exit code per error code (sysexits.h where one fits)
EXIT_CODES: Final[dict[str, int]] = {
    "INVALID_REQUEST": 64,  # EX_USAGE
    "INVALID_TENANT": 64,
    "VALIDATION_FAILED": 65,  # EX_DATAERR
    "DECRYPTION_FAILED": 65,
    "PAYLOAD_TOO_LARGE": 65,
    "NOT_FOUND": 66,  # EX_NOINPUT
    "UNAUTHENTICATED": 77,  # EX_NOPERM
    "FORBIDDEN": 77,
    "KEY_NOT_USABLE": 75,  # EX_TEMPFAIL
    "KEY_DESTROYED": 65,
    "UNAVAILABLE": 69,  # EX_UNAVAILABLE
    "CONFIGURATION": 78,  # EX_CONFIG
}

app = typer.Typer(
    name="keygate",
    help="keygate: government-held keys, envelope encryption and audit for the Government Cloud.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
tenant_app = typer.Typer(
    help="Tenants: local governments (全国地方公共団体コード) or central organisations.",
    no_args_is_help=True,
)
key_app = typer.Typer(
    help="Keys (KEKs in the HSM) per tenant × purpose, and their versions.", no_args_is_help=True
)
token_app = typer.Typer(help="Service identities and their bearer tokens.", no_args_is_help=True)
audit_app = typer.Typer(
    help="The audit trail: export, offline verification, the checkpoint key, record lookups.",
    no_args_is_help=True,
)
app.add_typer(tenant_app, name="tenant")
app.add_typer(key_app, name="key")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
from keygate.cli.bulk import bulk_app  # noqa: E402 - beside the other sub-apps

app.add_typer(bulk_app, name="bulk")
provider_app = typer.Typer(
    help="Cloud KMS keys (outer wrap) per tenant × purpose: set, show, test, migrate.",
    no_args_is_help=True,
)
app.add_typer(provider_app, name="provider")

out = Console()
err = Console(stderr=True)
_state: dict[str, Any] = {"verbose": False, "actor": None}
T = TypeVar("T")


def _actor() -> str:
    actor = _state["actor"] or os.environ.get("KEYGATE_ACTOR")
    if actor:
        return str(actor)
    try:
        return "custodian:" + getpass.getuser()
    except (KeyError, OSError):
        return "custodian:unknown"


def _fail(exc: BaseException) -> typer.Exit:
    if isinstance(exc, GatewayError):
        err.print(f"[bold red]error[/] [{exc.code}] {exc.detail}", highlight=False)
        code = EXIT_CODES.get(exc.code, 1)
    else:
        err.print(f"[bold red]error[/] {type(exc).__name__}: {exc}", highlight=False)
        code = 1
    if _state["verbose"]:
        err.print_exception()
    else:
        err.print("[dim](run with --verbose for details)[/]")
    return typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except (GatewayError, OSError, ValueError) as exc:
        raise _fail(exc) from None


@contextmanager
def _gateway() -> Iterator[Any]:
    """A gateway for one admin command (no refresher thread: the command is short-lived)."""
    with _errors():
        from keygate.bootstrap import build_gateway
        from keygate.config import load_settings

        gw = build_gateway(load_settings(), start_refresher=False)
        try:
            yield gw
        finally:
            gw.close()


def _run(fn: Callable[[Any], T]) -> T:
    with _gateway() as gw, _errors():
        return fn(gw)


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show stack traces on errors.")
    ] = False,
    actor: Annotated[
        str | None,
        typer.Option(help="Custodian name recorded in the audit trail (default: your OS user)."),
    ] = None,
) -> None:
    _state["verbose"] = verbose
    _state["actor"] = actor
    from keygate.logging import configure_logging

    configure_logging(
        fmt=os.environ.get("KEYGATE_LOG_FORMAT", "console"), level="debug" if verbose else "warning"
    )


# ---------------------------------------------------------------------- init / serve
@app.command()
def init(
    softhsm: Annotated[
        bool,
        typer.Option(help="Also create a SoftHSM token in the data directory (development only)."),
    ] = False,
) -> None:
    """Create the registry and audit tables and check that the HSM token logs in."""
    with _errors():
        from keygate.bootstrap import audit_keys, hsm_config, open_registry
        from keygate.config import load_settings

        settings = load_settings()
        if softhsm:
            _init_softhsm(settings)
        registry, store = open_registry(settings, create=True)
        registry.close()
        from keygate.hsm.pkcs11 import Pkcs11Hsm

        hsm = Pkcs11Hsm(hsm_config(settings))
        try:
            hsm.check()
            mech = hsm.mechanism
            audit_keys(settings, hsm, store).ensure()  # checkpoint signing + pseudonym keys
        finally:
            hsm.close()
            store.close()
    out.print(
        f"[green]ok[/] registry {settings.data_dir}; HSM token {settings.hsm_token_label!r} "
        f"answers; wrap mechanism {mech.name}"
    )


def _init_softhsm(settings: Any) -> None:
    from keygate.hsm.softhsm import init_softhsm_token

    pin = settings.hsm_pin.get_secret_value() if settings.hsm_pin else None
    if not pin:
        raise typer.BadParameter("set KEYGATE_HSM_PIN to the user PIN the new token should have")
    token = init_softhsm_token(
        settings.data_dir / "softhsm",
        label=settings.hsm_token_label,
        user_pin=pin,
        so_pin=os.urandom(8).hex(),
    )
    out.print(f"SoftHSM token {token.label!r} created; export SOFTHSM2_CONF={token.conf_path}")
    os.environ.update(token.env)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default 8443; 0 = any free port).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default 2).")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="CA for client certificates: turns on mTLS.")
    ] = None,
) -> None:
    """Run the HTTP gateway with several worker processes."""
    import ssl
    import tempfile

    import uvicorn

    from keygate.config import load_settings

    overrides = {
        "KEYGATE_HOST": host,
        "KEYGATE_PORT": port,
        "KEYGATE_WORKERS": workers,
        "KEYGATE_TLS_CERT": tls_cert,
        "KEYGATE_TLS_KEY": tls_key,
        "KEYGATE_TLS_CLIENT_CA": tls_client_ca,
    }
    for name, value in overrides.items():
        if value is not None:
            os.environ[name] = str(value)  # the workers read the same settings from the environment
    with _errors():
        settings = load_settings()
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise typer.BadParameter("--tls-cert and --tls-key go together")
        if settings.tls_client_ca and not settings.tls_cert:
            raise typer.BadParameter("mTLS (--tls-client-ca) needs --tls-cert and --tls-key")
        if settings.workers > 1:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="keygate-metrics-")
        kwargs: dict[str, Any] = {}
        if settings.tls_cert:
            kwargs.update(ssl_certfile=str(settings.tls_cert), ssl_keyfile=str(settings.tls_key))
        if settings.tls_client_ca:
            kwargs.update(
                ssl_ca_certs=str(settings.tls_client_ca),
                ssl_cert_reqs=ssl.CERT_REQUIRED,
                http="keygate.api.tls:ClientCertH11Protocol",
            )
        uvicorn.run(
            "keygate.api.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=10,
            **kwargs,
        )


# ---------------------------------------------------------------------- tenants
@tenant_app.command("add")
def tenant_add(
    tenant: Annotated[
        str, typer.Argument(help="6-digit local government code (e.g. 131016) or a slug.")
    ],
    name: Annotated[str, typer.Option(help="Display name, e.g. 千代田区.")] = "",
) -> None:
    """Register a tenant."""
    rec = _run(lambda gw: gw.add_tenant(_actor(), tenant, name=name))
    out.print(f"[green]added[/] tenant {rec.id} ({rec.kind}) {rec.name}")


@tenant_app.command("list")
def tenant_list() -> None:
    """List tenants."""
    rows = _run(lambda gw: gw.registry.list_tenants())
    table = Table("tenant", "kind", "name", "enabled", "created")
    for r in rows:
        table.add_row(
            r.id,
            r.kind,
            r.name,
            "yes" if r.enabled else "[red]no[/]",
            r.created_at.isoformat(timespec="seconds"),
        )
    out.print(table)


@tenant_app.command("disable")
def tenant_disable(tenant: str) -> None:
    """Disable a tenant: every key of it stops working in running gateways within seconds."""
    _run(lambda gw: gw.set_tenant_enabled(_actor(), tenant, False))
    out.print(f"[yellow]disabled[/] tenant {tenant}")


@tenant_app.command("enable")
def tenant_enable(tenant: str) -> None:
    """Enable a tenant again."""
    _run(lambda gw: gw.set_tenant_enabled(_actor(), tenant, True))
    out.print(f"[green]enabled[/] tenant {tenant}")


# ---------------------------------------------------------------------- keys
@key_app.command("create")
def key_create(
    tenant: str,
    purpose: Annotated[str, typer.Argument(help="Data class, e.g. resident, tax, mynumber.")],
    dek_max_records: Annotated[
        int | None, typer.Option(help="Records per DEK before a new one is made.")
    ] = None,
    dek_max_age: Annotated[
        float | None, typer.Option(help="Seconds a DEK is used and cached.")
    ] = None,
) -> None:
    """Create the KEK (version 1) of tenant × purpose in the HSM."""
    rec = _run(
        lambda gw: gw.create_key(
            _actor(), tenant, purpose, dek_max_records=dek_max_records, dek_max_age_s=dek_max_age
        )
    )
    out.print(
        f"[green]created[/] {tenant}/{purpose} v{rec.version} ({rec.state.value}) "
        f"in the HSM as {rec.hsm_label}"
    )


@key_app.command("rotate")
def key_rotate(tenant: str, purpose: str) -> None:
    """Make a new active KEK version; the previous one becomes decrypt-only."""
    rec = _run(lambda gw: gw.rotate_key(_actor(), tenant, purpose))
    out.print(
        f"[green]rotated[/] {tenant}/{purpose}: v{rec.version} is active; "
        "older versions are decrypt-only until rewrapped"
    )


@key_app.command("list")
def key_list(tenant: Annotated[str | None, typer.Argument()] = None) -> None:
    """List keys and their versions."""

    def collect(gw: Any) -> list[tuple[Any, list[Any]]]:
        return [
            (k, gw.registry.list_versions(k.tenant, k.purpose))
            for k in gw.registry.list_keys(tenant)
        ]

    rows = _run(collect)
    table = Table("tenant", "purpose", "version", "state", "HSM label", "DEK limits", "updated")
    colours = {"active": "green", "decrypt-only": "cyan", "disabled": "yellow", "destroyed": "red"}
    for k, versions in rows:
        for v in versions:
            table.add_row(
                k.tenant,
                k.purpose,
                str(v.version),
                f"[{colours.get(v.state.value, 'white')}]{v.state.value}[/]",
                v.hsm_label,
                f"{k.dek_max_records} rec / {k.dek_max_age_s:g} s",
                v.updated_at.isoformat(timespec="seconds"),
            )
    out.print(table)


def _set_state(tenant: str, purpose: str, version: int, *, enabled: bool) -> None:
    rec = _run(lambda gw: gw.set_key_state(_actor(), tenant, purpose, version, enabled=enabled))
    out.print(f"{tenant}/{purpose} v{rec.version} is now [bold]{rec.state.value}[/]")


@key_app.command("disable")
def key_disable(tenant: str, purpose: str, version: int) -> None:
    """Disable a key version: it refuses everything until enabled (gateways within seconds)."""
    _set_state(tenant, purpose, version, enabled=False)


@key_app.command("enable")
def key_enable(tenant: str, purpose: str, version: int) -> None:
    """Enable a disabled key version again."""
    _set_state(tenant, purpose, version, enabled=True)


# ---------------------------------------------------------------------- providers
@provider_app.command("set")
def provider_set(
    tenant: str,
    purpose: str,
    uri: Annotated[str, typer.Argument(help="Provider key URI, e.g. aws-kms://arn:aws:kms:…")],
) -> None:
    """Give tenant × purpose its provider key: new DEKs are wrapped by the HSM, then by it.

    The key must be in a Japanese region (policies/residency.toml) and answer a real round trip.
    """
    _run(lambda gw: gw.provider_set(_actor(), tenant, purpose, uri))
    out.print(
        f"[green]set[/] {tenant}/{purpose}: new DEKs are wrapped by the HSM, then by {uri}",
        highlight=False,
    )


@provider_app.command("show")
def provider_show(
    tenant: Annotated[str | None, typer.Argument()] = None,
    purpose: Annotated[str | None, typer.Argument()] = None,
) -> None:
    """List provider keys (active, decrypt-only during a migration, retired)."""
    rows = _run(lambda gw: gw.registry.list_provider_keys(tenant, purpose))
    table = Table("tenant", "purpose", "state", "region", "provider key", "since")
    colours = {"active": "green", "decrypt-only": "cyan", "retired": "dim"}
    for r in rows:
        table.add_row(
            r.tenant,
            r.purpose,
            f"[{colours.get(r.state.value, 'white')}]{r.state.value}[/]",
            r.region,
            r.uri,
            r.updated_at.isoformat(timespec="seconds"),
        )
    if not rows:
        out.print("no provider keys: every key uses the HSM layer alone")
        return
    out.print(table)


@provider_app.command("test")
def provider_test(
    tenant: str,
    purpose: str,
    uri: Annotated[
        str | None, typer.Argument(help="Key URI to test (default: the active provider key).")
    ] = None,
) -> None:
    """Check a provider key: residency, metadata, and a real wrap/unwrap round trip."""

    def test(gw: Any) -> dict[str, Any]:
        target = uri
        if target is None:
            prov = gw.keys.snapshot.active_provider(tenant, purpose)
            if prov is None:
                from keygate.core.errors import NotFound

                raise NotFound(f"{tenant}/{purpose} has no active provider key")
            target = prov.uri
        return dict(gw.provider_test(_actor(), tenant, purpose, target))

    report = _run(test)
    table = Table("check", "result")
    for name, value in report.items():
        table.add_row(name, str(value))
    out.print(table)
    out.print(f"[green]ok[/] {report['uri']} is healthy", highlight=False)


@provider_app.command("migrate")
def provider_migrate(
    tenant: str,
    purpose: str,
    to: Annotated[
        str | None,
        typer.Option("--to", help="New provider key URI, or 'hsm-only' to drop the outer wrap."),
    ] = None,
    finish: Annotated[
        bool,
        typer.Option(
            "--finish", help="End the migration: retire the old provider key(s) for good."
        ),
    ] = False,
) -> None:
    """Move tenant × purpose to another provider key without re-encrypting anything.

    New DEKs use the new key at once; rewrap existing ciphertexts (POST /v1/rewrap/batch or
    `keygate bulk rewrap`), which rewrites headers only.  The old key keeps unwrapping until
    `--finish`.
    """
    if finish == (to is not None):
        raise _fail(ValueError("give exactly one of --to URI and --finish"))
    if finish:
        recs = _run(lambda gw: gw.provider_finish(_actor(), tenant, purpose))
        for r in recs:
            out.print(f"[green]retired[/] {r.uri}", highlight=False)
        return
    target = None if to == "hsm-only" else to
    _run(lambda gw: gw.provider_migrate(_actor(), tenant, purpose, target))
    out.print(
        f"[green]migrating[/] {tenant}/{purpose} to {to}: new DEKs use it now; rewrap existing "
        "ciphertexts, then run `keygate provider migrate "
        f"{tenant} {purpose} --finish`",
        highlight=False,
    )


# ---------------------------------------------------------------------- tokens
@token_app.command("add")
def token_add(
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
) -> None:
    """Register a service identity; prints its bearer token once."""
    der = None
    if cert is not None:
        with _errors():
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding

            der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
    rec, token = _run(
        lambda gw: gw.add_identity(
            _actor(),
            name,
            tenants=tenant,
            purposes=purpose,
            record_types=record_type or [],
            operations=operation,
            certificate_der=der,
        )
    )
    if token is None:
        out.print(f"[green]added[/] identity {rec.name} (client certificate)")
        return
    err.print(
        f"[green]added[/] identity {rec.name}; its token follows on stdout and is not shown again:"
    )
    # The token alone on stdout so it can be captured: TOKEN=$(keygate token add …)
    sys.stdout.write(token + "\n")


@token_app.command("revoke")
def token_revoke(name: str) -> None:
    """Revoke a service identity (running gateways refuse it within seconds)."""
    _run(lambda gw: gw.revoke_identity(_actor(), name))
    out.print(f"[yellow]revoked[/] identity {name}")


@token_app.command("list")
def token_list() -> None:
    """List service identities (never their tokens)."""
    rows = _run(lambda gw: gw.registry.list_identities())
    table = Table(
        "identity", "tenants", "purposes", "record types", "operations", "auth", "revoked"
    )
    for r in rows:
        table.add_row(
            r.name,
            ",".join(sorted(r.tenants)),
            ",".join(sorted(r.purposes)),
            ",".join(sorted(r.record_types)) or "-",
            ",".join(sorted(r.operations)),
            "cert" if r.token_hash.startswith("cert-") else "token",
            r.revoked_at.isoformat(timespec="seconds") if r.revoked_at else "",
        )
    out.print(table)


# ---------------------------------------------------------------------- audit
def _when(value: str | None, name: str) -> Any:
    """An ISO 8601 date or date-time; without an offset it is taken as UTC."""
    if value is None:
        return None
    from datetime import UTC, datetime

    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{name} must be an ISO 8601 date or date-time") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@audit_app.command("export")
def audit_export(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="jsonl (verifiable), csv (Excel) or ocsf.")
    ] = "jsonl",
    since: Annotated[
        str | None, typer.Option(help="From this ISO 8601 time (inclusive; default UTC).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Up to this ISO 8601 time (exclusive; default UTC).")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's events.")] = None,
) -> None:
    """Export the trail; signs the chain head first.  Left-out events become hash-only stubs."""
    from keygate.audit.export import FORMATS, export_trail

    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
    start, end = _when(since, "--since"), _when(until, "--until")

    def run(gw: Any) -> Any:
        keys = gw.audit_keys
        store = gw.audit_store

        def write(stream: Any) -> Any:
            return export_trail(
                store,
                stream,
                checkpoint_now=lambda: (keys.prepare(), store.checkpoint(keys.sign_checkpoint))[1],
                fmt=fmt,
                since=start,
                until=end,
                tenant=tenant,
                key_id=keys.key_id,
            )

        if output is None:
            summary = write(sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return summary
        with output.open("wb") as stream:
            return write(stream)

    summary = _run(run)
    err.print(
        f"[green]exported[/] {summary.events} events, {summary.omitted} omitted (hash only), "
        f"{summary.checkpoints} checkpoints; seq {summary.from_seq}..{summary.to_seq}"
        + (f" to {output}" if output else ""),
        highlight=False,
    )


@audit_app.command("verify")
def audit_verify(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="A JSON Lines export (keygate audit export); or segment archives and then a "
            "current export, oldest first, verified as one chain."
        ),
    ],
    public_key: Annotated[
        Path, typer.Option("--public-key", help="The checkpoint key (keygate audit public-key).")
    ],
) -> None:
    """Verify an export offline: chain, seq continuity, checkpoint signatures.  Needs no
    database and no HSM."""
    from contextlib import ExitStack

    from rich.markup import escape

    from keygate.audit.verify import verify_exports

    with _errors(), ExitStack() as stack:
        pem = public_key.read_bytes()
        opened = [
            (str(f), stack.enter_context(f.open(encoding="utf-8", newline=""))) for f in files
        ]
        result = verify_exports(opened, pem)
    if not result.ok:
        where = f"line {result.line}" + (f" (seq {result.seq})" if result.seq is not None else "")
        if len(files) > 1:
            where = f"{escape(result.file or '?')} {where}"
        err.print(f"[bold red]FAILED[/] at {where}: {result.reason}", highlight=False)
        raise typer.Exit(65)  # EX_DATAERR
    start = (
        f"; starts after the signed checkpoint at seq {result.anchor_seq}"
        if result.anchor_seq is not None
        else ""
    )
    out.print(
        f"[green]OK[/] {result.events} events, {result.omitted} omitted (hash only), "
        f"{result.checkpoints} checkpoints; seq {result.first_seq}..{result.last_seq} verified"
        + (f" across {result.files} files" if result.files > 1 else "")
        + start,
        highlight=False,
        soft_wrap=True,
    )
    for p in result.prunes:
        archive = (
            "no archive" if p.forced or not p.archive_sha256 else f"archive {p.archive_sha256}"
        )
        out.print(
            f"  seq {p.from_seq}..{p.to_seq} pruned ({p.events} events; record at seq {p.seq}; "
            f"{archive})",
            highlight=False,
            soft_wrap=True,
        )


@audit_app.command("public-key")
def audit_public_key() -> None:
    """Print the PEM public key that verifies checkpoint signatures."""
    pem = _run(lambda gw: gw.audit_keys.public_key_pem())
    sys.stdout.write(pem.decode("ascii"))


@audit_app.command("who-touched")
def audit_who_touched(
    tenant: Annotated[str | None, typer.Argument(help="The record's tenant.")] = None,
    record_id: Annotated[
        str | None, typer.Argument(help="The record id, as the application sent it.")
    ] = None,
    ref: Annotated[
        str | None,
        typer.Option(
            "--ref", help="The record's pseudonym (64 hex digits), as printed by this command."
        ),
    ] = None,
    export: Annotated[
        list[Path] | None,
        typer.Option(
            "--export",
            help="Search this JSON Lines export offline instead of the live trail (with --ref; "
            "repeat for archives, oldest first).",
        ),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option("--public-key", help="With --export: verify the files first (offline)."),
    ] = None,
) -> None:
    """List the events that touched a record, found by its pseudonym (ids are never stored),
    each checked against the record refs it commits to; exits 65 if one does not match."""
    from rich.markup import escape

    from keygate.audit.lookup import who_touched

    ref = ref.lower() if ref is not None else None
    by_id = tenant is not None and record_id is not None
    if export:
        if ref is None or tenant is not None or record_id is not None:
            raise typer.BadParameter(
                "--export searches by --ref only: compute the pseudonym online with "
                "`keygate audit who-touched TENANT RECORD_ID` (it needs the HSM key)"
            )
        found = _who_touched_offline(export, ref, public_key)
    else:
        if public_key is not None:
            raise typer.BadParameter("--public-key goes with --export")
        if by_id == (ref is not None) or (ref is not None and tenant is not None):
            raise typer.BadParameter("give TENANT RECORD_ID, or --ref")

        def run(gw: Any) -> tuple[str, list[Any]]:
            from keygate.policy.tenants import validate_tenant

            if ref is not None:
                return ref, who_touched(gw.audit_store, ref)
            validate_tenant(tenant)
            if not record_id or "\x00" in record_id:
                raise typer.BadParameter("record id must be non-empty text")
            computed = gw.audit_keys.record_ref(tenant, record_id)
            return computed, who_touched(gw.audit_store, computed, tenant=tenant)

        shown_ref, found = _run(run)
        err.print(f"record_ref {shown_ref}: {len(found)} event(s)", highlight=False)
    table = Table("seq", "time (UTC)", "actor", "action", "outcome", "code", "request id", "check")
    for touch in found:
        ev = touch.event
        table.add_row(
            str(touch.seq),
            str(ev.get("ts", ""))[:19],
            escape(str(ev.get("actor", ""))),
            escape(str(ev.get("action", ""))),
            escape(str(ev.get("outcome", ""))),
            escape(str(ev.get("code") or "")),
            escape(str(ev.get("request_id", ""))),
            "ok" if touch.problem is None else "[bold red]TAMPERED[/]",
        )
    out.print(table)
    bad = [t for t in found if t.problem is not None]
    for touch in bad:
        where = f"{escape(touch.file)} line {touch.line} " if touch.file else ""
        err.print(
            f"[bold red]TAMPERED[/] {where}(seq {touch.seq}): {touch.problem}",
            highlight=False,
            soft_wrap=True,
        )
    if bad:
        raise typer.Exit(65)  # EX_DATAERR, as `audit verify`


def _who_touched_offline(files: list[Path], ref: str, public_key: Path | None) -> list[Any]:
    """Search exports for ``ref`` (no database, no HSM); verify them first with the key."""
    from contextlib import ExitStack

    from rich.markup import escape

    from keygate.audit.lookup import search_exports
    from keygate.audit.verify import verify_exports

    with _errors(), ExitStack() as stack:
        if public_key is not None:
            pem = public_key.read_bytes()
            opened = [(str(f), stack.enter_context(f.open(encoding="utf-8"))) for f in files]
            result = verify_exports(opened, pem)
            if not result.ok:
                err.print(
                    f"[bold red]FAILED[/] at {escape(result.file or '?')} line {result.line}"
                    + (f" (seq {result.seq})" if result.seq is not None else "")
                    + f": {result.reason}",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(65)
        again = [(str(f), stack.enter_context(f.open(encoding="utf-8"))) for f in files]
        found = search_exports(again, ref)
    checked = "verified" if public_key is not None else "NOT verified (give --public-key)"
    err.print(
        f"record_ref {ref}: {len(found)} event(s) in {len(files)} file(s), {checked}",
        highlight=False,
    )
    return found


# ---------------------------------------------------------------------- audit report, retention
@audit_app.command("report")
def audit_report(
    output: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")],
    since: Annotated[
        str | None, typer.Option(help="From this ISO 8601 time (inclusive; default UTC).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Up to this ISO 8601 time (exclusive; default UTC).")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's events.")] = None,
    from_export: Annotated[
        Path | None,
        typer.Option(
            "--from-export",
            help="Report on this JSON Lines export instead of the live trail (offline; needs "
            "--public-key).",
        ),
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option("--public-key", help="The checkpoint key, with --from-export.")
    ] = None,
    utc: Annotated[
        bool, typer.Option("--utc", help="Days and times in UTC (default JST).")
    ] = False,
) -> None:
    """Write a self-contained HTML report for security reviewers (verified figures, charts)."""
    from datetime import UTC

    from keygate.api.errors import STATUS_BY_CODE
    from keygate.audit.report import JST, report_from_export, report_from_store

    start, end = _when(since, "--since"), _when(until, "--until")
    tz = UTC if utc else JST
    if from_export is not None:
        if public_key is None:
            raise typer.BadParameter("--from-export needs --public-key")
        with _errors():
            summary = report_from_export(
                from_export, output, public_key_pem=public_key.read_bytes(), since=start,
                until=end, tenant=tenant, status_by_code=STATUS_BY_CODE, tz=tz,
            )  # fmt: skip
    else:

        def run(gw: Any) -> Any:
            keys, store = gw.audit_keys, gw.audit_store
            return report_from_store(
                store, output,
                checkpoint_now=lambda: (keys.prepare(), store.checkpoint(keys.sign_checkpoint))[1],
                public_key_pem=keys.public_key_pem(), key_id=keys.key_id, since=start, until=end,
                tenant=tenant, status_by_code=STATUS_BY_CODE, tz=tz,
            )  # fmt: skip

        summary = _run(run)
    r = summary.result
    if not r.ok:
        where = f"line {r.line}" + (f" (seq {r.seq})" if r.seq is not None else "")
        err.print(
            f"[bold red]report written to {output}, but the chain does NOT verify[/] at {where}: "
            f"{r.reason}",
            highlight=False,
        )
        raise typer.Exit(65)  # EX_DATAERR
    err.print(
        f"[green]report[/] {output}: {summary.events} events, {summary.decrypts} records "
        f"decrypted, {summary.refused} denied or failed; chain verified up to checkpoint seq "
        f"{r.last_checkpoint_seq}",
        highlight=False,
    )


segments_app = typer.Typer(
    help="Retention: the trail in segments (one per UTC month, or day), archived to verifiable "
    "files and pruned after KEYGATE_AUDIT_RETENTION_DAYS.",
    no_args_is_help=True,
)
audit_app.add_typer(segments_app, name="segments")
_ArchiveDir = Annotated[
    Path | None,
    typer.Option("--dir", help="Archive directory (default KEYGATE_AUDIT_ARCHIVE_DIR, else "
                 "<data dir>/audit-archive)."),
]  # fmt: skip


def _retention_settings(directory: Path | None) -> tuple[Any, Path]:
    from keygate.config import load_settings

    settings = load_settings()
    where = directory or settings.audit_archive_dir or settings.data_dir / "audit-archive"
    return settings, where


@segments_app.command("list")
def segments_list(directory: _ArchiveDir = None) -> None:
    """List the segments: period, seq range, events, archive, and whether retention expired."""
    from datetime import UTC, datetime

    from keygate.audit.retention import list_segments, plan_prune

    with _errors():
        settings, where = _retention_settings(directory)
    segs = _run(lambda gw: list_segments(gw.audit_store, period=settings.audit_segment_period))
    expired: set[int] = set()
    if settings.audit_retention_days:
        with _errors():
            found = plan_prune(
                segs, retention_days=settings.audit_retention_days, now=datetime.now(UTC)
            )
        expired = {s.to_seq for s in found}
    table = Table("period", "seq", "events", "first event", "last event", "state", "archive")
    for s in segs:
        state = "open" if not s.closed else "expired" if s.to_seq in expired else "closed"
        table.add_row(
            s.period,
            f"{s.from_seq}..{s.to_seq}",
            str(s.events),
            s.first_ts.isoformat(timespec="seconds") if s.first_ts else "",
            s.last_ts.isoformat(timespec="seconds") if s.last_ts else "",
            state,
            (s.archive.archive_file or "") if s.archive else "",
        )
    out.print(table)
    retention = settings.audit_retention_days
    err.print(
        f"retention: {f'{retention} days' if retention else 'keep everything'}; archives in "
        f"{where}",
        highlight=False,
    )


@segments_app.command("archive")
def segments_archive(directory: _ArchiveDir = None) -> None:
    """Write every closed segment without a valid archive to a verifiable JSON Lines file."""
    from keygate.audit.retention import archive_segments

    with _errors():
        settings, where = _retention_settings(directory)

    def run(gw: Any) -> Any:
        keys, store = gw.audit_keys, gw.audit_store
        return archive_segments(
            store, where, public_key_pem=keys.public_key_pem(), key_id=keys.key_id,
            actor=_actor(), period=settings.audit_segment_period,
            checkpoint_now=lambda: (keys.prepare(), store.checkpoint(keys.sign_checkpoint))[1],
        )  # fmt: skip

    done = _run(run)
    for rec in done:
        out.print(
            f"[green]archived[/] {rec.period} seq {rec.from_seq}..{rec.to_seq} "
            f"({rec.events} events) to {where / (rec.archive_file or '')} "
            f"sha256 {rec.archive_sha256}",
            highlight=False,
        )
    if not done:
        out.print("nothing to archive: every closed segment has a valid archive")


@segments_app.command("prune")
def segments_prune(
    directory: _ArchiveDir = None,
    force: Annotated[
        bool, typer.Option("--force", help="Also delete expired segments that have no archive.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would go.")] = False,
) -> None:
    """Delete the segments older than the retention (each archived first, unless --force);
    the trail records what was removed and stays verifiable from the kept checkpoint."""
    from keygate.audit.retention import prune_segments

    with _errors():
        settings, where = _retention_settings(directory)

    def run(gw: Any) -> Any:
        keys, store = gw.audit_keys, gw.audit_store
        return prune_segments(
            store, where, retention_days=settings.audit_retention_days,
            public_key_pem=keys.public_key_pem(), actor=_actor(),
            period=settings.audit_segment_period, force=force, dry_run=dry_run,
            checkpoint_now=lambda: (keys.prepare(), store.checkpoint(keys.sign_checkpoint))[1],
        )  # fmt: skip

    result = _run(run)
    if not result.segments:
        out.print("nothing to prune: no closed segment is older than the retention")
        return
    verb = "would prune" if dry_run else "pruned"
    for seg in result.segments:
        note = " [yellow](no archive: --force)[/]" if seg in result.forced else ""
        out.print(
            f"[green]{verb}[/] {seg.period} seq {seg.from_seq}..{seg.to_seq} ({seg.events} "
            f"events){note}",
            highlight=False,
        )
    if not dry_run and result.head is not None:
        out.print(f"the trail now starts after the signed checkpoint at seq "
                  f"{result.segments[-1].to_seq}; pruning records appended up to seq "
                  f"{result.head[0]}", highlight=False)  # fmt: skip


# ---------------------------------------------------------------------- demo
@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option(help="Where the demo keeps its SoftHSM token, registry and exports.")
    ] = Path(".keygate-demo"),
    records: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="Synthetic records per record type.")
    ] = 1000,
    workers: Annotated[int, typer.Option(min=1, max=8, help="Gateway worker processes.")] = 2,
    provider: Annotated[
        str | None,
        typer.Option(help="Provider key URI for the first tenant's keys (cloud KMS outer wrap)."),
    ] = None,
    migrate_to: Annotated[
        str | None,
        typer.Option(help="Then migrate its resident data to this provider key."),
    ] = None,
) -> None:
    """The whole story on the embedded default (SQLite + SoftHSM), over real HTTP."""
    from keygate.cli.demo import run_demo

    with _errors():
        run_demo(
            directory.resolve(),
            records=records,
            workers=workers,
            console=out,
            provider=provider,
            migrate_to=migrate_to,
        )


# ---------------------------------------------------------------------- dual control
from keygate.cli.custody import register as _register_custody  # noqa: E402 - uses the helpers

_register_custody(
    app, key_app, run=_run, actor=_actor, errors=_errors, fail=_fail, out=out, err=err,
    exit_codes=EXIT_CODES,
)  # fmt: skip


def main() -> None:
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - one clear line, never a stack trace unless --verbose
        raise SystemExit(_fail(exc).exit_code) from None


if __name__ == "__main__":
    main()
