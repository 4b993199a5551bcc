"""Running the experiment: managed (one gateway per variant in turn) or against targets."""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from loadtest.core.client import api_root
from loadtest.core.config import Load, Output, RunConfig, Target, TokenRange, Workload
from loadtest.kvheads.plan import VariantPlan, check_plan, plan_from_server, plan_variants, resolve
from loadtest.kvheads.procs import Gateway, log, other_engines, serve_command, summarize_log, wait_for_idle
from loadtest.kvheads.result import KvHeadsResult, VariantRun
from loadtest.kvheads.spec import KvHeadsSpec, VariantSpec
from loadtest.core.results import RunResult, StepResult, environment, now_iso
from loadtest.server.observed import ObservedRunner
from loadtest.server.scrape import Scraper, Snapshot
from loadtest.local.servers import free_port
from loadtest.core.workload import Prompt, TokenizerLike, build_workload, load_tokenizer


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
        await ObservedRunner(config, tokenizer=tokenizer, argv=argv).run(warm)
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
            run = await ObservedRunner(config, tokenizer=tokenizer, argv=argv).run(prompts)
            seen = sorted(set(before) | set(other_engines(own_root))) if watch is not None else []
            if not seen:
                break
            assert watch is not None
            rerun = wait_idle_s > 0 and attempt < max_reruns
            watch[f"c={concurrency} attempt {attempt + 1} ({'discarded, re-run' if rerun else 'kept'})"] = seen
            log(f"warning: other vLLM engines {seen} ran around step c={concurrency}"
                 + ("; running it again once they end" if rerun else "; keeping it"))  # fmt: skip
            if not rerun:
                break
        step = run.steps[0]
        results.append(step.model_copy(update={"index": index, "offset_s": (t_call - t_first) + step.offset_s}))
        s, v = step.summary, step.server
        log(
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


@contextmanager
def variant_gateway(
    vrun: VariantRun, variant: VariantSpec, spec: KvHeadsSpec, log_dir: Path, warnings: list[str],
    wait_idle_s: float = 0.0,
) -> Iterator[Gateway | None]:
    """The variant's gateway on a free port for the body of the ``with`` (None when it did not
    start): its start, engine check, other engines, failure (of the start or the body), stop
    and log summary go into ``vrun``; a failure is recorded, not raised."""
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
        log(f"warning: other vLLM engines are running: {others}")
    v0 = time.monotonic()
    log(f"{variant.name}: starting {shlex.join(gateway.cmd)}")
    started = False
    try:
        gateway.start(spec.engine.start_timeout_s)
        vrun.engine_start_s = gateway.start_s
        vrun.engine_check = engine_check(asyncio.run(scrape_once(base_url, variant.name)), vrun.plan)
        blocks = vrun.engine_check.get("kv_blocks")
        log(f"{variant.name}: ready in {gateway.start_s:.1f} s; /metrics: {blocks} blocks")
        if vrun.engine_check.get("blocks_match") is False:
            warnings.append(f"{variant.name}: the engine has {vrun.engine_check.get('kv_blocks')} blocks, "
                            f"the plan {vrun.plan.engine_blocks}")
        started = True
    except (RuntimeError, OSError, ValueError, aiohttp.ClientError) as exc:
        vrun.error = f"{type(exc).__name__}: {exc}"
        log(f"{variant.name}: failed to start: {vrun.error}")
    try:
        yield gateway if started else None
    except (RuntimeError, OSError, ValueError, aiohttp.ClientError) as exc:
        vrun.error = f"{type(exc).__name__}: {exc}"
        log(f"{variant.name}: failed: {vrun.error}")
    finally:
        status = gateway.stop(spec.engine.stop_timeout_s)
        vrun.wall_s = time.monotonic() - v0
        if log_path.exists():
            vrun.log_summary = summarize_log(log_path.read_text(errors="replace"))
        log(f"{variant.name}: stopped (status {status}) after {vrun.wall_s:.0f} s")


def run_managed(
    spec: KvHeadsSpec, argv: Sequence[str], log_dir: Path, dry_run: bool = False, wait_idle_s: float = 0.0
) -> KvHeadsResult:
    budget, plans = plan_variants(spec)
    errors, warnings = check_plan(spec, plans)
    for p in plans:
        log(
            f"{p.name}: {p.kind}, {p.kv_bytes_per_token:,} B/token, {p.num_blocks} blocks "
            f"(+{p.reserved_blocks} reserved) of {p.kv_bytes_per_block:,} B = {budget:,} B, "
            f"{p.blocks_per_seq} block(s)/sequence -> predicted {p.predicted_running} running"
        )
    for w in warnings:
        log(f"warning: {w}")
    if errors:
        raise ValueError("; ".join(errors))
    result = KvHeadsResult(
        command=command_line(argv), mode="managed", created_at=now_iso(), spec=spec, budget_bytes=budget,
        warnings=warnings, environment=environment(list(argv)),
        variants=[VariantRun(plan=p) for p in plans],
    )  # fmt: skip
    if dry_run:
        for p, v in zip(plans, spec.variants, strict=True):
            log("would run: " + shlex.join(serve_command(p, spec, 0, resolve(v.model))))
        return result
    tokenizer, warm, steps = _prompts(spec)
    t0 = time.monotonic()
    for vrun, variant in zip(result.variants, spec.variants, strict=True):
        with variant_gateway(vrun, variant, spec, log_dir, result.warnings, wait_idle_s) as gateway:
            if gateway is None:
                continue
            own = gateway.process.pid if gateway.process else None
            vrun.run = asyncio.run(
                sweep(
                    spec, gateway.base_url, variant.name, variant.name, warm, steps, tokenizer, argv,
                    vrun.other_engines_seen, own, wait_idle_s,
                )  # fmt: skip
            )
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
        log(f"{target.name}: {target.base_url} model {model}, {plan.num_blocks} usable blocks -> predicted "
             f"{plan.predicted_running} running")  # fmt: skip
        try:
            vrun.run = asyncio.run(sweep(spec, target.base_url, model, target.name, warm, steps, tokenizer, argv))
        except (RuntimeError, OSError, ValueError, aiohttp.ClientError) as exc:
            vrun.error = f"{type(exc).__name__}: {exc}"
            log(f"{target.name}: failed: {vrun.error}")
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
    log(f"built {len(warm)} warm-up and {sum(map(len, steps))} step prompts of {spec.workload.input_tokens} tokens")
    return tokenizer, warm, steps


def command_line(argv: Sequence[str]) -> str:
    return "python -m loadtest " + shlex.join(argv)

