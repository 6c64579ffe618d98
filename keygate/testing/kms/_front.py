"""A small loopback HTTP front for the local KMS servers: forwards, records, injects faults.

:class:`HttpFront` listens on 127.0.0.1 (a free port), forwards every HTTP/1.1 request to one
upstream server (the real local server: moto, OpenBao, …) and relays the answer.  Tests point the
SDK at :attr:`HttpFront.url` and read what went over the wire:

- :attr:`HttpFront.received`: every request body, in order, exactly as the client sent it;
- :attr:`HttpFront.calls`: a counter per operation (the ``operation`` callback names it);
- :meth:`HttpFront.fault`: ``"down"`` closes the listening socket (new connections are refused,
  kept-alive ones are closed on their next request), ``"slow"`` holds each request for
  :attr:`HttpFront.slow_s` seconds before forwarding it, ``"error"`` answers ``error_reply`` (the
  provider's own 5xx) without forwarding; ``None`` restores normal forwarding.

An optional ``respond(request, reply)`` callback may replace the upstream's reply (the AWS server
uses it to enforce key state, which moto does not).  Only ``Content-Length`` request bodies are
supported (no chunked uploads): the SDKs used here always send one.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final
from urllib.parse import urlsplit

__all__ = ["FAULT_MODES", "FrontReply", "FrontRequest", "HttpFront", "ServedOnLoopback"]

FAULT_MODES: Final = frozenset({"down", "slow", "error"})
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_MAX_BODY: Final = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FrontRequest:
    """One request as the front received it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes


@dataclass(frozen=True, slots=True)
class FrontReply:
    """One answer to relay: status, headers (without Content-Length) and body."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    front: HttpFront


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests read :attr:`HttpFront.received` instead."""

    def _handle(self) -> None:
        front = self.server.front
        if front.mode == "down":
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= _MAX_BODY:
            self.send_error(413)
            return
        body = self.rfile.read(length) if length else b""
        request = FrontRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        reply = front.handle(request)
        if reply is None:  # gone down while this request waited
            self.close_connection = True
            return
        with contextlib.suppress(OSError):  # the client may have given up (timeouts)
            self.send_response(reply.status)
            for name, value in reply.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_LIST = _handle  # noqa: N815


class ServedOnLoopback:
    """What a threaded loopback HTTP server with fault injection shares (the front, the OCI fake):
    closing, ``fault("down")`` closing the listener and reopening it on the same port afterwards,
    and ``reset``.  The class provides ``_listen``, ``mode``, ``received``, ``calls``, ``_lock``,
    ``_server`` and ``_thread``."""

    mode: str | None
    received: list[bytes]
    calls: Counter[str]
    _lock: threading.Lock
    _server: ThreadingHTTPServer | None
    _thread: threading.Thread | None

    def _listen(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def fault(self, mode: str | None) -> None:
        """Inject a fault (``"down"``, ``"slow"``, ``"error"``) or end it (``None``)."""
        if mode is not None and mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {sorted(FAULT_MODES)}")
        previous, self.mode = self.mode, mode
        if mode == "down" and previous != "down":
            self._close()
        elif previous == "down" and mode != "down":
            self._listen()  # the same port again (SO_REUSEADDR)

    def reset(self) -> None:
        """Forget what was received and counted."""
        with self._lock:
            self.received.clear()
            self.calls.clear()


class HttpFront(ServedOnLoopback):
    """Forwarding proxy on 127.0.0.1 in front of ``upstream`` (``http://127.0.0.1:PORT``)."""

    host: Final = "127.0.0.1"

    def __init__(
        self,
        upstream: str,
        *,
        operation: Callable[[FrontRequest], str],
        error_reply: FrontReply,
        respond: Callable[[FrontRequest, FrontReply], FrontReply] | None = None,
        slow_s: float = 2.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError("upstream must be http://HOST:PORT")
        self._upstream = (parts.hostname, parts.port)
        self._operation = operation
        self._respond = respond
        self.error_reply = error_reply
        #: how long "slow" holds each request, seconds
        self.slow_s = slow_s
        self.mode: str | None = None
        self.received: list[bytes] = []
        self.calls: Counter[str] = Counter()
        self.port = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._stopping.clear()
        self._listen()

    def stop(self) -> None:
        self._stopping.set()
        self._close()

    def __enter__(self) -> HttpFront:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self) -> None:
        server = _Server((self.host, self.port), _Handler)
        server.front = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="kms-front",
            daemon=True,
        )
        self._thread.start()

    # ------------------------------------------------------------------------ forwarding
    def handle(self, request: FrontRequest) -> FrontReply | None:
        """Record ``request``, apply the fault mode, forward it and return the reply to send."""
        with self._lock:
            self.received.append(request.body)
            self.calls[self._operation(request)] += 1
        mode = self.mode
        if mode == "slow" and self._stopping.wait(self.slow_s):
            return None
        if mode == "error":
            return self.error_reply
        if self.mode == "down":
            return None
        reply = self.forward(request)
        return self._respond(request, reply) if self._respond is not None else reply

    def forward(self, request: FrontRequest) -> FrontReply:
        """Send ``request`` to the upstream server as is and return its answer."""
        conn = http.client.HTTPConnection(*self._upstream, timeout=30)
        try:
            conn.putrequest(request.method, request.path, skip_host=True, skip_accept_encoding=True)
            for name, value in request.headers.items():
                if name not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(request.body)))
            conn.endheaders(request.body)
            resp = conn.getresponse()
            body = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            return FrontReply(resp.status, headers, body)
        finally:
            conn.close()
