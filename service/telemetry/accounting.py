"""Per-request accounting: what one request cost in KV memory, attention and time.

Pure: built from token counts, the engine's per-request timestamps and the model's KV
geometry (formulas in service/kv/geometry.py). ``observe`` puts one record into Prometheus
and one JSON line into the log.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from service.kv.geometry import KVGeometry, kv_byte_seconds, sequence_cost
from service.telemetry.metrics import GatewayMetrics

request_log = logging.getLogger("gateway.requests")


@dataclass(frozen=True)
class EngineTimes:
    """Per-request timings from vLLM's RequestStateStats (engine monotonic clock)."""

    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    ttft_seconds: float | None = None
    scheduled: bool = False
    preemptions: int = 0

    @classmethod
    def from_stats(cls, stats: Any) -> "EngineTimes":
        if stats is None or not getattr(stats, "queued_ts", 0):
            return cls()
        q, s = stats.queued_ts, stats.scheduled_ts
        f, last = stats.first_token_ts, stats.last_token_ts
        scheduled = s > 0
        return cls(
            queue_seconds=max(s - q, 0.0) if scheduled else 0.0,
            prefill_seconds=max(f - s, 0.0) if scheduled and f else 0.0,
            decode_seconds=max(last - f, 0.0) if f and last else 0.0,
            ttft_seconds=stats.first_token_latency if f else None,
            scheduled=scheduled,
            preemptions=int(stats.num_preemptions),
        )


@dataclass
class RequestFigures:
    request_id: str
    model: str
    kv_heads: int
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int
    choices: int
    kv_tokens: int
    kv_blocks: int
    kv_used_bytes: int
    kv_allocated_bytes: int
    kv_mha_equivalent_bytes: int
    kv_byte_seconds: float
    attention_flops_prefill: int
    attention_flops_decode: int
    kv_read_bytes: int
    queue_seconds: float
    ttft_seconds: float | None
    tpot_seconds: float | None
    prefill_seconds: float
    decode_seconds: float
    e2e_seconds: float
    preemptions: int
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d.update(self.extra)
        return d


def account(
    geometry: KVGeometry, *, request_id: str, model: str, finish_reason: str,
    prompt_tokens: int, generated: Sequence[int], cached_tokens: int,
    times: EngineTimes, e2e_seconds: float,
) -> RequestFigures:
    """Figures of one request whose choices generated ``generated[i]`` tokens each.

    Each choice is one engine sequence with its own block table, so KV and attention
    figures are summed over choices (blocks shared through the prefix cache count once
    per sequence that holds them).
    """
    prefilled = times.scheduled or any(g > 0 for g in generated)
    costs = [sequence_cost(geometry, prompt_tokens, g, cached_tokens, prefilled) for g in generated]
    gmax = max(generated, default=0)
    tpot = times.decode_seconds / (gmax - 1) if gmax > 1 else None
    bps = sum(
        kv_byte_seconds(geometry.kv_bytes_per_token, prompt_tokens if prefilled else 0, g,
                        times.prefill_seconds, times.decode_seconds)
        for g in generated
    )
    return RequestFigures(
        request_id=request_id, model=model, kv_heads=geometry.kv_heads,
        finish_reason=finish_reason, prompt_tokens=prompt_tokens,
        generation_tokens=sum(generated), cached_tokens=cached_tokens, choices=len(generated),
        kv_tokens=sum(c.kv_tokens for c in costs),
        kv_blocks=sum(c.kv_blocks for c in costs),
        kv_used_bytes=sum(c.kv_used_bytes for c in costs),
        kv_allocated_bytes=sum(c.kv_allocated_bytes for c in costs),
        kv_mha_equivalent_bytes=sum(c.kv_mha_equivalent_bytes for c in costs),
        kv_byte_seconds=bps,
        attention_flops_prefill=sum(c.prefill_flops for c in costs),
        attention_flops_decode=sum(c.decode_flops for c in costs),
        kv_read_bytes=sum(c.kv_read_bytes for c in costs),
        queue_seconds=times.queue_seconds, ttft_seconds=times.ttft_seconds, tpot_seconds=tpot,
        prefill_seconds=times.prefill_seconds, decode_seconds=times.decode_seconds,
        e2e_seconds=e2e_seconds, preemptions=times.preemptions,
    )


def observe(metrics: GatewayMetrics, f: RequestFigures) -> None:
    """One request into every per-request histogram and counter, with its id as exemplar."""
    m, lv = metrics, (f.model, str(f.kv_heads))
    ex = {"request_id": f.request_id[:100]}
    m.requests.labels(*lv, f.finish_reason).inc()
    m.prompt_tokens.labels(*lv).inc(f.prompt_tokens)
    m.generation_tokens.labels(*lv).inc(f.generation_tokens)
    m.cached_tokens.labels(*lv).inc(f.cached_tokens)
    m.kv_used_bytes_total.labels(*lv).inc(f.kv_used_bytes)
    m.kv_mha_bytes_total.labels(*lv).inc(f.kv_mha_equivalent_bytes)
    m.kv_byte_seconds_total.labels(*lv).inc(f.kv_byte_seconds)
    m.attention_flops_total.labels(*lv, "prefill").inc(f.attention_flops_prefill)
    m.attention_flops_total.labels(*lv, "decode").inc(f.attention_flops_decode)
    m.kv_read_bytes_total.labels(*lv).inc(f.kv_read_bytes)

    m.h_prompt.labels(*lv).observe(f.prompt_tokens, ex)
    m.h_generation.labels(*lv).observe(f.generation_tokens, ex)
    m.h_cached.labels(*lv).observe(f.cached_tokens, ex)
    m.h_blocks.labels(*lv).observe(f.kv_blocks, ex)
    m.h_kv_alloc.labels(*lv).observe(f.kv_allocated_bytes, ex)
    m.h_kv_used.labels(*lv).observe(f.kv_used_bytes, ex)
    m.h_kv_mha.labels(*lv).observe(f.kv_mha_equivalent_bytes, ex)
    m.h_kv_byte_seconds.labels(*lv).observe(f.kv_byte_seconds, ex)
    m.h_flops.labels(*lv, "prefill").observe(f.attention_flops_prefill, ex)
    m.h_flops.labels(*lv, "decode").observe(f.attention_flops_decode, ex)
    m.h_kv_read.labels(*lv).observe(f.kv_read_bytes, ex)
    m.h_queue.labels(*lv).observe(f.queue_seconds, ex)
    if f.ttft_seconds is not None:
        m.h_ttft.labels(*lv).observe(f.ttft_seconds, ex)
    if f.tpot_seconds is not None:
        m.h_tpot.labels(*lv).observe(f.tpot_seconds, ex)
    m.h_e2e.labels(*lv).observe(f.e2e_seconds, ex)
    m.h_prefill.labels(*lv).observe(f.prefill_seconds, ex)
    m.h_decode.labels(*lv).observe(f.decode_seconds, ex)
    m.h_preempt.labels(*lv).observe(f.preemptions, ex)

    request_log.info(json.dumps(f.as_dict(), separators=(",", ":")))
