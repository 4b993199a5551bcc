"""Fair shares of KV blocks between the requests that hold them (pure bookkeeping).

In the spirit of PSS in Linux memory accounting: a block held by k live requests counts
1/k to each of them, a block held by one counts whole. Integrated over time, a request's
*fair-share block-seconds* add up, over all requests, to the block-seconds of every block
held by some request; its *referenced block-seconds* count every block it holds whole
(RSS-like: shared blocks count once per holder).

``FairShareLedger.step(now, holders)`` is called once per engine step with every
request's current block list (vLLM's ``req_to_blocks``). It costs O(requests) to see which
lists changed (each list only grows at its end between steps, or is freed whole on finish
or preemption) plus O(blocks acquired or released), not O(blocks held): a block's share is
kept as "virtual time", S_b = the integral of 1/k_b(t) dt, updated only when its holder
count k_b changes. A holder's share of b is S_b(release) - S_b(acquire).

Pure: imports nothing from vLLM; block lists are sequences of objects with ``block_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence


@dataclass
class _Block:
    holders: int = 0
    share: float = 0.0  # S_b at `since`: seconds of 1/k_b integrated so far
    since: float = 0.0

    def advance(self, now: float) -> float:
        if self.holders:
            self.share += (now - self.since) / self.holders
        self.since = now
        return self.share


@dataclass
class _Holder:
    blocks: list[int] = field(default_factory=list)
    fair: float = 0.0  # fair-share block-seconds, pending terms of held blocks included
    referenced: float = 0.0
    peak_blocks: int = 0
    finished: bool = False


@dataclass(frozen=True)
class HolderTotals:
    """What one request held over its life (all its scheduling rounds, preemptions too)."""

    fair_block_seconds: float
    referenced_block_seconds: float
    peak_blocks: int


@dataclass(frozen=True)
class StepFigures:
    """One step: the distinct blocks requests hold now, and the block-seconds each
    bucket accrued since the previous step (state held over the interval)."""

    now: float
    interval: float
    attributed_blocks: int
    referenced_blocks: int  # blocks held, each counted once per holder (RSS-like)
    holders: int
    attributed_block_seconds: float
    finished: dict[str, HolderTotals]


class FairShareLedger:
    def __init__(self) -> None:
        self._blocks: dict[int, _Block] = {}
        self._holders: dict[str, _Holder] = {}
        self._finished: set[str] = set()
        self._last: float | None = None

    # ---- events
    def finish(self, request_id: str) -> None:
        """The engine finished (or aborted) the request; its totals go out at the next step,
        once its blocks are released."""
        self._finished.add(request_id)

    def _acquire(self, h: _Holder, block_ids: Iterable[int], now: float) -> None:
        blocks = self._blocks
        for bid in block_ids:
            b = blocks.get(bid)
            if b is None:
                b = blocks[bid] = _Block(since=now)
            h.fair -= b.advance(now)
            b.holders += 1
            h.referenced -= now
            h.blocks.append(bid)
        h.peak_blocks = max(h.peak_blocks, len(h.blocks))

    def _release_all(self, h: _Holder, now: float) -> None:
        blocks = self._blocks
        for bid in h.blocks:
            b = blocks[bid]
            h.fair += b.advance(now)
            b.holders -= 1
            if not b.holders:
                del blocks[bid]
            h.referenced += now
        h.blocks = []

    # ---- every step
    def step(self, now: float, holders: Mapping[str, Sequence[Any]]) -> StepFigures:
        interval = 0.0 if self._last is None else max(now - self._last, 0.0)
        attributed_before = len(self._blocks)
        self._last = now
        known = self._holders
        for rid in [r for r in known if r not in holders]:  # freed: finished or preempted
            self._release_all(known[rid], now)
        for rid, blocks in holders.items():
            n = len(blocks)
            h = known.get(rid)
            if h is None:
                if not n:
                    continue
                h = known[rid] = _Holder()
            have = len(h.blocks)
            if n == have and (not n or blocks[n - 1].block_id == h.blocks[-1]):
                continue
            if n > have and (not have or blocks[have - 1].block_id == h.blocks[-1]):
                self._acquire(h, (b.block_id for b in blocks[have:]), now)
            else:  # freed and allocated again between two steps: start over
                self._release_all(h, now)
                self._acquire(h, (b.block_id for b in blocks), now)
        done: dict[str, HolderTotals] = {}
        for rid in self._finished:
            if rid in holders and len(holders[rid]):
                continue  # blocks not released yet
            h = known.pop(rid, None) or _Holder()
            done[rid] = HolderTotals(h.fair, h.referenced, h.peak_blocks)
        self._finished.difference_update(done)
        held = [len(h.blocks) for h in known.values() if h.blocks]
        return StepFigures(now=now, interval=interval, attributed_blocks=len(self._blocks),
                           referenced_blocks=sum(held), holders=len(held),
                           attributed_block_seconds=attributed_before * interval, finished=done)

    # ---- reading (tests, debugging)
    def fair_share_now(self, request_id: str) -> float:
        """Blocks the request holds now, each divided by its holder count."""
        h = self._holders.get(request_id)
        return sum(1.0 / self._blocks[b].holders for b in h.blocks) if h else 0.0

    def referenced_now(self, request_id: str) -> int:
        h = self._holders.get(request_id)
        return len(h.blocks) if h else 0
