"""Every metric we export, declared in one place.

Names: prefix ``gateway_``, base units (seconds, bytes, ratios 0-1), ``_total`` for
counters, labels bounded to model, KV-head count, finish reason, phase, route template,
method and status class. docs/metrics.md explains each one.

- ``EngineMetrics``: model shape, engine state and per-sequence figures, set by the
  stat-logger plugin (service/telemetry/plugin.py). They live in prometheus_client's
  default registry, which is what a plain ``vllm serve`` serves on ``/metrics`` (next to
  vLLM's ``vllm:`` metrics; vLLM unregisters only default-registry collectors whose name
  starts with ``vllm:``). One instance per process: ``engine_metrics()``.
- ``GatewayMetrics``: the gateway's HTTP-layer metrics, in a registry of its own that also
  forwards the default registry, so the gateway's ``/metrics`` serves everything.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.registry import Collector

# `_created` series double the exposition for no use on dashboards (vLLM does the same).
disable_created_metrics()

PREFIX = "gateway"
MODEL_LABELS = ("model", "kv_heads")
TENANT_LABELS = MODEL_LABELS + ("tenant",)  # per-request counters: the API key's name (service/telemetry/tenants.py)

_TOKENS = tuple(float(2**i) for i in range(0, 18))  # 1 .. 131072
_BLOCKS = tuple(float(2**i) for i in range(0, 14))  # 1 .. 8192
_BYTES = tuple(float(4**i) for i in range(8, 19))  # 64 KiB .. 64 GiB
_FLOPS = tuple(10.0**i for i in range(6, 17))  # 1 MFLOP .. 10 PFLOP
_BYTE_SECONDS = tuple(10.0**i for i in range(3, 14))
_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
         0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_PREEMPT = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)


class _Forward(Collector):
    """Serves another registry's metrics (vLLM's, in the default registry) through ours."""

    def __init__(self, source: CollectorRegistry):
        self._source = source

    def collect(self):
        yield from self._source.collect()


class EngineMetrics:
    """Model shape, engine state (every step) and per-sequence figures (the plugin's)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        p = PREFIX
        L = MODEL_LABELS

        def hist(name: str, doc: str, buckets: tuple, labels: tuple = L) -> Histogram:
            return Histogram(f"{p}_{name}", doc, labels, buckets=buckets, registry=r)

        def counter(name: str, doc: str, labels: tuple = L) -> Counter:
            return Counter(f"{p}_{name}", doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: tuple = L) -> Gauge:
            return Gauge(f"{p}_{name}", doc, labels, registry=r)

        # ---- model and cache shape
        self.model_info = Info(f"{p}_model", "Shape of the served model's KV cache "
                               "(layers, query/KV heads, head size, block size, bytes).", registry=r)
        self.kv_bytes_per_token = gauge("kv_bytes_per_token", "KV cache bytes one token occupies in the whole model: layers x 2 x KV heads x head size x dtype bytes.")
        self.kv_mha_bytes_per_token = gauge("kv_mha_bytes_per_token", "KV bytes per token an MHA model of the same shape (KV heads = query heads) would need.")
        self.kv_group_size = gauge("kv_group_size", "Query heads per KV head (1 = MHA, query heads = MQA).")

        # ---- engine state, every engine step (stat logger)
        self.kv_usage = gauge("kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0-1).")
        self.kv_blocks = gauge("kv_cache_blocks", "KV cache blocks in the pool.")
        self.kv_blocks_used = gauge("kv_cache_blocks_used", "KV cache blocks in use.")
        self.kv_capacity_tokens = gauge("kv_cache_capacity_tokens", "Tokens the KV cache holds (blocks x block size).")
        self.kv_capacity_bytes = gauge("kv_cache_capacity_bytes", "Bytes of the KV cache pool, whole model (all tensor- and pipeline-parallel ranks).")
        self.predicted_concurrency = gauge(
            "predicted_max_concurrency",
            "Sequences the KV cache holds at once: blocks / blocks per sequence, for sequences of "
            "the model's max length (basis=max_model_len) or of the mean finished request (basis=mean_request).",
            L + ("basis",))
        self.running = gauge("requests_running", "Requests in the engine's running batch.")
        self.waiting = gauge("requests_waiting", "Requests waiting to be scheduled.")
        self.preemptions = counter("preemptions", "Requests preempted by the engine (KV blocks reclaimed; recomputed later).")
        self.kv_demand_bytes = gauge(
            "kv_demand_bytes", "KV bytes the unfinished (running and waiting) sequences may hold before they stop: "
            "sum of ceil(min(prompt + max_tokens, max_model_len) / block) blocks x block bytes.")
        self.kv_demand_ratio = gauge("kv_demand_ratio", "KV demand blocks / usable KV blocks (may exceed 1).")

        # ---- decode steps: the roofline of the running batch next to its measured time
        self.roofline_hardware = Info(f"{p}_roofline_hardware", "Hardware the decode-step roofline predicts on: "
                                      "name, source, bandwidth (bytes/s), peak FLOP/s, origin.", L, registry=r)
        self.decode_steps = counter("decode_steps", "Engine steps that produced decode tokens (with a roofline prediction).")
        self.decode_step_seconds = counter(
            "decode_step_seconds", "Measured time of those steps: mean inter-token latency of the step's sequences.")
        self.decode_step_predicted_seconds = counter(
            "decode_step_predicted_seconds", "Roofline floor of those steps: max((weights + KV of the batch's "
            "contexts) / bandwidth, FLOPs / peak) on gateway_roofline_hardware_info.")
        self.decode_step_memory_seconds = counter(
            "decode_step_memory_seconds", "Memory part of the roofline of those steps: (weights + KV read) / bandwidth.")
        self.decode_bandwidth_efficiency = gauge(
            "decode_bandwidth_efficiency_ratio", "Last decode step: bytes it had to read / (measured time x "
            "memory bandwidth); 1 = at the hardware's bandwidth.")

        # ---- per engine sequence (one per choice of an n>1 request), observed once when it
        # finishes or is aborted; counters by tenant (the API key's name)
        T = TENANT_LABELS
        self.requests = counter("requests", "Finished or aborted engine sequences (one per choice) by finish reason (stop, length, abort, error).", T + ("finish_reason",))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.", T)
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished sequences.", T)
        self.cached_tokens = counter("cached_tokens", "Prompt tokens served from the prefix cache.", T)
        self.kv_used_bytes_total = counter("kv_used_bytes", "Sum over requests of the KV bytes each held at its peak (tokens actually written).", T)
        self.kv_mha_bytes_total = counter("kv_mha_equivalent_bytes", "Sum over requests of the KV bytes an MHA model of the same shape would have held.", T)
        self.kv_byte_seconds_total = counter("kv_byte_seconds", "KV memory x time held by finished requests (byte-seconds), by the request's own token count.", T)
        self.attention_flops_total = counter("attention_flops", "Attention FLOPs (QK^T and AV) of finished requests.", T + ("phase",))
        self.kv_read_bytes_total = counter("kv_read_bytes", "KV bytes read by decode attention of finished requests.", T)

        self.kv_fair_share_byte_seconds_total = counter(
            "kv_fair_share_byte_seconds", "KV byte-seconds finished requests held, each block divided among the "
            "requests holding it (PSS-like; from the engine's block tables, needs the accounting KV connector).", T)
        self.kv_referenced_byte_seconds_total = counter(
            "kv_referenced_byte_seconds", "KV byte-seconds of every block finished requests referenced, shared "
            "blocks counted whole for each holder (RSS-like; from the engine's block tables).", T)

        # ---- KV attribution, every step: the engine's own count next to ours (block-seconds
        # integrate the block count held since the previous step over the time to this one)
        self.kv_engine_block_seconds = counter(
            "kv_engine_block_seconds", "Time integral of the engine's used KV blocks (vLLM's kv_cache_usage x "
            "usable blocks), step by step on the API server's clock: the truth the attribution must add up to.")
        self.kv_attributed_block_seconds = counter(
            "kv_attributed_block_seconds", "Time integral of the blocks held by live requests (the sum of their "
            "fair shares), step by step on the engine's clock (accounting KV connector).")
        self.kv_unattributed_block_seconds = counter(
            "kv_unattributed_block_seconds", "Time integral of blocks in use but held by no request "
            "(deferred frees, copy-on-write retention): the remainder, not hidden.")
        self.kv_attributed_blocks = gauge("kv_attributed_blocks", "Blocks held by live requests now: the sum of their fair shares.")
        self.kv_referenced_blocks = gauge(
            "kv_referenced_blocks", "Blocks live requests reference now, shared blocks counted once per holder "
            "(RSS-like; exceeds the engine's used blocks when the prefix cache shares blocks).")
        self.kv_unattributed_blocks = gauge("kv_unattributed_blocks", "Blocks in use now but held by no request.")
        self.kv_attribution_holders = gauge("kv_attribution_holders", "Requests holding KV blocks now.")
        self.kv_attribution_cost_seconds = counter(
            "kv_attribution_cost_seconds", "Time the accounting KV connector spent in the engine's scheduler loop.")
        self.kv_attribution_steps = counter(
            "kv_attribution_steps", "Engine steps by how the attribution compared with the engine's used blocks: "
            "exact (held = used), remainder (held + unattributed = used), mismatch (they differ).", L + ("result",))
        self.kv_attribution_verify_steps = counter(
            "kv_attribution_verify_steps", "With KV_GATEWAY_ATTRIBUTION_VERIFY=1 only: steps whose fair shares, "
            "recomputed from vLLM's own block reference counts, matched ours (ok) or not (mismatch).", L + ("result",))

        self.h_prompt = hist("request_prompt_tokens", "Prompt tokens per request.", _TOKENS)
        self.h_generation = hist("request_generation_tokens", "Generated tokens per sequence.", _TOKENS)
        self.h_cached = hist("request_cached_tokens", "Prefix-cache hit tokens per request.", _TOKENS)
        self.h_blocks = hist("request_kv_blocks", "KV blocks a sequence held at its peak.", _BLOCKS)
        self.h_kv_alloc = hist("request_kv_allocated_bytes", "KV bytes of the blocks a request held at its peak.", _BYTES)
        self.h_kv_used = hist("request_kv_used_bytes", "KV bytes a request held at its peak: tokens written x KV bytes per token.", _BYTES)
        self.h_kv_mha = hist("request_kv_mha_equivalent_bytes", "KV bytes an MHA model of the same shape would have held for the request.", _BYTES)
        self.h_kv_fair_share_byte_seconds = hist(
            "request_kv_fair_share_byte_seconds", "KV byte-seconds a request held, shared blocks divided among their "
            "holders (accounting KV connector).", _BYTE_SECONDS)
        self.h_kv_byte_seconds = hist("request_kv_byte_seconds", "KV bytes held x seconds, over the request's prefill and decode.", _BYTE_SECONDS)
        self.h_flops = hist("request_attention_flops", "Attention FLOPs per request, by phase (prefill, decode).", _FLOPS, L + ("phase",))
        self.h_kv_read = hist("request_kv_read_bytes", "KV bytes read by the request's decode attention.", _BYTES)
        self.h_queue = hist("request_queue_seconds", "Time from engine arrival to first scheduling.", _LATENCY)
        self.h_ttft = hist("request_ttft_seconds", "Time to first token, from arrival at the engine front end.", _LATENCY)
        self.h_tpot = hist("request_tpot_seconds", "Time per output token after the first: decode time / (tokens - 1).", _TPOT)
        self.h_e2e = hist("request_e2e_seconds", "Time from arrival at the engine front end to the last token (or the abort).", _LATENCY)
        self.h_prefill = hist("request_prefill_seconds", "Time from first scheduling to first token.", _LATENCY)
        self.h_decode = hist("request_decode_seconds", "Time from first to last token.", _LATENCY)
        self.h_preempt = hist("request_preemptions", "Preemptions per request.", _PREEMPT)



_ENGINE_METRICS: EngineMetrics | None = None
_LOCK = threading.Lock()


def engine_metrics() -> EngineMetrics:
    """The process's EngineMetrics, registered in the default registry on first use.

    vLLM builds one stat logger per engine (and tests may build several in one process):
    they all share this instance, so no collector is registered twice."""
    global _ENGINE_METRICS
    with _LOCK:
        if _ENGINE_METRICS is None:
            _ENGINE_METRICS = EngineMetrics(REGISTRY)
        return _ENGINE_METRICS


class GatewayMetrics:
    """The gateway's HTTP-layer metrics; the engine's are reached through it (same objects
    as the plugin's, see ``engine_metrics``)."""

    def __init__(self, registry: CollectorRegistry | None = None, include_engine_metrics: bool = True):
        r = self.registry = registry or CollectorRegistry()
        p = PREFIX
        self.http_requests = Counter(f"{p}_http_requests", "HTTP requests by route template, method and status class.",
                                     ("route", "method", "status_class"), registry=r)
        self.http_latency = Histogram(f"{p}_http_request_duration_seconds", "HTTP request duration until the response (or stream) ends.",
                                      ("route", "method"), buckets=_LATENCY, registry=r)
        if include_engine_metrics:
            r.register(_Forward(REGISTRY))

    def __getattr__(self, name: str):
        return getattr(engine_metrics(), name)
