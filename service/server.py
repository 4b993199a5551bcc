"""Start and stop one gateway: socket, engine, vLLM's app with ours on top, then vLLM's
``serve_http``; and the drain on SIGTERM/SIGINT.

Drain: the first signal turns readiness 503 and refuses new generation requests with 503
``draining`` while admitted ones keep streaming; once none is left (or the grace period is
over) the HTTP server stops, then the engine is shut down and the process exits 0. A second
signal stops the HTTP server at once (the engine is still shut down)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from typing import Any

from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger(__name__)
#: after the drain, how long uvicorn may wait for connections before cancelling them
FINAL_CLOSE_SECONDS = 5


class Drain:
    def __init__(self, app: Any, runtime: Runtime, grace_seconds: float):
        self.app, self.rt, self.grace = app, runtime, grace_seconds
        self.started: float | None = None
        self.task: asyncio.Task | None = None

    def install(self) -> None:
        """Replace serve_http's signal handlers (it stops the engine first, under clients)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)

    def on_signal(self, sig: int) -> None:
        server = getattr(self.app.state, "server", None)
        if self.started is not None:
            log.warning("second signal: stopping now")
            if server is not None:
                server.should_exit = True
                server.force_exit = True
            return
        self.started = time.monotonic()
        self.rt.draining = True
        log.info("signal %s: draining (up to %.0f s), readiness is now 503", sig, self.grace)
        self.task = asyncio.get_running_loop().create_task(self._wait_then_stop(server))

    async def _wait_then_stop(self, server: Any) -> None:
        while self.rt.in_flight and time.monotonic() - self.started < self.grace:
            await asyncio.sleep(0.1)
        if self.rt.in_flight:
            log.warning("grace period over with %d requests in flight", self.rt.in_flight)
        if server is not None:
            server.should_exit = True


async def serve(settings: Settings, args: argparse.Namespace) -> int:
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
    import vllm.envs as envs

    from service.app import create_app
    from service.engine import build_engine, engine_info, warmup
    from service.telemetry.ledger import LEDGER
    from service.telemetry.metrics import GatewayMetrics
    from service.vllm_args import served_name

    listen_address, sock = setup_server(args, reuse_port=False)  # bind before the engine starts
    metrics = GatewayMetrics()
    rt = Runtime(settings=settings, metrics=metrics)
    name = served_name(args)
    LEDGER.maxlen = settings.ledger_size
    t0 = time.monotonic()
    try:
        async with build_engine(settings, args) as engine:
            rt.info = info = engine_info(engine, name, args.model, time.monotonic() - t0)
            rt.vocab_size = engine.model_config.get_vocab_size()
            log.info("engine ready in %.1f s: %s, %d blocks x %d tokens, %d B/token KV",
                     info.start_seconds, name, info.num_blocks, info.geometry.block_size,
                     info.geometry.kv_bytes_per_token)
            if settings.warmup:
                await warmup(engine)
            if settings.admission:
                from service.admission.gate import Gate

                rt.gate = Gate.for_engine(settings, info, engine.get_tokenizer(), rt.engine_state, metrics.admission)
            tasks = await engine.get_supported_tasks()
            app = create_app(args, rt, tasks, engine.model_config)
            await init_app_state(engine, app.state, args, tasks)
            _enable_our_loggers()
            rt.engine = engine
            drain = Drain(app, rt, settings.shutdown_grace_seconds)
            loop = asyncio.get_running_loop()
            loop.call_soon(drain.install)  # after serve_http installs its own
            loop.call_soon(_enable_our_loggers)  # and after uvicorn configured logging
            kwargs: dict[str, Any] = {}
            if (log_config := get_uvicorn_log_config(args)) is not None:
                kwargs["log_config"] = log_config
            log.info("serving %s on %s", name, listen_address)
            shutdown = await serve_http(
                app, sock=sock, enable_ssl_refresh=args.enable_ssl_refresh, host=args.host,
                port=args.port, log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log,
                timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
                timeout_graceful_shutdown=FINAL_CLOSE_SECONDS,
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
                ssl_cert_reqs=args.ssl_cert_reqs, ssl_ciphers=args.ssl_ciphers,
                h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
                h11_max_header_count=args.h11_max_header_count, **kwargs)
            await shutdown
            log.info("HTTP server stopped; shutting down the engine")
    finally:
        sock.close()
    return 0


def _enable_our_loggers() -> None:
    """After vLLM's app setup our service.* log lines stopped appearing (drain messages
    included); the likely cause, a logging dictConfig that disables existing loggers, is
    not confirmed. Re-enabling is harmless either way."""
    for name, logger in logging.root.manager.loggerDict.items():
        if name == "service" or name.startswith("service.") or name == "gateway.requests":
            if isinstance(logger, logging.Logger):
                logger.disabled = False


def run(settings: Settings, args: argparse.Namespace) -> int:
    import uvloop

    return uvloop.run(serve(settings, args))
