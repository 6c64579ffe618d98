"""A throwaway PostgreSQL cluster for tests.

``PostgresServer`` runs ``initdb`` into a fresh temporary directory, starts ``postgres`` listening
on 127.0.0.1 only (on a free port; its unix socket stays inside the temporary directory), trusts
connections from the loopback address and the socket only, and removes everything on exit::

    with PostgresServer() as pg:
        registry = Registry(pg.url)                     # postgresql+psycopg://keygate@127.0.0.1:PORT/keygate
        other = Registry(pg.create_database("case_42")) # a fresh, empty database
        third = Registry(pg.create_schema("case_43"))   # an empty schema first in search_path

PostgreSQL refuses to run as root.  When we are root (as in CI), the server runs as the ``postgres``
user that Debian's packages create, or else as ``nobody``, through ``setpriv`` (or ``runuser``);
nothing is created system-wide: only the temporary directory is handed to that user.  The server
is stopped with ``pg_ctl stop -m fast`` on its own data directory, then, if need be, by signalling
the one process this object started.

Binaries are found through ``$KEYGATE_PG_BINDIR``, ``pg_config --bindir`` or
``/usr/lib/postgresql/*/bin`` (newest first); :func:`find_bindir` returns ``None`` when there are
none, so a test fixture can skip.  Durability is traded for speed (``fsync=off``): never point
anything that matters at this server.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = ["PostgresServer", "find_bindir"]

_REQUIRED_BINARIES: Final = ("initdb", "postgres", "pg_ctl", "pg_isready", "createdb", "psql")
_DEBIAN_BINDIRS: Final = "/usr/lib/postgresql/*/bin"
_DATABASE_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_FALLBACK_USERS: Final = ("postgres", "nobody")
_START_ATTEMPTS: Final = 3
#: searched for helper programs (setpriv, runuser, pg_config); the server's own binaries come
#: from the bindir found below.
_SYSTEM_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _has_binaries(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in _REQUIRED_BINARIES)


def _version_key(bindir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin → (15,); non-numeric names sort first.
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


def find_bindir() -> Path | None:
    """The directory holding ``initdb``, ``postgres`` and ``pg_ctl``; ``None`` if there is none."""
    override = os.environ.get("KEYGATE_PG_BINDIR")
    if override:
        path = Path(override)
        return path if _has_binaries(path) else None
    pg_config = shutil.which("pg_config", path=os.environ.get("PATH", _SYSTEM_PATH))
    if pg_config:
        try:
            out = subprocess.run(  # noqa: S603 - absolute path from shutil.which, fixed arguments
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_binaries(Path(out)):
            return Path(out)
    candidates = sorted(
        (p for p in Path("/").glob(_DEBIAN_BINDIRS.lstrip("/")) if _has_binaries(p)),
        key=_version_key,
        reverse=True,
    )
    return candidates[0] if candidates else None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _searchable_by(path: Path, uid: int, gid: int) -> bool:
    """True if ``uid``/``gid`` may traverse every directory from ``/`` down to ``path``."""
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_mode & stat.S_IXOTH:
            continue
        if st.st_uid == uid and st.st_mode & stat.S_IXUSR:
            continue
        if st.st_gid == gid and st.st_mode & stat.S_IXGRP:
            continue
        return False
    return True


class PostgresServer:
    """A PostgreSQL cluster in a temporary directory, for the lifetime of a ``with`` block."""

    host: Final = "127.0.0.1"

    def __init__(
        self,
        *,
        bindir: str | Path | None = None,
        database: str = "keygate",
        user: str = "keygate",
        base_dir: str | Path | None = None,
        startup_timeout: float = 30.0,
        run_as: str | None = None,
    ) -> None:
        """Describe a server; nothing runs until :meth:`start` (or ``with``).

        ``run_as`` names the OS user the server runs as when we are root (default: ``postgres``,
        else ``nobody``); it is ignored when we are not root.
        """
        found = Path(bindir) if bindir is not None else find_bindir()
        if found is None or not _has_binaries(found):
            raise RuntimeError(
                "no PostgreSQL binaries found (looked at $KEYGATE_PG_BINDIR, `pg_config --bindir` "
                f"and {_DEBIAN_BINDIRS})"
            )
        if not _DATABASE_NAME.fullmatch(database) or not _DATABASE_NAME.fullmatch(user):
            raise ValueError("database and user must match [a-z_][a-z0-9_]{0,62}")
        self.bindir = found
        self.database = database
        self.user = user
        self.port = 0
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._startup_timeout = startup_timeout
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as: pwd.struct_passwd | None = None
        self._run_as_name = run_as
        self._prefix: list[str] = []

    # -- public -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default database (``postgresql+psycopg://…``)."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        if self._proc is None:
            raise RuntimeError("the PostgreSQL server is not running")
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def data_dir(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("the PostgreSQL server is not running")
        return self._tmp / "data"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def run_as(self) -> str | None:
        """The OS user the server runs as, or ``None`` when it runs as the current user."""
        return self._run_as.pw_name if self._run_as is not None else None

    def start(self) -> PostgresServer:
        if self._proc is not None:
            raise RuntimeError("the PostgreSQL server is already running")
        self._choose_user()
        self._tmp = Path(
            tempfile.mkdtemp(prefix="keygate-pg-", dir=self._base_dir or tempfile.gettempdir())
        )
        atexit.register(self.stop)
        try:
            self._initdb()
            self._start_postmaster()
            self._run([str(self.bindir / "createdb"), *self._client_args(), self.database])
        except BaseException:
            self.stop()
            raise
        return self

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError("database names must match [a-z_][a-z0-9_]{0,62}")
        self._run([str(self.bindir / "createdb"), *self._client_args(), name])
        return self.url_for(name)

    def execute(self, sql: str, *, database: str | None = None) -> str:
        """Run SQL through ``psql`` as the superuser; return its unaligned, tuples-only output."""
        return self._run(
            [
                str(self.bindir / "psql"),
                *self._client_args(),
                "-d",
                database or self.database,
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ]
        )

    def create_schema(self, name: str, *, database: str | None = None) -> str:
        """Create an empty schema and return a URL whose ``search_path`` starts with it.

        Much cheaper than :meth:`create_database` (milliseconds rather than a copy of
        ``template1``), so suites can give every test its own schema.
        """
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError("schema names must match [a-z_][a-z0-9_]{0,62}")
        self.execute(f"CREATE SCHEMA {name}", database=database)
        return f"{self.url_for(database or self.database)}?options=-csearch_path%3D{name}"

    def stop(self) -> None:
        """Stop the server this object started (``pg_ctl stop -m fast``); remove its directory."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                self._run(
                    [
                        str(self.bindir / "pg_ctl"),
                        "stop",
                        "-D",
                        str(self.data_dir),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        "30",
                    ],
                    as_server=True,
                )
                proc.wait(timeout=30)
            except (OSError, RuntimeError, subprocess.SubprocessError):
                # pg_ctl failed: signal only the process we started, never anything by name.
                proc.kill()
                proc.wait(timeout=30)
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server log (for error messages)."""
        if self._tmp is None:
            return ""
        try:
            text = (self._tmp / "postgres.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals --------------------------------------------------------------------------

    def _choose_user(self) -> None:
        if os.geteuid() != 0:
            self._run_as = None
            self._prefix = []
            return
        candidates = (self._run_as_name,) if self._run_as_name else _FALLBACK_USERS
        for name in candidates:
            try:
                self._run_as = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        else:
            raise RuntimeError(
                f"running as root and no user {' or '.join(map(repr, candidates))} exists; "
                "PostgreSQL refuses to run as root"
            )
        if self._run_as.pw_uid == 0:
            raise RuntimeError("PostgreSQL refuses to run as root; choose another run_as user")
        setpriv = shutil.which("setpriv", path=_SYSTEM_PATH)
        runuser = shutil.which("runuser", path=_SYSTEM_PATH)
        uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
        if setpriv:
            self._prefix = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        elif runuser:
            self._prefix = [runuser, "-u", self._run_as.pw_name, "--"]
        else:
            raise RuntimeError("running as root, but neither setpriv nor runuser is available")

    def _env(self) -> dict[str, str]:
        # A clean environment: no PG* variables (PGPASSWORD, PGHOST…) leak in from the caller.
        return {
            "PATH": _SYSTEM_PATH,
            "LC_ALL": "C",
            "LANG": "C",
            "TZ": "UTC",
            "HOME": str(self._tmp) if self._tmp is not None else "/",
        }

    def _client_args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", self.user]

    def _run(self, argv: list[str], *, as_server: bool = False) -> str:
        cmd = [*self._prefix, *argv] if as_server else argv
        result = subprocess.run(  # noqa: S603 - absolute binary paths, arguments built here
            cmd, capture_output=True, text=True, env=self._env(), timeout=60, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n{self.log_tail()}"
            )
        return result.stdout

    def _initdb(self) -> None:
        assert self._tmp is not None  # noqa: S101 - set by start()
        if self._run_as is not None:
            uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
            if not _searchable_by(self._tmp.parent, uid, gid):
                raise RuntimeError(
                    f"PostgreSQL runs as {self._run_as.pw_name!r}, which cannot reach "
                    f"{self._tmp.parent}; pass base_dir= or set TMPDIR to a world-searchable "
                    "directory"
                )
            os.chown(self._tmp, uid, gid)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self._tmp / "data"),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            as_server=True,
        )
        # Trust the unix socket (inside our private directory) and the IPv4 loopback only.
        hba = self._tmp / "data" / "pg_hba.conf"
        hba.write_text(
            "# written by keygate.testing.postgres\n"
            "local all all trust\n"
            "host  all all 127.0.0.1/32 trust\n"
        )
        if self._run_as is not None:
            os.chown(hba, self._run_as.pw_uid, self._run_as.pw_gid)

    def _start_postmaster(self) -> None:
        assert self._tmp is not None  # noqa: S101 - set by start()
        last_error = ""
        for _ in range(_START_ATTEMPTS):
            self.port = _free_port(self.host)
            argv = [
                *self._prefix,
                str(self.bindir / "postgres"),
                "-D",
                str(self._tmp / "data"),
                "-p",
                str(self.port),
                "-k",
                str(self._tmp),
                "-c",
                f"listen_addresses={self.host}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                "-c",
                "logging_collector=off",
            ]
            with (self._tmp / "postgres.log").open("ab") as log:
                self._proc = subprocess.Popen(  # noqa: S603 - absolute binary paths
                    argv, stdout=log, stderr=subprocess.STDOUT, env=self._env()
                )
            if self._wait_ready():
                return
            last_error = self.log_tail()
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=30)
            self._proc = None
        raise RuntimeError(f"PostgreSQL did not start:\n{last_error}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None  # noqa: S101 - set by _start_postmaster()
        deadline = time.monotonic() + self._startup_timeout
        isready = [
            str(self.bindir / "pg_isready"),
            *self._client_args(),
            "-d",
            "postgres",
            "-t",
            "1",
        ]
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            probe = subprocess.run(  # noqa: S603 - absolute binary path, fixed arguments
                isready, capture_output=True, env=self._env(), timeout=10, check=False
            )
            if probe.returncode == 0:
                return True
            time.sleep(0.05)
        return False
