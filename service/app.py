"""The app: vLLM's own OpenAI server (``build_app``: every route ``vllm serve`` has for the
model's tasks), with the gateway's routes in front of it and the gateway's middleware
around it."""

from __future__ import annotations

import argparse
from typing import Any

from fastapi import FastAPI

from service.api import health, metrics as metrics_api, models, requests
from service.middleware import GatewayMiddleware
from service.runtime import Runtime

#: our routes, tried before vLLM's: /health*, /metrics, /v1/models (+ KV card), request figures
OUR_ROUTERS = (health.router, metrics_api.router, models.router, requests.router)


def add_gateway(app: FastAPI, runtime: Runtime) -> FastAPI:
    """Put the gateway on an app built by vLLM's ``build_app``."""
    app.state.runtime = runtime
    before = len(app.router.routes)
    for r in OUR_ROUTERS:
        app.include_router(r)
    ours = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = ours  # first match wins: ours shadow vLLM's /health, /metrics, /v1/models
    app.middleware_stack = None  # build_app already built it; rebuilt on first request
    app.add_middleware(GatewayMiddleware, runtime=runtime)
    return app


def create_app(args: argparse.Namespace, runtime: Runtime, supported_tasks: tuple[str, ...],
               model_config: Any) -> FastAPI:
    from vllm.entrypoints.launchers.app import build_app

    return add_gateway(build_app(args, supported_tasks, model_config), runtime)
