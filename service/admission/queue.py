"""The gateway's own queue in front of the engine: admit a request when the KV demand of
everything admitted plus its own fits the budget; otherwise it waits here, per tenant,
served fairly.

- Budget: ``kv_fraction`` x the engine's usable KV blocks. In use: the blocks reserved by
  the admitted requests (service/kv/admission.py), or the engine's own count of blocks
  referenced by live requests when that is higher (work that came in another way), so a
  wrong reservation cannot accumulate: reservations are released when the response ends.
- Fair order: the queue heads of the tenants are candidates. A tenant whose reservations
  plus its head would pass its share of the budget (``weight / sum of the weights of the
  tenants with requests admitted or queued``) is not a candidate while another tenant has
  requests queued (with nothing reserved it always is, so a request larger than a share is
  not starved). Among candidates: higher priority first, then the tenant with the least
  reserved per unit of weight, then the oldest. If the chosen head does not fit, nobody
  passes it (no starvation of large requests by small ones).
- Refusal (429): the queue is full (``max_queue``); the predicted wait passes the deadline;
  or the request waited the whole deadline. ``Retry-After`` = (requests queued + 1) / drain rate,
  the rate at which admitted requests finished since the queue last filled (at most the last
  minute; requests/s): when the queue now waiting, and this request, would have drained.
- A waiter whose client disconnects leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from service.admission.policy import Policy
from service.kv.admission import PrefixIndex

#: how often a waiter looks again without a release (the engine's own count moves per step)
TICK_SECONDS = 0.1
RATE_WINDOW_SECONDS = 60.0


@dataclass
class Ticket:
    tenant: str
    blocks: int  # reserved while admitted (after the prefix hits)
    hashes: tuple[int, ...] = ()
    hit_blocks: int = 0
    enqueued: float = 0.0
    seq: int = 0
    wait_seconds: float = 0.0
    reason: str = "immediate"  # immediate | queued
    admitted: bool = False
    released: bool = False
    future: asyncio.Future | None = field(default=None, repr=False)


class Refused(Exception):
    """429: ``outcome`` shed (at arrival) or expired (after waiting); ``reason`` one of
    queue_full, predicted_wait, deadline."""

    def __init__(self, outcome: str, reason: str, message: str, retry_after: int, wait_seconds: float,
                 queued: int = 0, drain_rate: float | None = None):
        super().__init__(message)
        self.outcome, self.reason, self.message = outcome, reason, message
        self.retry_after, self.wait_seconds = retry_after, wait_seconds
        self.queued, self.drain_rate = queued, drain_rate  # what Retry-After was computed from


class Disconnected(Exception):
    """The client left while its request was queued."""


class Admission:
    def __init__(self, policy: Policy, usable_blocks: int, engine_used_blocks: Callable[[], int] = lambda: 0,
                 metrics: Any = None, clock: Callable[[], float] = time.monotonic):
        if usable_blocks <= 0:
            raise ValueError(f"usable KV blocks must be positive, not {usable_blocks}")
        self.policy = policy
        self.usable_blocks = usable_blocks
        self.budget = max(1, math.floor(policy.kv_fraction * usable_blocks))
        self.engine_used_blocks = engine_used_blocks
        self.metrics = metrics
        self.clock = clock
        self.reserved = 0
        self.by_tenant: dict[str, int] = {}
        self.queues: dict[str, deque[Ticket]] = {}
        self.prefix = PrefixIndex()
        self._finished: deque[float] = deque(maxlen=512)
        self._seq = 0
        self._first_admission: float | None = None
        self._busy_since: float | None = None
        if metrics is not None:
            metrics.budget_blocks.set(self.budget)

    # ---- figures
    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def used(self) -> int:
        """Blocks in use for admission: the reservations, or the engine's own count if higher."""
        return max(self.reserved, self.engine_used_blocks()) if self.reserved else 0

    def drain_rate(self) -> float | None:
        """Admitted requests finished per second: since the queue last filled while it is not
        empty, else since the first admission; over the last minute at most (None while none
        finished in that time)."""
        now = self.clock()
        while self._finished and now - self._finished[0] > RATE_WINDOW_SECONDS:
            self._finished.popleft()
        since = self._busy_since if self.queued and self._busy_since is not None else self._first_admission
        if since is None:
            return None
        since = max(since, now - RATE_WINDOW_SECONDS)
        count = sum(1 for t in self._finished if t >= since)
        return count / max(now - since, 1.0) if count else None

    def retry_after(self, ahead: int) -> tuple[int, float | None]:
        """(seconds until ``ahead`` queued requests and this one drain at the measured rate, the
        rate): ceil((ahead + 1) / rate), at least 1; the deadline before a rate is measured."""
        rate = self.drain_rate()
        if rate is None:
            return max(1, math.ceil(self.policy.deadline_seconds)), None
        return max(1, math.ceil((ahead + 1) / rate)), rate

    def _ahead(self, tenant: str) -> int:
        """Requests likely served before a new one of ``tenant``: its own queue, and as many of each
        other tenant's per unit of weight, never more than are queued."""
        own = len(self.queues.get(tenant, ()))
        w = self.policy.weight(tenant)
        others = sum(min(len(q), math.ceil((own + 1) * self.policy.weight(t) / w))
                     for t, q in self.queues.items() if t != tenant)
        return own + others

    # ---- the request's way through
    async def acquire(self, tenant: str, blocks: int, hashes: tuple[int, ...] = (),
                      disconnected: Callable[[], Awaitable] | None = None) -> Ticket:
        """Admit now, or queue until admitted; raises Refused (429) or Disconnected.
        ``disconnected()``, called only when the request has to wait, completes when the client leaves."""
        hit = min(self.prefix.hits(hashes), blocks - 1) if hashes else 0
        self._seq += 1
        t = Ticket(tenant, max(1, blocks - max(hit, 0)), hashes, max(hit, 0), self.clock(), self._seq)
        if self.metrics is not None:
            self.metrics.request_blocks.observe(t.blocks)
            if t.hit_blocks:
                self.metrics.prefix_hit_blocks.inc(t.hit_blocks)
        if not self.queued and self._fits(t):
            self._admit(t, "immediate")
            return t
        if self.queued >= self.policy.max_queue:
            self._refuse(t, "shed", "queue_full", f"the admission queue is full ({self.queued} requests)")
        rate = self.drain_rate()
        ahead = self._ahead(tenant)
        if rate is not None and (ahead + 1) / rate > self.policy.deadline_seconds:
            self._refuse(t, "shed", "predicted_wait",
                         f"{ahead} requests are ahead and the queue drains {rate:.2f} requests/s: the wait would "
                         f"pass the {self.policy.deadline_seconds:g} s deadline")
        return await self._wait(t, disconnected)

    async def _wait(self, t: Ticket, disconnected: Callable[[], Awaitable] | None) -> Ticket:
        t.future = asyncio.get_running_loop().create_future()
        if not self.queued:
            self._busy_since = self.clock()
        self.queues.setdefault(t.tenant, deque()).append(t)
        self._gauge(t.tenant)
        self._dispatch()
        watch = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            deadline = t.enqueued + self.policy.deadline_seconds
            while not t.future.done():
                left = deadline - self.clock()
                if left <= 0:
                    break
                waiting = {t.future} | ({watch} if watch is not None else set())
                await asyncio.wait(waiting, timeout=min(left, TICK_SECONDS), return_when=asyncio.FIRST_COMPLETED)
                if t.future.done():
                    break
                if watch is not None and watch.done():
                    self._leave(t, "left", "disconnect")
                    raise Disconnected()
                self._dispatch()
            if t.future.done():
                return t
            retry, rate = self.retry_after(self.queued - 1)  # the others still queued
            ahead = self.queued - 1
            self._leave(t, "expired", "deadline")
            raise Refused("expired", "deadline", f"the request waited the whole {self.policy.deadline_seconds:g} s "
                          "deadline in the admission queue", retry, t.wait_seconds, ahead, rate)
        except asyncio.CancelledError:
            if t.admitted:
                self.release(t)
            else:
                self._leave(t, "left", "disconnect")
            raise
        finally:
            if watch is not None and not watch.done():
                watch.cancel()

    def release(self, t: Ticket) -> None:
        """The response ended: its blocks go back to the budget (once)."""
        if not t.admitted or t.released:
            return
        t.released = True
        self.reserved -= t.blocks
        self.by_tenant[t.tenant] -= t.blocks
        if not self.by_tenant[t.tenant]:
            del self.by_tenant[t.tenant]
        self.prefix.remove(t.hashes)
        self._finished.append(self.clock())
        self._demand_gauges(t.tenant)
        self._dispatch()

    # ---- decisions
    def _fits(self, t: Ticket) -> bool:
        used = self.used()
        return used == 0 or used + t.blocks <= self.budget

    def _share(self, tenant: str) -> float:
        active = set(self.by_tenant) | {k for k, q in self.queues.items() if q} | {tenant}
        total = sum(self.policy.weight(a) for a in active)
        return self.budget * self.policy.weight(tenant) / total

    def _candidate(self, tenant: str) -> bool:
        held = self.by_tenant.get(tenant, 0)
        if not held or held + self.queues[tenant][0].blocks <= self._share(tenant):
            return True
        return not any(q for k, q in self.queues.items() if k != tenant)

    def _dispatch(self) -> None:
        while True:
            heads = [k for k, q in self.queues.items() if q and self._candidate(k)]
            if not heads:
                return
            p = self.policy
            best = min(heads, key=lambda k: (-p.priority(k), self.by_tenant.get(k, 0) / p.weight(k),
                                             self.queues[k][0].seq))
            t = self.queues[best][0]
            if not self._fits(t):
                return
            self.queues[best].popleft()
            self._admit(t, "queued")
            self._gauge(best)
            t.future.set_result(True)

    def _admit(self, t: Ticket, reason: str) -> None:
        t.admitted, t.reason = True, reason
        t.wait_seconds = self.clock() - t.enqueued
        if self._first_admission is None:
            self._first_admission = self.clock()
        self.reserved += t.blocks
        self.by_tenant[t.tenant] = self.by_tenant.get(t.tenant, 0) + t.blocks
        self.prefix.add(t.hashes)
        self._count(t, "admitted", reason)
        self._demand_gauges(t.tenant)
        self._gauge(t.tenant)  # the tenant's queue-length series exists from its first request

    def _leave(self, t: Ticket, outcome: str, reason: str) -> None:
        q = self.queues.get(t.tenant)
        if q is not None and t in q:
            q.remove(t)
        t.wait_seconds = self.clock() - t.enqueued
        self._gauge(t.tenant)
        self._count(t, outcome, reason)
        self._dispatch()  # a head that left may have blocked others

    def _refuse(self, t: Ticket, outcome: str, reason: str, message: str) -> None:
        t.wait_seconds = 0.0
        self._count(t, outcome, reason)
        retry, rate = self.retry_after(self.queued)
        raise Refused(outcome, reason, message, retry, 0.0, self.queued, rate)

    # ---- metrics
    def _count(self, t: Ticket, outcome: str, reason: str) -> None:
        m = self.metrics
        if m is None:
            return
        m.decisions.labels(t.tenant, outcome, reason).inc()
        m.wait.labels(t.tenant, outcome).observe(t.wait_seconds)
        rate = self.drain_rate()
        m.drain_rate.set(rate or 0.0)

    def _gauge(self, tenant: str) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.labels(tenant).set(len(self.queues.get(tenant, ())))

    def _demand_gauges(self, tenant: str) -> None:
        m = self.metrics
        if m is None:
            return
        m.demand_blocks.set(self.reserved)
        m.demand_ratio.set(self.reserved / self.usable_blocks)
        m.tenant_demand_blocks.labels(tenant).set(self.by_tenant.get(tenant, 0))
