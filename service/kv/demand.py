"""KV demand: how much KV cache the requests already admitted will need at their worst.

`kv_cache_usage` says how full the cache is *now*. A request holds KV for its prompt
and every token it has generated so far, and keeps growing until it stops, so a cache
at 60% can still run out (and preempt) before any new request arrives. KV demand adds
up what each running or waiting request may grow to:

    demand tokens of one request = min(prompt + max_tokens, max_model_len)
    demand blocks                = sum over requests of ceil(demand tokens / block size)
    demand bytes                 = demand blocks * KV bytes per block
    demand ratio                 = demand blocks / usable blocks of the cache

A request without ``max_tokens`` may run to the context limit (``max_model_len``).
Blocks are rounded per request because vLLM allocates whole blocks to each sequence.
Prefix-cache sharing lowers what is really allocated, so demand is an upper bound:
a ratio above 1 means the admitted work cannot all finish without preemption unless
requests stop early (EOS, stop strings) or share prefixes; a ratio well below 1 means
usage cannot reach 100% from the requests in flight.

Pure arithmetic: no vLLM import (the load tester and the docs' examples use it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from service.kv.geometry import blocks_for_tokens


@dataclass(frozen=True)
class KVDemand:
    requests: int
    tokens: int  # sum of per-request demand tokens
    blocks: int  # sum of per-request demand blocks (whole blocks)
    bytes: int  # blocks * KV bytes per block
    capacity_bytes: int  # usable blocks * KV bytes per block
    ratio: float  # demand blocks / usable blocks


def request_demand_tokens(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """Tokens of KV one request may hold before it stops: its prompt plus every token it may generate.

    ``max_tokens`` None (the client did not cap it) means up to the context limit."""
    if prompt_tokens < 0 or (max_tokens is not None and max_tokens < 0) or max_model_len <= 0:
        raise ValueError(f"bad request shape: prompt {prompt_tokens}, max_tokens {max_tokens}, "
                         f"max_model_len {max_model_len}")
    if max_tokens is None:
        return max(prompt_tokens, max_model_len)
    return min(prompt_tokens + max_tokens, max(max_model_len, prompt_tokens))


def kv_demand(requests: Iterable[tuple[int, int | None]], *, kv_bytes_per_token: int, block_size: int,
              num_blocks: int, max_model_len: int) -> KVDemand:
    """KV demand of the (prompt tokens, max_tokens) pairs of the running and waiting requests.

    ``num_blocks`` is the cache's usable blocks (vLLM's ``num_gpu_blocks`` minus its null block),
    ``kv_bytes_per_token`` the model's KV bytes per token on one shard set."""
    if kv_bytes_per_token <= 0 or block_size <= 0 or num_blocks <= 0:
        raise ValueError(f"bad cache shape: {kv_bytes_per_token} B/token, block {block_size}, {num_blocks} blocks")
    n = tokens = blocks = 0
    for prompt, max_tokens in requests:
        t = request_demand_tokens(prompt, max_tokens, max_model_len)
        n += 1
        tokens += t
        blocks += blocks_for_tokens(t, block_size)
    block_bytes = kv_bytes_per_token * block_size
    return KVDemand(n, tokens, blocks, blocks * block_bytes, num_blocks * block_bytes, blocks / num_blocks)
