"""Seed-model tables: published models and their MHA/GQA/MQA siblings on published GPUs.

For each seed model, each KV-head sibling and each GPU: the predicted maximum number of
concurrent sequences at a few context lengths (the KV budget left beside the weights,
``planner.plan``) and the predicted time per output token at a few batch sizes (the
decode-step roofline, ``roofline.uniform_step``). Predictions on paper, not measurements.

Which siblings: MHA (KV heads = query heads), the model's own count, MQA (1 KV head);
a model that is itself MHA or MQA gets as its GQA sibling the largest divisor of its
query heads that is at most 8 (Llama-2-7B and Gemma-7B: 8, GPT-2: 6); Falcon-7B's 71
query heads have no such divisor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.kv import planner, roofline
from service.kv.geometry import KVGeometry, blocks_for_tokens, dtype_bytes

# (id in configs/model-shapes.yaml, short name)
SEED_MODELS: tuple[tuple[str, str], ...] = (
    ("meta-llama/Llama-2-7b-chat-hf", "Llama-2-7B"),
    ("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "Mistral-7B"),
    ("tiiuae/falcon-7b-instruct", "Falcon-7B"),
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B"),
    ("google/gemma-7b", "Gemma-7B"),
    ("openai-community/gpt2", "GPT-2"),
    ("meta-llama/Meta-Llama-3-70B", "Llama-3-70B"),
)
CONTEXTS = (2048, 8192, 32768)
BATCHES = (1, 16, 64)
TPOT_CONTEXT = 4096
GPU_BLOCK = 16
UTILIZATION = 0.9
DTYPE = "bfloat16"
LABEL = "predictions on paper, not measurements"


def sibling_kv_heads(query_heads: int, kv_heads: int) -> list[int]:
    """KV-head counts of the siblings shown: MHA, the model's own (or a GQA one), MQA."""
    middle = kv_heads
    if kv_heads in (1, query_heads):
        divisors = [n for n in range(min(8, query_heads - 1), 1, -1) if query_heads % n == 0]
        middle = divisors[0] if divisors else None
    counts = [query_heads, middle, 1]
    return [n for i, n in enumerate(counts) if n is not None and n not in counts[:i]]


def model_rows(
    model: str, short: str, hw: roofline.Hardware, contexts: Sequence[int] = CONTEXTS,
    batches: Sequence[int] = BATCHES, tpot_context: int = TPOT_CONTEXT, tensor_parallel_size: int = 1,
    utilization: float = UTILIZATION, block_size: int = GPU_BLOCK, dtype: str = DTYPE,
) -> list[dict[str, Any]]:
    """One row per sibling of ``model`` on ``hw`` (every figure per GPU when TP > 1)."""
    if hw.memory_bytes is None:
        raise ValueError(f"{hw.name}: no memory size, so no KV budget")
    tp = tensor_parallel_size
    geometry, cfg = planner.geometry_for(model, block_size, "auto", dtype, tp)
    nbytes = dtype_bytes(dtype)
    weights = roofline.weights_bytes(cfg, nbytes)
    matmul = roofline.matmul_parameters(cfg)
    max_len = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 0)
    budget = int(hw.memory_bytes * utilization - weights / tp)
    rows = []
    for n in sibling_kv_heads(geometry.query_heads, geometry.kv_heads):
        g = geometry.with_kv_heads(n)
        try:
            shard = g.sharded(tp)
        except ValueError:
            continue  # this KV-head count cannot be split over the GPUs
        usable = max(budget // shard.kv_bytes_per_block - 1, 0) if budget > 0 else 0  # vLLM's null block
        concurrency = {c: (usable // blocks_for_tokens(c, block_size) if c <= max_len else None) for c in contexts}
        t_ctx = min(tpot_context, max_len)
        tpot = {}
        for b in batches:
            step = roofline.uniform_step(g, weights, matmul, b, t_ctx, hw, tp)
            fits = usable // blocks_for_tokens(t_ctx, block_size) >= b
            tpot[b] = {**step.as_dict(), "fits": fits}
        rows.append({
            "model": model, "name": short, "hardware": hw.name, "kind": planner.kind(g.query_heads, n),
            "native": n == geometry.kv_heads, "query_heads": g.query_heads, "kv_heads": n,
            "kv_bytes_per_token": shard.kv_bytes_per_token, "weights_bytes": weights,
            "kv_budget_bytes": max(budget, 0), "usable_blocks": usable, "max_model_len": max_len,
            "max_concurrency": concurrency, "tpot_context": t_ctx, "tpot": tpot,
            "weights_fit": budget > 0,
        })
    return rows


def seed_tables(hardware: Sequence[roofline.Hardware], models: Sequence[tuple[str, str]] = SEED_MODELS,
                **kw: Any) -> dict[str, Any]:
    """Every seed model present in the shapes file, on every GPU given (JSON-ready)."""
    shapes = planner.load_shapes()
    present = [(m, s) for m, s in models if m in shapes]
    rows = [r for hw in hardware for m, s in present for r in model_rows(m, s, hw, **kw)]
    return {"label": LABEL, "hardware": [vars(h) for h in hardware], "models": [s for _, s in present],
            "conventions": roofline.__doc__, "rows": rows}


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:,.1f}"


def render_seed_tables(tables: dict[str, Any]) -> str:
    """Markdown: one table per GPU; TPOT marked * where that batch does not fit in the KV budget."""
    out = [f"**{tables['label'].capitalize()}.**", ""]
    for hw in tables["hardware"]:
        rows = [r for r in tables["rows"] if r["hardware"] == hw["name"]]
        if not rows:
            continue
        contexts = list(rows[0]["max_concurrency"])
        batches = list(rows[0]["tpot"])
        out += [f"### {hw['name']}: {hw['bandwidth'] / 1e12:g} TB/s, "
                f"{(hw['peak_flops'] or 0) / 1e12:g} TFLOPS dense BF16, {hw['memory_bytes'] / 2**30:g} GiB "
                f"({hw['source']})", ""]
        head = (["model", "kind", "KV heads", "KV B/token", "weights GB"]
                + [f"max seqs @ {c // 1024}k" for c in contexts] + ["TPOT context"]
                + [f"TPOT ms @ batch {b}" for b in batches])
        out += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in rows:
            conc = ["-" if v is None else f"{v:,}" for v in r["max_concurrency"].values()]
            if not r["weights_fit"]:
                conc = ["weights do not fit"] + ["-"] * (len(conc) - 1)
            tpot = [_ms(t["tpot_s"]) + ("" if t["fits"] else "*") for t in r["tpot"].values()]
            out.append("| " + " | ".join(
                [r["name"], r["kind"] + ("" if not r["native"] else " (published)"), str(r["kv_heads"]),
                 f"{r['kv_bytes_per_token']:,}", f"{r['weights_bytes'] / 1e9:.1f}", *conc,
                 f"{r['tpot_context']:,}", *tpot]) + " |")
        out.append("")
    out += ["`-`: the context exceeds the model's maximum. `*`: that batch at that context does not fit in the "
            "KV budget (memory x 0.9 - weights); the figure is the roofline alone. TPOT = max(bytes read / "
            "bandwidth, FLOPs / peak) of one decode step (service/kv/roofline.py)."]
    return "\n".join(out)


def geometry_of(model: str) -> KVGeometry:
    return planner.geometry_for(model, GPU_BLOCK, "auto", DTYPE)[0]


def roofline_rows(
    model: str, hw: roofline.Hardware, batches: Sequence[int], contexts: Sequence[int],
    kv_heads: Sequence[int] | None = None, tensor_parallel_size: int = 1, dtype: str = DTYPE,
    resize_kv_weights: bool = False, block_size: int = GPU_BLOCK,
) -> list[dict[str, Any]]:
    """Predicted TPOT of every (sibling, batch, context) of one model on one piece of hardware."""
    geometry, cfg = planner.geometry_for(model, block_size, "auto", dtype, tensor_parallel_size)
    nbytes = dtype_bytes(dtype)
    matmul = roofline.matmul_parameters(cfg)
    counts = list(kv_heads or sibling_kv_heads(geometry.query_heads, geometry.kv_heads))
    rows = []
    for n in counts:
        g = geometry.with_kv_heads(n)
        if resize_kv_weights:
            weights = roofline.resized_kv_weights(cfg, geometry, n, nbytes)
            params = matmul + (weights - roofline.weights_bytes(cfg, nbytes)) // nbytes
        else:
            weights, params = roofline.weights_bytes(cfg, nbytes), matmul
        for b in batches:
            for c in contexts:
                step = roofline.uniform_step(g, weights, params, b, c, hw, tensor_parallel_size)
                rows.append({"model": model, "hardware": hw.name, "kind": planner.kind(g.query_heads, n),
                             "kv_heads": n, "context": c,
                             "crossover_context": roofline.crossover_context(g, weights, b, tensor_parallel_size),
                             **step.as_dict()})
    return rows


def render_roofline(rows: list[dict[str, Any]]) -> str:
    head = ["hardware", "kind", "KV heads", "batch", "context", "weights GB", "KV GB", "GFLOP", "memory ms",
            "compute ms", "TPOT ms", "bound", "KV = weights at context"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for r in rows:
        compute = "-" if r["compute_s"] is None else f"{1000 * r['compute_s']:,.2f}"
        out.append("| " + " | ".join([
            r["hardware"], r["kind"], str(r["kv_heads"]), str(r["batch"]), f"{r['context']:,}",
            f"{r['weight_bytes'] / 1e9:,.2f}", f"{r['kv_bytes'] / 1e9:,.2f}", f"{r['flops'] / 1e9:,.1f}",
            f"{1000 * r['memory_s']:,.2f}", compute, f"{1000 * r['tpot_s']:,.2f}", r["bound"],
            f"{r['crossover_context']:,.0f}"]) + " |")
    return "\n".join(out)
