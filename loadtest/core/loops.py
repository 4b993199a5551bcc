"""The two ways a step sends its units (requests or sessions), shared by both runners.

``closed_workers``: C workers, each starting its next unit when its previous one is done,
no start after the deadline. ``open_arrivals``: unit i starts at t0 + offsets[i] whatever is
in flight (at most ``max_concurrency`` at once if set). ``act(index, item, scheduled)``
does one unit (``scheduled``: its planned offset, None in a closed loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from loadtest.core.shapes import worker_start_offsets

T = TypeVar("T")
Act = Callable[[int, T, "float | None"], Awaitable[None]]


async def closed_workers(
    act: Act[T],
    items: Sequence[T],
    concurrency: int,
    t0: float,
    *,
    count: int | None,
    duration_s: float | None,
    ramp_up_s: float = 0.0,
) -> None:
    """``concurrency`` workers over ``items`` (cycled), ``count`` units at most."""
    deadline = t0 + duration_s if duration_s is not None else math.inf
    counter = itertools.count()

    async def worker(start_offset: float) -> None:
        await asyncio.sleep(start_offset)
        while time.perf_counter() < deadline:
            index = next(counter)
            if count is not None and index >= count:
                return
            await act(index, items[index % len(items)], None)

    await asyncio.gather(*(worker(offset) for offset in worker_start_offsets(concurrency, ramp_up_s)))


async def open_arrivals(
    act: Act[T], items: Sequence[T], offsets: Sequence[float], t0: float, max_concurrency: int | None = None
) -> None:
    """Unit i (``items`` cycled) at t0 + offsets[i]."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()

    async def one(index: int, scheduled: float) -> None:
        async with limit:
            await act(index, items[index % len(items)], scheduled)

    tasks = []
    for index, offset in enumerate(offsets):
        delay = t0 + float(offset) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, float(offset))))
    await asyncio.gather(*tasks)
