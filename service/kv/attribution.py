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


class _Holder:
    __slots__ = ("blocks", "fair", "referenced", "peak_blocks", "last")

    def __init__(self) -> None:
        self.blocks: list[int] = []  # block ids held, in allocation order
        self.fair = 0.0  # fair-share block-seconds, pending terms of held blocks included
        self.referenced = 0.0
        self.peak_blocks = 0
        self.last: Any = None  # the engine's object for the last block: identity = no change


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
        self._holders: dict[str, _Holder] = {}  # requests holding blocks now
        self._parked: dict[str, _Holder] = {}  # preempted: blocks freed, totals kept
        self._finished: set[str] = set()
        self._last: float | None = None
        self._referenced = 0  # sum of len(blocks) over holders

    # ---- events
    def finish(self, request_id: str) -> None:
        """The engine finished (or aborted) the request; its totals go out at the next step,
        once its blocks are released."""
        self._finished.add(request_id)

    def _acquire(self, h: _Holder, blocks: Sequence[Any], now: float) -> None:
        table = self._blocks
        for blk in blocks:
            bid = blk.block_id
            b = table.get(bid)
            if b is None:
                b = table[bid] = _Block(since=now)
            h.fair -= b.advance(now)
            b.holders += 1
            h.blocks.append(bid)
        h.referenced -= now * len(blocks)
        self._referenced += len(blocks)
        h.peak_blocks = max(h.peak_blocks, len(h.blocks))

    def _release_all(self, h: _Holder, now: float) -> None:
        table = self._blocks
        for bid in h.blocks:
            b = table[bid]
            h.fair += b.advance(now)
            b.holders -= 1
            if not b.holders:
                del table[bid]
        h.referenced += now * len(h.blocks)
        self._referenced -= len(h.blocks)
        h.blocks = []
        h.last = None

    # ---- every step
    def step(self, now: float, holders: Mapping[str, Sequence[Any]]) -> StepFigures:
        """Steady state (no list changed) costs one dict lookup, one length and one
        identity comparison per request."""
        interval = 0.0 if self._last is None else max(now - self._last, 0.0)
        attributed_before = len(self._blocks)
        self._last = now
        known, get = self._holders, self._holders.get
        visited = 0
        changed = []
        for rid, blocks in holders.items():
            h = get(rid)
            if h is None:
                if blocks:
                    changed.append((rid, None, blocks))
                continue
            visited += 1
            n = len(blocks)
            if n == len(h.blocks) and (not n or blocks[-1] is h.last):
                continue
            changed.append((rid, h, blocks))
        if visited != len(known):  # some lists were freed: finished or preempted
            for rid in [r for r in known if r not in holders]:
                h = known.pop(rid)
                self._release_all(h, now)
                self._parked[rid] = h
        for rid, h, blocks in changed:
            if h is None:
                h = known[rid] = self._parked.pop(rid, None) or _Holder()
            have, n = len(h.blocks), len(blocks)
            if n >= have and (not have or blocks[have - 1].block_id == h.blocks[-1]):
                self._acquire(h, blocks[have:], now)  # grew at its end (or an equal copy)
            else:  # freed and allocated again between two steps: start over
                self._release_all(h, now)
                self._acquire(h, blocks, now)
            h.last = blocks[-1] if n else None
            if not n:
                self._parked[rid] = known.pop(rid)
        done: dict[str, HolderTotals] = {}
        if self._finished:
            for rid in list(self._finished):
                if rid in known:
                    continue  # blocks not released yet
                h = self._parked.pop(rid, None) or _Holder()
                done[rid] = HolderTotals(h.fair, h.referenced, h.peak_blocks)
                self._finished.discard(rid)
        return StepFigures(now=now, interval=interval, attributed_blocks=len(self._blocks),
                           referenced_blocks=self._referenced, holders=len(known),
                           attributed_block_seconds=attributed_before * interval, finished=done)

    # ---- reading (tests, debugging)
    def fair_share_now(self, request_id: str) -> float:
        """Blocks the request holds now, each divided by its holder count."""
        h = self._holders.get(request_id)
        return sum(1.0 / self._blocks[b].holders for b in h.blocks) if h else 0.0

    def referenced_now(self, request_id: str) -> int:
        h = self._holders.get(request_id)
        return len(h.blocks) if h else 0
