"""Runs a load test: warm-up, then one step per swept concurrency or rate.

Each step is bounded by ``num_requests`` and/or ``duration_s``: no request starts
after the duration, and requests in flight then finish (each bounded by the request
timeout), so every run stops by itself. A step's duration runs from its first send
to the end of its last request. Each step gets its own slice of prompts so that a
sweep never replays a previous step's prompts into a prefix cache.

Every request is sent with its own ``X-Request-Id`` (``loadtest.core.client.request_id``: the
run's random id, the step, the index). This runner only talks to the OpenAI endpoint: reading
the server while a step runs (``/metrics``) and joining each request's server figures after the
run are the server layer's, in ``loadtest.server.observed.ObservedRunner``, which fills the
two hooks below (``_scraper`` and ``_join``). Use that one against a real server.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

import aiohttp
import numpy as np
from tqdm import tqdm

from loadtest.core.client import RequestOptions, StreamClient, endpoint_url, new_run_id, request_id
from loadtest.core.config import Load, RunConfig
from loadtest.core.loops import closed_workers, open_arrivals
from loadtest.core.metrics import summarize
from loadtest.core.session_runner import Exchange, SessionPlayer, trace_offsets
from loadtest.core.sessions import Conversation
from loadtest.core.results import (
    RequestMetricsJoin, RequestRecord, RunResult, StepResult, WarmupResult, environment, now_iso,
)  # fmt: skip
from loadtest.core.shapes import arrival_offsets
from loadtest.core.workload import Prompt, TokenizerLike

T = TypeVar("T")
Send = Callable[[int, Prompt, float, "float | None"], Awaitable[RequestRecord]]


class StepWatcher(Protocol):
    """Watches the server during a step: ``async with watcher.step() as watch`` then
    ``watch.summary(t0)`` (``loadtest.server.scrape.Scraper`` is one)."""

    def step(self) -> AbstractAsyncContextManager[Any]: ...


def prompts_needed(load: Load) -> int:
    """Prompts a run consumes: warm-ups plus one distinct slice per step."""
    return load.warmup_requests + len(load.steps) * (load.num_requests or load.pool_size)


def split_prompts(prompts: Sequence[T], load: Load) -> tuple[list[T], list[list[T]]]:
    """(warm-up prompts, per-step prompt slices); a short source (JSONL) is cycled. Works the
    same for conversations."""
    if not prompts:
        raise ValueError("the workload has no prompts")
    stream = itertools.cycle(prompts)
    warmup = list(itertools.islice(stream, load.warmup_requests))
    per_step = load.num_requests or load.pool_size
    return warmup, [list(itertools.islice(stream, per_step)) for _ in load.steps]


def default_label(config: RunConfig) -> str:
    return f"{config.target.model}-{config.target.endpoint}-{config.load.shape}"


async def closed_loop(
    send: Send,
    prompts: Sequence[Prompt],
    concurrency: int,
    t0: float,
    *,
    num_requests: int | None,
    duration_s: float | None,
    ramp_up_s: float = 0.0,
) -> list[RequestRecord]:
    """C workers, each sending its next request when the previous one ends."""
    records: list[RequestRecord] = []

    async def act(index: int, prompt: Prompt, scheduled: float | None) -> None:
        records.append(await send(index, prompt, t0, scheduled))

    await closed_workers(act, prompts, concurrency, t0, count=num_requests, duration_s=duration_s, ramp_up_s=ramp_up_s)
    return records


async def open_loop(
    send: Send, prompts: Sequence[Prompt], offsets: Sequence[float], t0: float, max_concurrency: int | None = None
) -> list[RequestRecord]:
    """Send request i at t0 + offsets[i], whatever is in flight (capped by a semaphore if set)."""
    records: list[RequestRecord] = []

    async def act(index: int, prompt: Prompt, scheduled: float | None) -> None:
        records.append(await send(index, prompt, t0, scheduled))

    await open_arrivals(act, prompts, offsets, t0, max_concurrency)
    return records


def _identified(client: StreamClient, run_id: str, step: int | str) -> Send:
    """``client.send`` with each request's ``X-Request-Id`` made from its index."""

    async def send(index: int, prompt: Prompt, t0: float, scheduled: float | None) -> RequestRecord:
        return await client.send(index, prompt, t0, scheduled, request_id=request_id(run_id, step, index))

    return send


def _exchanging(client: StreamClient, run_id: str, step: int | str, bar: tqdm | None = None) -> Exchange:
    """``client.exchange`` with each request's ``X-Request-Id``, counted on ``bar``."""

    async def exchange(index: int, prompt: Prompt, t0: float, scheduled: float | None) -> tuple[RequestRecord, str]:
        out = await client.exchange(index, prompt, t0, scheduled, request_id=request_id(run_id, step, index))
        if bar is not None:
            bar.update(1)
        return out

    return exchange


def _counting(send: Send, bar: tqdm) -> Send:
    async def counted(index: int, prompt: Prompt, t0: float, scheduled: float | None) -> RequestRecord:
        record = await send(index, prompt, t0, scheduled)
        bar.update(1)
        return record

    return counted


class Runner:
    """One run against one target; ``await Runner(...).run(...)`` returns the result."""

    def __init__(
        self,
        config: RunConfig,
        *,
        api_key: str | None = None,
        tokenizer: TokenizerLike | None = None,
        argv: Sequence[str] = (),
    ) -> None:
        if not config.target.base_url or not config.target.model:
            raise ValueError("the target needs a base URL and a model name (--base-url, --model)")
        self.config = config
        self.api_key = api_key
        self.tokenizer = tokenizer
        self.argv = list(argv)

    async def run(self, prompts: Sequence[Prompt]) -> RunResult:
        """Every step of the load over single prompts."""
        warmup, per_step = split_prompts(prompts, self.config.load)
        return await self._run(warmup, per_step)

    async def run_conversations(self, conversations: Sequence[Conversation]) -> RunResult:
        """Every step of the load over conversations (``loadtest.core.session_runner``): the
        concurrency or rate counts sessions; a trace is replayed whole at every speed-up."""
        load = self.config.load
        if load.shape == "speedup":
            warmup = list(itertools.islice(itertools.cycle(conversations), load.warmup_requests))
            return await self._run(warmup, [list(conversations) for _ in load.steps], sessions=True)
        warmup, per_step = split_prompts(conversations, load)
        return await self._run(warmup, per_step, sessions=True)

    async def _run(self, warmup_units: list[Any], step_units: list[list[Any]], sessions: bool = False) -> RunResult:
        config, target, load = self.config, self.config.target, self.config.load
        options = RequestOptions(
            url=endpoint_url(target.base_url or "", target.endpoint),
            model=target.model or "",
            endpoint=target.endpoint,
            ignore_eos=config.workload.ignore_eos,
            extra_body=config.workload.extra_body,
            stream=target.stream,
        )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        connector = aiohttp.TCPConnector(limit=load.connection_limit, limit_per_host=load.connection_limit)
        timeout = aiohttp.ClientTimeout(total=target.request_timeout_s, sock_connect=30)
        run_id = new_run_id()
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            aiohttp.ClientSession() as scrape_session,
        ):
            client = StreamClient(session, options, self.tokenizer, headers)
            scraper = self._scraper(scrape_session, headers) if target.scrape else None
            warmup = await self._warmup(client, run_id, warmup_units, sessions)
            run_t0 = time.perf_counter()
            steps = [
                await self._step(client, run_id, scraper, index, value, step_units[index], run_t0, sessions)
                for index, value in enumerate(load.steps)
            ]
        # only now, with every measured request over, ask the server for its figures
        joined = await self._join(steps, headers) if target.request_metrics else RequestMetricsJoin(status="off")
        return RunResult(
            label=config.output.label or default_label(config),
            run_id=run_id,
            created_at=now_iso(),
            config=config,
            environment=environment(self.argv),
            warmup=warmup,
            steps=steps,
            request_metrics=joined,
        )

    def _scraper(self, session: aiohttp.ClientSession, headers: dict[str, str]) -> StepWatcher | None:
        """What reads the server during each step; none here (the server layer's subclass has one)."""
        return None

    async def _join(self, steps: list[StepResult], headers: dict[str, str]) -> RequestMetricsJoin:
        """Each request's server figures; not read here (the server layer's subclass reads them)."""
        return RequestMetricsJoin(status="off")

    async def _warmup(self, client: StreamClient, run_id: str, units: list[Any], sessions: bool) -> WarmupResult:
        """Requests (or sessions) whose results are discarded; all of them failing aborts the run."""
        if not units:
            return WarmupResult()
        load = self.config.load
        width = load.concurrency[0] if load.concurrency else load.max_concurrency or len(units)
        t0 = time.perf_counter()
        if sessions:
            player = SessionPlayer(_exchanging(client, run_id, "w"), self.config.target.endpoint, t0)
            records = await player.closed(units, width, num_sessions=len(units), duration_s=None)
        else:
            records = await closed_loop(
                _identified(client, run_id, "w"), units, width, t0, num_requests=len(units), duration_s=None
            )
        failed = [r for r in records if not r.success]
        if len(failed) == len(records):
            raise RuntimeError(f"every warm-up request failed; first error: {failed[0].error_type}: {failed[0].error}")
        return WarmupResult(requests=len(records), failed=len(failed))

    async def _step(
        self,
        client: StreamClient,
        run_id: str,
        scraper: StepWatcher | None,
        index: int,
        value: float,
        units: list[Any],
        run_t0: float,
        sessions: bool,
    ) -> StepResult:
        config, load = self.config, self.config.load
        concurrency = int(value) if load.shape == "concurrency" else None
        rate = value if load.shape == "rate" else None
        speedup = value if load.shape == "speedup" else None
        desc = f"step {index + 1}/{len(load.steps)} " + (
            f"concurrency {concurrency}" if concurrency else f"rate {rate:g}/s" if rate else f"trace x{speedup:g}"
        )
        offsets: Sequence[float] | None = None
        if speedup is not None:
            offsets = trace_offsets(units, speedup, load.duration_s)[: load.num_requests]
        elif rate is not None:
            rng = np.random.default_rng([load.seed, 1, index])
            offsets = arrival_offsets(
                rng,
                rate,
                arrival=load.arrival,
                burstiness=load.burstiness,
                ramp_up_s=load.ramp_up_s,
                num_requests=load.num_requests,
                duration_s=load.duration_s,
            )
        total = None if sessions else len(offsets) if offsets is not None else load.num_requests
        started_at = now_iso()
        watch_context = scraper.step() if scraper else contextlib.nullcontext()
        # disable=None: tqdm shows the bar only on a terminal
        with tqdm(total=total, desc=desc, unit="req", disable=None if config.output.progress else True) as bar:
            async with watch_context as watch:
                t0 = time.perf_counter()
                if sessions:
                    player = SessionPlayer(_exchanging(client, run_id, index, bar), config.target.endpoint, t0)
                    if offsets is not None:
                        records = await player.open(units, offsets, load.max_concurrency)
                    else:
                        records = await player.closed(
                            units, concurrency or 1, num_sessions=load.num_requests, duration_s=load.duration_s,
                            ramp_up_s=load.ramp_up_s,
                        )  # fmt: skip
                elif offsets is not None:
                    send = _counting(_identified(client, run_id, index), bar)
                    records = await open_loop(send, units, offsets, t0, load.max_concurrency)
                else:
                    records = await closed_loop(
                        _counting(_identified(client, run_id, index), bar),
                        units,
                        concurrency or 1,
                        t0,
                        num_requests=load.num_requests,
                        duration_s=load.duration_s,
                        ramp_up_s=load.ramp_up_s,
                    )
                duration = time.perf_counter() - t0
        records.sort(key=lambda r: r.index)
        return StepResult(
            index=index,
            shape=load.shape,
            concurrency=concurrency,
            rate=rate,
            speedup=speedup,
            max_concurrency=load.max_concurrency if concurrency is None else None,
            started_at=started_at,
            offset_s=t0 - run_t0,
            requests=records,
            summary=summarize(records, duration, config.slo, config.workload.ignore_eos),
            server=watch.summary(t0) if watch is not None else None,
        )
