"""Uvicorn with a drain on SIGTERM/SIGINT.

First signal: readiness turns 503 and new completion requests get 503, while requests
already admitted keep streaming; once none is left (or the grace period is over) the
server stops, the lifespan shuts the engine down and the process exits 0. A second signal
stops at once."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from service.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app_state: Any, grace_seconds: float):
        super().__init__(config)
        self.app_state = app_state
        self.grace_seconds = grace_seconds
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal at exit (status 143).
        if self.drain_started is not None:
            log.warning("second signal: stopping now")
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self.drain_started = time.monotonic()
        gw = getattr(self.app_state, "gateway", None)
        if gw is not None:
            gw.draining = True
        log.info("signal %s: draining (up to %.0f s), readiness is now 503", sig, self.grace_seconds)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            gw = getattr(self.app_state, "gateway", None)
            left = gw.in_flight if gw is not None else 0
            if left == 0 or time.monotonic() - self.drain_started >= self.grace_seconds:
                if left:
                    log.warning("grace period over with %d requests in flight", left)
                self.should_exit = True
        return await super().on_tick(counter)


def run_server(app: Any, settings: Settings) -> int:
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=5)
    server = DrainingServer(config, app.state, settings.shutdown_grace_seconds)
    server.run()
    return 0 if server.started else 1
