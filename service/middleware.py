"""One pure-ASGI middleware in front of vLLM's app, for what every request passes through,
in this order: request id, authentication, body size limit, engine death / drain /
admission (generation routes), request fixes (service/api/fixes.py), the admission queue on
predicted KV demand (service/admission/: chat, completions, responses), and on the way out
the OpenAI error shape on every error and every stream.

Pure ASGI (no BaseHTTPMiddleware) so streams are not buffered; only error bodies and
non-streamed generation answers (one message each) are looked at."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any, Callable

from service.admission.gate import DEMAND_PATHS
from service.api import fixes
from service.errors import error_bytes, is_openai_error, normalize, sse_error
from service.runtime import Runtime
from service.telemetry.tenants import DEFAULT_TENANT, TENANTS

log = logging.getLogger(__name__)

#: routes that start engine work: admission control, drain and the engine-death check apply
GENERATION_PATHS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
    "/v1/chat/completions/batch", "/v1/messages", "/inference/v1/generate", "/pooling",
    "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
    "/v1/audio/transcriptions", "/v1/audio/translations", "/invocations",
})
_BAD_FINISH = re.compile(rb'"finish_reason"\s*:\s*"(abort|error)"')


class _BodyTooLarge(Exception):
    pass


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _request_id(raw: bytes | None) -> str | None:
    if not raw:
        return None
    value = raw.decode("latin-1").strip()
    if value and len(value) <= 128 and value.isprintable() and " " not in value:
        return value
    return None


class GatewayMiddleware:
    def __init__(self, app: Any, runtime: Runtime):
        self.app = app
        self.rt = runtime
        self.settings = runtime.settings
        self.keys = [(name, k.encode()) for name, k in runtime.settings.tenant_keys]

    # ---- pieces
    def _needs_key(self, path: str) -> bool:
        if not self.keys:
            return False
        if path == "/metrics" or path.startswith("/metrics/"):
            return self.settings.protect_metrics
        if path.startswith("/health") or path in ("/ping", "/version"):
            return self.settings.protect_health
        return True

    def _tenant(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The name of the API key the request carries; None when it carries none of ours."""
        auth = _header(headers, b"authorization") or b""
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None
        token = token.strip()
        found = None
        for name, key in self.keys:  # compare with every key: time does not depend on which matched
            if hmac.compare_digest(token, key):
                found = name
        return found

    def _shed_reason(self) -> str | None:
        s, es = self.settings, self.rt.engine_state
        if s.max_in_flight and self.rt.in_flight >= s.max_in_flight:
            return f"the server is at its limit of {s.max_in_flight} requests in flight"
        if s.max_waiting and es.waiting >= s.max_waiting:
            return f"the engine queue is full ({es.waiting} requests waiting)"
        if s.shed_kv_usage and es.kv_usage >= s.shed_kv_usage:
            return f"the KV cache is {es.kv_usage:.0%} full"
        return None

    async def _read_body(self, receive: Callable) -> bytes:
        limit, parts, size = self.settings.max_body_bytes, [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge()
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    # ---- the request
    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or ())
        rid = _request_id(_header(headers, b"x-request-id"))
        path, method = scope.get("path", ""), scope.get("method", "")
        status, t0 = 500, time.perf_counter()
        admitted, ticket = False, None
        out = _Responder(send, rid or "", path in GENERATION_PATHS)
        try:
            tenant = self._tenant(headers) if self.keys else DEFAULT_TENANT
            if method != "OPTIONS" and self._needs_key(path) and tenant is None:
                await out.error(401, "Invalid or missing API key (Authorization: Bearer ...).",
                                "invalid_api_key", [(b"www-authenticate", b"Bearer")])
                return
            length = _header(headers, b"content-length")
            limit = self.settings.max_body_bytes
            if length is not None and length.isdigit() and int(length) > limit:
                await out.error(413, f"request body larger than {limit} bytes", "request_too_large")
                return
            generation = method == "POST" and path in GENERATION_PATHS
            if generation:
                if self.rt.engine_dead:
                    await out.error(503, "the inference engine is not running", "engine_dead")
                    return
                if self.rt.draining:
                    await out.error(503, "the server is shutting down", "draining", [(b"retry-after", b"5")])
                    return
                reason = self._shed_reason()
                if reason:
                    await out.error(429, reason + "; retry later", "overloaded",
                                    [(b"retry-after", str(self.settings.retry_after_seconds).encode())])
                    return
                self.rt.in_flight += 1
                admitted = True
            if method == "POST" and path in fixes.FIXED_PATHS:
                body = await self._read_body(receive)
                fixed = await self._fix(path, body, out)
                if fixed is None:
                    return
                body, body_rid = fixed
                rid = rid or body_rid
                client_receive, receive = receive, _replay(body, receive)
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
            else:
                receive = _limited(receive, limit)
            rid = rid or uuid.uuid4().hex
            out.request_id = rid
            # vLLM names the engine request after this header (chat: chatcmpl-<id>).
            headers = [(k, v) for k, v in headers if k.lower() != b"x-request-id"]
            headers.append((b"x-request-id", rid.encode()))
            scope["headers"] = headers
            state = scope.setdefault("state", {})
            state["request_id"], state["tenant"] = rid, tenant or DEFAULT_TENANT
            if generation:
                TENANTS.bind(rid, tenant or DEFAULT_TENANT)
            if generation and self.rt.gate is not None and path in DEMAND_PATHS:
                ticket, refused, client_receive = await self.rt.gate.enter(
                    path, body, tenant or DEFAULT_TENANT, rid, client_receive)
                if refused is not None:
                    await out.error(429, refused.message + "; retry later", "overloaded",
                                    [(b"retry-after", str(refused.retry_after).encode())])
                    return
                receive = _replay(body, client_receive)
            await self.app(scope, receive, out.send)
        except _BodyTooLarge:
            if not out.started:
                await out.error(413, f"request body larger than {self.settings.max_body_bytes} bytes",
                                "request_too_large")
        except asyncio.CancelledError:
            raise
        except Exception:
            if out.started:
                raise
            log.exception("unhandled error")
            await out.error(500, "internal error", None)
        finally:
            status = out.status
            if ticket is not None:
                self.rt.gate.release(ticket)
            if admitted:
                self.rt.in_flight -= 1
            m = self.rt.metrics
            if m is not None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                m.http_requests.labels(route, method, f"{status // 100}xx").inc()
                m.http_latency.labels(route, method).observe(time.perf_counter() - t0)

    async def _fix(self, path: str, body: bytes, out: "_Responder") -> tuple[bytes, str | None] | None:
        # Inline: json.loads holds the GIL, so a worker thread would not free the loop
        # (a 4 MiB body parses in ~18 ms; vLLM parses it again itself).
        try:
            result = fixes.fix_body(path, body, self.rt)
        except fixes.RequestRefused as e:
            await out.error(e.status, e.message, e.code, param=e.param)
            return None
        return result


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def wrapped() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # disconnect detection (vLLM aborts the engine request)

    return wrapped


def _limited(receive: Callable, limit: int) -> Callable:
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge()
        return message

    return wrapped


class _Responder:
    """The response side: request-id header, OpenAI-shaped errors, and no 200 that carries
    an engine ``abort``/``error`` finish reason (JSON answers and SSE events alike)."""

    def __init__(self, send: Callable, request_id: str, generation: bool):
        self._send = send
        self.request_id = request_id
        self.generation = generation
        self.status = 500
        self.started = False
        self._held: dict | None = None  # response start held back until the body is known
        self._sse = False
        self._buffer: list[bytes] = []

    def _headers(self, headers: list) -> list:
        out = [(k, v) for k, v in headers if k.lower() not in (b"x-request-id", b"content-length")]
        if self.request_id:
            out.append((b"x-request-id", self.request_id.encode()))
        return out

    async def error(self, status: int, message: str, code: str | None,
                    extra: list[tuple[bytes, bytes]] = (), param: str | None = None) -> None:
        body = error_bytes(status, message, code, param)
        await self._start(status, [(b"content-type", b"application/json"), *extra], body)
        await self._send({"type": "http.response.body", "body": body})

    async def _start(self, status: int, headers: list, body: bytes) -> None:
        self.status, self.started = status, True
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [*self._headers(headers), (b"content-length", str(len(body)).encode())]})

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            ctype = _header(message.get("headers", []), b"content-type") or b""
            self._sse = ctype.startswith(b"text/event-stream")
            if self.status >= 400 or (self.generation and not self._sse and self.status == 200):
                self._held = message  # look at the body first
                return
            self.started = True
            message["headers"] = self._headers(message.get("headers", []))
            await self._send(message)
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        if self._held is not None:
            self._buffer.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await self._flush_held(b"".join(self._buffer))
            return
        if self._sse:
            message = {**message, "body": _fix_sse(message.get("body", b""))}
        await self._send(message)

    async def _flush_held(self, body: bytes) -> None:
        held, self._held = self._held, None
        status = held["status"]
        headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-type"]
        if status >= 400:
            if not is_openai_error(body, status):
                body = normalize(status, body)
        elif _BAD_FINISH.search(body):
            status, message, code = _bad_finish(body)
            body = error_bytes(status, message, code)
        else:
            headers = held.get("headers", [])
            await self._start(status, headers, body)
            await self._send({"type": "http.response.body", "body": body})
            return
        await self._start(status, [*headers, (b"content-type", b"application/json")], body)
        await self._send({"type": "http.response.body", "body": body})


def _fix_sse(chunk: bytes) -> bytes:
    """SSE events: vLLM's error events in the OpenAI shape; an abort/error finish becomes an
    error event (the status is already 200)."""
    if b'"error"' not in chunk and not _BAD_FINISH.search(chunk):
        return chunk
    out = []
    for event in chunk.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            out.append(event)
            continue
        payload = event[6:]
        if payload.startswith(b'{"error"'):
            try:
                code = json.loads(payload)["error"].get("code")
                status = int(code) if isinstance(code, int) or str(code).isdigit() else 500
            except (ValueError, KeyError, TypeError, AttributeError):
                status = 500
            if not is_openai_error(payload, status):
                payload = normalize(status, payload)
            out.append(b"data: " + payload)
        elif _BAD_FINISH.search(payload):
            out.append(sse_error(*_bad_finish(payload)).rstrip(b"\n"))
        else:
            out.append(event)
    return b"\n\n".join(out)


def _bad_finish(payload: bytes) -> tuple[int, str, str]:
    if _BAD_FINISH.search(payload).group(1) == b"abort":
        return 503, "the engine aborted the request before it finished", "aborted"
    return 500, "the engine failed while generating", "generation_error"
