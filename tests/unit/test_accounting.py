"""Per-sequence accounting from vLLM's finished-request stats (no engine)."""

import pytest
from vllm.v1.engine import FinishReason
from vllm.v1.metrics.stats import FinishedRequestStats

from service.kv.geometry import KVGeometry, kv_byte_seconds
from service.telemetry.accounting import SequenceStats, account_sequence

SMOL = KVGeometry(layers=30, query_heads=9, kv_heads=3, head_size=64, dtype_bytes=2, block_size=128)


def finished(g=5, prefill=0.5, decode=2.0):
    return FinishedRequestStats(finish_reason=FinishReason.STOP, request_id="chatcmpl-1", e2e_latency=3.0,
                                num_prompt_tokens=100, num_generation_tokens=g, num_cached_tokens=0,
                                queued_time=0.5, prefill_time=prefill, decode_time=decode)


def test_sequence_from_finished_request_stats_derives_ttft_tpot_and_byte_seconds():
    s = SequenceStats.from_finished(finished())
    assert s.finish_reason == "stop" and s.ttft_seconds == 1.0 and s.e2e_seconds == 3.0
    f = account_sequence(SMOL, "m", s)
    assert f.tpot_seconds == pytest.approx(2.0 / (5 - 1))  # decode time over the tokens after the first
    assert f.choices == 1 and f.kv_tokens == 104  # the last sampled token's K/V is never written
    assert f.kv_used_bytes == 104 * 23_040 and f.kv_mha_equivalent_bytes == 3 * f.kv_used_bytes
    assert f.kv_byte_seconds == pytest.approx(kv_byte_seconds(23_040, 100, 5, 0.5, 2.0))
    assert f.queue_seconds == 0.5


def test_single_token_sequence_has_no_tpot():
    f = account_sequence(SMOL, "m", SequenceStats.from_finished(finished(g=1, decode=0.0)))
    assert f.tpot_seconds is None and f.kv_tokens == 100


def test_never_scheduled_sequence_holds_nothing():
    f = account_sequence(SMOL, "m", SequenceStats("q", "abort", prompt_tokens=10, generation_tokens=0, scheduled=False))
    assert f.kv_tokens == 0 and f.attention_flops_prefill == 0 and f.kv_byte_seconds == 0 and f.ttft_seconds is None
