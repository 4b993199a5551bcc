"""The stat-logger plugin fed with vLLM's own stats objects (no engine)."""

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from vllm.v1.engine import FinishReason
from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

from service.kv.geometry import KVGeometry, kv_byte_seconds, prefill_context_sum
from service.telemetry.ledger import EngineState, Ledger
from service.telemetry.metrics import EngineMetrics, engine_metrics
from service.telemetry.plugin import KVAccountingLogger
from tests.unit.fake_vllm import fake_vllm_config

F = 4 * 30 * 9 * 64  # attention FLOPs per context token, SmolLM2
KVB = 23_040
LABELS = {"model": "SmolLM2-135M-Instruct", "kv_heads": "3"}


def plugin(**cfg):
    reg = CollectorRegistry()
    p = KVAccountingLogger(fake_vllm_config(**cfg), 0, metrics=EngineMetrics(reg), state=EngineState(),
                           ledger=Ledger())
    p.log_engine_initialized()
    return p, reg


def sample(reg, name, **labels):
    return reg.get_sample_value(name, {**LABELS, **labels}) or 0.0


def finished(rid, p, g, cached, prefill, decode, e2e, reason=FinishReason.LENGTH):
    return FinishedRequestStats(finish_reason=reason, request_id=rid, e2e_latency=e2e, num_prompt_tokens=p,
                                num_generation_tokens=g, num_cached_tokens=cached, queued_time=0.25,
                                prefill_time=prefill, decode_time=decode, inference_time=prefill + decode,
                                mean_time_per_output_token=decode / (g - 1) if g > 1 else 0.0)


def step(p, *finished_reqs):
    it = IterationStats()
    it.finished_requests.extend(finished_reqs)
    p.record(None, it)


def test_review_case_each_child_of_n2_is_accounted_on_its_own():
    """P=1000, n=2, G=[2, 500], block 16: the long child prefilled the prompt, the short one
    was scheduled later and hit 62 cached blocks (992 tokens). The review saw 15,944 (both
    children charged the request's 992 hits) where the truth is 500,500 + 7,972 = 508,472."""
    p, reg = plugin(block_size=16)
    long_child = finished("chatcmpl-rev", 1000, 500, 0, prefill=2.0, decode=20.0, e2e=22.5)
    short_child = finished("chatcmpl-rev", 1000, 2, 992, prefill=0.05, decode=0.04, e2e=2.4)
    step(p, short_child)
    step(p, long_child)
    assert prefill_context_sum(1000, 0) + prefill_context_sum(1000, 992) == 508_472
    assert sample(reg, "gateway_request_attention_flops_sum", phase="prefill") == F * 508_472
    assert sample(reg, "gateway_request_attention_flops_count", phase="prefill") == 2
    assert sample(reg, "gateway_request_cached_tokens_sum") == 992
    assert sample(reg, "gateway_request_kv_used_bytes_sum") == KVB * ((1000 + 2 - 1) + (1000 + 500 - 1))
    records = p.ledger.get("chatcmpl-rev")
    assert [r["generation_tokens"] for r in records] == [2, 500]
    short, long_ = records
    # the short child is charged its own decode time, not the long child's 20 s
    assert short["kv_byte_seconds"] == kv_byte_seconds(KVB, 1000, 2, 0.05, 0.04)
    assert short["decode_seconds"] == 0.04 and short["tpot_seconds"] == pytest.approx(0.04)
    assert long_["kv_byte_seconds"] == kv_byte_seconds(KVB, 1000, 500, 2.0, 20.0)
    assert long_["attention_flops_prefill"] == F * 500_500 and short["attention_flops_prefill"] == F * 7_972
    assert sample(reg, "gateway_request_kv_byte_seconds_sum") == pytest.approx(
        short["kv_byte_seconds"] + long_["kv_byte_seconds"])
    assert sample(reg, "gateway_requests_total", tenant="default", finish_reason="length") == 2
    # the ledger finds them by the bare id too
    assert p.ledger.get("rev") == records


def test_engine_state_every_step_and_shape_at_start():
    p, reg = plugin(num_gpu_blocks=21)
    assert sample(reg, "gateway_kv_bytes_per_token") == KVB and sample(reg, "gateway_kv_group_size") == 3
    assert sample(reg, "gateway_kv_cache_blocks") == 20 and sample(reg, "gateway_kv_cache_capacity_tokens") == 2560
    assert sample(reg, "gateway_kv_cache_capacity_bytes") == 2560 * KVB
    assert sample(reg, "gateway_predicted_max_concurrency", basis="max_model_len") == 20 / 16
    p.record(SchedulerStats(num_running_reqs=4, num_waiting_reqs=2, kv_cache_usage=0.5), None)
    assert (p.state.running, p.state.waiting, p.state.kv_usage) == (4, 2, 0.5)
    assert sample(reg, "gateway_kv_cache_blocks_used") == 10 and sample(reg, "gateway_requests_waiting") == 2
    step(p, finished("cmpl-x-0", 100, 156, 0, 0.1, 1.0, 1.2))
    assert sample(reg, "gateway_predicted_max_concurrency", basis="mean_request") == 20 / 2


def test_built_twice_in_one_process_registers_once():
    a = KVAccountingLogger(fake_vllm_config(), 0)
    b = KVAccountingLogger(fake_vllm_config(), 1)
    assert a.metrics is b.metrics is engine_metrics()


def test_pp2_reports_whole_model_bytes():
    p, reg = plugin(pp=2)
    step(p, finished("chatcmpl-pp", 100, 10, 0, 0.1, 0.5, 0.7))
    assert sample(reg, "gateway_request_kv_used_bytes_sum") == 109 * KVB  # 30 layers, not stage 0's 15


def test_refused_shape_stops_the_plugin_at_construction():
    with pytest.raises(ValueError, match="deepseek"):
        KVAccountingLogger(fake_vllm_config(use_mla=True, served_model_name="deepseek-v2"), 0)


def test_aborted_sequence_is_charged_what_it_held():
    p, reg = plugin()
    stats = SimpleNamespace(num_generation_tokens=7, num_preemptions=0, arrival_time=1000.0, queued_ts=50.0,
                            scheduled_ts=50.5, first_token_ts=51.0, last_token_ts=52.0, first_token_latency=1.1)
    state = SimpleNamespace(stats=stats, external_req_id="chatcmpl-gone", prompt_len=40, num_cached_tokens=0)
    from service.telemetry.aborts import sequence_from_state

    p.account_aborted([sequence_from_state(state, now=1003.0)])
    (rec,) = p.ledger.get("gone")
    assert rec["finish_reason"] == "abort" and rec["kv_used_bytes"] == (40 + 7 - 1) * KVB
    assert rec["e2e_seconds"] == 3.0 and rec["decode_seconds"] == 1.0 and rec["queue_seconds"] == 0.5
    assert sample(reg, "gateway_requests_total", tenant="default", finish_reason="abort") == 1


def test_observations_carry_the_request_id_as_exemplar():
    # (a plain vllm serve 0.32 serves /metrics in the text format only, which drops
    # exemplars; any OpenMetrics exposition of the registry shows them)
    from prometheus_client.openmetrics.exposition import generate_latest

    p, reg = plugin()
    step(p, finished("chatcmpl-ex1", 10, 3, 0, 0.1, 0.2, 0.4))
    assert b'# {request_id="chatcmpl-ex1"}' in generate_latest(reg)
