"""KV demand and the live decode-step roofline, fed by a real vLLM OutputProcessor (no engine)."""

from __future__ import annotations

import json
import struct
import time

import pytest
from prometheus_client import CollectorRegistry
from vllm.v1.engine import EngineCoreEvent, EngineCoreEventType, EngineCoreOutput
from vllm.v1.engine.output_processor import OutputProcessor
from vllm.v1.metrics.stats import IterationStats, PrefillStats, SchedulerStats

from service.kv import roofline
from service.kv.geometry import KVGeometry
from service.telemetry import live
from service.telemetry.ledger import EngineState, Ledger
from service.telemetry.metrics import EngineMetrics
from service.telemetry.plugin import KVAccountingLogger
from tests.unit.fake_vllm import fake_vllm_config
from tests.unit.test_vllm_seams import _request

KVB = 23_040  # SmolLM2 in bf16: 30 x 2 x 3 x 64 x 2
LABELS = {"model": "SmolLM2-135M-Instruct", "kv_heads": "3"}


def tiny_checkpoint(folder, params: int = 1000) -> None:
    """config.json and a safetensors file whose header declares ``params`` float32 elements."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 10, "vocab_size": 20, "tie_word_embeddings": True}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [params], "data_offsets": [0, 4 * params]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * (4 * params))


def hwprobe_json(path, bandwidth: float = 1e10, peak: float = 1e12) -> str:
    path.write_text(json.dumps({"hardware": {"name": "test cpu", "bandwidth": bandwidth, "peak_flops": peak,
                                             "memory_bytes": None, "source": "test"}}))
    return str(path)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv(live.HARDWARE_ENV, hwprobe_json(tmp_path / "hw.json"))
    reg = CollectorRegistry()
    plugin = KVAccountingLogger(fake_vllm_config(num_gpu_blocks=21, model=str(tmp_path / "ckpt")), 0,
                                metrics=EngineMetrics(reg), state=EngineState(), ledger=Ledger())
    plugin.log_engine_initialized()
    op = OutputProcessor(None, log_stats=True)
    return plugin, reg, op


def sample(reg, name):
    return reg.get_sample_value(name, LABELS)


def test_kv_demand_counts_prompt_plus_max_tokens_of_every_unfinished_sequence(setup):
    plugin, reg, op = setup
    now = time.time()
    op.add_request(_request("a", "chatcmpl-a", 40, now), None)  # max_tokens 100 -> 140 tokens -> 2 blocks
    op.add_request(_request("b", "chatcmpl-b", 200, now), None)  # 300 tokens -> 3 blocks
    plugin.record(SchedulerStats(num_running_reqs=1, num_waiting_reqs=1, kv_cache_usage=0.1), IterationStats())
    assert sample(reg, "gateway_kv_demand_bytes") == 5 * 128 * KVB
    assert sample(reg, "gateway_kv_demand_ratio") == 5 / 20
    op.abort_requests(["chatcmpl-b"], internal=False)
    plugin.record(SchedulerStats(), IterationStats())
    assert sample(reg, "gateway_kv_demand_bytes") == 2 * 128 * KVB


def test_decode_step_prediction_next_to_its_measured_time(setup):
    plugin, reg, op = setup
    t0 = 50.0
    for rid, p in (("a", 40), ("b", 100)):
        op.add_request(_request(rid, f"chatcmpl-{rid}", p, time.time()), None)
        op.process_outputs([EngineCoreOutput(
            request_id=rid, new_token_ids=[7],
            events=[EngineCoreEvent(EngineCoreEventType.QUEUED, t0),
                    EngineCoreEvent(EngineCoreEventType.SCHEDULED, t0 + 0.1)],
            prefill_stats=PrefillStats(num_prompt_tokens=p, num_computed_tokens=p, num_cached_tokens=0,
                                       num_local_cached_tokens=0))],
            engine_core_timestamp=t0 + 0.2, iteration_stats=IterationStats())
    it = IterationStats()
    op.process_outputs([EngineCoreOutput(request_id=r, new_token_ids=[8]) for r in ("a", "b")],
                       engine_core_timestamp=t0 + 0.25, iteration_stats=it)
    assert len(it.inter_token_latencies_iter) == 2
    plugin.record(SchedulerStats(num_running_reqs=2), it)
    # contexts 40 + 2 and 100 + 2 tokens; weights 1000 float32 parameters (bf16 model: 2 B each)
    g = KVGeometry(layers=30, query_heads=9, kv_heads=3, head_size=64, dtype_bytes=2, block_size=128)
    hw = roofline.Hardware("t", 1e10, 1e12, None, "t")
    cost = roofline.decode_step(g, 1000 * 2, 1000 - 0, [42, 102], hw)
    assert sample(reg, "gateway_decode_steps_total") == 1
    assert sample(reg, "gateway_decode_step_seconds_total") == pytest.approx(0.05)
    assert sample(reg, "gateway_decode_step_predicted_seconds_total") == pytest.approx(cost.tpot_s)
    assert sample(reg, "gateway_decode_step_memory_seconds_total") == pytest.approx(cost.memory_s)
    assert cost.kv_bytes == (42 + 102) * KVB
    assert sample(reg, "gateway_decode_bandwidth_efficiency_ratio") == pytest.approx(cost.memory_s / 0.05)


def test_no_hardware_no_prediction(tmp_path, monkeypatch):
    monkeypatch.setenv(live.HARDWARE_ENV, "none")
    reg = CollectorRegistry()
    plugin = KVAccountingLogger(fake_vllm_config(), 0, metrics=EngineMetrics(reg), state=EngineState(),
                                ledger=Ledger())
    plugin.log_engine_initialized()
    assert plugin.step_model is None
    assert sample(reg, "gateway_decode_steps_total") is None
    assert sample(reg, "gateway_kv_demand_ratio") == 0


def test_a_bad_hardware_setting_fails_at_start(monkeypatch):
    monkeypatch.setenv(live.HARDWARE_ENV, "no-such-gpu")
    with pytest.raises(ValueError, match="KV_GATEWAY_HARDWARE"):
        KVAccountingLogger(fake_vllm_config(), 0, metrics=EngineMetrics(CollectorRegistry()),
                           state=EngineState(), ledger=Ledger())


def test_output_processor_seam_for_live_requests():
    """vLLM 0.32: the front end's request states carry what demand and the roofline read."""
    assert live.install() is False  # the plugin wrapped add_request already (idempotent)
    op = OutputProcessor(None, log_stats=True)
    op.add_request(_request("x", "chatcmpl-x", 12, time.time()), None)
    (state,) = live.live_states()
    assert state.prompt_len == 12 and state.max_tokens_param == 100
    assert state.stats.scheduled_ts == 0 and state.stats.first_token_ts == 0
