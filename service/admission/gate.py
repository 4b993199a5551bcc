"""Where the middleware meets the admission queue: measure the request, wait for its turn
while watching the client, and record what happened (metrics, ledger, log line)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from service.admission.book import ADMISSIONS, figures, record_refused
from service.admission.policy import Policy
from service.admission.queue import Admission, Disconnected, Refused, Ticket
from service.admission.shape import measure
from service.kv.geometry import used_blocks

log = logging.getLogger(__name__)
request_log = logging.getLogger("gateway.requests")

#: routes whose body the gateway reads (service/api/fixes.py): their demand is known before the engine
DEMAND_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


class Gate:
    def __init__(self, admission: Admission, tokenizer: Any, block_size: int, max_model_len: int):
        self.admission = admission
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.max_model_len = max_model_len

    @classmethod
    def for_engine(cls, settings: Any, info: Any, tokenizer: Any, engine_state: Any, metrics: Any) -> "Gate":
        """The gate of a started engine (``info``: service.engine.EngineInfo)."""
        n = info.num_blocks

        def engine_used() -> int:
            return used_blocks(engine_state.kv_usage, n)

        admission = Admission(Policy.from_settings(settings), n, engine_used, metrics)
        return cls(admission, tokenizer, info.geometry.block_size, info.max_model_len)

    async def enter(self, path: str, raw: bytes, tenant: str, request_id: str,
                    receive: Callable) -> tuple[Ticket | None, Refused | None, Callable]:
        """(ticket, None, receive) once admitted; (None, refusal, receive) for a 429. Raises
        asyncio.CancelledError when the client left while queued. The returned ``receive`` replays
        what the disconnect watch read."""
        shape = await measure(path, raw, self.tokenizer, self.block_size)
        blocks = shape.blocks(self.block_size, self.max_model_len)
        watch = _Watch(receive)
        try:
            ticket = await self.admission.acquire(tenant, blocks, shape.hashes, watch.disconnected)
        except Refused as r:
            watch.close()
            figs = figures(r.outcome, r.reason, r.wait_seconds, blocks, 0)
            record_refused(request_id, tenant, {**figs, "retry_after_seconds": r.retry_after, "admission_queued": r.queued,
                                                "admission_drain_rate": r.drain_rate}, request_log)
            return None, r, watch.receive
        except Disconnected:
            watch.close()
            record_refused(request_id, tenant, figures("left", "disconnect", 0.0, blocks, 0), request_log)
            raise asyncio.CancelledError() from None
        ADMISSIONS.bind(request_id, figures("admitted", ticket.reason, ticket.wait_seconds, ticket.blocks,
                                            ticket.hit_blocks))
        return ticket, None, watch.receive

    def release(self, ticket: Ticket) -> None:
        self.admission.release(ticket)


class _Watch:
    """Reads the client's next ASGI message while the request waits (the body is already read,
    so the next one is the disconnect), and hands it on afterwards."""

    def __init__(self, receive: Callable):
        self._receive = receive
        self._task: asyncio.Task | None = None

    async def _next(self) -> dict:
        return await self._receive()

    def disconnected(self) -> "asyncio.Future":
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._next())
        done = loop.create_future()

        def check(task: asyncio.Task) -> None:
            if done.done():
                return
            if task.cancelled() or task.exception() is not None or task.result().get("type") == "http.disconnect":
                done.set_result(True)

        self._task.add_done_callback(check)
        return done

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None

    async def receive(self) -> dict:
        task, self._task = self._task, None
        if task is not None:
            if not task.done():
                return await task  # still waiting for the client: let the app wait on the same read
            if not task.cancelled() and task.exception() is None:
                return task.result()
        return await self._receive()
