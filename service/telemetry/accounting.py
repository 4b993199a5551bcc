"""Per-sequence accounting: what one engine sequence cost in KV memory, attention and time.

Pure: built from token counts, the engine's per-request timings and the model's KV
geometry (formulas in service/kv/geometry.py). An n>1 request is n engine sequences, each
with its own block table, prefix-cache hits and timings: each is accounted on its own.
``observe`` puts one sequence into Prometheus, the ledger and one JSON log line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from service.kv.geometry import KVGeometry, kv_byte_seconds, sequence_cost
from service.telemetry.ledger import LEDGER, Ledger
from service.telemetry.metrics import EngineMetrics
from service.telemetry.tenants import DEFAULT_TENANT

request_log = logging.getLogger("gateway.requests")


@dataclass(frozen=True)
class SequenceStats:
    """What the engine front end knows about one finished or aborted engine sequence.

    Timings are engine intervals: queue = scheduled - queued, prefill = first token -
    scheduled, decode = last token - first token (engine-core clock); ttft and e2e run from
    the request's arrival at the front end. A sequence never scheduled has no timings."""

    request_id: str
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int = 0
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    ttft_seconds: float | None = None
    e2e_seconds: float = 0.0
    preemptions: int = 0
    scheduled: bool = True

    @classmethod
    def from_finished(cls, fr: Any) -> "SequenceStats":
        """From vLLM's ``FinishedRequestStats`` (one per sequence; ``request_id`` is the
        external id, shared by the children of an n>1 request). It carries no TTFT: the
        first token came ``decode_time`` before the last, so ttft = e2e - decode."""
        g = int(fr.num_generation_tokens)
        return cls(
            request_id=str(fr.request_id), finish_reason=str(fr.finish_reason),
            prompt_tokens=int(fr.num_prompt_tokens), generation_tokens=g,
            cached_tokens=int(fr.num_cached_tokens),
            queue_seconds=max(float(fr.queued_time), 0.0),
            prefill_seconds=max(float(fr.prefill_time), 0.0),
            decode_seconds=max(float(fr.decode_time), 0.0),
            ttft_seconds=max(float(fr.e2e_latency) - float(fr.decode_time), 0.0) if g else None,
            e2e_seconds=max(float(fr.e2e_latency), 0.0),
            preemptions=int(fr.num_preemptions),
            scheduled=True,
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
    tenant: str = DEFAULT_TENANT
    # measured from the engine's block tables (service/telemetry/attribution.py); None
    # without the accounting KV connector, or until the engine frees the blocks
    kv_fair_share_block_seconds: float | None = None
    kv_referenced_block_seconds: float | None = None
    kv_peak_blocks_held: int | None = None
    kv_fair_share_byte_seconds: float | None = None
    kv_referenced_byte_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d.update(self.extra)
        return d


def account_sequence(geometry: KVGeometry, model: str, s: SequenceStats,
                     tenant: str = DEFAULT_TENANT) -> RequestFigures:
    """Figures of one engine sequence, from its own tokens, cache hits and timings."""
    g = s.generation_tokens
    prefilled = s.scheduled or g > 0
    c = sequence_cost(geometry, s.prompt_tokens, g, s.cached_tokens, prefilled)
    return RequestFigures(
        request_id=s.request_id, model=model, kv_heads=geometry.kv_heads,
        finish_reason=s.finish_reason, prompt_tokens=s.prompt_tokens, generation_tokens=g,
        cached_tokens=s.cached_tokens, choices=1,
        kv_tokens=c.kv_tokens, kv_blocks=c.kv_blocks, kv_used_bytes=c.kv_used_bytes,
        kv_allocated_bytes=c.kv_allocated_bytes, kv_mha_equivalent_bytes=c.kv_mha_equivalent_bytes,
        kv_byte_seconds=kv_byte_seconds(geometry.kv_bytes_per_token, s.prompt_tokens if prefilled else 0,
                                        g, s.prefill_seconds, s.decode_seconds),
        attention_flops_prefill=c.prefill_flops, attention_flops_decode=c.decode_flops,
        kv_read_bytes=c.kv_read_bytes,
        queue_seconds=s.queue_seconds, ttft_seconds=s.ttft_seconds,
        tpot_seconds=s.decode_seconds / (g - 1) if g > 1 else None,
        prefill_seconds=s.prefill_seconds, decode_seconds=s.decode_seconds,
        e2e_seconds=s.e2e_seconds, preemptions=s.preemptions, tenant=tenant,
    )


def observe(metrics: EngineMetrics, f: RequestFigures, ledger: Ledger | None = LEDGER) -> None:
    """One sequence into every per-request histogram and counter (its id as exemplar),
    the ledger and one JSON line on the ``gateway.requests`` logger."""
    m, lv = metrics, (f.model, str(f.kv_heads))
    lt = lv + (f.tenant,)
    ex = {"request_id": f.request_id[:100]}
    m.requests.labels(*lt, f.finish_reason).inc()
    m.prompt_tokens.labels(*lt).inc(f.prompt_tokens)
    m.generation_tokens.labels(*lt).inc(f.generation_tokens)
    m.cached_tokens.labels(*lt).inc(f.cached_tokens)
    m.kv_used_bytes_total.labels(*lt).inc(f.kv_used_bytes)
    m.kv_mha_bytes_total.labels(*lt).inc(f.kv_mha_equivalent_bytes)
    m.kv_byte_seconds_total.labels(*lt).inc(f.kv_byte_seconds)
    m.attention_flops_total.labels(*lt, "prefill").inc(f.attention_flops_prefill)
    m.attention_flops_total.labels(*lt, "decode").inc(f.attention_flops_decode)
    m.kv_read_bytes_total.labels(*lt).inc(f.kv_read_bytes)
    if f.kv_fair_share_byte_seconds is not None:
        observe_attribution(m, lt, f.as_dict(), ex)

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

    record = f.as_dict()
    if ledger is not None:
        ledger.add(f.request_id, record)
    request_log.info(json.dumps(record, separators=(",", ":")))


def observe_attribution(m: EngineMetrics, lt: tuple[str, ...], fields: dict[str, Any], ex: dict[str, str]) -> None:
    """One sequence's fair-share and referenced byte-seconds (measured from the engine's
    block tables) into the tenant counters and the per-request histogram."""
    m.kv_fair_share_byte_seconds_total.labels(*lt).inc(fields["kv_fair_share_byte_seconds"])
    m.kv_referenced_byte_seconds_total.labels(*lt).inc(fields["kv_referenced_byte_seconds"])
    m.h_kv_fair_share_byte_seconds.labels(*lt[:2]).observe(fields["kv_fair_share_byte_seconds"], ex)
