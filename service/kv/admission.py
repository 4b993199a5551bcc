"""KV demand of one request before it enters the engine, and the probable prefix-cache hits.

The admission controller (service/admission/) reserves, for every request it lets into the
engine, the KV blocks that request may grow to:

    blocks of one sequence = ceil(min(prompt + max_tokens, max_model_len) / block size)
    blocks of the request  = n x blocks of one sequence - (n - 1) x full prompt blocks
                             (the n choices share the prompt's full blocks through the prefix cache)
                             - probable prefix hits (full leading blocks another admitted
                             request holds right now)

A request without ``max_tokens`` may run to the context limit (``max_model_len``), as in
``service.kv.demand``. vLLM never writes the KV of the last generated token, so the first
line is an upper bound of what the sequence allocates.

Probable prefix hits: vLLM's prefix cache shares a full block (``block size`` tokens) between
requests whose token ids agree from the start up to the end of that block. ``PrefixIndex``
holds a chained hash of every full prompt block of the requests admitted and not yet
finished, with a count of holders; a new request's leading blocks found there are counted as
shared, since the live holder keeps them in the cache. "Probable": our hash is over the token
ids the gateway computed (vLLM also keys on LoRA and multimodal inputs, which the gateway does
not see), and two identical prompts admitted in the same engine step may each get their own
blocks. The index is bounded by the blocks the admitted requests reserved, so never larger
than the cache.

Pure arithmetic: no vLLM import.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from service.kv.demand import request_demand_tokens
from service.kv.geometry import blocks_for_tokens


def full_block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full blocks of a prompt: block i's hash covers tokens 0 .. (i+1) x size."""
    if block_size <= 0:
        raise ValueError(f"block size must be positive, not {block_size}")
    out, parent = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        out.append(parent)
    return tuple(out)


def request_blocks(prompt_tokens: Iterable[int], max_tokens: int | None, n: int, *, block_size: int,
                   max_model_len: int) -> int:
    """KV blocks a request of one or more prompts (a batch completion) and ``n`` choices each may grow to."""
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    total = 0
    for p in prompt_tokens:
        p = min(p, max_model_len)
        one = blocks_for_tokens(request_demand_tokens(p, max_tokens, max_model_len), block_size)
        total += n * one - (n - 1) * (p // block_size)
    return total


class PrefixIndex:
    """Full prompt blocks held by the admitted requests, with the number of holders of each."""

    def __init__(self) -> None:
        self._holders: Counter[int] = Counter()

    def hits(self, hashes: Sequence[int]) -> int:
        """Leading blocks of a prompt that an admitted request holds now."""
        n = 0
        for h in hashes:
            if self._holders[h] <= 0:
                break
            n += 1
        return n

    def add(self, hashes: Iterable[int]) -> None:
        self._holders.update(hashes)

    def remove(self, hashes: Sequence[int]) -> None:
        self._holders.subtract(hashes)
        for h in [h for h in hashes if self._holders[h] <= 0]:
            del self._holders[h]

    def __len__(self) -> int:
        return len(self._holders)
