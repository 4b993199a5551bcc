"""One pure-ASGI middleware for what every request passes through, in this order:
request id, HTTP metrics, authentication, body size limit, admission control.

Pure ASGI (no BaseHTTPMiddleware) so streams are not buffered and the per-request cost
stays a few dict lookups."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from typing import Any, Callable

from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import error_body
from service.settings import Settings
from service.telemetry.metrics import GatewayMetrics

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class _BodyTooLarge(StarletteHTTPException):
    """Raised while the body is read: FastAPI passes HTTPExceptions through to our handler."""

    code = "request_too_large"

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


async def _send_error(send: Callable, status: int, message: str, type_: str, code: str | None,
                      headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class GatewayMiddleware:
    def __init__(self, app: Any, settings: Settings, metrics: GatewayMetrics, state: Any):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.state = state  # app.state: the Gateway appears there once the engine is up
        self.keys = [k.encode() for k in settings.api_keys]

    # ---- pieces
    def _needs_key(self, path: str) -> bool:
        if not self.keys:
            return False
        if path.startswith("/v1/"):
            return True
        if path == "/metrics":
            return self.settings.protect_metrics
        if path.startswith("/health"):
            return self.settings.protect_health
        return False

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        token = token.strip()
        ok = False
        for key in self.keys:  # compare with every key: time does not depend on which matched
            ok |= hmac.compare_digest(token, key)
        return ok

    def _shed_reason(self, gw: Any) -> str | None:
        s = self.settings
        if s.max_in_flight and gw.in_flight >= s.max_in_flight:
            return f"the server is at its limit of {s.max_in_flight} requests in flight"
        es = gw.engine_state
        if s.max_waiting and es.waiting >= s.max_waiting:
            return f"the engine queue is full ({es.waiting} requests waiting)"
        if s.shed_kv_usage and es.kv_usage >= s.shed_kv_usage:
            return f"the KV cache is {es.kv_usage:.0%} full"
        return None

    # ---- the request
    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        rid = _request_id(headers.get(b"x-request-id")) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started = False
        t0 = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
            await send(message)

        path, method = scope.get("path", ""), scope.get("method", "")
        gw = None
        admitted = False
        try:
            if self._needs_key(path) and not self._authorized(headers):
                await _send_error(send_wrapper, 401, "Invalid or missing API key (Authorization: Bearer ...).",
                                  "authentication_error", "invalid_api_key",
                                  [(b"www-authenticate", b"Bearer")])
                return
            length = headers.get(b"content-length")
            limit = self.settings.max_body_bytes
            if length is not None and length.isdigit() and int(length) > limit:
                await _send_error(send_wrapper, 413, f"request body larger than {limit} bytes",
                                  "invalid_request_error", "request_too_large")
                return
            receive = _limited(receive, limit)
            if method == "POST" and path in COMPLETION_PATHS:
                gw = getattr(self.state, "gateway", None)
                if gw is not None:
                    if gw.draining:
                        await _send_error(send_wrapper, 503, "the server is shutting down", "service_unavailable",
                                          "draining", [(b"retry-after", b"5")])
                        return
                    reason = self._shed_reason(gw)
                    if reason:
                        await _send_error(send_wrapper, 429, reason + "; retry later", "rate_limit_error",
                                          "overloaded",
                                          [(b"retry-after", str(self.settings.retry_after_seconds).encode())])
                        return
                    gw.in_flight += 1
                    admitted = True
            await self.app(scope, receive, send_wrapper)
        except _BodyTooLarge as e:  # read outside a FastAPI route
            if not started:
                await _send_error(send_wrapper, 413, e.detail, "invalid_request_error", e.code)
        finally:
            if admitted:
                gw.in_flight -= 1
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http_requests.labels(route, method, f"{status // 100}xx").inc()
            self.metrics.http_latency.labels(route, method).observe(time.perf_counter() - t0)


def _limited(receive: Callable, limit: int) -> Callable:
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge(limit)
        return message

    return wrapped


def _request_id(raw: bytes | None) -> str | None:
    if not raw:
        return None
    value = raw.decode("latin-1").strip()
    if value and len(value) <= 128 and value.isprintable():
        return value
    return None
