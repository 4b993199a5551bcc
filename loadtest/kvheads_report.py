"""Report of the KV-heads experiment: Markdown + PNGs, rebuilt from the JSON alone.

``write_report(result, DIR)`` writes ``DIR/*.png`` and ``DIR.md`` beside the folder
(e.g. ``docs/results/kv-heads-cpu/`` and ``docs/results/kv-heads-cpu.md``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadtest.kvheads import KvHeadsResult, Measured, VariantRun, measure, ratios, waiting_fraction, within
from loadtest.results import StepResult

GIB = 2**30
# (model id in configs/model-shapes.yaml, short name) of the GPU comparison
GPU_MODELS = (
    ("meta-llama/Llama-2-7b-chat-hf", "Llama-2-7B"),
    ("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B"),
    ("tiiuae/falcon-7b-instruct", "Falcon-7B"),
)
GPU_MEMORY_GIB = 80.0
GPU_UTILIZATION = 0.9
GPU_BLOCK = 16
GPU_SEQ_LEN = 2048


def markdown_path(out_dir: Path) -> Path:
    """``DIR.md`` beside the asset folder ``DIR``."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.md"


def _num(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:,.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _runs(result: KvHeadsResult) -> list[tuple[VariantRun, Measured | None]]:
    fraction = result.spec.criteria.saturation_fraction
    return [(v, measure(v.run, fraction) if v.run is not None else None) for v in result.variants]


def pooled_mean(v: VariantRun, name: str) -> float | None:
    """Count-weighted mean of a per-request server histogram over every step of a variant."""
    if v.run is None:
        return None
    total = count = 0.0
    for step in v.run.steps:
        h = step.server.per_request.get(name) if step.server else None
        if h is not None and h.mean is not None and h.count:
            total += h.mean * h.count
            count += h.count
    return total / count if count else None


def _heads(n: int | None) -> str:
    return "? KV heads" if n is None else f"{n} KV head{'' if n == 1 else 's'}"


def _mib(value: float | None) -> str:
    return _num(None if value is None else value / 2**20, 2)


# ---------------------------------------------------------------- GPU planner tables
def gpu_plan(seq_len: int = GPU_SEQ_LEN, gpu_gib: float = GPU_MEMORY_GIB) -> list[dict[str, Any]]:
    """Published models on one GPU: weights, KV budget, tokens and sequences (service.kv.planner)."""
    from service.kv import planner

    out = []
    for model, short in GPU_MODELS:
        g, cfg = planner.geometry_for(model, GPU_BLOCK, "auto", "bfloat16")
        weights = planner.weights_bytes(cfg, 2)
        budget = planner.budget_bytes(
            kv_cache_gib=None, gpu_memory_gib=gpu_gib, gpu_memory_utilization=GPU_UTILIZATION, weights=weights
        )
        max_len = int(cfg.get("max_position_embeddings", seq_len))
        row = planner.plan(g, budget, seq_len, max_len, kv_heads=[g.kv_heads])[0]
        out.append({"name": short, "row": row, "geometry": g, "weights": weights, "budget": budget})
    return out


def gpu_rows(plans: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            p["name"], p["row"].kind, f"{p['geometry'].query_heads} / {p['geometry'].kv_heads}",
            f"{p['row'].kv_bytes_per_token:,}", f"{p['weights'] / GIB:.1f}", f"{p['budget'] / GIB:.1f}",
            f"{p['row'].tokens:,}", f"{p['row'].max_seqs:,.0f}",
        ]
        for p in plans
    ]  # fmt: skip


def sibling_rows(model: str = "meta-llama/Llama-3.1-8B-Instruct", seq_len: int = GPU_SEQ_LEN) -> list[list[str]]:
    """One model's MHA/GQA/MQA siblings on the same card and budget (only KV heads differ)."""
    from service.kv import planner

    g, cfg = planner.geometry_for(model, GPU_BLOCK, "auto", "bfloat16")
    weights = planner.weights_bytes(cfg, 2)
    budget = planner.budget_bytes(
        kv_cache_gib=None, gpu_memory_gib=GPU_MEMORY_GIB, gpu_memory_utilization=GPU_UTILIZATION, weights=weights
    )
    rows = planner.plan(g, budget, seq_len, seq_len, kv_heads=[g.query_heads, g.kv_heads, 1])
    return [
        [r.kind, str(r.kv_heads), f"{r.kv_bytes_per_token:,}", f"{r.tokens:,}", f"{r.max_seqs:,.0f}"] for r in rows
    ]


# ---------------------------------------------------------------- Markdown
def _setup(result: KvHeadsResult) -> list[str]:
    s = result.spec
    w, e, load = s.workload, s.engine, s.load
    rows = []
    for v in result.variants:
        p = v.plan
        rows.append([
            p.name, p.kind or "-", f"`{p.model}`", _num(p.kv_heads, 0) if p.kv_heads else "-",
            _num(p.kv_bytes_per_token, 0), _num(p.kv_bytes_per_block, 0),
            f"{p.num_blocks} + {p.reserved_blocks}" if p.num_blocks is not None else "-",
            _num(p.budget_bytes, 0), _num(v.engine_check.get("kv_blocks"), 0),
        ])  # fmt: skip
    steps = ", ".join(f"{c} ({load.requests_for(c)} req)" for c in load.concurrency)
    lines = [
        "## Setup",
        "",
        *_table(
            ("variant", "kind", "model", "KV heads", "KV B/token", "KV B/block", "blocks (usable + null)",
             "usable KV bytes", "engine blocks (/metrics)"),
            rows,
        ),  # fmt: skip
        "",
        f"- Workload: random prompts of exactly {w.input_tokens} tokens, {w.output_tokens} output tokens "
        f"(`ignore_eos`), `{w.endpoint}` endpoint; the same prompts for every variant (seed {load.seed}).",
        f"- Closed loop, one step per concurrency (requests per step): {steps}; no new request after "
        f"{_num(load.max_step_seconds, 0)} s of a step; {load.warmup_requests} warm-up requests per variant; "
        f"`/metrics` scraped every {load.scrape_interval_s:g} s.",
        f"- Engine limits, identical for every variant: block size {e.block_size}, max_model_len {e.max_model_len}, "
        f"max_num_seqs {e.max_num_seqs}, prefix caching {'on' if e.enable_prefix_caching else 'off'}, "
        f"{'eager' if e.enforce_eager else 'compiled'}, dtype {e.dtype}"
        + (f", max_num_batched_tokens {e.max_num_batched_tokens}" if e.max_num_batched_tokens else "")
        + ".",
    ]
    if result.mode == "managed" and result.variants:
        p = result.variants[0].plan
        lines.append(
            f"- Each sequence ends holding P + G - 1 = {p.kv_tokens_per_seq} KV tokens = {p.blocks_per_seq} "
            f"block(s) of {p.block_size}, and is admitted with {p.admission_blocks_per_seq} block(s)"
            + (
                ": it never grows past its admission, so the running batch is exactly the number of "
                "usable blocks divided by the blocks per sequence."
                if not p.grows_after_admission
                else ": it grows after admission, so expect over-admission and preemptions."
            )
        )
        lines.append(
            f"- Budget: {_num(result.budget_bytes, 0)} bytes of usable KV per variant "
            f"({result.spec.budget.blocks_of_largest or '-'} blocks of the largest-KV variant). vLLM v1 keeps "
            f"{p.reserved_blocks} block of every pool as its null block (it never holds KV), so each engine gets "
            "`--num-gpu-blocks-override` = usable blocks + that block."
        )
    for warning in result.warnings:
        lines.append(f"- Warning: {warning}")
    return lines


def _capacity(result: KvHeadsResult, runs: list[tuple[VariantRun, Measured | None]]) -> list[str]:
    tol = result.spec.criteria.tolerance
    rows = []
    for v, m in runs:
        p = v.plan
        sus = m.sustained if m else None
        ok = within(sus.median if sus else None, p.predicted_running, tol)
        rows.append([
            p.name, _num(p.predicted_max_seqs, 1), _num(p.predicted_running, 0),
            _num(sus.median if sus else None, 1), _num(sus.mode if sus else None, 0),
            _num(m.running_peak if m else None, 0), str(sus.samples if sus else 0),
            ", ".join(map(str, m.saturated_concurrencies)) if m and m.saturated_concurrencies else "none",
            _num(m.preemptions if m else None, 0),
            "-" if ok is None else ("yes" if ok else "**no**"),
        ])  # fmt: skip
    predicted = [v.plan.predicted_running for v, _ in runs]
    measured = [m.sustained.median if m else None for _, m in runs]
    names = ":".join(v.plan.name for v, _ in runs)

    def fmt(values: list[float | None]) -> str:
        return " : ".join("-" if r is None else f"{r:.2f}" for r in ratios(values))

    return [
        "## Predicted vs measured maximum concurrent running requests",
        "",
        "Predicted: `service.kv.planner.plan` on the usable blocks (blocks / blocks per sequence; whole "
        "sequences = its floor). Measured: the sustained running batch under saturation = median (and mode) "
        "of `gateway_requests_running` over the scrapes that saw waiting requests, pooled over the "
        f"saturated steps (waiting > 0 in at least {result.spec.criteria.saturation_fraction:.0%} of the "
        "step's scrapes). Peak running and preemptions over the whole sweep beside it.",
        "",
        *_table(
            ("variant", "planner max seqs", "predicted running", "measured median", "mode", "peak",
             "samples", "saturated at concurrency", "preemptions", f"within {tol:.0%}"),
            rows,
        ),  # fmt: skip
        "",
        f"Capacity ratio {names}: predicted {fmt(predicted)}, measured {fmt(measured)}.",
    ] + _gateway_gauge_note(runs)


def _gateway_gauge_note(runs: list[tuple[VariantRun, Measured | None]]) -> list[str]:
    """What the gateway's own capacity gauge said, beside the experiment's prediction."""
    read = []
    for v, _ in runs:
        last = v.run.steps[-1].server if v.run and v.run.steps else None
        value = last.predicted_max_concurrency_mean_request if last else None
        if value is not None:
            read.append((v.plan, value))
    if not read:
        return []
    figures = ", ".join(f"{p.name} {value:g}" for p, value in read)
    off = [p for p, value in read if p.engine_blocks is not None and p.num_blocks is not None
           and p.engine_blocks != p.num_blocks and value == p.engine_blocks / p.blocks_per_seq]  # fmt: skip
    return [
        "",
        f"For comparison, the gateway's own gauge `gateway_predicted_max_concurrency{{basis=\"mean_request\"}}` "
        f"read {figures} at the end of the sweep"
        + (
            ": it divides every engine block, vLLM's null block included, so it is one sequence too high here "
            "(negligible on a GPU with thousands of blocks)."
            if off
            else "."
        ),
    ]


def _steps(runs: list[tuple[VariantRun, Measured | None]]) -> list[str]:
    rows = []
    for v, _ in runs:
        if v.run is None:
            continue
        for step in v.run.steps:
            s, srv = step.summary, step.server
            rows.append([
                v.plan.name, str(step.concurrency), f"{s.completed}/{s.completed + s.failed}", _num(s.duration_s),
                _num(s.request_throughput, 2), _num(s.output_throughput),
                _num(s.ttft_s.p50, 0, 1000), _num(s.ttft_s.p99, 0, 1000), _num(s.tpot_s.p50, 1, 1000),
                _num(srv.running_mean if srv else None), _num(srv.running_median_while_waiting if srv else None),
                _num(srv.running_peak if srv else None, 0), _num(srv.waiting_peak if srv else None, 0),
                f"{waiting_fraction(step):.0%}", _num(srv.preemptions if srv else None, 0),
                _num(100 * srv.kv_usage_peak if srv and srv.kv_usage_peak is not None else None, 0),
            ])  # fmt: skip
    return [
        "## Every step",
        "",
        "Client side (vLLM benchmark definitions, docs/loadtest.md): TTFT = send -> first content chunk; "
        "TPOT = (E2E - TTFT) / (output tokens - 1) per request; throughput = tokens / step duration. "
        "Server side from `/metrics`: running mean over the step, running median while requests wait, peaks, "
        "share of scrapes with a queue, preemptions (counter delta), peak KV usage.",
        "",
        *_table(
            ("variant", "concurrency", "ok/sent", "duration s", "req/s", "out tok/s", "TTFT p50 ms",
             "TTFT p99 ms", "TPOT p50 ms", "running mean", "running median while waiting", "running peak",
             "waiting peak", "scrapes with queue", "preemptions", "KV peak %"),
            rows,
        ),  # fmt: skip
    ]


def _onsets(result: KvHeadsResult, runs: list[tuple[VariantRun, Measured | None]]) -> list[str]:
    rows = []
    for v, m in runs:
        if v.run is None or m is None:
            continue
        steps = sorted(v.run.steps, key=lambda s: s.x)
        service = steps[0].summary.e2e_s.p50 if steps else None
        jump = next(
            (int(s.x) for s in steps if service and s.summary.ttft_s.p99 and s.summary.ttft_s.p99 > service), None
        )
        rows.append([
            v.plan.name, _num(v.plan.predicted_running, 0), str(m.queueing_from or "never"),
            str(jump or "never"), str(m.preemptions_from or "never"),
        ])  # fmt: skip
    return [
        "## Where queueing and preemption start",
        "",
        "First swept concurrency at which the queue is sustained (saturated step), at which TTFT p99 exceeds "
        "the whole E2E latency of a request at the lowest concurrency (some request waited for a running one "
        "to finish), and at which the engine preempted a request. Below capacity TTFT grows too, but "
        "gradually: more prompts are prefilled together and decode steps get longer with the batch.",
        "",
        *_table(
            ("variant", "predicted capacity", "sustained queue from", "TTFT p99 > one request's E2E from",
             "preemptions from"),
            rows,
        ),  # fmt: skip
    ]


def _kv_and_attention(runs: list[tuple[VariantRun, Measured | None]]) -> list[str]:
    rows = []
    reads = []
    for v, _ in runs:
        kv_used = pooled_mean(v, "kv_used_bytes")
        kv_alloc = pooled_mean(v, "kv_allocated_bytes")
        kv_mha = pooled_mean(v, "kv_mha_equivalent_bytes")
        prefill = pooled_mean(v, "attention_flops_prefill")
        decode = pooled_mean(v, "attention_flops_decode")
        read = pooled_mean(v, "kv_read_bytes")
        reads.append(read)
        intensity = (decode / read) if decode and read else None
        rows.append([
            v.plan.name, _num(v.plan.kv_heads, 0) if v.plan.kv_heads else "-", _mib(kv_used), _mib(kv_alloc),
            _mib(kv_mha), _num(None if prefill is None else prefill / 1e9, 3),
            _num(None if decode is None else decode / 1e9, 3), _mib(read), _num(intensity, 2),
        ])  # fmt: skip
    rel = ratios(reads)
    return [
        "## KV bytes and attention work per request",
        "",
        "Means over every request of the sweep, from the gateway's per-request histograms "
        "(`gateway_request_kv_used_bytes`, `_kv_allocated_bytes`, `_kv_mha_equivalent_bytes`, "
        "`gateway_request_attention_flops{phase}`, `gateway_request_kv_read_bytes`; formulas in "
        "docs/metrics.md). KV bytes per request and decode KV bytes read scale with the KV heads; attention "
        "FLOPs do not (every query head still attends to every context token).",
        "",
        *_table(
            ("variant", "KV heads", "KV used MiB/req", "KV allocated MiB/req", "MHA-equivalent MiB/req",
             "prefill attn GFLOP/req", "decode attn GFLOP/req", "decode KV read MiB/req",
             "decode FLOP per KV byte read"),
            rows,
        ),  # fmt: skip
        "",
        "Decode KV bytes read relative to the first variant: "
        + " : ".join("-" if r is None else f"{r:.3f}" for r in rel)
        + ".",
    ]


def _explain(result: KvHeadsResult, runs: list[tuple[VariantRun, Measured | None]]) -> list[str]:
    lines = ["## Explain it", ""]
    done = [(v, m) for v, m in runs if v.run is not None and m is not None]
    if done:
        first = done[0][0].plan
        parts = []
        for v, m in done:
            p = v.plan
            top = max(v.run.steps, key=lambda s: s.x) if v.run and v.run.steps else None
            ttft = top.summary.ttft_s.p50 if top else None
            parts.append(
                f"{p.name} ({_heads(p.kv_heads)}, {p.kv_bytes_per_token:,} B/token) holds "
                f"{_num(p.predicted_running, 0)} one-block sequences and ran a sustained "
                f"{_num(m.sustained.median, 1)} under saturation"
                + (f"; at concurrency {int(top.x)} its TTFT p50 was {_num(ttft, 1)} s" if top else "")
            )
        heads = ":".join(str(v.plan.kv_heads) for v, _ in done)
        pred = " : ".join("-" if r is None else f"{r:g}" for r in ratios([v.plan.predicted_running for v, _ in done]))
        meas = " : ".join("-" if r is None else f"{r:.2f}" for r in ratios([m.sustained.median for _, m in done]))
        budget = (
            f"the same {_num(result.budget_bytes, 0)} bytes of KV cache"
            if result.budget_bytes
            else "its own KV cache (targets mode: budgets differ)"
        )
        lines += [
            f"**What the numbers show.** Every variant got {budget}. "
            + "; ".join(parts)
            + ". Fewer KV heads make each token's K/V smaller, so the same bytes hold more tokens and more "
            f"sequences: KV heads {heads} give a predicted capacity ratio of {pred}, and the measured sustained "
            f"batches came out {meas}. "
            "Past a variant's capacity the scheduler keeps the extra requests waiting: its running count sits "
            "flat at the capacity, the queue grows with the offered concurrency and TTFT grows with the queue "
            "(a waiting request needs a whole batch to finish first), while the variants with fewer KV heads "
            "still admit everyone. Throughput follows the running batch: once a variant is capped, more "
            "offered load adds only queueing.",
            "",
            "**Attention work vs memory traffic.** Per request, the attention FLOPs are the same for every "
            "variant (they depend on query heads, not KV heads), while the KV bytes held and the KV bytes read "
            "by decode attention scale with the KV heads. "
            + _same_batch_tpot(done)
            + "On a GPU, decode at large batch and long context is bound by memory bandwidth, where the smaller "
            "KV reads also cut time per token (the GQA and MQA papers' speed-ups below).",
            "",
        ]
        if first.grows_after_admission:
            lines += [
                "Here a sequence grows after admission: vLLM admits by prompt, so the peaks run above the "
                "prediction and preemptions recompute the excess (FIELD_NOTES).",
                "",
            ]
    gpu = gpu_plan()
    seqs = {p["name"]: p["row"].max_seqs for p in gpu}
    mha, gqa, mqa = (seqs.get(name) for name in ("Llama-2-7B", "Llama-3.1-8B", "Falcon-7B"))
    lines += [
        f"**On real GPU models** (`service.kv.planner`, one {GPU_MEMORY_GIB:g} GB-class card "
        f"({GPU_MEMORY_GIB:g} GiB x {GPU_UTILIZATION} utilization - bf16 weights; activation memory not "
        f"subtracted), block {GPU_BLOCK}, sequences of {GPU_SEQ_LEN} tokens, i.e. prompt + output):",
        "",
        *_table(
            ("model", "attention", "query / KV heads", "KV B/token", "weights GiB", "KV budget GiB",
             "KV tokens", f"max seqs @ {GPU_SEQ_LEN}"),
            gpu_rows(gpu),
        ),  # fmt: skip
        "",
        "The same card, Llama-3.1-8B's shape with only its KV heads changed (same weights budget):",
        "",
        *_table(("kind", "KV heads", "KV B/token", "KV tokens", f"max seqs @ {GPU_SEQ_LEN}"), sibling_rows()),
        "",
        "The CPU experiment checks the planner's arithmetic against a real vLLM scheduler; the same arithmetic "
        "gives these GPU figures"
        + (
            f": Llama-2-7B (MHA) holds {mha / gqa:.2f}x the sequences of Llama-3.1-8B (GQA-8) on the same card, "
            f"and Falcon-7B (MQA: its 71 query heads share one KV head) {mqa / gqa:.1f}x"
            if mha and gqa and mqa
            else ""
        )
        + f". Past about 256 sequences vLLM's default `max_num_seqs` (256) binds instead of the KV cache, so "
        "a GQA-8 model on one card already sits near that limit at 2k tokens and an MQA model far beyond it; "
        "then compute and the batch limit, not KV memory, set the throughput. To measure it there, deploy each "
        "model (configs/models/*.yaml) and run `python -m loadtest kv-heads --targets "
        "llama2=http://...,llama31=http://...,falcon=http://... --tokenizer DIR` (targets mode reads each "
        "server's blocks from `/metrics`; the budgets then differ per model).",
        "",
        "**Published results.**",
        "",
        "- Llama 2 paper (arXiv 2307.09288, appendix A.2.1, fig. 24): a 30B ablation on 8x A100-80GB; MHA ran "
        "out of memory at batch 1024 with a 256-token context and at batch 128 with a 2k context, where MQA "
        "and GQA completed; latency was similar at small batches.",
        "- GQA paper (Ainslie et al. 2023, table 1): time per sample MHA-XXL 1.51 s, MQA-XXL 0.24 s, GQA-8-XXL "
        "0.28 s; quality MHA-XXL 47.2, GQA-8 47.1, MQA 46.6 (after uptraining).",
        "- MQA paper (Shazeer 2019, table 2): decoder time per output token 46 -> 3.8 us (greedy).",
        "",
        "**Caveat.** The 9-KV-head variant repeats each of the original 3 KV heads over its group: it is the "
        "same function as the original (greedy outputs match token for token). The 1-KV-head variant "
        "mean-pools the 3 heads (the GQA paper's conversion) *without* the uptraining the paper follows it "
        "with: this small model then emits degenerate text. Its capacity and latency are measured honestly "
        "(fixed output lengths with `ignore_eos`, same prompts), its text quality is not comparable and is "
        "not measured here.",
    ]
    return lines


def _same_batch_tpot(done: list[tuple[VariantRun, Measured | None]]) -> str:
    """A sentence comparing TPOT where every variant admitted everyone (same running batch)."""
    capacities = [v.plan.predicted_running for v, _ in done]
    if not done or any(c is None for c in capacities):
        return ""
    common = set.intersection(*({int(s.x) for s in v.run.steps} for v, _ in done if v.run))
    fits = [c for c in common if c <= min(c for c in capacities if c is not None)]
    if not fits:
        return ""
    c = max(fits)
    figures = []
    values = []
    for v, _ in done:
        step = next(s for s in v.run.steps if int(s.x) == c) if v.run else None
        value = step.summary.tpot_s.p50 if step else None
        values += [value] if value else []
        figures.append(f"{v.plan.name} {_num(value, 1, 1000)} ms")
    spread = f" (within {max(values) / min(values) - 1:.0%} of each other)" if len(values) > 1 else ""
    return (
        f"At concurrency {c}, where every variant runs the same batch, TPOT p50 was " + ", ".join(figures)
        + spread
        + ": on this CPU and this 135M model a decode step is dominated by the weights and per-step overheads, "
        "not by reading the KV cache, so the KV-head effect shows as capacity, queueing and TTFT rather than "
        "per-token speed; at higher concurrency the variants with fewer KV heads run larger batches, whose "
        "steps take longer (TPOT rises) while throughput rises too. "
    )


def _logs(result: KvHeadsResult) -> list[str]:
    lines = ["## Gateway logs (summary)", ""]
    for v in result.variants:
        head = f"- **{v.plan.name}**: "
        facts = []
        if v.engine_start_s is not None:
            facts.append(f"ready in {v.engine_start_s:.1f} s")
        if v.wall_s is not None:
            facts.append(f"{v.wall_s:.0f} s from start to stop")
        if v.engine_check.get("kv_blocks") is not None:
            facts.append(
                f"`/metrics` at start: {v.engine_check['kv_blocks']:.0f} blocks, "
                f"{_num(v.engine_check.get('kv_bytes_per_token'), 0)} B/token"
            )
        if v.waited_for_idle_s and v.waited_for_idle_s >= 1:
            facts.append(f"waited {v.waited_for_idle_s:.0f} s for other engines to end")
        if v.other_engines_seen:
            kept = [k for k in v.other_engines_seen if "kept" in k]
            facts.append(
                "other vLLM engines seen on the machine ("
                + ", ".join(f"{k}: pids {p}" for k, p in v.other_engines_seen.items())
                + "); discarded steps were run again once it was idle"
                + (f"; **kept with another engine running: {', '.join(kept)}** (latencies skewed, capacity not)"
                   if kept else "")
            )
        elif result.mode == "managed":
            facts.append("no other engine, model server or load test seen at its start or around any step")
        if v.error:
            facts.append(f"error: {v.error}")
        key = [line for line in v.log_summary if _KEY_LOG.search(line)]
        others = len(v.log_summary) - len(key)
        if others:
            facts.append(f"{others} generic vLLM warning line(s) not shown (eager mode, no Triton, LD_PRELOAD hints)")
        lines.append(head + "; ".join(facts or ["no log"]))
        lines += [f"  - `{line}`" for line in key]
    return lines


_KEY_LOG = re.compile(
    r"engine ready in|Overriding num_gpu_blocks|KV cache size|Maximum concurrency|Reducing Torch threads|"
    r"\bERROR\b|Traceback|Error:|force killing"
)


def markdown(result: KvHeadsResult, image_dir: str | None = None, result_path: str = "RESULT.json") -> str:
    """The report; ``image_dir`` is the PNG folder relative to the Markdown file (None: no images)."""
    runs = _runs(result)
    env = result.environment
    versions = ", ".join(f"{k} {v}" for k, v in env.packages.items() if v)
    names = " vs ".join(v.plan.name for v in result.variants)
    waited = sum(v.waited_for_idle_s or 0 for v in result.variants)
    lines = [
        f"# KV heads: {names} under one KV byte budget",
        "",
        "Produced by:",
        "",
        "```sh",
        result.command,
        "```",
        "",
        f"Run {result.created_at} -> {result.finished_at or '?'} on {env.hostname} ({env.cpu_count} CPUs, "
        f"{env.platform}), wall time {_num((result.wall_s or 0) / 60, 1)} min"
        + (
            f" (of which {waited / 60:.1f} min waiting for other benchmarks on the machine to end, so the "
            f"experiment itself ran {((result.wall_s or 0) - waited) / 60:.1f} min)"
            if waited >= 1
            else ""
        )
        + f"; Python {env.python}, {versions}. "
        f"Rebuild this report from the JSON: `python -m loadtest kv-heads --report-only {result_path}`.",
        "",
    ]
    lines += _setup(result) + [""]
    lines += _capacity(result, runs) + [""]
    if image_dir:
        lines += [f"![capacity]({image_dir}/capacity.png)", ""]
        lines += [
            "Latency, throughput and the engine's queue against the offered concurrency (dotted verticals: each "
            "variant's predicted capacity):",
            "",
            f"![sweep]({image_dir}/sweep.png)",
            "",
            "Running and waiting requests over the sweep (dashed: predicted capacity):",
            "",
            f"![timeline]({image_dir}/timeline.png)",
            "",
        ]
    lines += _onsets(result, runs) + [""]
    lines += _kv_and_attention(runs) + [""]
    if image_dir:
        lines += [f"![kv and attention]({image_dir}/kv_attention.png)", ""]
    lines += _steps(runs) + [""]
    lines += _explain(result, runs) + [""]
    lines += _logs(result) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots
_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def plot_capacity(result: KvHeadsResult, path: Path) -> Path:
    runs = _runs(result)
    tol = result.spec.criteria.tolerance
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = range(len(runs))
    width = 0.27
    pred = [v.plan.predicted_running or 0 for v, _ in runs]
    med = [m.sustained.median if m and m.sustained.median is not None else float("nan") for _, m in runs]
    peak = [m.running_peak if m and m.running_peak is not None else float("nan") for _, m in runs]
    ax.bar([x - width for x in xs], pred, width, color="lightgrey", edgecolor="black", label="predicted (planner)")
    ax.errorbar([x - width for x in xs], pred, yerr=[tol * p for p in pred], fmt="none", ecolor="black",
                capsize=4, label=f"±{tol:.0%}")  # fmt: skip
    ax.bar(list(xs), med, width, color=[_color(i) for i in xs], label="measured sustained (median while waiting)")
    ax.bar([x + width for x in xs], peak, width, color=[_color(i) for i in xs], alpha=0.35, hatch="//",
           label="measured peak")  # fmt: skip
    for x, values in zip(xs, zip(pred, med, peak, strict=True), strict=True):
        for dx, value, lift in zip((-width, 0, width), values, (1 + tol, 1, 1), strict=True):
            if value == value:  # not NaN
                ax.annotate(f"{value:.0f}", (x + dx, value * lift), ha="center", va="bottom", fontsize="small")
    from matplotlib.patches import Patch

    by_label = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    by_label["measured sustained (median while waiting)"] = Patch(facecolor="dimgray")
    by_label["measured peak"] = Patch(facecolor="white", edgecolor="dimgray", hatch="//")
    labels = ["predicted (planner)", f"±{tol:.0%}", "measured sustained (median while waiting)", "measured peak"]
    handles = [by_label[label] for label in labels]
    ax.set_xticks(list(xs), [f"{v.plan.name}\n{_heads(v.plan.kv_heads)}" for v, _ in runs])
    ax.set_ylabel("concurrent running requests")
    ax.set_title(f"Same KV bytes ({(result.budget_bytes or 0) / 2**20:.1f} MiB): running batch under saturation")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(handles, labels, fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _series(steps: Sequence[StepResult], getter) -> list[float]:
    out = []
    for s in steps:
        value = getter(s)
        out.append(float("nan") if value is None else float(value))
    return out


def plot_sweep(result: KvHeadsResult, path: Path) -> Path:
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = (
        ("output tokens/s", lambda s: s.summary.output_throughput, False),
        ("TTFT p50 (s)", lambda s: s.summary.ttft_s.p50, True),
        ("TTFT p99 (s)", lambda s: s.summary.ttft_s.p99, True),
        ("TPOT p50 (ms)", lambda s: None if s.summary.tpot_s.p50 is None else 1000 * s.summary.tpot_s.p50, False),
        ("running requests: median over the step (o), peak (^)", lambda s: _median_running(s), False),
        ("waiting requests: mean over the step", lambda s: _mean_waiting(s), False),
    )
    for i, v in enumerate(result.variants):
        if v.run is None:
            continue
        steps = sorted(v.run.steps, key=lambda s: s.x)
        xs = [s.x for s in steps]
        for ax, (title, getter, _) in zip(axes.flat, panels, strict=True):
            ax.plot(xs, _series(steps, getter), "-o", color=_color(i), label=v.plan.name)
        axes[1][1].plot(xs, _series(steps, lambda s: s.server.running_peak if s.server else None), "^",
                        color=_color(i), alpha=0.6)  # fmt: skip
        if v.plan.predicted_running:
            for ax in axes.flat:
                ax.axvline(v.plan.predicted_running, color=_color(i), linestyle=":", alpha=0.7)
            axes[1][1].axhline(v.plan.predicted_running, color=_color(i), linestyle="--", alpha=0.5)
    concurrencies = sorted({s.x for v in result.variants if v.run for s in v.run.steps})
    if concurrencies:
        axes[1][1].plot(concurrencies, concurrencies, color="grey", alpha=0.4, label="everyone admitted (y = x)")
        axes[1][1].legend(fontsize="small")
    for ax, (title, _, log) in zip(axes.flat, panels, strict=True):
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("offered concurrency (closed loop)")
        if log:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle("KV heads under one KV byte budget: dotted lines = predicted capacity of each variant")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _median_running(step: StepResult) -> float | None:
    from loadtest.kvheads import during_samples

    rows = sorted(s.running for s in during_samples(step) if s.running is not None)
    if not rows:
        return None
    mid = len(rows) // 2
    return rows[mid] if len(rows) % 2 else (rows[mid - 1] + rows[mid]) / 2


def _mean_waiting(step: StepResult) -> float | None:
    from loadtest.kvheads import during_samples

    rows = [s.waiting for s in during_samples(step) if s.waiting is not None]
    return sum(rows) / len(rows) if rows else None


def plot_timeline(result: KvHeadsResult, path: Path) -> Path:
    runs = [v for v in result.variants if v.run is not None]
    fig, axes = plt.subplots(max(len(runs), 1), 1, figsize=(13, 3.2 * max(len(runs), 1)), squeeze=False)
    for ax, v in zip(axes[:, 0], runs, strict=False):
        assert v.run is not None
        for step in v.run.steps:
            if step.server is None or not step.server.samples:
                continue
            t = [step.offset_s + p.t_s for p in step.server.samples]
            running = [float("nan") if p.running is None else p.running for p in step.server.samples]
            waiting = [float("nan") if p.waiting is None else p.waiting for p in step.server.samples]
            first = step is v.run.steps[0]
            ax.step(t, running, where="post", color="tab:blue", label="running" if first else None)
            ax.step(t, waiting, where="post", color="tab:red", alpha=0.7, label="waiting" if first else None)
            ax.axvline(step.offset_s, color="grey", alpha=0.4)
            extra = f", {step.server.preemptions:.0f} preempted" if step.server.preemptions else ""
            ax.annotate(f"c={step.concurrency}{extra}", (step.offset_s, 1.0), xycoords=("data", "axes fraction"),
                        fontsize="x-small", va="top", ha="left")  # fmt: skip
        if v.plan.predicted_running:
            ax.axhline(v.plan.predicted_running, color="black", linestyle="--", alpha=0.6,
                       label=f"predicted capacity {v.plan.predicted_running}")  # fmt: skip
        ax.set_ylabel("requests")
        ax.set_title(f"{v.plan.name}: {_heads(v.plan.kv_heads)}, {v.plan.num_blocks} usable blocks", fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", loc="center left")
    axes[-1][0].set_xlabel("seconds since the variant's first step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_kv_attention(result: KvHeadsResult, path: Path) -> Path:
    vs = result.variants
    names = [f"{v.plan.name}\n{_heads(v.plan.kv_heads)}" for v in vs]
    colors = [_color(i) for i in range(len(vs))]

    def values(name: str, scale: float) -> list[float]:
        out = []
        for v in vs:
            m = pooled_mean(v, name)
            out.append(float("nan") if m is None else m / scale)
        return out

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (
        (axes[0], values("kv_used_bytes", 2**20), "KV held per request (MiB)"),
        (axes[2], values("kv_read_bytes", 2**20), "decode KV bytes read per request (MiB)"),
    )
    for ax, ys, title in panels:
        ax.bar(names, ys, color=colors)
        ax.set_title(title)
        for x, y in enumerate(ys):
            if y == y:
                ax.annotate(f"{y:.2f}", (x, y), ha="center", va="bottom", fontsize="small")
    prefill = values("attention_flops_prefill", 1e9)
    decode = values("attention_flops_decode", 1e9)
    axes[1].bar(names, prefill, color=colors, alpha=0.5, label="prefill")
    axes[1].bar(names, decode, bottom=prefill, color=colors, label="decode")
    for x, (a, b) in enumerate(zip(prefill, decode, strict=True)):
        if a == a and b == b:
            axes[1].annotate(f"{a + b:.3f}", (x, a + b), ha="center", va="bottom", fontsize="small")
    axes[1].set_title("attention GFLOP per request (prefill light, decode dark)")
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Attention FLOPs are the same for every variant; KV bytes held and read scale with KV heads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(result: KvHeadsResult, out_dir: Path, plots: bool = True) -> list[Path]:
    """PNGs into ``out_dir`` and the Markdown as ``out_dir``.md beside it; returns the files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_path(out_dir)
    written: list[Path] = []
    if plots:
        written += [
            plot_capacity(result, out_dir / "capacity.png"),
            plot_sweep(result, out_dir / "sweep.png"),
            plot_timeline(result, out_dir / "timeline.png"),
            plot_kv_attention(result, out_dir / "kv_attention.png"),
        ]
    image_dir = os.path.relpath(out_dir, md.parent) if plots else None
    md.write_text(markdown(result, image_dir, str(out_dir / "result.json")))
    return [md, *written]
