"""Running the latency sweep: one gateway per variant (all up at once, so each point can
alternate the variants' order, or one at a time), one closed-loop step per point.

The gateways are the capacity experiment's (``procs.serve_command``: same engine flags,
``--num-gpu-blocks-override`` = usable blocks + the null block); the points, prompts and
predictions come from ``latency`` (pure). The result is one JSON document
(:class:`LatencyResult`) from which ``latency_report`` rebuilds its Markdown and PNG.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from pydantic import Field

from loadtest.core.config import Load, Output, RunConfig, Target, TokenRange, Workload
from loadtest.kvheads.latency import LatencySpec, Point, VariantModel, sweep_points, variant_model
from loadtest.kvheads.plan import ROOT, VariantPlan, budget_bytes_for, plan_variant, resolve
from loadtest.kvheads.procs import Gateway, log, other_engines, serve_command, summarize_log
from loadtest.kvheads.result import ExperimentRun, strip_itl
from loadtest.kvheads.run import engine_check, scrape_once
from loadtest.kvheads.spec import KvHeadsSpec, _Strict
from loadtest.core.results import Environment, RunResult, StepResult, environment, load_versioned, now_iso
from loadtest.server.observed import ObservedRunner
from loadtest.local.servers import free_port
from loadtest.core.workload import Prompt, TokenizerLike, build_workload, load_tokenizer
from service.kv import planner
from service.kv.geometry import geometry_from_model_dir
from service.kv.roofline import hardware_from_dict

SCHEMA_VERSION: Final = 1


class GatewayRun(_Strict):
    name: str
    plan: VariantPlan
    command: str
    base_url: str | None = None
    engine_start_s: float | None = None
    engine_check: dict[str, Any] = Field(default_factory=dict)
    log_summary: list[str] = Field(default_factory=list)
    error: str | None = None


class PointRun(_Strict):
    point: Point
    order: int  # position in the run (0-based): the alternation is visible in the JSON
    started_at: str
    other_engines: list[int] = Field(default_factory=list)  # other engines/load seen around the step
    step: StepResult | None = None
    error: str | None = None


class LatencyResult(ExperimentRun):
    kind: Literal["kv-heads-latency"] = "kv-heads-latency"
    spec: LatencySpec
    budget_bytes: int
    hardware: dict[str, Any]
    models: list[VariantModel]
    gateways: list[GatewayRun] = Field(default_factory=list)
    points: list[PointRun] = Field(default_factory=list)
    environment: Environment
    notes: list[str] = Field(default_factory=list)


def load_latency(path: Path) -> LatencyResult:
    return load_versioned(path, LatencyResult, SCHEMA_VERSION, "kv-heads-latency", "kv-heads latency result")


def prepare(spec: LatencySpec, argv: Sequence[str]) -> tuple[LatencyResult, list[VariantPlan]]:
    """Budget, each variant's model for the roofline, its engine plan, the points; no engine."""
    folders = [resolve(v.model) for v in spec.variants]
    geometries = [geometry_from_model_dir(f, block_size=spec.engine.block_size, dtype=spec.engine.dtype)
                  for f in folders]  # fmt: skip
    budget = budget_bytes_for(spec.budget, geometries)
    plans = [plan_variant(v.name, str(v.model), g, budget, spec.load.min_prompt_tokens, spec.output_tokens,
                          spec.engine.max_model_len, spec.engine.reserved_blocks)
             for v, g in zip(spec.variants, geometries, strict=True)]  # fmt: skip
    models = [variant_model(v.name, g, planner.load_shape(str(f)), p.num_blocks or 0)
              for v, g, f, p in zip(spec.variants, geometries, folders, plans, strict=True)]  # fmt: skip
    hw = json.loads(Path(resolve(spec.hardware)).read_text())
    hardware_from_dict(hw.get("hardware", {}))  # refuse a file that is not one
    result = LatencyResult(
        command="python -m loadtest " + shlex.join(argv), created_at=now_iso(), spec=spec, budget_bytes=budget,
        hardware={**hw["hardware"], "file": str(spec.hardware), "created_at": hw.get("created_at")},
        models=models, environment=environment(list(argv)),
    )  # fmt: skip
    return result, plans


def ordered_points(spec: LatencySpec, models: Sequence[VariantModel]) -> list[Point]:
    """The sweep's points; with ``order: alternate`` the variant order rotates from one
    (batch, prompt) group to the next, so no variant always runs first or last."""
    points = sweep_points([m.name for m in models], [m.usable_blocks for m in models], spec.engine.block_size,
                          spec.load, spec.output_tokens, spec.engine.max_model_len)  # fmt: skip
    if spec.load.order == "sequential":
        return sorted(points, key=lambda p: [m.name for m in models].index(p.variant))
    groups: dict[tuple[int, int], list[Point]] = {}
    for p in points:
        groups.setdefault((p.batch, p.prompt_tokens), []).append(p)
    out = []
    for i, group in enumerate(groups.values()):
        shift = i % len(group)
        out += group[shift:] + group[:shift]
    return out


def point_prompts(spec: LatencySpec, point: Point, tokenizer: TokenizerLike) -> list[Prompt]:
    """The same prompts for every variant at one (batch, prompt length): a function of the seed."""
    workload = Workload(input_tokens=TokenRange(low=point.prompt_tokens, high=point.prompt_tokens),
                        output_tokens=TokenRange(low=spec.output_tokens, high=spec.output_tokens))
    rng = np.random.default_rng([spec.load.seed, point.batch, point.prompt_tokens])
    return build_workload(workload, spec.endpoint, spec.load.requests_for(point.batch), rng, tokenizer)


def step_config(spec: LatencySpec, base_url: str, model: str, batch: int, requests: int) -> RunConfig:
    return RunConfig(
        target=Target(base_url=base_url, model=model, endpoint=spec.endpoint, scrape=True,
                      scrape_interval_s=spec.load.scrape_interval_s, request_timeout_s=spec.load.request_timeout_s),
        workload=Workload(input_tokens=TokenRange(low=1, high=1), tokenizer=spec.tokenizer, ignore_eos=True,
                          output_tokens=TokenRange(low=spec.output_tokens, high=spec.output_tokens)),
        load=Load(concurrency=[batch], num_requests=requests, warmup_requests=0, seed=spec.load.seed),
        output=Output(label=model, plots=False, progress=False),
    )  # fmt: skip


async def run_point(spec: LatencySpec, base_url: str, point: Point, prompts: list[Prompt],
                    tokenizer: TokenizerLike, argv: Sequence[str]) -> StepResult:
    config = step_config(spec, base_url, point.variant, point.batch, len(prompts))
    run: RunResult = await ObservedRunner(config, tokenizer=tokenizer, argv=argv).run(prompts)
    return strip_itl(run).steps[0]


async def warm_up(spec: LatencySpec, base_url: str, model: str, tokenizer: TokenizerLike, argv: Sequence[str]) -> None:
    if not spec.load.warmup_requests:
        return
    point = Point(variant=model, batch=1, prompt_tokens=spec.load.min_prompt_tokens, fills_cache=False)
    prompts = build_workload(
        Workload(input_tokens=TokenRange(low=point.prompt_tokens, high=point.prompt_tokens),
                 output_tokens=TokenRange(low=spec.output_tokens, high=spec.output_tokens)),
        spec.endpoint, spec.load.warmup_requests, np.random.default_rng([spec.load.seed, 99]), tokenizer)  # fmt: skip
    config = step_config(spec, base_url, model, 1, len(prompts))
    config.target.scrape = False
    await ObservedRunner(config, tokenizer=tokenizer, argv=argv).run(prompts)


def run_latency(spec: LatencySpec, argv: Sequence[str], log_dir: Path, dry_run: bool = False) -> LatencyResult:
    result, plans = prepare(spec, argv)
    points = ordered_points(spec, result.models)
    ports = {p.name: free_port() for p in plans}
    gateways: dict[str, Gateway] = {}
    for plan, variant in zip(plans, spec.variants, strict=True):
        cmd = serve_command(plan, KvHeadsSpec(engine=spec.engine), ports[plan.name], resolve(variant.model))
        gw = GatewayRun(name=plan.name, plan=plan, command=portable(cmd), base_url=f"http://127.0.0.1:{ports[plan.name]}")
        result.gateways.append(gw)
        path = log_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', plan.name)}.log"
        gateways[plan.name] = Gateway(cmd, path, gw.base_url or "")
        log(f"{plan.name}: {plan.num_blocks} usable blocks (+{plan.reserved_blocks}) of {plan.kv_bytes_per_block:,} B")
    for p in points:
        log(f"point: {p.variant} batch {p.batch} prompt {p.prompt_tokens}{' (fills its cache)' if p.fills_cache else ''}")
    if dry_run:
        for gw in result.gateways:
            log("would run: " + gw.command)
        return result
    tokenizer = load_tokenizer(resolve(spec.tokenizer or spec.variants[0].model))
    t0 = time.monotonic()
    try:
        if spec.load.order == "alternate":  # start them together: engine starts take minutes under load
            with ThreadPoolExecutor(max_workers=len(gateways)) as pool:
                list(pool.map(lambda name: _start(spec, result, gateways, name, tokenizer, argv), gateways))
        current: str | None = None
        for order, point in enumerate(points):
            if spec.load.order == "sequential" and point.variant != current:
                if current is not None:
                    _stop(result, gateways, current)
                _start(spec, result, gateways, point.variant, tokenizer, argv)
                current = point.variant
            _measure(spec, result, gateways, point, order, tokenizer, argv)
    finally:
        for name in gateways:
            _stop(result, gateways, name)
    result.wall_s = time.monotonic() - t0
    result.finished_at = now_iso()
    return result


def portable(cmd: Sequence[str]) -> str:
    """The command as the result file keeps it: ``python`` for this interpreter and paths under the
    project relative to it, so no machine path lands in a committed result."""
    out = ["python" if i == 0 else arg for i, arg in enumerate(cmd)]
    for i, arg in enumerate(out):
        path = Path(arg)
        if path.is_absolute() and path.is_relative_to(ROOT):
            out[i] = str(path.relative_to(ROOT))
    return shlex.join(out)


def _gw(result: LatencyResult, name: str) -> GatewayRun:
    return next(g for g in result.gateways if g.name == name)


def _start(spec: LatencySpec, result: LatencyResult, gateways: dict[str, Gateway], name: str,
           tokenizer: TokenizerLike, argv: Sequence[str]) -> None:
    gw, proc = _gw(result, name), gateways[name]
    log(f"{name}: starting {gw.command}")
    try:
        proc.start(spec.engine.start_timeout_s)
        gw.engine_start_s = proc.start_s
        gw.engine_check = engine_check(asyncio.run(scrape_once(proc.base_url, name)), gw.plan)
        log(f"{name}: ready in {proc.start_s:.1f} s; /metrics: {gw.engine_check.get('kv_blocks')} blocks")
        asyncio.run(warm_up(spec, proc.base_url, name, tokenizer, argv))
    except (RuntimeError, OSError, ValueError) as exc:
        gw.error = f"{type(exc).__name__}: {exc}"
        log(f"{name}: failed: {gw.error}")


def _stop(result: LatencyResult, gateways: dict[str, Gateway], name: str) -> None:
    proc = gateways[name]
    if proc.process is None:
        return
    status = proc.stop(result.spec.engine.stop_timeout_s)
    if proc.log_path.exists():
        _gw(result, name).log_summary = summarize_log(proc.log_path.read_text(errors="replace"))
    log(f"{name}: stopped (status {status})")


def _measure(spec: LatencySpec, result: LatencyResult, gateways: dict[str, Gateway], point: Point, order: int,
             tokenizer: TokenizerLike, argv: Sequence[str]) -> None:
    gw = _gw(result, point.variant)
    run = PointRun(point=point, order=order, started_at=now_iso())
    result.points.append(run)
    if gw.error:
        run.error = f"gateway: {gw.error}"
        return
    own = [g.process.pid for g in gateways.values() if g.process is not None]
    before = _others(own)
    try:
        run.step = asyncio.run(run_point(spec, gateways[point.variant].base_url, point,
                                         point_prompts(spec, point, tokenizer), tokenizer, argv))  # fmt: skip
    except (RuntimeError, OSError, ValueError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    run.other_engines = sorted(set(before) | set(_others(own)))
    s = run.step.summary if run.step else None
    log(f"{point.variant} b={point.batch} P={point.prompt_tokens}: "
        + (f"TPOT p50 {1000 * (s.tpot_s.p50 or 0):.1f} ms, ITL p50 {1000 * (s.itl_s.p50 or 0):.1f} ms, "
           f"TTFT max {(s.ttft_s.max or 0):.2f} s, {s.completed}/{s.completed + s.failed} ok" if s else run.error or "")
        + (f"; other engines/load seen: {run.other_engines}" if run.other_engines else ""))  # fmt: skip


def _others(own: Sequence[int]) -> list[int]:
    """Other engines, servers and load generators on the machine (none of our gateways' trees)."""
    found = set(other_engines())
    for pid in own:
        found &= set(other_engines(pid))
    return sorted(found)
