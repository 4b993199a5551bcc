"""Metric math on synthetic timelines (no network, no clock)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from loadtest.core.config import Slo
from loadtest.core.metrics import distribution, meets_slo, output_token_count, peak_concurrency, summarize, tpot
from loadtest.core.results import RequestRecord


def record(index: int, start: float, chunk_times: list[float], *, tokens: int | None = None, **kw) -> RequestRecord:
    """A successful request whose content chunks arrived at ``chunk_times`` (absolute)."""
    gaps = [b - a for a, b in itertools.pairwise(chunk_times)]
    fields = dict(
        index=index,
        start_s=start,
        end_s=chunk_times[-1],
        ttft_s=chunk_times[0] - start,
        e2e_s=chunk_times[-1] - start,
        itl_s=gaps,
        content_chunks=len(chunk_times),
        output_tokens=len(chunk_times) if tokens is None else tokens,
        success=True,
    )
    fields.update(kw)
    return RequestRecord(**fields)


def failed(index: int, start: float, end: float, error_type: str) -> RequestRecord:
    return RequestRecord(index=index, start_s=start, end_s=end, success=False, error_type=error_type)


def test_distribution_matches_numpy_linear_percentiles() -> None:
    values = [0.1, 0.5, 0.2, 0.9, 0.3, 0.7, 0.4]
    d = distribution(values)
    assert d.count == 7
    assert d.mean == pytest.approx(np.mean(values))
    for name, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
        assert getattr(d, name) == pytest.approx(np.percentile(values, q))
    assert d.max == 0.9
    assert d.p50 == pytest.approx(0.4)


def test_distribution_of_nothing_is_none_not_zero() -> None:
    d = distribution([])
    assert d.count == 0 and d.mean is None and d.p99 is None


def test_tpot_itl_ttft_e2e_on_a_timeline() -> None:
    # sent at 1.0; chunks at 1.5, 1.6, 1.8, 2.1 -> TTFT 0.5, E2E 1.1, ITL .1 .2 .3
    r = record(0, 1.0, [1.5, 1.6, 1.8, 2.1])
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2e_s == pytest.approx(1.1)
    assert tpot(r) == pytest.approx((1.1 - 0.5) / 3)
    assert r.itl_s == pytest.approx([0.1, 0.2, 0.3])


def test_tpot_uses_usage_tokens_not_chunk_count() -> None:
    # 2 chunks carrying 5 tokens: TPOT divides by 5 - 1
    r = record(0, 0.0, [1.0, 3.0], tokens=5)
    assert tpot(r) == pytest.approx(2.0 / 4)


def test_tpot_undefined_for_single_token_and_failures() -> None:
    assert tpot(record(0, 0.0, [1.0])) is None
    assert tpot(failed(1, 0.0, 1.0, "timeout")) is None


def test_output_token_count_fallbacks() -> None:
    base = record(0, 0.0, [1.0, 2.0, 3.0])
    assert output_token_count(base) == 3
    assert output_token_count(base.model_copy(update={"output_tokens": None, "retokenized_output_tokens": 7})) == 7
    assert output_token_count(base.model_copy(update={"output_tokens": None})) == 3


def test_summary_pools_itl_and_computes_throughput_over_duration() -> None:
    a = record(0, 0.0, [0.5, 0.6, 0.7], prompt_tokens=10)  # ITL .1 .1
    b = record(1, 0.0, [1.0, 1.5], prompt_tokens=20)  # ITL .5
    c = failed(2, 0.0, 0.2, "http_500")
    s = summarize([a, b, c], duration_s=2.0, slo=Slo(), ignore_eos=False)
    assert (s.completed, s.failed, s.failures) == (2, 1, {"http_500": 1})
    assert s.itl_s.count == 3
    assert s.itl_s.mean == pytest.approx((0.1 + 0.1 + 0.5) / 3)
    assert s.output_tokens == 5 and s.input_tokens == 30
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(2.5)
    assert s.total_token_throughput == pytest.approx(17.5)
    assert s.ttft_s.mean == pytest.approx(0.75)
    assert s.tpot_s.count == 2
    assert s.goodput is None and s.good_requests is None


def test_goodput_counts_requests_meeting_every_slo() -> None:
    fast = record(0, 0.0, [0.1, 0.15, 0.2])  # TTFT 100 ms, TPOT 50 ms, E2E 200 ms
    slow_start = record(1, 0.0, [0.6, 0.65, 0.7])  # TTFT 600 ms
    slow_tokens = record(2, 0.0, [0.1, 0.3, 0.5])  # TPOT 200 ms
    one_token = record(3, 0.0, [0.2])  # TPOT counts as 0
    slo = Slo(ttft_ms=500, tpot_ms=50, e2el_ms=2000)
    assert [meets_slo(r, slo) for r in (fast, slow_start, slow_tokens, one_token)] == [True, False, False, True]
    s = summarize([fast, slow_start, slow_tokens, one_token, failed(4, 0, 1, "timeout")], 4.0, slo, False)
    assert s.good_requests == 2
    assert s.goodput == pytest.approx(0.5)


def test_goodput_with_only_some_slos_set() -> None:
    r = record(0, 0.0, [0.6, 0.7])
    assert meets_slo(r, Slo(e2el_ms=1000))
    assert not meets_slo(r, Slo(ttft_ms=500))


def test_peak_concurrency_from_intervals() -> None:
    rs = [failed(0, 0.0, 1.0, "x"), failed(1, 0.5, 1.5, "x"), failed(2, 1.0, 2.0, "x"), failed(3, 0.9, 1.2, "x")]
    assert peak_concurrency(rs) == 3
    # back to back (end == start) is not overlap
    assert peak_concurrency([failed(0, 0.0, 1.0, "x"), failed(1, 1.0, 2.0, "x")]) == 1


def test_token_checks_report_mismatches() -> None:
    ok = record(0, 0, [1, 2], expected_prompt_tokens=8, prompt_tokens=8, requested_output_tokens=2)
    bad_prompt = record(1, 0, [1, 2], expected_prompt_tokens=8, prompt_tokens=9, requested_output_tokens=2)
    short = record(2, 0, [1, 2], tokens=1, requested_output_tokens=2, retokenized_output_tokens=2)
    no_usage = record(3, 0, [1, 2]).model_copy(update={"output_tokens": None})
    checks = summarize([ok, bad_prompt, short, no_usage], 1.0, Slo(), ignore_eos=True).token_checks
    assert checks.prompt_mismatches == 1
    assert checks.output_mismatches == 1
    assert checks.retokenization_mismatches == 1
    assert checks.missing_usage == 1
    # without ignore_eos a short answer is legitimate
    assert summarize([short], 1.0, Slo(), ignore_eos=False).token_checks.output_mismatches == 0
