"""Parsing /metrics of the gateway and of plain vLLM, and the per-step server summary."""

from __future__ import annotations

import pytest

from loadtest.server.scrape import METRICS, Snapshot, snapshot, summarize_server

GATEWAY = """\
# HELP gateway_kv_cache_usage_ratio Fraction of KV blocks in use.
# TYPE gateway_kv_cache_usage_ratio gauge
gateway_kv_cache_usage_ratio{kv_heads="3",model="smol"} {kv}
# TYPE gateway_kv_cache_blocks gauge
gateway_kv_cache_blocks{kv_heads="3",model="smol"} 20.0
# TYPE gateway_kv_cache_blocks_used gauge
gateway_kv_cache_blocks_used{kv_heads="3",model="smol"} 5.0
# TYPE gateway_kv_cache_capacity_tokens gauge
gateway_kv_cache_capacity_tokens{kv_heads="3",model="smol"} 2560.0
# TYPE gateway_requests_running gauge
gateway_requests_running{kv_heads="3",model="smol"} {running}
# TYPE gateway_requests_waiting gauge
gateway_requests_waiting{kv_heads="3",model="smol"} {waiting}
# TYPE gateway_predicted_max_concurrency gauge
gateway_predicted_max_concurrency{basis="max_model_len",kv_heads="3",model="smol"} 1.25
gateway_predicted_max_concurrency{basis="mean_request",kv_heads="3",model="smol"} 10.0
# TYPE gateway_kv_bytes_per_token gauge
gateway_kv_bytes_per_token{kv_heads="3",model="smol"} 23040.0
# TYPE gateway_model_info gauge
gateway_model_info{kv_heads="3",model="smol",architecture="LlamaForCausalLM"} 1.0
# TYPE gateway_preemptions_total counter
gateway_preemptions_total{kv_heads="3",model="smol"} {preempt}
gateway_preemptions_created{kv_heads="3",model="smol"} 1.7e+09
# TYPE gateway_requests_total counter
gateway_requests_total{finish_reason="length",kv_heads="3",model="smol"} {finished}
gateway_requests_total{finish_reason="stop",kv_heads="3",model="smol"} 1.0
# TYPE gateway_generation_tokens_total counter
gateway_generation_tokens_total{kv_heads="3",model="smol"} {gen}
# TYPE gateway_request_kv_used_bytes histogram
gateway_request_kv_used_bytes_bucket{kv_heads="3",le="+Inf",model="smol"} {count}
gateway_request_kv_used_bytes_count{kv_heads="3",model="smol"} {count}
gateway_request_kv_used_bytes_sum{kv_heads="3",model="smol"} {sum}
# TYPE gateway_request_attention_flops histogram
gateway_request_attention_flops_count{kv_heads="3",model="smol",phase="prefill"} {count}
gateway_request_attention_flops_sum{kv_heads="3",model="smol",phase="prefill"} {flops_p}
gateway_request_attention_flops_count{kv_heads="3",model="smol",phase="decode"} {count}
gateway_request_attention_flops_sum{kv_heads="3",model="smol",phase="decode"} {flops_d}
"""

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smol"} 7.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smol"} 3.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="smol"} 0.875
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="smol"} 23.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="smol"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="smol"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="smol"} 2.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",engine="0",num_gpu_blocks="20"} 1.0
"""


def gateway(
    t: float, kv=0.0, running=0, waiting=0, preempt=0, finished=0, gen=0, count=0, sum=0.0, flops_p=0.0, flops_d=0.0
) -> Snapshot:
    values = dict(
        kv=kv,
        running=running,
        waiting=waiting,
        preempt=preempt,
        finished=finished,
        gen=gen,
        count=count,
        sum=sum,
        flops_p=flops_p,
        flops_d=flops_d,
    )
    text = GATEWAY
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return snapshot(text, t, "smol")


def test_gateway_exposition_maps_every_gateway_metric() -> None:
    snap = gateway(
        1.0, kv=0.25, running=4, waiting=2, preempt=3, finished=7, count=5, sum=1000.0, flops_p=10.0, flops_d=30.0
    )
    assert snap.source == "gateway"
    assert snap.values["kv_usage"] == 0.25
    assert snap.values["running"] == 4 and snap.values["waiting"] == 2
    assert snap.values["kv_blocks"] == 20 and snap.values["kv_blocks_used"] == 5
    assert snap.values["kv_capacity_tokens"] == 2560
    assert snap.values["predicted_max_concurrency_max_model_len"] == 1.25
    assert snap.values["predicted_max_concurrency_mean_request"] == 10
    assert snap.values["kv_bytes_per_token"] == 23040
    assert snap.values["preemptions"] == 3
    assert snap.values["requests_finished"] == 8  # summed over finish reasons
    assert snap.histograms["kv_used_bytes"] == (1000.0, 5.0)
    assert snap.histograms["attention_flops_prefill"] == (10.0, 5.0)
    assert snap.histograms["kv_allocated_bytes"] is None  # not exposed -> None
    assert snap.values["prompt_tokens"] is None
    assert snap.info["architecture"] == "LlamaForCausalLM"


def test_vllm_exposition_uses_vllm_names_and_misses_the_rest() -> None:
    snap = snapshot(VLLM, 0.0, "smol")
    assert snap.source == "vllm"
    assert snap.values["kv_usage"] == 0.875
    assert (snap.values["running"], snap.values["waiting"], snap.values["preemptions"]) == (7, 3, 23)
    assert snap.histograms["ttft_seconds"] == (2.0, 4.0)
    assert snap.values["kv_capacity_tokens"] is None
    assert snap.histograms["kv_used_bytes"] is None
    assert snap.info["num_gpu_blocks"] == "20"


def test_unknown_or_empty_exposition_is_all_none() -> None:
    snap = snapshot("# nothing here\nother_metric 1\n", 0.0)
    assert snap.source is None
    assert all(v is None for v in snap.values.values())
    assert all(v is None for v in snap.histograms.values())


def test_other_models_are_filtered_out() -> None:
    text = (
        "# TYPE gateway_requests_running gauge\n"
        'gateway_requests_running{model="smol"} 2\n'
        'gateway_requests_running{model="other"} 9\n'
    )
    assert snapshot(text, 0, "smol").values["running"] == 2
    assert snapshot(text, 0, "unknown-name").values["running"] == 11


def test_every_canonical_metric_has_a_gateway_name() -> None:
    assert all(spec.gateway and spec.gateway.startswith("gateway_") for spec in METRICS.values())
    assert all(spec.vllm is None or spec.vllm.startswith("vllm:") for spec in METRICS.values())


def test_step_summary() -> None:
    before = gateway(-0.1, preempt=2, finished=10, gen=100, count=10, sum=5000.0)
    during = [
        gateway(0.5, kv=0.5, running=9, waiting=3),
        gateway(1.0, kv=0.9, running=10, waiting=5),
        gateway(1.5, kv=0.7, running=9, waiting=1),
        gateway(2.0, kv=0.3, running=4, waiting=0),
    ]
    after = gateway(2.2, preempt=5, finished=30, gen=740, count=30, sum=5000.0 + 20 * 2000.0)
    s = summarize_server(before, during, after, errors=1, t0=0.0)
    assert s.source == "gateway" and s.scrapes == 6 and s.scrape_errors == 1
    assert s.kv_usage_peak == 0.9
    assert s.kv_usage_mean == pytest.approx((0.5 + 0.9 + 0.7 + 0.3) / 4)
    assert s.running_peak == 10 and s.waiting_peak == 5
    assert s.running_mean == pytest.approx(8.0)
    assert s.samples_while_waiting == 3
    assert s.running_median_while_waiting == 9 and s.running_mode_while_waiting == 9
    assert s.preemptions == 3 and s.requests_finished == 20 and s.generation_tokens == 640
    assert s.per_request["kv_used_bytes"] is not None
    assert s.per_request["kv_used_bytes"].count == 20 and s.per_request["kv_used_bytes"].mean == 2000.0
    assert s.per_request["kv_allocated_bytes"] is None
    assert s.predicted_max_concurrency_mean_request == 10
    assert [p.t_s for p in s.samples] == [-0.1, 0.5, 1.0, 1.5, 2.0, 2.2]


def test_step_summary_survives_missing_scrapes_and_counter_resets() -> None:
    assert summarize_server(None, [], None, errors=3).scrape_errors == 3
    s = summarize_server(gateway(0, preempt=9), [], gateway(1, preempt=1))
    assert s.preemptions is None  # counter went back: server restarted
    assert s.running_median_while_waiting is None and s.kv_usage_mean == 0.0
    only_after = summarize_server(None, [], gateway(1, running=2))
    assert only_after.running_peak == 2 and only_after.preemptions is None


def test_gateway_that_also_serves_vllm_metrics_prefers_its_own_and_falls_back() -> None:
    combined = GATEWAY.replace("{running}", "4").replace("{kv}", "0.5") + VLLM
    for key in ("waiting", "preempt", "finished", "gen", "count", "sum", "flops_p", "flops_d"):
        combined = combined.replace("{" + key + "}", "0")
    snap = snapshot(combined, 0.0, "smol")
    assert snap.source == "gateway"
    assert snap.values["running"] == 4 and snap.values["kv_usage"] == 0.5  # gateway's, not vLLM's 7 / 0.875
    assert snap.histograms["ttft_seconds"] == (2.0, 4.0)  # only vLLM has it here
