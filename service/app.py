"""The app factory: routers, error handlers, middleware and the engine's lifespan."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI

from service.api import chat, completions, health, metrics as metrics_api, models
from service.api.serving import Gateway
from service.errors import install_error_handlers
from service.settings import Settings
from service.telemetry.metrics import GatewayMetrics

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, GatewayMetrics], contextlib.AbstractAsyncContextManager]


@contextlib.asynccontextmanager
async def real_engine(settings: Settings, metrics: GatewayMetrics) -> AsyncIterator[Any]:
    from service.engine import build_engine
    from service.telemetry.stat_logger import EngineStateLogger

    loggers = [EngineStateLogger.factory(metrics, settings.model_name)]
    async with build_engine(settings, stat_loggers=loggers) as handle:
        yield handle


async def _warmup(gw: Gateway) -> None:
    """One tiny greedy generation so the first user request does not pay one-time costs."""
    from vllm import SamplingParams

    t0 = time.monotonic()
    params = SamplingParams(max_tokens=2, temperature=0.0)
    async for _ in gw.handle.engine.generate({"prompt_token_ids": [1, 2, 3]}, params, "warmup-" + uuid.uuid4().hex):
        pass
    log.info("warm-up generation took %.2f s", time.monotonic() - t0)


def set_model_metrics(m: GatewayMetrics, gw: Gateway) -> None:
    g, name = gw.handle.geometry, gw.handle.model_name
    lv = (name, str(g.kv_heads))
    m.model_info.info({
        "model": name, "kv_heads": str(g.kv_heads), "query_heads": str(g.query_heads),
        "layers": str(g.layers), "head_size": str(g.head_size), "group_size": str(g.group_size),
        "block_size": str(g.block_size), "kv_bytes_per_token": str(g.kv_bytes_per_token),
        "dtype": g.dtype, "max_model_len": str(gw.handle.max_model_len),
    })
    m.kv_bytes_per_token.labels(*lv).set(g.kv_bytes_per_token)
    m.kv_mha_bytes_per_token.labels(*lv).set(g.mha_kv_bytes_per_token)
    m.kv_group_size.labels(*lv).set(g.group_size)


def create_app(settings: Settings, engine_factory: EngineFactory = real_engine,
               metrics: GatewayMetrics | None = None) -> FastAPI:
    metrics = metrics or GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine_factory(settings, metrics) as handle:
            gw = Gateway(handle=handle, settings=settings, metrics=metrics,
                         defaults=_sampling_defaults(handle))
            set_model_metrics(metrics, gw)
            if settings.warmup:
                await _warmup(gw)
            app.state.gateway = gw
            try:
                yield
            finally:
                gw.draining = True
                app.state.gateway = None
                log.info("shutting down the engine")

    app = FastAPI(title="kv-gateway", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible gateway on vLLM with per-request KV and attention accounting")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.gateway = None
    install_error_handlers(app)
    for r in (chat.router, completions.router, models.router, health.router, metrics_api.router):
        app.include_router(r)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


def _sampling_defaults(handle: Any) -> dict[str, Any]:
    """The model's generation-config defaults (as vLLM's server applies them)."""
    get = getattr(getattr(handle.engine, "model_config", None), "get_diff_sampling_param", None)
    if get is None:
        return {}
    allowed = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty",
               "presence_penalty", "frequency_penalty"}
    return {k: v for k, v in get().items() if k in allowed}


class RequestContextMiddleware:
    """Pure ASGI: request id (X-Request-Id accepted or generated, echoed back) and HTTP metrics."""

    def __init__(self, app: Any, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.http_requests.labels(path, method, f"{status // 100}xx").inc()
            self.metrics.http_latency.labels(path, method).observe(time.perf_counter() - t0)


def _incoming_request_id(scope: dict) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == b"x-request-id":
            value = v.decode("latin-1").strip()
            if value and len(value) <= 128 and value.isprintable():
                return value
    return None
