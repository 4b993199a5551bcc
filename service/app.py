"""The app factory: routers, error handlers, middleware and the engine's lifespan."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI

from service.api import chat, completions, health, metrics as metrics_api, models
from service.api.serving import EngineState, Gateway
from service.errors import install_error_handlers
from service.middleware import GatewayMiddleware
from service.settings import Settings
from service.telemetry.metrics import GatewayMetrics

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, GatewayMetrics, EngineState], contextlib.AbstractAsyncContextManager]


@contextlib.asynccontextmanager
async def real_engine(settings: Settings, metrics: GatewayMetrics, state: EngineState) -> AsyncIterator[Any]:
    from service.engine import build_engine
    from service.telemetry.stat_logger import EngineStateLogger

    loggers = [EngineStateLogger.factory(metrics, settings.model_name, state)]
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
        engine_state = EngineState()
        async with engine_factory(settings, metrics, engine_state) as handle:
            gw = Gateway(handle=handle, settings=settings, metrics=metrics,
                         defaults=_sampling_defaults(handle), engine_state=engine_state)
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
    app.add_middleware(GatewayMiddleware, settings=settings, metrics=metrics, state=app.state)
    return app


def _sampling_defaults(handle: Any) -> dict[str, Any]:
    """The model's generation-config defaults (as vLLM's server applies them)."""
    get = getattr(getattr(handle.engine, "model_config", None), "get_diff_sampling_param", None)
    if get is None:
        return {}
    allowed = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty",
               "presence_penalty", "frequency_penalty"}
    return {k: v for k, v in get().items() if k in allowed}
