"""The KV-heads experiment: MHA, GQA and MQA variants of one model under the same KV
byte budget and the same load sweep (``python -m loadtest kv-heads``).

Managed mode (the default) starts the gateway (``python -m service serve``) for each
variant in turn on a free loopback port, waits for ``/health/ready``, runs the sweep,
and stops it with SIGTERM; never two engines at once. Targets mode
(``--targets name=url,...``) drives servers that are already running, e.g. one per GPU
model, and reads their cache shape from ``/metrics``.

The same bytes for every variant
    ``num_gpu_blocks_override`` counts blocks, so each variant's block count comes from
    its KV bytes per block: budget B bytes -> ``B // (block_size x KV bytes per token)``
    blocks (``service.kv.planner.plan``). vLLM v1 also takes one block of the pool as its
    *null block* (a placeholder that never holds KV), so the engine is given
    ``blocks + reserved_blocks``: the usable bytes are then equal across variants.

The prediction
    A sequence of P prompt and G generated tokens ends holding T = P + G - 1 tokens of
    KV (service/kv/geometry.py), i.e. ceil(T / block_size) blocks; vLLM admits a request
    when the blocks of its prompt are free and grows it while it decodes. With
    ceil(P / block_size) == ceil(T / block_size) a sequence never grows past its
    admission, so the running batch under saturation is exactly
    ``floor(usable blocks / blocks per sequence)``, with no preemption. Otherwise the
    scheduler over-admits and preempts (FIELD_NOTES), and the sustained batch sits near
    the prediction with higher peaks.

The measurement
    The sustained running batch under saturation: the median (and mode) of
    ``gateway_requests_running`` over the scrapes that saw waiting requests, pooled over
    the *saturated* steps of a variant, i.e. the steps where at least
    ``saturation_fraction`` of the scrapes taken during the step saw a non-empty queue
    (a closed loop below capacity only queues for an instant between a request's end
    and its successor's admission). Peaks and preemptions are reported beside it.

Result: one JSON document (:class:`KvHeadsResult`, one ``loadtest`` RunResult per
variant inside), from which ``--report-only RESULT.json`` rebuilds the Markdown and PNGs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from loadtest.client import api_root
from loadtest.config import Endpoint, Load, Output, RunConfig, Target, TokenRange, Workload
from loadtest.results import Environment, RunResult, ServerSample, StepResult, environment, now_iso
from loadtest.runner import Runner
from loadtest.scrape import Scraper, Snapshot
from loadtest.servers import ProcessExited, free_port, stop_process, wait_ready
from loadtest.workload import Prompt, TokenizerLike, build_workload, load_tokenizer

SCHEMA_VERSION: Final = 1
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "loadtest" / "kv-heads-cpu.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- the spec (YAML)
class VariantSpec(_Strict):
    """One model folder to serve; its KV-head count is read from its config.json."""

    name: str
    model: Path


class TargetSpec(_Strict):
    """An already running OpenAI-compatible server (targets mode)."""

    name: str
    base_url: str
    model: str | None = None  # served model name; default: the first of GET /v1/models


class BudgetSpec(_Strict):
    """The KV byte budget every variant gets: ``bytes``, or ``blocks_of_largest`` blocks
    of the variant with the most KV bytes per block (the MHA one)."""

    blocks_of_largest: int | None = Field(default=None, ge=1)
    bytes: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one(self) -> BudgetSpec:
        if (self.blocks_of_largest is None) == (self.bytes is None):
            raise ValueError("set exactly one of budget.blocks_of_largest and budget.bytes")
        return self


class EngineSpec(_Strict):
    """Engine limits, the same for every variant (gateway settings of the same names)."""

    block_size: int = Field(default=128, ge=1)
    max_model_len: int = Field(default=256, ge=16)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = False
    enforce_eager: bool = True
    dtype: str = "bfloat16"
    kv_cache_gib: float = Field(default=1.0, gt=0)
    reserved_blocks: int = Field(default=1, ge=0, description="blocks vLLM keeps out of the pool (null block)")
    start_timeout_s: float = Field(default=600.0, gt=0)
    stop_timeout_s: float = Field(default=60.0, gt=0)
    extra_args: list[str] = Field(default_factory=list, description="more `service serve` flags")


class WorkloadSpec(_Strict):
    endpoint: Endpoint = "completions"
    input_tokens: int = Field(default=32, ge=1)
    output_tokens: int = Field(default=64, ge=1)
    tokenizer: Path | None = None  # default: the first variant's folder


class LoadSpec(_Strict):
    """Closed loop, one step per concurrency C; each step sends
    clamp(ceil(waves x C), min_requests, max_requests) requests and starts none after
    ``max_step_seconds`` (requests in flight then finish)."""

    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 8, 16, 32, 48])
    waves: float = Field(default=3.0, gt=0)
    min_requests: int = Field(default=8, ge=1)
    max_requests: int | None = Field(default=None, ge=1)
    max_step_seconds: float | None = Field(default=60.0, gt=0)
    warmup_requests: int = Field(default=2, ge=0)
    seed: int = 0
    scrape_interval_s: float = Field(default=0.25, gt=0)
    request_timeout_s: float = Field(default=900.0, gt=0)

    @model_validator(mode="after")
    def _positive(self) -> LoadSpec:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError("load.concurrency needs values >= 1")
        return self

    def requests_for(self, concurrency: int) -> int:
        n = max(self.min_requests, math.ceil(self.waves * concurrency))
        return min(n, self.max_requests) if self.max_requests else n


class CriteriaSpec(_Strict):
    tolerance: float = Field(default=0.10, ge=0)
    saturation_fraction: float = Field(default=0.5, gt=0, le=1)


class OutputSpec(_Strict):
    dir: Path = Path("loadtest-results/kv-heads")
    log_dir: Path | None = None  # raw gateway logs; default: <dir>/logs
    keep_itl: bool = False  # per-request inter-token gaps in the JSON (large)


class KvHeadsSpec(_Strict):
    kind: Literal["kv-heads"] = "kv-heads"  # tells this spec from a `loadtest run` one
    variants: list[VariantSpec] = Field(default_factory=list)
    targets: list[TargetSpec] = Field(default_factory=list)
    budget: BudgetSpec = Field(default_factory=lambda: BudgetSpec(blocks_of_largest=4))
    engine: EngineSpec = Field(default_factory=EngineSpec)
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    load: LoadSpec = Field(default_factory=LoadSpec)
    criteria: CriteriaSpec = Field(default_factory=CriteriaSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @property
    def mode(self) -> Literal["managed", "targets"]:
        return "targets" if self.targets else "managed"


def load_spec(path: Path | None) -> KvHeadsSpec:
    if path is None:
        return KvHeadsSpec()
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the kv-heads spec must be a YAML mapping")
    return KvHeadsSpec.model_validate(data)


# ---------------------------------------------------------------- the plan (pure)
class VariantPlan(_Strict):
    """One variant's share of the budget and the predicted running batch.

    ``num_blocks``: usable blocks (budget // bytes per block, or what a target reports
    minus the reserved blocks); ``engine_blocks``: what the engine is given (+ reserved).
    ``kv_tokens_per_seq``: P + G - 1; ``blocks_per_seq`` at the end of a sequence and
    ``admission_blocks_per_seq`` at its admission (prompt only).
    ``predicted_max_seqs``: the planner's figure (blocks / blocks per sequence);
    ``predicted_running``: its floor, the whole sequences that fit at once.
    """

    name: str
    model: str
    kind: str | None = None
    kv_heads: int | None = None
    query_heads: int | None = None
    layers: int | None = None
    head_size: int | None = None
    dtype_bytes: int | None = None
    block_size: int
    kv_bytes_per_token: int | None = None
    kv_bytes_per_block: int | None = None
    budget_bytes: int | None = None
    num_blocks: int | None = None
    engine_blocks: int | None = None
    reserved_blocks: int = 0
    kv_tokens_per_seq: int
    blocks_per_seq: int
    admission_blocks_per_seq: int
    predicted_max_seqs: float | None = None
    predicted_running: int | None = None

    @property
    def grows_after_admission(self) -> bool:
        return self.blocks_per_seq > self.admission_blocks_per_seq


def kv_tokens_per_sequence(input_tokens: int, output_tokens: int) -> int:
    """KV tokens a finished sequence holds: P + G - 1 (the last sampled token is never fed back)."""
    from service.kv.geometry import kv_tokens_held

    return kv_tokens_held(input_tokens, output_tokens)


def budget_bytes_for(budget: BudgetSpec, geometries: Iterable[Any]) -> int:
    """The budget in bytes: given, or N blocks of the largest-KV variant."""
    if budget.bytes is not None:
        return budget.bytes
    assert budget.blocks_of_largest is not None
    largest = max(g.kv_bytes_per_block for g in geometries)
    return budget.blocks_of_largest * largest


def plan_variant(
    name: str,
    model: str,
    geometry: Any,
    budget_bytes: int,
    input_tokens: int,
    output_tokens: int,
    max_model_len: int,
    reserved_blocks: int = 1,
) -> VariantPlan:
    """Blocks and predicted running batch of one variant (``service.kv.planner.plan``)."""
    from service.kv import planner
    from service.kv.geometry import blocks_for_tokens

    tokens = kv_tokens_per_sequence(input_tokens, output_tokens)
    # budget_bytes is the usable part here; the null block is added to the engine's count below
    row = planner.plan(geometry, budget_bytes, tokens, max_model_len, kv_heads=[geometry.kv_heads],
                       reserved_blocks=0)[0]
    per_seq = blocks_for_tokens(tokens, geometry.block_size)
    return VariantPlan(
        name=name,
        model=model,
        kind=row.kind,
        kv_heads=geometry.kv_heads,
        query_heads=geometry.query_heads,
        layers=geometry.layers,
        head_size=geometry.head_size,
        dtype_bytes=geometry.dtype_bytes,
        block_size=geometry.block_size,
        kv_bytes_per_token=geometry.kv_bytes_per_token,
        kv_bytes_per_block=geometry.kv_bytes_per_block,
        budget_bytes=budget_bytes,
        num_blocks=row.num_blocks,
        engine_blocks=row.num_blocks + reserved_blocks,
        reserved_blocks=reserved_blocks,
        kv_tokens_per_seq=tokens,
        blocks_per_seq=per_seq,
        admission_blocks_per_seq=blocks_for_tokens(input_tokens, geometry.block_size),
        predicted_max_seqs=row.max_seqs,
        predicted_running=row.num_blocks // per_seq,
    )


def plan_variants(spec: KvHeadsSpec, root: Path = ROOT) -> tuple[int, list[VariantPlan]]:
    """(budget bytes, one plan per variant) from the variants' config.json files."""
    from service.kv.geometry import geometry_from_model_dir

    geometries = []
    for variant in spec.variants:
        folder = resolve(variant.model, root)
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"variant {variant.name}: no config.json in {folder} "
                "(make it with `python -m service kv-variant --kv-heads N`)"
            )
        geometries.append(
            geometry_from_model_dir(folder, block_size=spec.engine.block_size, dtype=spec.engine.dtype)
        )
    budget = budget_bytes_for(spec.budget, geometries)
    plans = [
        plan_variant(
            v.name, str(v.model), g, budget, spec.workload.input_tokens, spec.workload.output_tokens,
            spec.engine.max_model_len, spec.engine.reserved_blocks,
        )
        for v, g in zip(spec.variants, geometries, strict=True)
    ]  # fmt: skip
    return budget, plans


def check_plan(spec: KvHeadsSpec, plans: Sequence[VariantPlan]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a managed run's plan: limits that would hide or break the effect."""
    errors: list[str] = []
    warnings: list[str] = []
    w, e = spec.workload, spec.engine
    if w.input_tokens + w.output_tokens > e.max_model_len:
        errors.append(f"max_model_len {e.max_model_len} < prompt + output {w.input_tokens + w.output_tokens}")
    for p in plans:
        if not p.num_blocks:
            errors.append(f"{p.name}: the budget holds no block of {p.kv_bytes_per_block:,} bytes")
            continue
        if p.num_blocks * p.block_size < e.max_model_len:
            errors.append(
                f"{p.name}: max_model_len {e.max_model_len} does not fit in its {p.num_blocks} usable blocks "
                f"({p.num_blocks * p.block_size} tokens)"
            )
        if p.budget_bytes and p.kv_bytes_per_block and p.budget_bytes % p.kv_bytes_per_block:
            warnings.append(
                f"{p.name}: the budget is not a whole number of its blocks; "
                f"{p.budget_bytes % p.kv_bytes_per_block:,} bytes unused"
            )
        if p.predicted_running is not None and p.predicted_running >= e.max_num_seqs:
            warnings.append(
                f"{p.name}: predicted {p.predicted_running} running >= max_num_seqs {e.max_num_seqs}: "
                "max_num_seqs binds first and hides the KV-head effect"
            )
        if p.predicted_running is not None and p.predicted_running >= max(spec.load.concurrency):
            warnings.append(
                f"{p.name}: the sweep's largest concurrency {max(spec.load.concurrency)} does not exceed the "
                f"predicted capacity {p.predicted_running}: its capacity will not be measured"
            )
        if p.grows_after_admission:
            warnings.append(
                f"{p.name}: a sequence is admitted with {p.admission_blocks_per_seq} block(s) and grows to "
                f"{p.blocks_per_seq}: expect over-admission and preemptions (FIELD_NOTES)"
            )
    tokens = w.input_tokens + w.output_tokens
    if plans and -(-tokens // e.block_size) != plans[0].blocks_per_seq:
        warnings.append(
            f"P + G = {tokens} and P + G - 1 = {tokens - 1} need different block counts: "
            "the prediction depends on the last token; choose lengths away from a block boundary"
        )
    return errors, warnings


# ---------------------------------------------------------------- measurement (pure)
class Sustained(_Strict):
    """Running requests over the scrapes that saw a queue."""

    samples: int = 0
    median: float | None = None
    mode: float | None = None
    mean: float | None = None


def sustained_running(samples: Iterable[ServerSample], min_waiting: float = 1) -> Sustained:
    """Median, mode and mean of ``running`` over the samples with ``waiting >= min_waiting``.

    The mode breaks ties towards the larger value (the batch the scheduler holds).
    """
    rows = [s.running for s in samples if s.running is not None and (s.waiting or 0) >= min_waiting]
    if not rows:
        return Sustained()
    counts = Counter(rows)
    top = max(counts.values())
    return Sustained(
        samples=len(rows),
        median=float(np.median(rows)),
        mode=float(max(v for v, c in counts.items() if c == top)),
        mean=float(np.mean(rows)),
    )


def during_samples(step: StepResult) -> list[ServerSample]:
    """Samples taken while the step ran (its before/after scrapes excluded)."""
    samples = step.server.samples if step.server else []
    return samples[1:-1] if len(samples) > 2 else list(samples)


def waiting_fraction(step: StepResult) -> float:
    """Share of the step's scrapes (during the step) that saw waiting requests."""
    rows = [s for s in during_samples(step) if s.waiting is not None]
    return sum(1 for s in rows if s.waiting and s.waiting > 0) / len(rows) if rows else 0.0


def is_saturated(step: StepResult, fraction: float = 0.5) -> bool:
    return waiting_fraction(step) >= fraction


class Measured(_Strict):
    """A variant's measured capacity and where its queue and its preemptions started."""

    sustained: Sustained = Field(default_factory=Sustained)
    running_peak: float | None = None
    saturated_concurrencies: list[int] = Field(default_factory=list)
    queueing_from: int | None = None  # first swept concurrency that saturated
    preemptions: float = 0
    preemptions_from: int | None = None  # first swept concurrency with a preemption


def measure(run: RunResult, fraction: float = 0.5) -> Measured:
    """Pool the saturated steps of one variant's run (module docstring)."""
    steps = sorted(run.steps, key=lambda s: s.x)
    saturated = [s for s in steps if is_saturated(s, fraction)]
    pooled = [sample for s in saturated for sample in during_samples(s)]
    peaks = [s.server.running_peak for s in steps if s.server and s.server.running_peak is not None]
    preempted = [s for s in steps if s.server and (s.server.preemptions or 0) > 0]
    return Measured(
        sustained=sustained_running(pooled),
        running_peak=max(peaks) if peaks else None,
        saturated_concurrencies=[int(s.x) for s in saturated],
        queueing_from=int(saturated[0].x) if saturated else None,
        preemptions=sum(s.server.preemptions or 0 for s in steps if s.server),
        preemptions_from=int(preempted[0].x) if preempted else None,
    )


def within(measured: float | None, predicted: float | None, tolerance: float) -> bool | None:
    """|measured - predicted| <= tolerance x predicted; None when either is missing."""
    if measured is None or predicted is None or predicted <= 0:
        return None
    return abs(measured - predicted) <= tolerance * predicted


def ratios(values: Sequence[float | None]) -> list[float | None]:
    """Values relative to the first (e.g. MHA:GQA:MQA capacities as 1:x:y)."""
    first = values[0] if values else None
    if not first:
        return [None for _ in values]
    return [None if v is None else v / first for v in values]


# ---------------------------------------------------------------- the result (JSON)
class VariantRun(_Strict):
    plan: VariantPlan
    base_url: str | None = None
    served_model: str | None = None
    engine_start_s: float | None = None
    engine_check: dict[str, Any] = Field(default_factory=dict)  # what /metrics said at start
    log_summary: list[str] = Field(default_factory=list)
    log_file: str | None = None
    started_at: str | None = None
    wall_s: float | None = None
    error: str | None = None
    waited_for_idle_s: float | None = None
    other_engines_seen: dict[str, list[int]] = Field(
        default_factory=dict, description="checkpoint -> pids of other vLLM engines running then"
    )
    run: RunResult | None = None


class KvHeadsResult(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["kv-heads"] = "kv-heads"
    command: str
    mode: Literal["managed", "targets"]
    created_at: str
    finished_at: str | None = None
    wall_s: float | None = None
    spec: KvHeadsSpec
    budget_bytes: int | None = None
    warnings: list[str] = Field(default_factory=list)
    environment: Environment
    variants: list[VariantRun]


def save_result(result: KvHeadsResult, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.model_dump_json(indent=1) + "\n")
    return path


def load_result(path: Path) -> KvHeadsResult:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("kind") != "kv-heads":
        raise ValueError(f"{path}: not a kv-heads result (python -m loadtest kv-heads writes one)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {data.get('schema_version')!r} is not supported")
    return KvHeadsResult.model_validate(data)


def strip_itl(run: RunResult) -> RunResult:
    """The run without per-request inter-token gaps (their distribution stays in each summary)."""
    steps = [
        s.model_copy(update={"requests": [r.model_copy(update={"itl_s": []}) for r in s.requests]})
        for s in run.steps
    ]
    return run.model_copy(update={"steps": steps})


# ---------------------------------------------------------------- gateway processes
def resolve(path: Path, root: Path = ROOT) -> Path:
    """A relative path: as given if it exists from the current folder, else under the project root."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (root / path).exists():
        return path.resolve() if path.exists() else path
    return (root / path).resolve()


def serve_command(plan: VariantPlan, spec: KvHeadsSpec, port: int, model_dir: Path) -> list[str]:
    """``python -m service serve`` with the variant's model and the shared engine limits."""
    e = spec.engine
    cmd = [
        sys.executable, "-m", "service", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", str(model_dir), "--served-model-name", plan.name,
        "--dtype", e.dtype, "--block-size", str(e.block_size),
        "--max-model-len", str(e.max_model_len), "--max-num-seqs", str(e.max_num_seqs),
        "--kv-cache-gib", f"{e.kv_cache_gib:g}",
        "--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching",
        "--enforce-eager" if e.enforce_eager else "--no-enforce-eager",
    ]  # fmt: skip
    if plan.engine_blocks is not None:
        cmd += ["--num-gpu-blocks-override", str(plan.engine_blocks)]
    if e.max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(e.max_num_batched_tokens)]
    return cmd + list(e.extra_args)


class Gateway:
    """One gateway subprocess (own session, so SIGKILL can reach its engine core)."""

    def __init__(self, cmd: list[str], log_path: Path, base_url: str) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.base_url = base_url
        self.process: subprocess.Popen[bytes] | None = None
        self.start_s: float | None = None

    def start(self, timeout_s: float) -> None:
        env = dict(os.environ)
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self.start_s = wait_ready(self.process, self.base_url + "/health/ready", timeout_s)
        except ProcessExited as e:
            raise RuntimeError(f"the gateway {e}; see {self.log_path}") from None
        if self.start_s is None:
            raise RuntimeError(f"the gateway was not ready within {timeout_s:g} s; see {self.log_path}")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL to its process group after ``timeout_s``."""
        return None if self.process is None else stop_process(self.process, timeout_s)


def _ppid(pid: int, proc: Path = Path("/proc")) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# Processes that load the CPU the way an engine does: engine cores, servers starting up
# (imports and model loading take a core for a minute before the engine core exists) and
# other load generators.
_BUSY = re.compile(
    r"^VLLM::|-m service serve|vllm\.entrypoints|\bvllm serve\b|-m loadtest (?:run|compare|soak|selftest)\b"
)


def _cmdline(entry: Path) -> str:
    try:
        raw = (entry / "cmdline").read_bytes()
    except OSError:
        return ""
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    if not text:  # kernel threads, zombies: fall back to the name
        try:
            text = (entry / "comm").read_text().strip()
        except OSError:
            return ""
    return text


def other_engines(own_root: int | None = None, proc: Path = Path("/proc")) -> list[int]:
    """Pids of vLLM engines, model servers and load generators on this machine that are
    neither ``own_root`` (our gateway) nor its descendants nor this process: they would
    share the 2 cores and skew latencies. Reads /proc only (empty where there is none)."""
    me = os.getpid()
    found = []
    for entry in proc.glob("[0-9]*"):
        pid = int(entry.name)
        if pid == me or not _BUSY.search(_cmdline(entry)):
            continue
        parent: int | None = pid
        for _ in range(64):
            if parent is None or parent <= 1 or parent == own_root:
                break
            parent = _ppid(parent, proc)
        if own_root is None or parent != own_root:
            found.append(pid)
    return sorted(found)


def wait_for_idle(timeout_s: float, poll_s: float = 5.0, own_root: int | None = None) -> float:
    """Wait until no other vLLM engine runs (at most ``timeout_s``); returns the seconds waited."""
    t0 = time.monotonic()
    announced = False
    while (pids := other_engines(own_root)) and time.monotonic() - t0 < timeout_s:
        if not announced:
            _log(f"waiting for other engines, servers or load tests to end (pids {pids}; up to {timeout_s:g} s)")
            announced = True
        time.sleep(poll_s)
    return time.monotonic() - t0


_LOG_PATTERNS = (
    r"engine ready in", r"Maximum concurrency", r"num_gpu_blocks", r"KV cache", r"# CPU blocks",
    r"Overriding", r"Reducing Torch threads", r"\bWARNING\b", r"\bERROR\b", r"Traceback", r"Error:",
)  # fmt: skip
_NOISE = re.compile(r"gateway\.requests|GET /metrics|POST /v1/")


def summarize_log(text: str, limit: int = 20, width: int = 240) -> list[str]:
    """The lines of a gateway log that explain its cache and its problems (request lines skipped)."""
    wanted = re.compile("|".join(_LOG_PATTERNS))
    lines: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        if _NOISE.search(line) or not wanted.search(line):
            continue
        key = re.sub(r"^\S+ \S+ |\d+", "", line)[:120]  # same message, other time or number
        if key in seen:
            continue
        seen.add(key)
        lines.append(line.strip()[:width])
        if len(lines) >= limit:
            break
    return lines


# ---------------------------------------------------------------- running
async def scrape_once(base_url: str, model: str | None) -> Snapshot | None:
    async with aiohttp.ClientSession() as session:
        return await Scraper(session, api_root(base_url) + "/metrics", model, 1.0).scrape()


async def served_model_name(base_url: str) -> str | None:
    """The first model id of ``GET /v1/models``; None when the server has no such route."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(api_root(base_url) + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as response,
        ):
            if response.status != 200:
                return None
            data = await response.json()
        return str(data["data"][0]["id"])
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, TypeError, ValueError):
        return None


def engine_check(snap: Snapshot | None, plan: VariantPlan | None) -> dict[str, Any]:
    """What the server says about its cache, and whether it matches the plan."""
    if snap is None:
        return {"scraped": False}
    info = snap.info
    out: dict[str, Any] = {
        "scraped": True,
        "source": snap.source,
        "kv_blocks": snap.values.get("kv_blocks"),
        "kv_bytes_per_token": snap.values.get("kv_bytes_per_token"),
        "kv_capacity_tokens": snap.values.get("kv_capacity_tokens"),
        "info": info,
    }
    if snap.values.get("kv_blocks") is None and info.get("num_gpu_blocks"):  # vllm serve
        out["kv_blocks"] = float(info["num_gpu_blocks"])
    if plan is not None and plan.engine_blocks is not None:
        out["blocks_match"] = out["kv_blocks"] == plan.engine_blocks
        out["bytes_per_token_match"] = out["kv_bytes_per_token"] == plan.kv_bytes_per_token
    return out


def plan_from_server(
    name: str, model: str, check: dict[str, Any], spec: KvHeadsSpec, reserved_blocks: int
) -> VariantPlan:
    """Targets mode: the plan from what a running server reports (None where it does not)."""
    from service.kv.geometry import blocks_for_tokens
    from service.kv.planner import kind

    info = check.get("info") or {}
    block = int(info.get("block_size") or spec.engine.block_size)
    P, G = spec.workload.input_tokens, spec.workload.output_tokens
    tokens = kv_tokens_per_sequence(P, G)
    per_seq = blocks_for_tokens(tokens, block)
    engine_blocks = int(check["kv_blocks"]) if check.get("kv_blocks") is not None else None
    usable = max(engine_blocks - reserved_blocks, 0) if engine_blocks is not None else None
    kvb = int(check["kv_bytes_per_token"]) if check.get("kv_bytes_per_token") else None
    q = int(info["query_heads"]) if info.get("query_heads") else None
    kv = int(info["kv_heads"]) if info.get("kv_heads") else None
    return VariantPlan(
        name=name,
        model=model,
        kind=kind(q, kv) if q and kv else None,
        kv_heads=kv,
        query_heads=q,
        layers=int(info["layers"]) if info.get("layers") else None,
        head_size=int(info["head_size"]) if info.get("head_size") else None,
        block_size=block,
        kv_bytes_per_token=kvb,
        kv_bytes_per_block=kvb * block if kvb else None,
        budget_bytes=usable * kvb * block if usable is not None and kvb else None,
        num_blocks=usable,
        engine_blocks=engine_blocks,
        reserved_blocks=reserved_blocks,
        kv_tokens_per_seq=tokens,
        blocks_per_seq=per_seq,
        admission_blocks_per_seq=blocks_for_tokens(P, block),
        predicted_max_seqs=usable / per_seq if usable is not None else None,
        predicted_running=usable // per_seq if usable is not None else None,
    )


def build_prompts(spec: KvHeadsSpec, tokenizer: TokenizerLike) -> tuple[list[Prompt], list[list[Prompt]]]:
    """(warm-up prompts, one list per step): the same for every variant, a function of the seed."""
    w, load = spec.workload, spec.load
    workload = Workload(
        input_tokens=TokenRange(low=w.input_tokens, high=w.input_tokens),
        output_tokens=TokenRange(low=w.output_tokens, high=w.output_tokens),
    )
    warm = build_workload(workload, w.endpoint, load.warmup_requests, np.random.default_rng([load.seed, 99]), tokenizer)
    steps = [
        build_workload(
            workload, w.endpoint, load.requests_for(c), np.random.default_rng([load.seed, i]), tokenizer
        )
        for i, c in enumerate(load.concurrency)
    ]
    return (warm if load.warmup_requests else []), steps


def step_config(spec: KvHeadsSpec, base_url: str, model: str, label: str, concurrency: int, requests: int) -> RunConfig:
    w, load = spec.workload, spec.load
    return RunConfig(
        target=Target(
            base_url=base_url, model=model, endpoint=w.endpoint, scrape=True,
            scrape_interval_s=load.scrape_interval_s, request_timeout_s=load.request_timeout_s,
        ),
        workload=Workload(
            input_tokens=TokenRange(low=w.input_tokens, high=w.input_tokens),
            output_tokens=TokenRange(low=w.output_tokens, high=w.output_tokens),
            tokenizer=w.tokenizer, ignore_eos=True,
        ),
        load=Load(
            concurrency=[concurrency], num_requests=requests, duration_s=load.max_step_seconds,
            warmup_requests=0, seed=load.seed,
        ),
        output=Output(label=label, plots=False, progress=False),
    )  # fmt: skip


def _log(message: str) -> None:
    print(f"[kv-heads {datetime.now():%H:%M:%S}] {message}", flush=True)


async def sweep(
    spec: KvHeadsSpec,
    base_url: str,
    model: str,
    label: str,
    warm: list[Prompt],
    steps: list[list[Prompt]],
    tokenizer: TokenizerLike,
    argv: Sequence[str],
    watch: dict[str, list[int]] | None = None,
    own_root: int | None = None,
    wait_idle_s: float = 0.0,
    max_reruns: int = 2,
) -> RunResult:
    """Warm-up (discarded), then one closed-loop step per concurrency; one RunResult.

    ``watch`` (managed mode) collects the other vLLM engines seen before or after each
    step. With ``wait_idle_s`` > 0, each step first waits for them to end, and a step
    that saw one is discarded and run again (at most ``max_reruns`` times).
    """
    if warm:
        config = step_config(spec, base_url, model, label, min(2, len(warm)), len(warm))
        config.target.scrape = False
        await Runner(config, tokenizer=tokenizer, argv=argv).run(warm)
    results: list[StepResult] = []
    first_config: RunConfig | None = None
    t_first: float | None = None
    for index, (concurrency, prompts) in enumerate(zip(spec.load.concurrency, steps, strict=True)):
        config = step_config(spec, base_url, model, label, concurrency, len(prompts))
        first_config = first_config or config
        for attempt in range(max_reruns + 1):
            if watch is not None and wait_idle_s > 0:
                await asyncio.to_thread(wait_for_idle, wait_idle_s, 5.0, own_root)
            before = other_engines(own_root) if watch is not None else []
            t_call = time.perf_counter()
            t_first = t_first if t_first is not None else t_call
            run = await Runner(config, tokenizer=tokenizer, argv=argv).run(prompts)
            seen = sorted(set(before) | set(other_engines(own_root))) if watch is not None else []
            if not seen:
                break
            assert watch is not None
            rerun = wait_idle_s > 0 and attempt < max_reruns
            watch[f"c={concurrency} attempt {attempt + 1} ({'discarded, re-run' if rerun else 'kept'})"] = seen
            _log(f"warning: other vLLM engines {seen} ran around step c={concurrency}"
                 + ("; running it again once they end" if rerun else "; keeping it"))  # fmt: skip
            if not rerun:
                break
        step = run.steps[0]
        results.append(step.model_copy(update={"index": index, "offset_s": (t_call - t_first) + step.offset_s}))
        s, v = step.summary, step.server
        _log(
            f"{label} c={concurrency}: {s.completed}/{s.completed + s.failed} ok in {s.duration_s:.1f} s, "
            f"{s.output_throughput:.1f} out tok/s, TTFT p50 {1000 * (s.ttft_s.p50 or 0):.0f} ms, "
            f"running peak {v.running_peak if v else None}, median while waiting "
            f"{v.running_median_while_waiting if v else None}, preemptions {v.preemptions if v else None}"
        )
    assert first_config is not None
    config = first_config.model_copy(deep=True)
    config.load = Load(
        concurrency=list(spec.load.concurrency), num_requests=max(len(p) for p in steps),
        duration_s=spec.load.max_step_seconds, warmup_requests=len(warm), seed=spec.load.seed,
    )  # fmt: skip
    return RunResult(
        label=label,
        created_at=now_iso(),
        config=config,
        environment=environment(list(argv)),
        warmup={"requests": len(warm), "failed": 0},
        steps=results,
    )


def run_managed(
    spec: KvHeadsSpec, argv: Sequence[str], log_dir: Path, dry_run: bool = False, wait_idle_s: float = 0.0
) -> KvHeadsResult:
    budget, plans = plan_variants(spec)
    errors, warnings = check_plan(spec, plans)
    for p in plans:
        _log(
            f"{p.name}: {p.kind}, {p.kv_bytes_per_token:,} B/token, {p.num_blocks} blocks "
            f"(+{p.reserved_blocks} reserved) of {p.kv_bytes_per_block:,} B = {budget:,} B, "
            f"{p.blocks_per_seq} block(s)/sequence -> predicted {p.predicted_running} running"
        )
    for w in warnings:
        _log(f"warning: {w}")
    if errors:
        raise ValueError("; ".join(errors))
    result = KvHeadsResult(
        command=command_line(argv), mode="managed", created_at=now_iso(), spec=spec, budget_bytes=budget,
        warnings=warnings, environment=environment(list(argv)),
        variants=[VariantRun(plan=p) for p in plans],
    )  # fmt: skip
    if dry_run:
        for p, v in zip(plans, spec.variants, strict=True):
            _log("would run: " + shlex.join(serve_command(p, spec, 0, resolve(v.model))))
        return result
    tokenizer, warm, steps = _prompts(spec)
    t0 = time.monotonic()
    for vrun, variant in zip(result.variants, spec.variants, strict=True):
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log_path = log_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', variant.name)}.log"
        gateway = Gateway(serve_command(vrun.plan, spec, port, resolve(variant.model)), log_path, base_url)
        vrun.base_url, vrun.served_model = base_url, variant.name
        vrun.log_file, vrun.started_at = str(log_path), now_iso()
        if wait_idle_s > 0:
            vrun.waited_for_idle_s = wait_for_idle(wait_idle_s)
        if others := other_engines():
            vrun.other_engines_seen["at engine start"] = others
            _log(f"warning: other vLLM engines are running: {others}")
        v0 = time.monotonic()
        _log(f"{variant.name}: starting {shlex.join(gateway.cmd)}")
        try:
            gateway.start(spec.engine.start_timeout_s)
            vrun.engine_start_s = gateway.start_s
            vrun.engine_check = engine_check(asyncio.run(scrape_once(base_url, variant.name)), vrun.plan)
            blocks = vrun.engine_check.get("kv_blocks")
            _log(f"{variant.name}: ready in {gateway.start_s:.1f} s; /metrics: {blocks} blocks")
            if vrun.engine_check.get("blocks_match") is False:
                result.warnings.append(f"{variant.name}: the engine has {vrun.engine_check.get('kv_blocks')} blocks, "
                                       f"the plan {vrun.plan.engine_blocks}")
            own = gateway.process.pid if gateway.process else None
            vrun.run = asyncio.run(
                sweep(
                    spec, base_url, variant.name, variant.name, warm, steps, tokenizer, argv,
                    vrun.other_engines_seen, own, wait_idle_s,
                )  # fmt: skip
            )
        except (RuntimeError, OSError, ValueError, aiohttp.ClientError) as exc:
            vrun.error = f"{type(exc).__name__}: {exc}"
            _log(f"{variant.name}: failed: {vrun.error}")
        finally:
            status = gateway.stop(spec.engine.stop_timeout_s)
            vrun.wall_s = time.monotonic() - v0
            if log_path.exists():
                vrun.log_summary = summarize_log(log_path.read_text(errors="replace"))
            _log(f"{variant.name}: stopped (status {status}) after {vrun.wall_s:.0f} s")
    result.wall_s = time.monotonic() - t0
    result.finished_at = now_iso()
    return result


def run_targets(spec: KvHeadsSpec, argv: Sequence[str]) -> KvHeadsResult:
    tokenizer, warm, steps = _prompts(spec)
    result = KvHeadsResult(
        command=command_line(argv), mode="targets", created_at=now_iso(), spec=spec,
        environment=environment(list(argv)), variants=[],
    )  # fmt: skip
    t0 = time.monotonic()
    for target in spec.targets:
        v0 = time.monotonic()
        model = target.model or asyncio.run(served_model_name(target.base_url)) or target.name
        check = engine_check(asyncio.run(scrape_once(target.base_url, model)), None)
        plan = plan_from_server(target.name, model, check, spec, spec.engine.reserved_blocks)
        vrun = VariantRun(
            plan=plan, base_url=target.base_url, served_model=model, engine_check=check, started_at=now_iso()
        )
        _log(f"{target.name}: {target.base_url} model {model}, {plan.num_blocks} usable blocks -> predicted "
             f"{plan.predicted_running} running")  # fmt: skip
        try:
            vrun.run = asyncio.run(sweep(spec, target.base_url, model, target.name, warm, steps, tokenizer, argv))
        except (RuntimeError, OSError, ValueError, aiohttp.ClientError) as exc:
            vrun.error = f"{type(exc).__name__}: {exc}"
            _log(f"{target.name}: failed: {vrun.error}")
        vrun.wall_s = time.monotonic() - v0
        result.variants.append(vrun)
    result.wall_s = time.monotonic() - t0
    result.finished_at = now_iso()
    return result


def _prompts(spec: KvHeadsSpec) -> tuple[TokenizerLike, list[Prompt], list[list[Prompt]]]:
    folder = spec.workload.tokenizer or (spec.variants[0].model if spec.variants else None)
    if folder is None:
        raise ValueError("targets mode needs a tokenizer (--tokenizer DIR or workload.tokenizer)")
    spec.workload.tokenizer = resolve(folder)
    tokenizer = load_tokenizer(spec.workload.tokenizer)
    warm, steps = build_prompts(spec, tokenizer)
    _log(f"built {len(warm)} warm-up and {sum(map(len, steps))} step prompts of {spec.workload.input_tokens} tokens")
    return tokenizer, warm, steps


def command_line(argv: Sequence[str]) -> str:
    return "python -m loadtest " + shlex.join(argv)


# ---------------------------------------------------------------- CLI
def parse_targets(text: str) -> list[TargetSpec]:
    """``name=url[,name=url...]``; a url may end in ``#model`` to name the served model."""
    targets = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ValueError(f"a target must look like name=http://host:port, got {item!r}")
        url, _, model = url.partition("#")
        targets.append(TargetSpec(name=name.strip(), base_url=url.strip(), model=model.strip() or None))
    return targets


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kv-heads",
        help="the KV-heads experiment: MHA/GQA/MQA under one KV byte budget (docs/results/kv-heads-cpu.md)",
    )
    p.add_argument("--config", type=Path, default=None, help=f"spec YAML (default {DEFAULT_CONFIG.relative_to(ROOT)})")
    p.add_argument("--variants", help="run only these variant names, e.g. MHA,MQA")
    p.add_argument("--targets", help="already running servers instead: name=url[#model],... (no engine is started)")
    p.add_argument("--tokenizer", type=Path, help="local HF tokenizer folder (default: the first variant's)")
    p.add_argument("--concurrency", help="sweep, e.g. 1,4,8,16,32,48")
    p.add_argument("--input-tokens", type=int)
    p.add_argument("--output-tokens", type=int)
    p.add_argument("--budget-blocks", type=int, help="budget = N blocks of the largest-KV variant")
    p.add_argument("--budget-bytes", type=int)
    p.add_argument("--waves", type=float, help="requests per step = waves x concurrency (>= min_requests)")
    p.add_argument("--max-step-seconds", type=float, help="no new request after this many seconds of a step")
    p.add_argument("--output-dir", type=Path, help="JSON + PNGs; the Markdown goes beside it as DIR.md")
    p.add_argument("--log-dir", type=Path, help="raw gateway logs (default: <output-dir>/logs)")
    p.add_argument("--keep-itl", action="store_true", help="keep per-request inter-token gaps in the JSON")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the gateway commands, start nothing")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each engine start, wait up to SECONDS while another vLLM engine runs here")
    p.add_argument("--report-only", type=Path, metavar="RESULT.json", help="rebuild the report from a result file")
    p.add_argument("--no-plots", action="store_true")


def spec_from_args(args: argparse.Namespace) -> KvHeadsSpec:
    spec = load_spec(args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() and not args.targets else None))
    if args.targets:
        spec.targets = parse_targets(args.targets)
        spec.variants = []
    if args.variants:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = set(names) - {v.name for v in spec.variants}
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; the spec has {[v.name for v in spec.variants]}")
        spec.variants = [v for v in spec.variants if v.name in names]
    if args.tokenizer:
        spec.workload.tokenizer = args.tokenizer
    if args.concurrency:
        spec.load.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    for flag, section, field in (
        ("input_tokens", spec.workload, "input_tokens"), ("output_tokens", spec.workload, "output_tokens"),
        ("waves", spec.load, "waves"), ("max_step_seconds", spec.load, "max_step_seconds"),
    ):  # fmt: skip
        if getattr(args, flag) is not None:
            setattr(section, field, getattr(args, flag))
    if args.budget_blocks is not None or args.budget_bytes is not None:
        spec.budget = BudgetSpec(blocks_of_largest=args.budget_blocks, bytes=args.budget_bytes)
    if args.output_dir:
        spec.output.dir = args.output_dir
    if args.log_dir:
        spec.output.log_dir = args.log_dir
    if args.keep_itl:
        spec.output.keep_itl = True
    spec = KvHeadsSpec.model_validate(spec.model_dump())  # re-validate the overrides
    if not spec.variants and not spec.targets:
        raise ValueError("nothing to run: the spec has no variants and no --targets were given")
    return spec


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from loadtest.kvheads_report import markdown_path, write_report

    if args.report_only:
        result = load_result(args.report_only)
        out_dir = args.output_dir or args.report_only.parent
        written = write_report(result, out_dir, plots=not args.no_plots)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    spec = spec_from_args(args)
    out_dir = spec.output.dir
    log_dir = spec.output.log_dir or out_dir / "logs"
    if spec.mode == "managed":
        result = run_managed(spec, argv, log_dir, dry_run=args.dry_run, wait_idle_s=args.wait_idle)
        if args.dry_run:
            return 0
    else:
        result = run_targets(spec, argv)
    if not spec.output.keep_itl:
        for v in result.variants:
            if v.run is not None:
                v.run = strip_itl(v.run)
    written = [save_result(result, out_dir / "result.json")]
    written += write_report(result, out_dir, plots=not args.no_plots)
    _log(f"done in {result.wall_s or 0:.0f} s; wrote " + ", ".join(str(p) for p in written))
    _log(f"report: {markdown_path(out_dir)}")
    failed = [v.plan.name for v in result.variants if v.error or v.run is None]
    return 1 if failed else 0
