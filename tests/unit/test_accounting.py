"""Per-request accounting from synthetic engine timestamps (no engine)."""

from types import SimpleNamespace

import pytest

from service.kv.geometry import KVGeometry, kv_byte_seconds
from service.telemetry.accounting import EngineTimes, account

SMOL = KVGeometry(layers=30, query_heads=9, kv_heads=3, head_size=64, dtype_bytes=2, block_size=128)


def stats(queued=10.0, scheduled=10.5, first=11.0, last=13.0, ttft=1.2, preemptions=0):
    return SimpleNamespace(queued_ts=queued, scheduled_ts=scheduled, first_token_ts=first, last_token_ts=last,
                           first_token_latency=ttft, num_preemptions=preemptions)


def test_engine_times_from_request_state_stats():
    t = EngineTimes.from_stats(stats(preemptions=2))
    assert (t.queue_seconds, t.prefill_seconds, t.decode_seconds) == (0.5, 0.5, 2.0)
    assert t.ttft_seconds == 1.2 and t.scheduled and t.preemptions == 2


def test_never_scheduled_request_has_no_times():
    t = EngineTimes.from_stats(stats(scheduled=0.0, first=0.0, last=0.0))
    assert not t.scheduled and t.ttft_seconds is None and t.decode_seconds == 0.0
    assert EngineTimes.from_stats(None) == EngineTimes()


def test_account_sums_choices_and_derives_tpot():
    times = EngineTimes.from_stats(stats())
    f = account(SMOL, request_id="r", model="m", finish_reason="length", prompt_tokens=100,
                generated=[5, 3], cached_tokens=0, times=times, e2e_seconds=3.5)
    assert f.generation_tokens == 8 and f.choices == 2
    assert f.kv_tokens == (100 + 5 - 1) + (100 + 3 - 1)
    assert f.kv_used_bytes == f.kv_tokens * 23_040 and f.kv_mha_equivalent_bytes == 3 * f.kv_used_bytes
    assert f.tpot_seconds == pytest.approx(2.0 / (5 - 1))  # decode time over the longest choice's tokens - 1
    assert f.kv_byte_seconds == pytest.approx(
        kv_byte_seconds(23_040, 100, 5, 0.5, 2.0) + kv_byte_seconds(23_040, 100, 3, 0.5, 2.0))
    assert f.queue_seconds == 0.5 and f.e2e_seconds == 3.5


def test_single_token_request_has_no_tpot_and_aborted_queue_request_costs_nothing():
    one = account(SMOL, request_id="r", model="m", finish_reason="stop", prompt_tokens=10, generated=[1],
                  cached_tokens=0, times=EngineTimes.from_stats(stats()), e2e_seconds=1.0)
    assert one.tpot_seconds is None and one.kv_tokens == 10
    queued = account(SMOL, request_id="q", model="m", finish_reason="abort", prompt_tokens=10, generated=[0],
                     cached_tokens=0, times=EngineTimes(), e2e_seconds=1.0)
    assert queued.kv_tokens == 0 and queued.attention_flops_prefill == 0 and queued.kv_byte_seconds == 0


def test_sequence_from_finished_request_stats_derives_ttft_and_tpot():
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import FinishedRequestStats

    from service.telemetry.accounting import SequenceStats, account_sequence

    fr = FinishedRequestStats(finish_reason=FinishReason.STOP, request_id="chatcmpl-1", e2e_latency=3.0,
                              num_prompt_tokens=100, num_generation_tokens=5, num_cached_tokens=0,
                              queued_time=0.5, prefill_time=0.5, decode_time=2.0)
    s = SequenceStats.from_finished(fr)
    assert s.finish_reason == "stop" and s.ttft_seconds == 1.0 and s.e2e_seconds == 3.0
    f = account_sequence(SMOL, "m", s)
    assert f.tpot_seconds == 0.5 and f.choices == 1 and f.kv_tokens == 104


def test_never_scheduled_sequence_holds_nothing():
    from service.telemetry.accounting import SequenceStats, account_sequence

    f = account_sequence(SMOL, "m", SequenceStats("q", "abort", prompt_tokens=10, generation_tokens=0, scheduled=False))
    assert f.kv_tokens == 0 and f.attention_flops_prefill == 0 and f.kv_byte_seconds == 0 and f.ttft_seconds is None
