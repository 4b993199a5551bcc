"""The latency sweep per KV-head variant (pure): its spec, the context grid, the roofline
prediction of each point and the residuals. No engine, no I/O beyond reading the spec.

The sweep
    Each variant (MHA, GQA, MQA of one model) gets the same usable KV bytes and the same
    engine settings as the capacity experiment (``plan.plan_variants``). For each batch
    size b, a closed loop of b streams sends b requests at once, all with the same prompt
    length P and G output tokens (``ignore_eos``), then the next prompt length, up to the
    one that fills the variant's KV cache: b sequences of ceil((P + G - 1) / block) blocks
    each must fit in its usable blocks, and P + G <= max_model_len.

The grid (``context_grid``)
    For batch b: the shortest prompt ``min_prompt_tokens``, each variant's *fill prompt*
    (the longest P that fits, above), then the geometric midpoint of the widest gap (in
    tokens) until ``points`` values. Each variant runs the points up to its own fill
    prompt, so at the shared points every variant runs the same batch and context.

The prediction (``predict_point``)
    A request's TPOT_i = (E2E_i - TTFT_i) / (G - 1) spans the G - 1 decode steps that
    produce tokens 2..G; token j comes from a forward pass over a context of P + j - 1
    tokens (service/kv/geometry.py). The predicted TPOT is the mean over those steps of
    the decode-step roofline ``service.kv.roofline.uniform_step(b, P + j - 1)``:
    max((W + KV bytes per token x b x context) / bandwidth, FLOPs / peak), with W and the
    matmul parameters counted from the variant's own checkpoint and the hardware from
    ``python -m loadtest hwprobe``.

Residuals
    relative residual = measured / predicted - 1 (+0.25: 25 % slower than the roofline);
    absolute residual = measured - predicted (seconds).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from loadtest.core.config import Endpoint, resolve_config_path
from loadtest.kvheads.spec import BudgetSpec, EngineSpec, VariantSpec, _Strict
from service.kv import roofline
from service.kv.geometry import KVGeometry, blocks_for_tokens
from service.resources import config_file

DEFAULT_LATENCY_CONFIG = config_file("loadtest", "kv-heads-latency-cpu.yaml")


# ---------------------------------------------------------------- spec
class LatencyLoad(_Strict):
    batches: list[int] = Field(default_factory=lambda: [1, 4, 16])
    points: int = Field(default=4, ge=2, description="prompt lengths per batch (more only when the fills give more)")
    min_prompt_tokens: int = Field(default=64, ge=1)
    waves: int = Field(default=1, ge=1, description="requests per point = waves x batch (>= min_requests)")
    min_requests: int = Field(default=2, ge=1)
    warmup_requests: int = Field(default=2, ge=0)
    seed: int = 0
    scrape_interval_s: float = Field(default=0.5, gt=0)
    request_timeout_s: float = Field(default=900.0, gt=0)
    order: Literal["alternate", "sequential"] = "alternate"

    @model_validator(mode="after")
    def _positive(self) -> LatencyLoad:
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError("load.batches needs values >= 1")
        return self

    def requests_for(self, batch: int) -> int:
        return max(self.min_requests, self.waves * batch)


class LatencyOutput(_Strict):
    dir: Path = Path("loadtest-results/kv-heads-latency")
    log_dir: Path | None = None
    report: Path | None = Field(default=None, description="the kv-heads result.json whose report gets the section")


class LatencySpec(_Strict):
    kind: Literal["kv-heads-latency"] = "kv-heads-latency"
    variants: list[VariantSpec]
    budget: BudgetSpec = Field(default_factory=lambda: BudgetSpec(blocks_of_largest=32))
    engine: EngineSpec = Field(default_factory=EngineSpec)
    hardware: Path = Path("docs/results/hwprobe-cpu/hwprobe.json")
    endpoint: Endpoint = "completions"
    output_tokens: int = Field(default=32, ge=2)
    tokenizer: Path | None = None
    load: LatencyLoad = Field(default_factory=LatencyLoad)
    output: LatencyOutput = Field(default_factory=LatencyOutput)


def load_latency_spec(path: Path | None) -> LatencySpec:
    path = resolve_config_path(path or DEFAULT_LATENCY_CONFIG)
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or data.get("kind") != "kv-heads-latency":
        raise ValueError(f"{path}: not a kv-heads latency spec (kind: kv-heads-latency)")
    return LatencySpec.model_validate(data)


# ---------------------------------------------------------------- the grid
def fill_prompt(usable_blocks: int, block_size: int, batch: int, output_tokens: int, max_model_len: int) -> int:
    """The longest prompt P whose b sequences fit: b x ceil((P + G - 1) / block) <= blocks and
    P + G <= max_model_len; 0 when not even one token fits."""
    per_seq_tokens = (usable_blocks // batch) * block_size
    return max(min(per_seq_tokens - output_tokens + 1, max_model_len - output_tokens), 0)


def kv_limited(usable_blocks: int, block_size: int, batch: int, output_tokens: int, max_model_len: int) -> bool:
    """Whether the KV cache, not max_model_len, sets the fill prompt (then the fill fills the cache)."""
    return (usable_blocks // batch) * block_size - output_tokens + 1 <= max_model_len - output_tokens


def context_grid(fills: Iterable[int], min_prompt: int, points: int) -> list[int]:
    """The prompt lengths of one batch: the shortest, every fill, then the geometric midpoint
    of the widest gap (in tokens) until ``points`` values (module docstring)."""
    grid = sorted({min_prompt, *(f for f in fills if f >= min_prompt)})
    while len(grid) < points and len(grid) >= 2:
        gap, i = max((grid[i + 1] - grid[i], i) for i in range(len(grid) - 1))
        middle = round(math.sqrt(grid[i] * grid[i + 1]))
        if grid[i + 1] / grid[i] < 1.5 or middle in grid:
            break
        grid.insert(i + 1, middle)
    return grid


class Point(_Strict):
    """One measured point of the sweep: a variant, a batch and a prompt length."""

    variant: str
    batch: int
    prompt_tokens: int
    fills_cache: bool  # the variant's fill prompt, set by its KV cache (not by max_model_len)


def sweep_points(
    variants: Sequence[str], usable_blocks: Sequence[int], block_size: int, load: LatencyLoad, output_tokens: int,
    max_model_len: int,
) -> list[Point]:
    """Every (variant, batch, prompt) of the sweep, batch-major, prompts ascending, variants in
    spec order (the runner alternates their order)."""
    out = []
    for b in load.batches:
        fills = [fill_prompt(n, block_size, b, output_tokens, max_model_len) for n in usable_blocks]
        grid = context_grid(fills, load.min_prompt_tokens, load.points)
        for p in grid:
            for name, fill, blocks in zip(variants, fills, usable_blocks, strict=True):
                if load.min_prompt_tokens <= p <= fill:
                    full = p == fill and kv_limited(blocks, block_size, b, output_tokens, max_model_len)
                    out.append(Point(variant=name, batch=b, prompt_tokens=p, fills_cache=full))
    return out


# ---------------------------------------------------------------- the prediction
class VariantModel(_Strict):
    """What the roofline needs of one variant: KV shape, its own weights, its usable blocks."""

    name: str
    kv_heads: int
    query_heads: int
    layers: int
    head_size: int
    dtype_bytes: int
    block_size: int
    kv_bytes_per_token: int
    parameters: int
    weight_bytes: int
    matmul_parameters: int
    usable_blocks: int

    def geometry(self) -> KVGeometry:
        return KVGeometry(self.layers, self.query_heads, self.kv_heads, self.head_size, self.dtype_bytes,
                          self.block_size)

    def crossover_context(self, batch: int) -> float:
        """Context per sequence at which a step reads as many KV bytes as weight bytes."""
        return roofline.crossover_context(self.geometry(), self.weight_bytes, batch)


def variant_model(name: str, geometry: KVGeometry, config: dict[str, Any], usable_blocks: int) -> VariantModel:
    """From a checkpoint's config (``num_parameters`` counted from its safetensors headers)."""
    params = roofline.parameter_count(config)
    return VariantModel(
        name=name, kv_heads=geometry.kv_heads, query_heads=geometry.query_heads, layers=geometry.layers,
        head_size=geometry.head_size, dtype_bytes=geometry.dtype_bytes, block_size=geometry.block_size,
        kv_bytes_per_token=geometry.kv_bytes_per_token, parameters=params,
        weight_bytes=roofline.weights_bytes(config, geometry.dtype_bytes),
        matmul_parameters=roofline.matmul_parameters(config), usable_blocks=usable_blocks,
    )  # fmt: skip


class Prediction(_Strict):
    """The roofline over a request's G - 1 decode steps (means over the steps)."""

    tpot_s: float
    memory_s: float
    compute_s: float | None
    weight_bytes: float
    kv_bytes: float  # KV bytes read per step, mean over the steps
    flops: float
    bound: str  # memory or compute, at the mean context
    mean_context: float
    kv_over_weights: float  # KV bytes read / weight bytes read per step


def predict_point(model: VariantModel, batch: int, prompt_tokens: int, output_tokens: int,
                  hw: roofline.Hardware) -> Prediction:
    """Predicted TPOT of ``batch`` sequences of ``prompt_tokens`` decoding ``output_tokens``."""
    if output_tokens < 2:
        raise ValueError("TPOT needs at least 2 output tokens")
    g = model.geometry()
    steps = [roofline.uniform_step(g, model.weight_bytes, model.matmul_parameters, batch, prompt_tokens + j - 1, hw)
             for j in range(2, output_tokens + 1)]  # fmt: skip
    n = len(steps)
    mean_context = sum(prompt_tokens + j - 1 for j in range(2, output_tokens + 1)) / n
    mid = roofline.uniform_step(g, model.weight_bytes, model.matmul_parameters, batch, round(mean_context), hw)
    kv = sum(s.kv_bytes for s in steps) / n
    return Prediction(
        tpot_s=sum(s.tpot_s for s in steps) / n,
        memory_s=sum(s.memory_s for s in steps) / n,
        compute_s=None if hw.peak_flops is None else sum(s.compute_s or 0.0 for s in steps) / n,
        weight_bytes=float(model.weight_bytes), kv_bytes=kv, flops=sum(s.flops for s in steps) / n,
        bound=mid.bound, mean_context=mean_context, kv_over_weights=kv / model.weight_bytes,
    )  # fmt: skip


def residual(measured: float | None, predicted: float | None) -> float | None:
    """measured / predicted - 1; None when either is missing or the prediction is not > 0."""
    if measured is None or predicted is None or predicted <= 0:
        return None
    return measured / predicted - 1


def worst(rows: Sequence[dict[str, Any]], key: str = "tpot_residual") -> dict[str, Any] | None:
    """The row whose residual is furthest from 0 (by |measured / predicted - 1|)."""
    scored = [r for r in rows if r.get(key) is not None]
    return max(scored, key=lambda r: abs(r[key])) if scored else None


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of y on x; None with fewer than 2 distinct x."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


def blocks_held(prompt_tokens: int, output_tokens: int, block_size: int, batch: int) -> int:
    """Blocks b sequences hold at their end: b x ceil((P + G - 1) / block)."""
    return batch * blocks_for_tokens(prompt_tokens + output_tokens - 1, block_size)
