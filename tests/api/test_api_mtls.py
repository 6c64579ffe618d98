"""mTLS: ``keygate serve --tls-client-ca`` maps a client certificate to a service identity."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keygate.bootstrap import build_gateway
from keygate.config import load_settings
from keygate.hsm.softhsm import SoftHsmToken

pytestmark = [pytest.mark.api, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


@pytest.fixture(scope="module")
def mtls(
    make_token: Callable[[str], SoftHsmToken], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, object]]:
    """A `keygate serve` subprocess with mTLS, one registered client certificate and one not."""
    home = tmp_path_factory.mktemp("mtls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("keygate test CA", ca_key, "keygate test CA", ca_key, ca=True)
    _write(home / "ca", ca, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    _write(
        home / "server",
        _cert("localhost", server_key, "keygate test CA", ca_key, server=True),
        server_key,
    )
    for name in ("juki-app", "stranger"):
        k = ec.generate_private_key(ec.SECP256R1())
        _write(home / name, _cert(name, k, "keygate test CA", ca_key), k)

    token = make_token("kg-mtls")
    pin_file = home / "pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.update(token.env)
    env.update(
        KEYGATE_DATA_DIR=str(home / "data"),
        KEYGATE_HSM_TOKEN_LABEL=token.label,
        KEYGATE_HSM_PIN_FILE=str(pin_file),
        KEYGATE_REFRESH_INTERVAL_S="0.2",
        PYTHONPATH=str(REPO),
    )
    admin = build_gateway(
        load_settings(data_dir=home / "data", hsm_token_label=token.label, hsm_pin=token.user_pin),
        start_refresher=False,
    )
    admin.add_tenant("custodian:t", "131016")
    admin.create_key("custodian:t", "131016", "resident")
    der = x509.load_pem_x509_certificate((home / "juki-app.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    _, shown = admin.add_identity(
        "custodian:t", "juki-app", tenants=["131016"], purposes=["resident"], record_types=[],
        operations=["encrypt", "decrypt"], certificate_der=der,
    )  # fmt: skip
    assert shown is None  # certificate identities have no bearer token

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (home / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "keygate.cli.main", "serve", "--port", str(port),
            "--workers", "1", "--tls-cert", str(home / "server.pem"),
            "--tls-key", str(home / "server.key"), "--tls-client-ca", str(home / "ca.pem"),
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (home / "serve.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
            assert time.monotonic() < deadline
        yield {"url": url, "home": home, "admin": admin}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        admin.close()


def _client(m: dict[str, object], name: str | None) -> httpx.Client:
    home = m["home"]
    assert isinstance(home, Path)
    ctx = ssl.create_default_context(cafile=str(home / "ca.pem"))
    if name is not None:
        ctx.load_cert_chain(str(home / f"{name}.pem"), str(home / f"{name}.key"))
    return httpx.Client(base_url=str(m["url"]), verify=ctx, timeout=30)


def test_registered_client_certificate_is_the_identity(mtls: dict[str, object]) -> None:
    """A client certificate registered to an identity encrypts and decrypts without a token."""
    body = {"tenant": "131016", "purpose": "resident", "plaintext": base64.b64encode(b"x").decode()}
    with _client(mtls, "juki-app") as c:
        r = c.post("/v1/encrypt", json=body)
        assert r.status_code == 200, r.text
        ct = r.json()["ciphertext"]
        r = c.post(
            "/v1/decrypt", json={"tenant": "131016", "purpose": "resident", "ciphertext": ct}
        )
        assert r.status_code == 200
        assert r.json()["plaintext"] == body["plaintext"]
        # Its grants still apply: another purpose is forbidden.
        r = c.post("/v1/encrypt", json={**body, "purpose": "tax"})
        assert r.status_code == 403
        assert r.json()["code"] == "FORBIDDEN"


def test_unregistered_certificate_of_the_same_ca_is_unauthenticated(
    mtls: dict[str, object],
) -> None:
    """A certificate the CA signed but no identity was registered for gets 401."""
    body = {"tenant": "131016", "purpose": "resident", "plaintext": "eA=="}
    with _client(mtls, "stranger") as c:
        r = c.post("/v1/encrypt", json=body)
    assert r.status_code == 401
    assert r.json()["code"] == "UNAUTHENTICATED"


def test_no_client_certificate_fails_the_handshake(mtls: dict[str, object]) -> None:
    """Without a client certificate the TLS handshake itself is refused (CERT_REQUIRED)."""
    with _client(mtls, None) as c, pytest.raises(httpx.TransportError):
        c.get("/healthz")


def test_revoked_certificate_identity_is_refused(mtls: dict[str, object]) -> None:
    """Revoking the certificate's identity makes the running gateway refuse it within seconds."""
    admin = mtls["admin"]
    body = {"tenant": "131016", "purpose": "resident", "plaintext": "eA=="}
    admin.revoke_identity("custodian:t", "juki-app")  # type: ignore[attr-defined]
    deadline = time.monotonic() + 15
    with _client(mtls, "juki-app") as c:
        while True:
            r = c.post("/v1/encrypt", json=body)
            if r.status_code == 401:
                break
            assert time.monotonic() < deadline, r.status_code
            time.sleep(0.2)
