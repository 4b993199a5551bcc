"""The runner against local fake servers on 127.0.0.1: counts and structure, never timings."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from loadtest.core.config import RunConfig
from loadtest.local.fakeserver import FakeOpenAIServer, write_json
from loadtest.core.runner import prompts_needed, split_prompts
from loadtest.server.observed import ObservedRunner
from loadtest.core.workload import Prompt

PROMPTS = [Prompt(output_tokens=5, text=f"w{i} w{i + 1} w{i + 2}", expected_prompt_tokens=3) for i in range(50)]


def config(base_url: str, **load: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "target": {"base_url": base_url, "model": "fake-model", "scrape_interval_s": 0.05},
            "load": load,
            "output": {"progress": False, "plots": False},
        }
    )


def run(cfg: RunConfig, prompts: list[Prompt] = PROMPTS):
    return asyncio.run(ObservedRunner(cfg).run(prompts))


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_closed_loop_never_exceeds_concurrency(serve, concurrency: int) -> None:
    server = FakeOpenAIServer(ttft_s=0.01, itl_s=0.002)
    with serve(server) as url:
        result = run(config(url, concurrency=[concurrency], num_requests=24, warmup_requests=0))
    step = result.steps[0]
    assert step.summary.completed == 24 and step.summary.failed == 0
    assert server.max_in_flight <= concurrency
    assert step.summary.peak_client_concurrency <= concurrency
    assert sorted(r.index for r in step.requests) == list(range(24))
    assert all(r.scheduled_s is None for r in step.requests)
    r = step.requests[0]
    assert r.output_tokens == 5 and r.prompt_tokens == 3 and len(r.itl_s) == 4 and r.content_chunks == 5
    assert step.summary.token_checks.model_dump() == dict.fromkeys(step.summary.token_checks.model_dump(), 0)


def test_warmup_is_excluded_and_steps_use_distinct_prompts(serve) -> None:
    server = FakeOpenAIServer()
    with serve(server) as url:
        cfg = config(url, concurrency=[2, 4], num_requests=6, warmup_requests=3)
        result = run(cfg)
    assert server.completed == 3 + 2 * 6
    assert result.warmup.requests == 3 and result.warmup.failed == 0
    assert [s.summary.completed for s in result.steps] == [6, 6]
    assert [s.concurrency for s in result.steps] == [2, 4]
    warmup, slices = split_prompts(PROMPTS, cfg.load)
    assert len(warmup) == 3 and [len(s) for s in slices] == [6, 6]
    assert not {p.text for p in slices[0]} & {p.text for p in slices[1]}
    assert prompts_needed(cfg.load) == 15


def test_open_loop_constant_rate_and_cap(serve) -> None:
    server = FakeOpenAIServer(itl_s=0.01)
    with serve(server) as url:
        result = run(config(url, rate=[200.0], arrival="constant", num_requests=10, max_concurrency=2))
    step = result.steps[0]
    assert step.shape == "rate" and step.rate == 200.0 and step.max_concurrency == 2
    assert step.summary.completed == 10
    assert [r.scheduled_s for r in step.requests] == pytest.approx([i / 200.0 for i in range(10)])
    assert all(r.start_s >= (r.scheduled_s or 0) for r in step.requests)
    assert server.max_in_flight <= 2


def test_duration_bound_stops_the_step(serve) -> None:
    server = FakeOpenAIServer(itl_s=0.005)
    with serve(server) as url:
        result = run(config(url, concurrency=[2], duration_s=0.3, pool_size=5))
    step = result.steps[0]
    assert step.summary.completed >= 1
    assert all(r.start_s < 0.3 for r in step.requests)


def test_server_side_figures_come_from_metrics(serve) -> None:
    server = FakeOpenAIServer(ttft_s=0.05, itl_s=0.02)
    with serve(server) as url:
        result = run(config(url, concurrency=[4], num_requests=8))
    server_side = result.steps[0].server
    assert server_side is not None and server_side.source == "gateway"
    assert server_side.scrapes >= 2 and server_side.scrape_errors == 0
    assert server_side.kv_bytes_per_token == 1024
    kv = server_side.per_request["kv_used_bytes"]
    assert kv is not None and kv.count == 8 and kv.mean == (3 + 5) * 1024
    assert server_side.running_peak is not None and server_side.running_peak <= 4


def test_no_metrics_endpoint_gives_none_not_a_crash(serve) -> None:
    class NoMetrics(FakeOpenAIServer):
        async def respond(self, writer, method, path, body) -> None:
            if path == "/metrics":
                write_json(writer, 404, {"error": "no"})
                await writer.drain()
            else:
                await super().respond(writer, method, path, body)

    with serve(NoMetrics()) as url:
        result = run(config(url, concurrency=[2], num_requests=4))
    server_side = result.steps[0].server
    assert server_side is not None and server_side.source is None and server_side.scrape_errors >= 2
    assert result.steps[0].summary.completed == 4


class FlakyServer(FakeOpenAIServer):
    """Request i (by arrival) fails in a way chosen by i % 5; chunks are split into tiny writes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    async def respond(self, writer, method, path, body) -> None:
        if method != "POST":
            return await super().respond(writer, method, path, body)
        self.seen += 1
        kind = self.seen % 5
        if kind == 1:
            write_json(writer, 500, {"error": {"message": "boom", "type": "internal"}})
            await writer.drain()
        elif kind == 2:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            await self.send_event(writer, {"error": {"message": "engine died", "type": "internal"}})
            await self.send_event(writer, "[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        elif kind == 3:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            await self.send_event(writer, "[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        else:
            await super().respond(writer, method, path, body)

    async def send_event(self, writer, data) -> None:
        payload = data if isinstance(data, str) else json.dumps(data)
        event = f"data: {payload}\n\n".encode()
        for start in range(0, len(event), 7):  # one HTTP chunk per 7 bytes, flushed one by one
            piece = event[start : start + 7]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0)


def test_failures_are_counted_by_type_and_split_chunks_parse(serve) -> None:
    with serve(FlakyServer()) as url:
        result = run(config(url, concurrency=[1], num_requests=10))
    summary = result.steps[0].summary
    assert summary.failures == {"http_500": 2, "no_content": 2, "stream_error": 2}
    assert summary.completed == 4
    ok = [r for r in result.steps[0].requests if r.success]
    assert all(r.output_tokens == 5 and r.content_chunks == 5 for r in ok)
    failed = [r for r in result.steps[0].requests if not r.success]
    assert all(r.error for r in failed)


def test_every_warmup_failing_aborts(serve) -> None:
    class Down(FakeOpenAIServer):
        async def respond(self, writer, method, path, body) -> None:
            write_json(writer, 503, {"error": {"message": "down"}})
            await writer.drain()

    with serve(Down()) as url, pytest.raises(RuntimeError, match="http_503"):
        run(config(url, concurrency=[1], num_requests=2, warmup_requests=2))


def test_connection_refused_is_a_connection_failure() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = run(config(f"http://127.0.0.1:{port}", concurrency=[1], num_requests=2))
    assert result.steps[0].summary.failures == {"connection": 2}
