"""A short load test against the REAL gateway (vLLM engine + default model).

Uses the session fixture ``gateway`` from tests/conftest.py (``.base_url`` without
/v1, ``.model``, ``.model_path``). Counts and captured figures only, never timings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.core import results as results_io
from loadtest.__main__ import main

pytestmark = pytest.mark.engine


# SmolLM2's chat template adds a default system prompt (30 tokens), hence 48 for chat.
@pytest.mark.parametrize(("endpoint", "input_tokens"), [("completions", 16), ("chat", 48)])
def test_short_run_against_the_gateway(gateway, tmp_path: Path, endpoint: str, input_tokens: int) -> None:
    status = main([
        "run", "--base-url", gateway.base_url, "--model", gateway.model, "--tokenizer", str(gateway.model_path),
        "--endpoint", endpoint, "--input-tokens", str(input_tokens), "--output-tokens", "8",
        "--concurrency", "4", "--num-requests", "8", "--warmup", "1", "--scrape-interval", "0.25",
        "--output-dir", str(tmp_path), "--no-progress",
    ])  # fmt: skip
    assert status == 0
    result = results_io.load(tmp_path / "result.json")
    assert result.warmup.requests == 1 and result.warmup.failed == 0
    step = result.steps[0]
    summary = step.summary
    assert summary.completed == 8 and summary.failed == 0, summary.failures
    for request in step.requests:
        assert request.output_tokens == 8  # usage.completion_tokens, forced by ignore_eos
        assert request.prompt_tokens == request.expected_prompt_tokens == input_tokens
        assert request.ttft_s is not None and request.content_chunks >= 1
    checks = summary.token_checks
    assert (checks.missing_usage, checks.prompt_mismatches, checks.output_mismatches) == (0, 0, 0)
    assert summary.peak_client_concurrency <= 4

    server = step.server
    assert server is not None and server.source == "gateway" and server.scrape_errors == 0
    assert server.kv_usage_peak is not None and server.running_peak is not None
    assert server.kv_bytes_per_token is not None and server.kv_bytes_per_token > 0
    assert server.kv_capacity_tokens is not None and server.kv_capacity_tokens > 0
    assert server.predicted_max_concurrency_max_model_len is not None
    assert server.preemptions is not None
    kv_used = server.per_request["kv_used_bytes"]
    assert kv_used is not None and kv_used.count >= 1 and kv_used.mean is not None and kv_used.mean > 0
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "latency_vs_concurrency.png").is_file()

    # the gateway's ledger, read by each request's X-Request-Id after the run
    join = result.request_metrics
    assert join is not None and join.status == "joined" and join.joined == 8, join
    for request in step.requests:
        figures = request.server
        assert figures is not None and figures.sequences == 1, request.request_id
        assert (figures.prompt_tokens, figures.generation_tokens) == (input_tokens, 8)
        # the last sampled token's K/V is never written: P + G - 1 tokens held
        assert figures.kv_used_bytes == (input_tokens + 8 - 1) * server.kv_bytes_per_token, request.request_id
    assert step.request_metrics is not None and step.request_metrics.joined == 8
    assert len(list(tmp_path.glob("request_kv_*.png"))) == 1


def test_conversation_prefix_hits_grow_with_the_turn(gateway, tmp_path: Path) -> None:
    """Each turn resends the history, so the engine's prefix cache serves more of it turn by
    turn: the joined per-request cached_tokens grow with the turn index in every session."""
    status = main([
        "run", "--base-url", gateway.base_url, "--model", gateway.model, "--tokenizer", str(gateway.model_path),
        "--endpoint", "chat", "--sessions", "--turns", "3", "--user-tokens", "100", "--output-tokens", "16",
        "--concurrency", "2", "--num-requests", "2", "--scrape-interval", "0.25",
        "--output-dir", str(tmp_path), "--no-progress",
    ])  # fmt: skip
    assert status == 0
    result = results_io.load(tmp_path / "result.json")
    assert result.request_metrics is not None and result.request_metrics.status == "joined"
    records = result.steps[0].requests
    assert len(records) == 6 and all(r.success and r.server is not None for r in records)
    for session in (0, 1):
        turns = sorted((r for r in records if r.session == session), key=lambda r: r.turn or 0)
        cached = [r.server.cached_tokens or 0 for r in turns if r.server is not None]
        prompts = [r.server.prompt_tokens or 0 for r in turns if r.server is not None]
        assert prompts[0] < prompts[1] < prompts[2], prompts  # the history grows
        assert cached[0] < cached[1] < cached[2], cached
    assert "## Conversations by turn" in (tmp_path / "summary.md").read_text()
