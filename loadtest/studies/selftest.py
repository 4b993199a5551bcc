"""How fast is the client itself? A benchmark of the harness, not of a server.

Starts :mod:`loadtest.local.fakeserver` as a subprocess on 127.0.0.1 (chunks sent
instantly, one HTTP chunk per token), pins it to one CPU and this process to another
(when the machine has two), and runs a normal closed-loop step against it through
the same runner, client and scraper as ``loadtest run``. The figures are the most
the client can measure on one core; the goal is at least 10x what the real model
serves (vLLM on this machine's CPU: ~1.43 req/s, ~91 output tok/s).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loadtest.core.config import Endpoint, RunConfig
from loadtest.server.observed import ObservedRunner
from loadtest.core.workload import Prompt

ANCHOR_REQ_S = 1.43
ANCHOR_TOK_S = 91.0
GOAL_FACTOR = 10.0


@dataclass(frozen=True)
class SelftestFigures:
    requests: int
    failed: int
    concurrency: int
    tokens_per_request: int
    duration_s: float
    request_throughput: float
    chunk_throughput: float
    output_throughput: float
    client_cpu_fraction: float
    pinned: bool

    @property
    def meets_goal(self) -> bool:
        return (
            self.failed == 0
            and self.request_throughput >= GOAL_FACTOR * ANCHOR_REQ_S
            and self.output_throughput >= GOAL_FACTOR * ANCHOR_TOK_S
        )

    def render(self) -> str:
        return "\n".join(
            [
                f"client self-test: {self.requests} requests x {self.tokens_per_request} chunks, "
                f"concurrency {self.concurrency}, client pinned to one core: {self.pinned}",
                f"  duration            {self.duration_s:10.2f} s ({self.failed} failed)",
                f"  requests/s          {self.request_throughput:10.1f}"
                f"   ({self.request_throughput / ANCHOR_REQ_S:,.0f}x the model's {ANCHOR_REQ_S} req/s)",
                f"  streamed chunks/s   {self.chunk_throughput:10.1f}",
                f"  output tokens/s     {self.output_throughput:10.1f}"
                f"   ({self.output_throughput / ANCHOR_TOK_S:,.0f}x the model's {ANCHOR_TOK_S:g} tok/s)",
                f"  client CPU use      {100 * self.client_cpu_fraction:10.0f} % of one core",
                f"  goal (>= {GOAL_FACTOR:g}x both): {'met' if self.meets_goal else 'NOT met'}",
            ]
        )


def _pin(pid: int, cpu: int) -> bool:
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return False
    os.sched_setaffinity(pid, {cpu})
    return True


@contextmanager
def fake_server_process(pin_cpu: int | None) -> Iterator[str]:
    """The fake server in a subprocess; yields its base URL and stops it afterwards."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "fake-server", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        if pin_cpu is not None:
            _pin(proc.pid, pin_cpu)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"fake server did not start: {line!r}")
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_selftest(
    concurrency: int = 32,
    num_requests: int = 2000,
    tokens: int = 64,
    endpoint: Endpoint = "completions",
    pin: bool = True,
) -> SelftestFigures:
    """Run the benchmark; see the module docstring."""
    original = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    pinned = pin and _pin(0, 0)
    try:
        with fake_server_process(1 if pinned else None) as base_url:
            config = RunConfig.model_validate(
                {
                    "target": {
                        "base_url": base_url, "model": "fake-model", "endpoint": endpoint, "request_metrics": False,
                    },
                    "workload": {"output_tokens": tokens},
                    "load": {
                        "concurrency": [concurrency],
                        "num_requests": num_requests,
                        "warmup_requests": concurrency,
                    },
                    "output": {"progress": False, "plots": False},
                }
            )
            prompts = [
                Prompt(output_tokens=tokens, text="hello " * 16, messages=[{"role": "user", "content": "hello " * 16}])
            ]
            cpu_before = time.process_time()
            wall_before = time.perf_counter()
            result = asyncio.run(ObservedRunner(config).run(prompts))
            cpu_fraction = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
    finally:
        if pinned and original is not None:
            os.sched_setaffinity(0, original)
    summary = result.steps[0].summary
    chunks = sum(r.content_chunks for r in result.steps[0].requests)
    return SelftestFigures(
        requests=num_requests,
        failed=summary.failed,
        concurrency=concurrency,
        tokens_per_request=tokens,
        duration_s=summary.duration_s,
        request_throughput=summary.request_throughput,
        chunk_throughput=chunks / summary.duration_s,
        output_throughput=summary.output_throughput,
        client_cpu_fraction=cpu_fraction,
        pinned=pinned,
    )
