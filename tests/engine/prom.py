"""Reading a server's /metrics in engine tests, and the metric-name contract.

The names are a contract (docs/metrics.md explains each): ``PLUGIN_FAMILIES`` are served by
any vLLM server with the kv-gateway stat-logger plugin installed; our gateway adds
``HTTP_FAMILIES``."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

PLUGIN_FAMILIES = {
    "gateway_model_info": "gauge",  # an Info metric: value 1, the shape in its labels
    "gateway_kv_bytes_per_token": "gauge",
    "gateway_kv_mha_bytes_per_token": "gauge",
    "gateway_kv_group_size": "gauge",
    "gateway_kv_cache_usage_ratio": "gauge",
    "gateway_kv_cache_blocks": "gauge",
    "gateway_kv_cache_blocks_used": "gauge",
    "gateway_kv_cache_capacity_tokens": "gauge",
    "gateway_kv_cache_capacity_bytes": "gauge",
    "gateway_predicted_max_concurrency": "gauge",
    "gateway_requests_running": "gauge",
    "gateway_requests_waiting": "gauge",
    "gateway_preemptions": "counter",
    "gateway_kv_demand_bytes": "gauge",
    "gateway_kv_demand_ratio": "gauge",
    "gateway_requests": "counter",
    "gateway_prompt_tokens": "counter",
    "gateway_generation_tokens": "counter",
    "gateway_cached_tokens": "counter",
    "gateway_kv_used_bytes": "counter",
    "gateway_kv_mha_equivalent_bytes": "counter",
    "gateway_kv_byte_seconds": "counter",
    "gateway_attention_flops": "counter",
    "gateway_kv_read_bytes": "counter",
    "gateway_request_prompt_tokens": "histogram",
    "gateway_request_generation_tokens": "histogram",
    "gateway_request_cached_tokens": "histogram",
    "gateway_request_kv_blocks": "histogram",
    "gateway_request_kv_allocated_bytes": "histogram",
    "gateway_request_kv_used_bytes": "histogram",
    "gateway_request_kv_mha_equivalent_bytes": "histogram",
    "gateway_request_kv_byte_seconds": "histogram",
    "gateway_request_attention_flops": "histogram",
    "gateway_request_kv_read_bytes": "histogram",
    "gateway_request_queue_seconds": "histogram",
    "gateway_request_ttft_seconds": "histogram",
    "gateway_request_tpot_seconds": "histogram",
    "gateway_request_e2e_seconds": "histogram",
    "gateway_request_prefill_seconds": "histogram",
    "gateway_request_decode_seconds": "histogram",
    "gateway_request_preemptions": "histogram",
    # KV attribution: fair shares from the engine's block tables next to its own used blocks
    "gateway_kv_fair_share_byte_seconds": "counter",
    "gateway_kv_referenced_byte_seconds": "counter",
    "gateway_request_kv_fair_share_byte_seconds": "histogram",
    "gateway_kv_engine_block_seconds": "counter",
    "gateway_kv_attributed_block_seconds": "counter",
    "gateway_kv_unattributed_block_seconds": "counter",
    "gateway_kv_attributed_blocks": "gauge",
    "gateway_kv_unattributed_blocks": "gauge",
    "gateway_kv_referenced_blocks": "gauge",
    "gateway_kv_attribution_holders": "gauge",
    "gateway_kv_attribution_cost_seconds": "counter",
    "gateway_kv_attribution_steps": "counter",
    "gateway_kv_attribution_verify_steps": "counter",
}
# Declared by every server with the plugin; samples only where the roofline has a hardware
# (detected, or KV_GATEWAY_HARDWARE; the test gateway probes this CPU).
DECODE_FAMILIES = {
    "gateway_roofline_hardware_info": "gauge",  # an Info metric, like gateway_model_info
    "gateway_decode_steps": "counter",
    "gateway_decode_step_seconds": "counter",
    "gateway_decode_step_predicted_seconds": "counter",
    "gateway_decode_step_memory_seconds": "counter",
    "gateway_decode_bandwidth_efficiency_ratio": "gauge",
}
PLUGIN_FAMILIES.update(DECODE_FAMILIES)
HTTP_FAMILIES = {
    "gateway_http_requests": "counter",
    "gateway_http_request_duration_seconds": "histogram",
}

Snapshot = dict[tuple[str, tuple], float]


def scrape(base_url: str) -> Snapshot:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap: Snapshot, name: str, **labels) -> float:
    total = 0.0
    for (n, lab), v in snap.items():
        d = dict(lab)
        if n == name and all(d.get(k) == str(val) for k, val in labels.items()):
            total += v
    return total


def delta(before: Snapshot, after: Snapshot, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_idle(base_url: str, timeout: float = 30) -> Snapshot:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = scrape(base_url)
        if value(s, "gateway_requests_running") == 0 and value(s, "gateway_requests_waiting") == 0:
            return s
        time.sleep(0.1)
    pytest.fail("engine did not become idle")
