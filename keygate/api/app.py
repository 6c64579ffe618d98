"""The FastAPI application: every endpoint of API.md, authentication, problem+json errors.

Endpoints are plain ``def`` functions, so Starlette runs them in its thread pool: the HSM and the
audit trail block, and the crypto itself takes microseconds.  One pure-ASGI middleware gives each
request its id, enforces the body limit, records metrics and writes one access log line.
"""

from __future__ import annotations

import binascii
import gc
import json
import re
import secrets
import time
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, Final

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from keygate.api._batch import (
    decode_plaintexts,
    envelope_or_text,
    fast_route,
    load,
    parse_decrypt,
    parse_encrypt,
    parse_rewrap,
    render_bytes,
    render_envelopes,
    render_texts,
)
from keygate.api._process import tune_malloc
from keygate.api.errors import STATUS_BY_CODE, error_object, problem_response
from keygate.api.metrics import InstrumentedHsm, Metrics, render_metrics
from keygate.api.schemas import (
    DecryptBatchRequest,
    DecryptRequest,
    DecryptResponse,
    EncryptBatchRequest,
    EncryptRequest,
    EncryptResponse,
    Problem,
    RecordBatchRequest,
    RecordRequest,
    RewrapBatchRequest,
)
from keygate.audit.events import AuditEvent
from keygate.config import Settings, load_settings
from keygate.core.errors import GatewayError, InvalidRequest, ProviderRejected, Unauthenticated
from keygate.policy.access import Principal
from keygate.service import BatchResult, Gateway

__all__ = ["create_app"]

log = structlog.get_logger("keygate.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ERROR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    status: {
        "model": Problem,
        "description": ", ".join(c for c, s in STATUS_BY_CODE.items() if s == status),
    }
    for status in sorted(set(STATUS_BY_CODE.values()))
}
_bearer = HTTPBearer(auto_error=False, description="a keygate service-identity token (kgt_…)")


def _b64decode(value: str, what: str) -> bytes:
    try:
        return binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidRequest(f"{what} is not valid standard base64") from None


def _b64encode(value: bytes) -> str:
    return binascii.b2a_base64(value, newline=False).decode("ascii")


def _json(body: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        status_code=status,
        media_type="application/json",
    )


def _batch_body(
    result: BatchResult, key: str, encode: Callable[[Any], Any] = lambda v: v
) -> Response:
    items = [
        {"error": error_object(item)} if isinstance(item, GatewayError) else {key: encode(item)}
        for item in result.items
    ]
    return _json({"items": items})


class _BodyTooLarge(StarletteHTTPException):
    """Raised from receive(); an HTTPException so FastAPI's body reader re-raises it unchanged."""

    def __init__(self) -> None:
        super().__init__(status_code=413)


class GatewayMiddleware:
    """Request ids, body limit, metrics and the access log, as plain ASGI (no per-request task)."""

    def __init__(self, app: ASGIApp, *, max_body: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                given = value.decode("latin-1")
            elif name == b"content-length":
                length = value
        request_id = given if _REQUEST_ID_RE.fullmatch(given) else secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        start = time.perf_counter()
        status_holder = {"status": 500}
        endpoint = scope.get("path", "")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = 1
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                await problem_response(
                    "PAYLOAD_TOO_LARGE",
                    f"the body is larger than {self.max_body} bytes",
                    request_id,
                )(scope, receive, send_with_id)
                return
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise _BodyTooLarge
                return message

            try:
                await self.app(scope, limited_receive, send_with_id)
            except _BodyTooLarge:
                scope["state"]["error_code"] = "PAYLOAD_TOO_LARGE"
                await problem_response(
                    "PAYLOAD_TOO_LARGE",
                    f"the body is larger than {self.max_body} bytes",
                    request_id,
                )(scope, receive, send_with_id)
            except Exception as exc:
                # Log where it happened, not the message (it could quote input).
                frames = [
                    f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}"
                    for f in traceback.extract_tb(exc.__traceback__)
                ]
                log.error(  # noqa: TRY400 - no traceback text: it could quote input
                    "http.internal_error", error=type(exc).__name__, frames=frames[-8:]
                )
                scope["state"]["error_code"] = "INTERNAL"
                if status_holder.get("started"):
                    raise
                await problem_response("INTERNAL", "internal error", request_id)(
                    scope, receive, send_with_id
                )
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            status = status_holder["status"]
            code = scope.get("state", {}).get("error_code", str(status))
            self.metrics.requests.labels(endpoint, code).inc()
            self.metrics.latency.labels(endpoint).observe(elapsed)
            log.info(
                "http.request",
                method=scope.get("method"),
                path=endpoint,
                status=status,
                code=code,
                ms=round(elapsed * 1000, 2),
            )
            structlog.contextvars.unbind_contextvars("request_id")


def create_app(settings: Settings | None = None, gateway: Gateway | None = None) -> FastAPI:
    """The ASGI app.  Built per worker process (``uvicorn --factory``)."""
    settings = settings or load_settings()
    if gateway is None:  # a server worker process of its own (keygate serve)
        from keygate.logging import configure_logging

        configure_logging(fmt=settings.log_format, level=settings.log_level)
        tune_malloc()
    metrics = Metrics()
    gw_holder: dict[str, Gateway] = {}
    if gateway is not None:
        gw_holder["gw"] = gateway

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        if "gw" not in gw_holder:
            from keygate.bootstrap import build_gateway

            gw_holder["gw"] = build_gateway(
                settings, instrument_hsm=lambda hsm: InstrumentedHsm(hsm, metrics)
            )
        gw = gw_holder["gw"]
        gw.keys.on_refresh.append(lambda km: metrics.sync_key_stats(km.stats))
        log.info("gateway.started", generation=gw.keys.generation)
        if gateway is None:
            # A worker of its own: everything built so far lives as long as the process.  Keep
            # it out of the cyclic collector's full passes, which batches of many items set off
            # often (each pass walking every module, model and registry object of the process).
            gc.freeze()
        try:
            yield
        finally:
            if gateway is None:
                gw.close()

    app = FastAPI(
        title="keygate",
        version="1",
        summary="Data-sovereignty key management and encryption gateway (API v1)",
        lifespan=lifespan,
        responses=_ERROR_RESPONSES,
    )

    def gw() -> Gateway:
        return gw_holder["gw"]

    def request_id(request: Request) -> str:
        return str(request.scope.get("state", {}).get("request_id", "-"))

    def principal(
        request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> Principal:
        g = gw()
        der = request.scope.get("extensions", {}).get("tls", {}).get("client_cert_der")
        p: Principal | None = None
        if creds is not None and creds.scheme.lower() == "bearer":
            p = g.authenticate(creds.credentials)
        elif der:
            p = g.authenticate_certificate(der)
        if p is None:
            reason = "bad credentials" if creds is not None or der else "no credentials"
            g.audit_event(
                AuditEvent(
                    action="auth.failed",
                    outcome="denied",
                    actor="anonymous",
                    request_id=request_id(request),
                    code="UNAUTHENTICATED",
                    detail={"reason": reason, "path": request.url.path[:200]},
                )
            )
            raise Unauthenticated("a valid bearer token or client certificate is required")
        structlog.contextvars.bind_contextvars(identity=p.name)
        request.scope.setdefault("state", {})["principal"] = p
        return p

    # ------------------------------------------------------------------ errors
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        request.scope.setdefault("state", {})["error_code"] = exc.code
        obj = error_object(exc)
        return problem_response(
            obj["code"],
            obj["detail"],
            request_id(request),
            retry_after=exc.retry_after,
            reason=obj.get("reason"),
            retryable=not isinstance(exc, ProviderRejected),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        # Name where the problem is, never the offending value (it may be plaintext).
        where = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            where.append(f"{loc or 'body'}: {err.get('type', 'invalid')}")
        request.scope.setdefault("state", {})["error_code"] = "INVALID_REQUEST"
        p = request.scope["state"].get("principal")
        if p is not None:  # authenticated: the refused call is audited like any other
            try:
                gw().audit_event(
                    AuditEvent(
                        action="request.rejected",
                        outcome="error",
                        actor=p.name,
                        request_id=request_id(request),
                        code="INVALID_REQUEST",
                        detail={"path": request.url.path[:200]},
                    )
                )
            except GatewayError as audit_exc:
                return problem_response(
                    audit_exc.code,
                    audit_exc.detail,
                    request_id(request),
                    retry_after=audit_exc.retry_after,
                )
        return problem_response(
            "INVALID_REQUEST", "; ".join(where) or "malformed request", request_id(request)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}.get(
            exc.status_code, "INVALID_REQUEST"
        )
        request.scope.setdefault("state", {})["error_code"] = code
        detail = {
            "NOT_FOUND": "no such endpoint",
            "METHOD_NOT_ALLOWED": "method not allowed",
            "PAYLOAD_TOO_LARGE": "the body is larger than the configured limit",
        }.get(code, "bad request")
        return problem_response(code, detail, request_id(request))

    # ------------------------------------------------------------------ operations
    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz() -> Response:
        report = gw().readiness()
        return _json({"ready": report.ready, "checks": report.checks}, 200 if report.ready else 503)

    @app.get("/metrics", tags=["operations"])
    def metrics_endpoint() -> Response:
        metrics.sync_key_stats(gw().keys.stats)
        body, ctype = render_metrics()
        return Response(body, media_type=ctype)

    # ------------------------------------------------------------------ opaque values
    @app.post("/v1/encrypt", response_model=EncryptResponse, tags=["opaque"])
    def encrypt(
        body: EncryptRequest, request: Request, p: Principal = Depends(principal)
    ) -> Response:
        plaintext = _b64decode(body.plaintext, "plaintext")
        text, version = gw().encrypt(
            p, request_id(request), body.tenant, body.purpose, body.context, plaintext
        )
        return _json({"ciphertext": text, "key_version": version})

    @app.post("/v1/decrypt", response_model=DecryptResponse, tags=["opaque"])
    def decrypt(
        body: DecryptRequest, request: Request, p: Principal = Depends(principal)
    ) -> Response:
        plaintext = gw().decrypt(
            p, request_id(request), body.tenant, body.purpose, body.context, body.ciphertext
        )
        return _json({"plaintext": _b64encode(plaintext)})

    # The batch endpoints below are declared with their Pydantic bodies (the OpenAPI document,
    # and the answer to every request the fast path in keygate.api._batch does not take); their
    # route class runs that fast path first.
    def _ok(body: bytes) -> Response:
        return Response(body, media_type="application/json")

    def fast_encrypt(request: Request, body: bytes, creds: Any) -> Response | None:
        parsed = parse_encrypt(load(body))
        if parsed is None:
            return None
        tenant, purpose, items = parsed
        p = principal(request, creds)
        good, bad = decode_plaintexts(items)
        result = gw().encrypt_batch(p, request_id(request), tenant, purpose, good, text=False)
        result = _merge(result, bad, len(items))
        return _ok(render_envelopes(result.items, result.failed, "ciphertext"))

    def fast_decrypt(request: Request, body: bytes, creds: Any) -> Response | None:
        parsed = parse_decrypt(load(body))
        if parsed is None:
            return None
        tenant, purpose, items = parsed
        p = principal(request, creds)
        pairs = [(context, envelope_or_text(text)) for context, text in items]
        result = gw().decrypt_batch(p, request_id(request), tenant, purpose, pairs)
        return _ok(render_bytes(result.items, result.failed, "plaintext"))

    def fast_rewrap(request: Request, body: bytes, creds: Any) -> Response | None:
        parsed = parse_rewrap(load(body))
        if parsed is None:
            return None
        tenant, purpose, items = parsed
        p = principal(request, creds)
        result = gw().rewrap_batch(p, request_id(request), tenant, purpose, items)
        return _ok(render_texts(result.items, result.failed, "ciphertext"))

    def batch_route(path: str, work: Any) -> Callable[[Callable[..., Any]], Any]:
        def declare(endpoint: Callable[..., Any]) -> Callable[..., Any]:
            app.router.add_api_route(
                path,
                endpoint,
                methods=["POST"],
                tags=["opaque"],
                route_class_override=fast_route(work, _bearer),
            )
            return endpoint

        return declare

    @batch_route("/v1/encrypt/batch", fast_encrypt)
    def encrypt_batch(
        body: EncryptBatchRequest, request: Request, p: Principal = Depends(principal)
    ) -> Response:
        items: list[Any] = []
        bad: dict[int, GatewayError] = {}
        for i, item in enumerate(body.items):
            try:
                items.append((item.context, _b64decode(item.plaintext, "plaintext")))
            except GatewayError as exc:
                bad[i] = exc
        result = gw().encrypt_batch(p, request_id(request), body.tenant, body.purpose, items)
        return _batch_body(_merge(result, bad, len(body.items)), "ciphertext")

    @batch_route("/v1/decrypt/batch", fast_decrypt)
    def decrypt_batch(
        body: DecryptBatchRequest, request: Request, p: Principal = Depends(principal)
    ) -> Response:
        pairs = [(item.context, item.ciphertext) for item in body.items]
        result = gw().decrypt_batch(p, request_id(request), body.tenant, body.purpose, pairs)
        return _batch_body(result, "plaintext", _b64encode)

    @batch_route("/v1/rewrap/batch", fast_rewrap)
    def rewrap_batch(
        body: RewrapBatchRequest, request: Request, p: Principal = Depends(principal)
    ) -> Response:
        result = gw().rewrap_batch(
            p, request_id(request), body.tenant, body.purpose, [i.ciphertext for i in body.items]
        )
        return _batch_body(result, "ciphertext")

    # ------------------------------------------------------------------ records
    @app.post("/v1/records/{record_type}/encrypt", tags=["records"])
    def record_encrypt(
        record_type: str, body: RecordRequest, request: Request, p: Principal = Depends(principal)
    ) -> Response:
        out = gw().encrypt_record(
            p, request_id(request), record_type, body.tenant, body.record_id, body.record
        )
        return _json({"record": out})

    @app.post("/v1/records/{record_type}/decrypt", tags=["records"])
    def record_decrypt(
        record_type: str, body: RecordRequest, request: Request, p: Principal = Depends(principal)
    ) -> Response:
        out = gw().decrypt_record(
            p, request_id(request), record_type, body.tenant, body.record_id, body.record
        )
        return _json({"record": out})

    @app.post("/v1/records/{record_type}/encrypt/batch", tags=["records"])
    def record_encrypt_batch(
        record_type: str,
        body: RecordBatchRequest,
        request: Request,
        p: Principal = Depends(principal),
    ) -> Response:
        items = [(i.record_id, i.record) for i in body.items]
        return _batch_body(
            gw().encrypt_record_batch(p, request_id(request), record_type, body.tenant, items),
            "record",
        )

    @app.post("/v1/records/{record_type}/decrypt/batch", tags=["records"])
    def record_decrypt_batch(
        record_type: str,
        body: RecordBatchRequest,
        request: Request,
        p: Principal = Depends(principal),
    ) -> Response:
        items = [(i.record_id, i.record) for i in body.items]
        return _batch_body(
            gw().decrypt_record_batch(p, request_id(request), record_type, body.tenant, items),
            "record",
        )

    app.add_middleware(GatewayMiddleware, max_body=settings.max_body_bytes, metrics=metrics)
    return app


def _merge(result: BatchResult, bad: dict[int, GatewayError], n: int) -> BatchResult:
    """Put per-item decoding errors back into their slots around the service's results."""
    if not bad:
        return result
    it = iter(result.items)
    items = [bad[i] if i in bad else next(it) for i in range(n)]
    return BatchResult(items, result.failed + len(bad))
