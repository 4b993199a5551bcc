"""Server figures joined to client records by request id, end to end against the fake
server's ledger route, and the rules of the join (classification, sums over sequences)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from loadtest.core import results as results_io
from loadtest.cli import build_parser, overrides_from_args
from loadtest.core.client import new_run_id, request_id
from loadtest.core.config import RunConfig, load_config
from loadtest.local.fakeserver import KV_BYTES_PER_TOKEN, FakeOpenAIServer, write_json
from loadtest.output.report import markdown, write_report
from loadtest.server.request_metrics import PROBE_LOOKUPS, classify, combine
from loadtest.core.results import RunResult
from loadtest.server.observed import ObservedRunner
from loadtest.core.workload import Prompt

# every prompt has its own (prompt, output) length, so figures on the wrong request show
PROMPTS = [
    Prompt(output_tokens=2 + i % 5, text=" ".join(["w"] * (2 + i)), expected_prompt_tokens=2 + i) for i in range(40)
]


def config(base_url: str, request_metrics: bool = True, **load: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "target": {
                "base_url": base_url, "model": "fake-model", "scrape": False, "request_metrics": request_metrics,
            },
            "load": load,
            "output": {"progress": False, "plots": False, "label": "joined"},
        }
    )


def run(cfg: RunConfig) -> RunResult:
    return asyncio.run(ObservedRunner(cfg).run(PROMPTS))


class Timed(FakeOpenAIServer):
    """Notes when each completion ended and when each ledger lookup came."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.ends: list[float] = []
        self.lookups_at: list[float] = []

    async def stream(self, writer, chat, request) -> None:
        await super().stream(writer, chat, request)
        self.ends.append(time.perf_counter())

    def lookup(self, writer, path) -> None:
        self.lookups_at.append(time.perf_counter())
        super().lookup(writer, path)


def test_ids_sent_are_ids_joined_and_figures_land_on_their_request(serve) -> None:
    server = Timed(ttft_s=0.005, itl_s=0.001)
    with serve(server) as url:
        result = run(config(url, concurrency=[2, 4], num_requests=8, warmup_requests=2))
    records = [r for step in result.steps for r in step.requests]
    ids = [r.request_id for r in records]
    assert len(set(ids)) == 16 and all(i and i.startswith(f"{result.run_id}-") for i in ids)
    # the server saw these ids, plus the warm-ups', which are not looked up
    assert set(server.request_ids) == set(ids) | {f"{result.run_id}-w-0", f"{result.run_id}-w-1"}
    join = result.request_metrics
    assert join is not None and join.status == "joined"
    assert (join.lookups, join.joined, join.missing, join.errors) == (16, 16, 0, 0) and join.note is None
    assert server.ledger_lookups == 16
    assert max(server.ends) <= min(server.lookups_at)  # every lookup after the last measured request
    for r in records:
        assert r.server is not None and r.server.sequences == 1
        assert (r.server.prompt_tokens, r.server.generation_tokens) == (r.prompt_tokens, r.output_tokens)
        assert r.server.kv_used_bytes == (r.prompt_tokens + r.output_tokens) * KV_BYTES_PER_TOKEN
        assert r.server.e2e_seconds is not None and r.server.e2e_seconds > 0  # the server's own clock
    for step in result.steps:
        summary = step.request_metrics
        assert summary is not None and (summary.requests, summary.joined) == (8, 8)
        assert summary.kv_used_bytes.max == max(r.server.kv_used_bytes for r in step.requests if r.server)


def test_ids_differ_between_runs_and_suit_the_gateway(serve) -> None:
    with serve(FakeOpenAIServer()) as url:
        first, second = (run(config(url, concurrency=[2], num_requests=4)) for _ in range(2))
    assert first.run_id != second.run_id
    ids = [r.request_id or "" for result in (first, second) for r in result.steps[0].requests]
    assert len(set(ids)) == 8
    assert all(len(i) <= 128 and i.isprintable() and " " not in i for i in ids)  # what the gateway keeps


def test_the_gateway_ledger_finds_our_ids_under_vllm_engine_ids() -> None:
    from service.telemetry.ledger import ledger_keys

    rid = request_id(new_run_id(), 3, 17)
    for engine_id in (f"cmpl-{rid}-0", f"chatcmpl-{rid}"):  # completions (prompt 0), chat
        assert rid in ledger_keys(engine_id)


def test_a_server_without_the_route_costs_one_lookup(serve, tmp_path: Path) -> None:
    server = FakeOpenAIServer(request_ledger=False)
    with serve(server) as url:
        result = run(config(url, concurrency=[2, 3], num_requests=6))
    assert [s.summary.completed for s in result.steps] == [6, 6]
    join = result.request_metrics
    assert join is not None and join.status == "not_offered" and join.joined == 0
    assert server.ledger_lookups == join.lookups == 1
    assert all(r.server is None for s in result.steps for r in s.requests)
    assert all(s.request_metrics is None for s in result.steps)
    files = write_report([result], tmp_path)
    assert not any(p.name.startswith("request_kv") for p in files)
    assert "- joined: no per-request figures; the server does not offer them (answers: HTTP 404 x1)" in markdown(
        [result]
    )


def test_unknown_ids_and_failing_lookups_stop_after_the_probes(serve) -> None:
    class Forgetful(FakeOpenAIServer):
        def lookup(self, writer, path) -> None:
            self.ledger.clear()
            super().lookup(writer, path)

    class Broken(FakeOpenAIServer):
        def lookup(self, writer, path) -> None:
            write_json(writer, 500, {"error": {"message": "boom"}})

    for server, status in ((Forgetful(), "not_found"), (Broken(), "not_offered")):
        with serve(server) as url:
            result = run(config(url, concurrency=[2], num_requests=10))
        join = result.request_metrics
        assert join is not None and join.status == status and result.steps[0].summary.completed == 10
        assert server.ledger_lookups == join.lookups == PROBE_LOOKUPS
        assert (join.missing, join.errors) == ((PROBE_LOOKUPS, 0) if status == "not_found" else (0, PROBE_LOOKUPS))


def test_a_partial_join_keeps_each_figure_on_its_request(serve) -> None:
    class HalfKept(FakeOpenAIServer):
        def lookup(self, writer, path) -> None:
            for request_id in [i for i in self.ledger if int(i.rsplit("-", 1)[1]) % 2]:
                del self.ledger[request_id]
            super().lookup(writer, path)

    with serve(HalfKept()) as url:
        result = run(config(url, concurrency=[1], num_requests=12))  # probes: 11 (forgotten), then 10
    join = result.request_metrics
    assert join is not None and join.status == "joined" and (join.joined, join.missing, join.lookups) == (6, 6, 12)
    assert join.note is not None and {"HTTP 200 x6", "HTTP 404 request_not_found x6"} <= set(
        join.note.removeprefix("answers: ").split(", ")
    )
    for r in result.steps[0].requests:
        assert (r.server is not None) == (r.index % 2 == 0)
        assert r.server is None or r.server.prompt_tokens == r.prompt_tokens
    assert result.steps[0].request_metrics is not None and result.steps[0].request_metrics.joined == 6


def test_the_flag_turns_the_join_off(serve) -> None:
    assert RunConfig().target.request_metrics is True
    args = build_parser().parse_args(["run", "--no-request-metrics"])
    assert load_config(None, overrides_from_args(args)).target.request_metrics is False
    server = FakeOpenAIServer()
    with serve(server) as url:
        result = run(config(url, request_metrics=False, concurrency=[2], num_requests=4))
    assert result.request_metrics is not None and result.request_metrics.status == "off"
    assert server.ledger_lookups == 0 and len(server.request_ids) == 4
    assert all(r.server is None for r in result.steps[0].requests)
    assert "- joined: not looked up (`--no-request-metrics`)" in markdown([result])


def test_report_plot_link_and_json_round_trip(serve, tmp_path: Path) -> None:
    with serve(FakeOpenAIServer(itl_s=0.001)) as url:
        result = run(config(url, concurrency=[1, 4], num_requests=6))
    files = write_report([result], tmp_path)
    assert tmp_path / "request_kv_joined.png" in files and (tmp_path / "request_kv_joined.png").stat().st_size > 0
    text = (tmp_path / "summary.md").read_text()
    assert "![joined: KV bytes held against TTFT and TPOT](request_kv_joined.png)" in text
    assert "| joined | concurrency 4 | 6/6 |" in text and "joined 12 of 12 requests by request id" in text
    assert "request_kv_joined.png" not in markdown([result], plots=False)
    path = results_io.save(result, tmp_path / "result.json")
    assert results_io.load(path) == result
    first = json.loads(path.read_text())["steps"][0]["requests"][0]
    assert first["request_id"] == f"{result.run_id}-0-0" and first["server"]["sequences"] == 1


def test_combine_sums_sequences_and_keeps_the_longest_times() -> None:
    a = {"prompt_tokens": 10, "generation_tokens": 4, "kv_used_bytes": 1300, "kv_byte_seconds": 2.5,
         "queue_seconds": 0.1, "e2e_seconds": 1.0, "preemptions": 0, "finish_reason": "length"}
    b = {"prompt_tokens": 10, "generation_tokens": 6, "kv_used_bytes": 1500, "kv_byte_seconds": 3.5,
         "queue_seconds": 0.3, "e2e_seconds": 0.8, "preemptions": 1}  # fmt: skip
    figures = combine([a, b])
    assert figures.sequences == 2
    assert (figures.prompt_tokens, figures.generation_tokens, figures.kv_used_bytes) == (20, 10, 2800)
    assert figures.kv_byte_seconds == 6.0 and figures.preemptions == 1
    assert (figures.queue_seconds, figures.e2e_seconds) == (0.3, 1.0)
    assert figures.kv_allocated_bytes is None and figures.decode_seconds is None  # not in the records


@pytest.mark.parametrize(
    ("status", "body", "answer"),
    [
        (200, {"object": "request.metrics", "id": "x", "data": [{"kv_used_bytes": 8}]}, "found"),
        (200, {"object": "request.metrics", "id": "x", "data": []}, "unknown"),
        (404, {"error": {"message": "no", "type": "not_found_error", "code": "request_not_found"}}, "unknown"),
        (404, {"detail": "Not Found"}, "absent"),  # plain vllm serve: no such route
        (405, {"detail": "Method Not Allowed"}, "absent"),
        (200, "<html>catch-all</html>", "absent"),
        (401, {"error": {"message": "key"}}, "error"),
        (503, {"error": {"message": "busy"}}, "error"),
    ],
)
def test_classify(status: int, body: Any, answer: str) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    got, figures = classify(status, raw)
    assert got == answer and (figures is not None) == (answer == "found")
