"""The report's "Explain it" section: what the figures show, and the planner on GPU models."""

from __future__ import annotations

from collections.abc import Callable

from loadtest.kvheads import gpu
from loadtest.kvheads.measure import Measured, ratios
from loadtest.kvheads.prose import fill, num, table
from loadtest.kvheads.result import KvHeadsResult, VariantRun

Runs = list[tuple[VariantRun, Measured | None]]


def explain(result: KvHeadsResult, runs: Runs, heads: Callable[[int | None], str]) -> str:
    parts = []
    done = [(v, m) for v, m in runs if v.run is not None and m is not None]
    if done:
        variants = []
        for v, m in done:
            p = v.plan
            top = max(v.run.steps, key=lambda s: s.x) if v.run and v.run.steps else None
            at_top = fill("explain_variant_top", concurrency=int(top.x), ttft=num(top.summary.ttft_s.p50, 1)) if top else ""
            variants.append(fill("explain_variant", name=p.name, heads=heads(p.kv_heads),
                                 bytes_per_token=f"{p.kv_bytes_per_token:,}", running=num(p.predicted_running, 0),
                                 sustained=num(m.sustained.median if m else None, 1), at_top=at_top))
        budget = (fill("explain_budget_same", budget=num(result.budget_bytes, 0)) if result.budget_bytes
                  else fill("explain_budget_targets"))
        same = same_batch_tpot(done)
        parts.append(fill(
            "explain", budget=budget, variants="; ".join(variants),
            heads=":".join(str(v.plan.kv_heads) for v, _ in done),
            predicted=" : ".join("-" if r is None else f"{r:g}"
                                 for r in ratios([v.plan.predicted_running for v, _ in done])),
            measured=" : ".join("-" if r is None else f"{r:.2f}"
                                for r in ratios([m.sustained.median for _, m in done if m])),
            same_batch=same + " " if same else "",
        ))
        if done[0][0].plan.grows_after_admission:
            parts.append(fill("explain_grows"))
    parts.append(_gpu())
    return "\n\n".join(parts)


def same_batch_tpot(done: Runs) -> str:
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
        figures.append(f"{v.plan.name} {num(value, 1, 1000)} ms")
    spread = f" (within {max(values) / min(values) - 1:.0%} of each other)" if len(values) > 1 else ""
    return fill("same_batch_tpot", concurrency=c, figures=", ".join(figures), spread=spread)


def _gpu() -> str:
    plans = gpu.gpu_plan()
    seqs = {p["name"]: p["row"].max_seqs for p in plans}
    mha, gqa, mqa = (seqs.get(name) for name in ("Llama-2-7B", "Llama-3.1-8B", "Falcon-7B"))
    seq = gpu.GPU_SEQ_LEN
    models = table(("model", "attention", "query / KV heads", "KV B/token", "weights GiB", "KV budget GiB",
                    "KV tokens", f"max seqs @ {seq}"), gpu.gpu_rows(plans))
    siblings = table(("kind", "KV heads", "KV B/token", "KV tokens", f"max seqs @ {seq}"), gpu.sibling_rows())
    ratio = fill("gpu_ratios", mha=f"{mha / gqa:.2f}", mqa=f"{mqa / gqa:.1f}") if mha and gqa and mqa else ""
    return fill("gpu", gpu_gib=f"{gpu.GPU_MEMORY_GIB:g}", utilization=gpu.GPU_UTILIZATION, block=gpu.GPU_BLOCK,
                seq_len=seq, models_table=models, siblings_table=siblings, ratios=ratio)
