"""The GuideLLM cross-check's arithmetic: our records under GuideLLM's definitions, and its
JSON read back (a synthetic document shaped like guidellm 0.8.1's). No timing is asserted."""

from __future__ import annotations

import pytest

from loadtest.core.config import Slo
from loadtest.studies.guidellm_check import guidellm, markdown, ours
from loadtest.core.metrics import summarize
from loadtest.core.results import RequestRecord, StepResult


def _step() -> StepResult:
    # two requests of 5 tokens: TTFT 1.0 / 2.0 s, E2E 3.0 / 6.0 s
    records = [
        RequestRecord(index=0, start_s=0.0, end_s=3.0, ttft_s=1.0, e2e_s=3.0, itl_s=[0.5] * 4, content_chunks=5,
                      output_tokens=5, requested_output_tokens=5, success=True),
        RequestRecord(index=1, start_s=0.0, end_s=6.0, ttft_s=2.0, e2e_s=6.0, itl_s=[1.0] * 4, content_chunks=5,
                      output_tokens=5, requested_output_tokens=5, success=True),
    ]  # fmt: skip
    return StepResult(index=0, shape="concurrency", concurrency=2, started_at="2025-01-01T00:00:00+00:00",
                      offset_s=0.0, requests=records, summary=summarize(records, 6.0, Slo(), True))  # fmt: skip


def test_ours_under_both_definitions() -> None:
    f = ours(_step())
    assert f["ttft_ms"] == pytest.approx(1500.0)
    # vLLM TPOT = GuideLLM ITL: mean((3 - 1) / 4, (6 - 2) / 4) = 0.75 s
    assert f["tpot_ms"] == pytest.approx(750.0)
    # GuideLLM TPOT includes the first token: mean(3 / 5, 6 / 5) = 0.9 s
    assert f["guidellm_tpot_ms"] == pytest.approx(900.0)
    assert f["output_tok_s"] == pytest.approx(10 / 6.0) and f["output_tokens"] == 10


def test_guidellm_json_is_read_under_the_same_keys() -> None:
    def dist(mean: float) -> dict:
        return {"successful": {"mean": mean, "median": mean}}

    doc = {"benchmarks": [{"duration": 7.0, "metrics": {
        "time_to_first_token_ms": dist(1500.0), "inter_token_latency_ms": dist(750.0),
        "time_per_output_token_ms": dist(900.0), "request_latency": dist(4.5), "output_tokens_per_second": dist(1.5)},
        "requests": {"successful": [
            {"output_tokens": 5, "info": {"timings": {"request_start": 100.0, "request_end": 103.0}}},
            {"output_tokens": 5, "info": {"timings": {"request_start": 100.0, "request_end": 106.0}}}]}}]}  # fmt: skip
    g = guidellm(doc)
    assert (g["ttft_ms"], g["tpot_ms"], g["guidellm_tpot_ms"], g["e2e_ms"]) == (1500.0, 750.0, 900.0, 4500.0)
    assert g["output_tok_s"] == pytest.approx(10 / 6.0) and g["output_tok_s_guidellm"] == 1.5
    table = markdown([("ours 1", ours(_step())), ("GuideLLM 1", g)])
    assert "| GuideLLM 1 | 2 | 10 | 1,500.0 (+0.0%) | 750.0 (+0.0%) |" in table
