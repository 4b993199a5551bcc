"""The server-side picture: scrape the target's Prometheus ``/metrics`` around each step.

Each step scrapes once before, every ``interval`` seconds while it runs, and once
after. :data:`METRICS` maps one canonical name to the gateway's metric and to plain
vLLM's (``vllm serve``), so either target works: the target's own family is read
first (the gateway also serves vLLM's metrics), the other is the fallback, and a
metric neither exposes reads as None. Per step (:func:`summarize_server`):

- peaks over every scrape of the step, means over the scrapes taken while it ran
  (over all of them when a short step had none);
- running requests while requests wait: the sustained running batch of the step
  (:func:`loadtest.server.saturation.sustained_running` over the scrapes taken while it ran:
  median and mode over those with waiting > 0, when at least half of them saw a queue;
  None for a step that was not saturated), to compare with the predicted maximum
  concurrency; short peaks show in the peak figures;
- counters (preemptions, tokens, finished requests) as after - before;
- per-request means from histograms as (after _sum - before _sum) / (after _count -
  before _count), e.g. mean KV bytes per request;
- gauges that describe the cache (capacity, predicted maximum concurrency) from the
  last scrape.

Scrapes are samples: a peak shorter than the interval can be missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from loadtest.core.results import HistogramMean, ServerSample, ServerSummary
from loadtest.server.saturation import sustained_running

Source = Literal["gateway", "vllm"]
Kind = Literal["gauge", "counter", "histogram", "info"]


@dataclass(frozen=True)
class MetricSpec:
    """Where one canonical metric lives on each kind of target.

    ``gateway``/``vllm``: the sample name (histograms: the base name, without
    ``_sum``/``_count``). ``labels``: label values a sample must carry. ``agg``:
    how several matching series combine (e.g. one per engine).
    """

    kind: Kind
    gateway: str | None
    vllm: str | None = None
    agg: Literal["sum", "max"] = "sum"
    labels: tuple[tuple[str, str], ...] = ()


METRICS: dict[str, MetricSpec] = {
    # gauges
    "kv_usage": MetricSpec("gauge", "gateway_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc", "max"),
    "running": MetricSpec("gauge", "gateway_requests_running", "vllm:num_requests_running"),
    "waiting": MetricSpec("gauge", "gateway_requests_waiting", "vllm:num_requests_waiting"),
    "kv_blocks": MetricSpec("gauge", "gateway_kv_cache_blocks"),
    "kv_blocks_used": MetricSpec("gauge", "gateway_kv_cache_blocks_used"),
    "kv_capacity_tokens": MetricSpec("gauge", "gateway_kv_cache_capacity_tokens"),
    "kv_bytes_per_token": MetricSpec("gauge", "gateway_kv_bytes_per_token", agg="max"),
    "predicted_max_concurrency_max_model_len": MetricSpec(
        "gauge", "gateway_predicted_max_concurrency", agg="max", labels=(("basis", "max_model_len"),)
    ),
    "predicted_max_concurrency_mean_request": MetricSpec(
        "gauge", "gateway_predicted_max_concurrency", agg="max", labels=(("basis", "mean_request"),)
    ),
    # counters
    "preemptions": MetricSpec("counter", "gateway_preemptions_total", "vllm:num_preemptions_total"),
    "requests_finished": MetricSpec("counter", "gateway_requests_total", "vllm:request_success_total"),
    "prompt_tokens": MetricSpec("counter", "gateway_prompt_tokens_total", "vllm:prompt_tokens_total"),
    "generation_tokens": MetricSpec("counter", "gateway_generation_tokens_total", "vllm:generation_tokens_total"),
    "cached_tokens": MetricSpec("counter", "gateway_cached_tokens_total", "vllm:prompt_tokens_cached_total"),
    # histograms (per-request observations)
    "kv_used_bytes": MetricSpec("histogram", "gateway_request_kv_used_bytes"),
    "kv_allocated_bytes": MetricSpec("histogram", "gateway_request_kv_allocated_bytes"),
    "kv_mha_equivalent_bytes": MetricSpec("histogram", "gateway_request_kv_mha_equivalent_bytes"),
    "kv_byte_seconds": MetricSpec("histogram", "gateway_request_kv_byte_seconds"),
    "attention_flops_prefill": MetricSpec(
        "histogram", "gateway_request_attention_flops", labels=(("phase", "prefill"),)
    ),
    "attention_flops_decode": MetricSpec("histogram", "gateway_request_attention_flops", labels=(("phase", "decode"),)),
    "kv_read_bytes": MetricSpec("histogram", "gateway_request_kv_read_bytes"),
    "queue_seconds": MetricSpec("histogram", "gateway_request_queue_seconds", "vllm:request_queue_time_seconds"),
    "ttft_seconds": MetricSpec("histogram", "gateway_request_ttft_seconds", "vllm:time_to_first_token_seconds"),
    "tpot_seconds": MetricSpec(
        "histogram", "gateway_request_tpot_seconds", "vllm:request_time_per_output_token_seconds"
    ),
    "e2e_seconds": MetricSpec("histogram", "gateway_request_e2e_seconds", "vllm:e2e_request_latency_seconds"),
    # info: labels only
    "info": MetricSpec("info", "gateway_model_info", "vllm:cache_config_info"),
}

_MODEL_LABELS = ("model", "model_name")
_SCRAPE_TIMEOUT_S = 5.0

Rows = list[tuple[dict[str, str], float]]


def parse_exposition(text: str) -> dict[str, Rows]:
    """Prometheus text format -> sample name -> [(labels, value)]."""
    samples: dict[str, Rows] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return dict(samples)


def detect_source(samples: dict[str, Rows]) -> Source | None:
    if any(name.startswith("gateway_") for name in samples):
        return "gateway"
    if any(name.startswith("vllm:") for name in samples):
        return "vllm"
    return None


def _select(rows: Rows, spec: MetricSpec, model: str | None) -> Rows:
    """Rows carrying the spec's labels; only the target model's when they name models."""
    rows = [row for row in rows if all(row[0].get(k) == v for k, v in spec.labels)]
    mine = [row for row in rows if model is not None and any(row[0].get(k) == model for k in _MODEL_LABELS)]
    return mine or rows


def _combine(values: list[float], spec: MetricSpec) -> float | None:
    if not values:
        return None
    return max(values) if spec.agg == "max" else sum(values)


@dataclass
class Snapshot:
    """One scrape, reduced to the canonical metrics (None where the target lacks one)."""

    t_s: float
    source: Source | None
    values: dict[str, float | None] = field(default_factory=dict)
    histograms: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)

    def sample(self, t0: float = 0.0) -> ServerSample:
        return ServerSample(
            t_s=self.t_s - t0,
            kv_usage=self.values.get("kv_usage"),
            running=self.values.get("running"),
            waiting=self.values.get("waiting"),
            kv_blocks_used=self.values.get("kv_blocks_used"),
        )


def snapshot(text: str, t_s: float, model: str | None = None) -> Snapshot:
    """Reduce one exposition to :data:`METRICS` for whichever target wrote it."""
    samples = parse_exposition(text)
    source = detect_source(samples)
    order = ("vllm", "gateway") if source == "vllm" else ("gateway", "vllm")
    snap = Snapshot(t_s=t_s, source=source)
    for name, spec in METRICS.items():
        suffix = "_count" if spec.kind == "histogram" else ""
        bases = [base for base in (getattr(spec, o) for o in order) if base and f"{base}{suffix}" in samples]
        base = bases[0] if bases else None
        if spec.kind == "histogram":
            snap.histograms[name] = None
            if base is not None:
                total = _combine([v for _, v in _select(samples.get(f"{base}_sum", []), spec, model)], spec)
                count = _combine([v for _, v in _select(samples[f"{base}_count"], spec, model)], spec)
                snap.histograms[name] = None if total is None or count is None else (total, count)
        elif spec.kind == "info":
            rows = _select(samples[base], spec, model) if base else []
            snap.info = dict(rows[0][0]) if rows else {}
        else:
            rows = _select(samples[base], spec, model) if base else []
            snap.values[name] = _combine([v for _, v in rows], spec)
    return snap


def _counter_delta(before: Snapshot | None, after: Snapshot | None, name: str) -> float | None:
    """Counter increase; None when missing or when the counter went back (restart)."""
    old = before.values.get(name) if before else None
    new = after.values.get(name) if after else None
    if old is None or new is None or new < old:
        return None
    return new - old


def _histogram_mean(before: tuple[float, float] | None, after: tuple[float, float] | None) -> HistogramMean | None:
    if before is None or after is None:
        return None
    count = after[1] - before[1]
    if count < 0:
        return None
    return HistogramMean(count=count, mean=(after[0] - before[0]) / count if count > 0 else None)


def _series(snaps: list[Snapshot], name: str) -> list[float]:
    return [v for v in (s.values.get(name) for s in snaps) if v is not None]


def _last(snaps: list[Snapshot], name: str) -> float | None:
    values = _series(snaps, name)
    return values[-1] if values else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize_server(
    before: Snapshot | None,
    during: list[Snapshot],
    after: Snapshot | None,
    errors: int = 0,
    t0: float = 0.0,
) -> ServerSummary:
    """One step's server-side figures (module docstring); sample times become t_s - t0."""
    every = [s for s in [before, *during, after] if s is not None]
    if not every:
        return ServerSummary(scrape_errors=errors)
    mean_basis = during or every
    sustained = sustained_running([[s.sample(t0) for s in mean_basis]])
    info_source = after or every[-1]
    return ServerSummary(
        source=info_source.source,
        scrapes=len(every),
        scrape_errors=errors,
        kv_usage_peak=max(_series(every, "kv_usage"), default=None),
        kv_usage_mean=_mean(_series(mean_basis, "kv_usage")),
        running_peak=max(_series(every, "running"), default=None),
        running_mean=_mean(_series(mean_basis, "running")),
        waiting_peak=max(_series(every, "waiting"), default=None),
        samples_while_waiting=sustained.samples,
        running_median_while_waiting=sustained.median,
        running_mode_while_waiting=sustained.mode,
        preemptions=_counter_delta(before, after, "preemptions"),
        requests_finished=_counter_delta(before, after, "requests_finished"),
        prompt_tokens=_counter_delta(before, after, "prompt_tokens"),
        generation_tokens=_counter_delta(before, after, "generation_tokens"),
        cached_tokens=_counter_delta(before, after, "cached_tokens"),
        kv_capacity_tokens=_last(every, "kv_capacity_tokens"),
        kv_blocks=_last(every, "kv_blocks"),
        kv_bytes_per_token=_last(every, "kv_bytes_per_token"),
        predicted_max_concurrency_max_model_len=_last(every, "predicted_max_concurrency_max_model_len"),
        predicted_max_concurrency_mean_request=_last(every, "predicted_max_concurrency_mean_request"),
        per_request={
            name: _histogram_mean(
                before.histograms.get(name) if before else None, after.histograms.get(name) if after else None
            )
            for name, spec in METRICS.items()
            if spec.kind == "histogram"
        },
        info=info_source.info,
        samples=[s.sample(t0) for s in every],
    )


class Scraper:
    """Fetches and reduces ``/metrics`` of one target; counts failed scrapes."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        model: str | None,
        interval_s: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.session = session
        self.url = url
        self.model = model
        self.interval_s = interval_s
        self.headers = headers or {}

    async def scrape(self) -> Snapshot | None:
        """One scrape stamped with its perf_counter send time; None on failure."""
        sent = time.perf_counter()
        try:
            timeout = aiohttp.ClientTimeout(total=_SCRAPE_TIMEOUT_S)
            async with self.session.get(self.url, timeout=timeout, headers=self.headers) as response:
                if response.status != 200:
                    return None
                text = await response.text()
            return snapshot(text, sent, self.model)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    def step(self) -> StepWatch:
        return StepWatch(self)


class StepWatch:
    """``async with scraper.step() as watch:`` scrapes before, during and after a step."""

    def __init__(self, scraper: Scraper) -> None:
        self.scraper = scraper
        self.before: Snapshot | None = None
        self.after: Snapshot | None = None
        self.during: list[Snapshot] = []
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    async def _take(self) -> Snapshot | None:
        snap = await self.scraper.scrape()
        if snap is None:
            self.errors += 1
        return snap

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.scraper.interval_s)
            snap = await self._take()
            if snap is not None:
                self.during.append(snap)

    async def __aenter__(self) -> StepWatch:
        self.before = await self._take()
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if exc_type is None:
            self.after = await self._take()

    def summary(self, t0: float) -> ServerSummary:
        """Figures of the step whose traffic started at perf_counter ``t0``."""
        return summarize_server(self.before, self.during, self.after, self.errors, t0)
