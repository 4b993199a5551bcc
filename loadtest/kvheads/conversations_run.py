"""Running the conversation experiment: one gateway per variant in turn, the same sessions
for each, and the result document (``python -m loadtest kv-heads --conversations``)."""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

import numpy as np
from pydantic import Field

from loadtest.core.config import Load, Output, RunConfig, Target, TokenRange, Workload
from loadtest.core.results import Environment, RunResult, StepResult, environment, load_versioned, now_iso
from loadtest.core.sessions import Conversation
from loadtest.core.workload import TokenizerLike, load_tokenizer
from loadtest.kvheads.conversations import ConversationSpec, VariantPrediction, predict, prompt_tokens_by_turn
from loadtest.kvheads.plan import VariantPlan, check_plan, plan_variants, resolve
from loadtest.kvheads.procs import log, other_engines, serve_command
from loadtest.kvheads.result import ExperimentRun, VariantRun, strip_itl
from loadtest.kvheads.run import command_line, variant_gateway
from loadtest.kvheads.spec import KvHeadsSpec, WorkloadSpec
from loadtest.server.observed import ObservedRunner

SCHEMA_VERSION: Final = 1


class ConversationsResult(ExperimentRun):
    kind: Literal["kv-heads-conversations"] = "kv-heads-conversations"
    spec: ConversationSpec
    budget_bytes: int
    prompt_tokens_by_turn: list[float]
    shared_prefix_tokens: int
    predictions: list[VariantPrediction]
    warnings: list[str] = Field(default_factory=list)
    environment: Environment
    variants: list[VariantRun]


def load_conversations(path: Path) -> ConversationsResult:
    return load_versioned(path, ConversationsResult, SCHEMA_VERSION, "kv-heads-conversations",
                          "kv-heads conversations result (python -m loadtest kv-heads --conversations)")


def capacity_spec(spec: ConversationSpec, last_prompt: int) -> KvHeadsSpec:
    """The capacity experiment's spec for the same variants, budget and engine, with a
    sequence as long as a session's last turn: its plan gives each variant's blocks."""
    return KvHeadsSpec(
        variants=spec.variants, budget=spec.budget, engine=spec.engine,
        workload=WorkloadSpec(endpoint="chat", input_tokens=last_prompt, output_tokens=spec.workload.output_tokens,
                              tokenizer=spec.workload.tokenizer),
    )  # fmt: skip


def step_config(spec: ConversationSpec, base_url: str, model: str, label: str, concurrency: int, sessions: int) -> RunConfig:
    w, load = spec.workload, spec.load
    return RunConfig(
        target=Target(base_url=base_url, model=model, endpoint="chat", scrape=True,
                      scrape_interval_s=load.scrape_interval_s, request_timeout_s=load.request_timeout_s),
        workload=Workload(source="sessions", sessions=spec.sessions_spec(), tokenizer=w.tokenizer, ignore_eos=True,
                          output_tokens=TokenRange(low=w.output_tokens, high=w.output_tokens)),
        load=Load(concurrency=[concurrency], num_requests=sessions, warmup_requests=0, seed=load.seed),
        output=Output(label=label, plots=False, progress=False),
    )  # fmt: skip


async def sweep(spec: ConversationSpec, base_url: str, label: str, warm: list[Conversation],
                steps: list[list[Conversation]], tokenizer: TokenizerLike, argv: Sequence[str]) -> RunResult:  # fmt: skip
    """Warm-up sessions (discarded), then one step per concurrency; one RunResult."""
    if warm:
        config = step_config(spec, base_url, label, label, 1, len(warm))
        config.target.scrape = config.target.request_metrics = False
        await ObservedRunner(config, tokenizer=tokenizer, argv=argv).run_conversations(warm)
    results: list[StepResult] = []
    t_first: float | None = None
    for index, (c, conversations) in enumerate(zip(spec.load.concurrency, steps, strict=True)):
        t_call = time.perf_counter()
        t_first = t_first if t_first is not None else t_call
        config = step_config(spec, base_url, label, label, c, len(conversations))
        run = await ObservedRunner(config, tokenizer=tokenizer, argv=argv).run_conversations(conversations)
        step = run.steps[0]
        results.append(step.model_copy(update={"index": index, "offset_s": (t_call - t_first) + step.offset_s}))
        v = step.server
        log(f"{label} C={c}: {step.summary.completed}/{len(step.requests)} turns ok in {step.summary.duration_s:.1f} s,"
            f" preemptions {v.preemptions if v else None}, join {run.request_metrics.status if run.request_metrics else None}")
    config = step_config(spec, base_url, label, label, spec.load.concurrency[0], len(steps[0]))
    config.load = Load(concurrency=list(spec.load.concurrency), num_requests=max(len(s) for s in steps),
                       warmup_requests=len(warm), seed=spec.load.seed)  # fmt: skip
    return RunResult(label=label, created_at=now_iso(), config=config, environment=environment(list(argv)),
                     warmup={"requests": len(warm), "failed": 0}, steps=results)  # fmt: skip


def prepare(spec: ConversationSpec) -> tuple[TokenizerLike, list[Conversation], list[list[Conversation]], list[float], int]:
    folder = spec.workload.tokenizer or spec.variants[0].model
    spec.workload.tokenizer = resolve(folder)
    tokenizer = load_tokenizer(spec.workload.tokenizer)
    warm = spec.step_conversations(99, spec.load.warmup_sessions, tokenizer) if spec.load.warmup_sessions else []
    steps = [spec.step_conversations(i, spec.load.waves * c, tokenizer) for i, c in enumerate(spec.load.concurrency)]
    prompts, shared = prompt_tokens_by_turn(steps[-1], spec.workload.output_tokens, tokenizer,
                                            np.random.default_rng([spec.load.seed, 7]))  # fmt: skip
    return tokenizer, warm, steps, prompts, shared


def plan(spec: ConversationSpec, prompts: list[float], shared: int) -> tuple[int, list[VariantPlan], list[VariantPrediction], list[str]]:
    """(budget, plans, predictions, warnings); raises on a plan that cannot run."""
    kv_spec = capacity_spec(spec, int(round(max(prompts))))
    budget, plans = plan_variants(kv_spec)
    errors, warnings = check_plan(kv_spec, plans)
    if errors:
        raise ValueError("; ".join(errors))
    predictions = [
        predict(p.name, p.num_blocks or 0, p.kv_bytes_per_token or 0, p.block_size, prompts, shared,
                spec.workload.output_tokens, spec.load.concurrency)
        for p in plans
    ]  # fmt: skip
    return budget, plans, predictions, [w for w in warnings if "sweep's largest concurrency" not in w]


def run_conversations(spec: ConversationSpec, argv: Sequence[str], log_dir: Path, dry_run: bool = False) -> ConversationsResult:
    tokenizer, warm, steps, prompts, shared = prepare(spec)
    budget, plans, predictions, warnings = plan(spec, prompts, shared)
    for p, pred in zip(plans, predictions, strict=True):
        log(f"{p.name}: {p.kv_bytes_per_token:,} B/token, {p.num_blocks} usable blocks; a session ends at "
            f"{pred.turns[-1].blocks} blocks -> {pred.sessions_fit} sessions fit")
    log("prompt tokens by turn: " + ", ".join(f"{p:.0f}" for p in prompts))
    result = ConversationsResult(
        command=command_line(argv), created_at=now_iso(), spec=spec, budget_bytes=budget,
        prompt_tokens_by_turn=prompts, shared_prefix_tokens=shared, predictions=predictions, warnings=warnings,
        environment=environment(list(argv)), variants=[VariantRun(plan=p) for p in plans],
    )  # fmt: skip
    kv_spec = capacity_spec(spec, int(round(max(prompts))))
    if dry_run:
        for p, v in zip(plans, spec.variants, strict=True):
            log("would run: " + shlex.join(serve_command(p, kv_spec, 0, resolve(v.model))))
        return result
    t0 = time.monotonic()
    for vrun, variant in zip(result.variants, spec.variants, strict=True):
        with variant_gateway(vrun, variant, kv_spec, log_dir, result.warnings) as gateway:
            if gateway is None:
                continue
            vrun.run = strip_itl(asyncio.run(sweep(spec, gateway.base_url, variant.name, warm, steps, tokenizer, argv)))
            if others := other_engines(gateway.process.pid if gateway.process else None):
                vrun.other_engines_seen["at the end"] = others
    result.wall_s = time.monotonic() - t0
    result.finished_at = now_iso()
    return result
