"""Planner tables of published GPU models for the report (``service.kv.planner``)."""

from __future__ import annotations

from typing import Any

from service.kv import planner

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


def gpu_plan(seq_len: int = GPU_SEQ_LEN, gpu_gib: float = GPU_MEMORY_GIB) -> list[dict[str, Any]]:
    """Published models on one GPU: weights, KV budget, tokens and sequences (service.kv.planner)."""
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
    g, cfg = planner.geometry_for(model, GPU_BLOCK, "auto", "bfloat16")
    weights = planner.weights_bytes(cfg, 2)
    budget = planner.budget_bytes(
        kv_cache_gib=None, gpu_memory_gib=GPU_MEMORY_GIB, gpu_memory_utilization=GPU_UTILIZATION, weights=weights
    )
    rows = planner.plan(g, budget, seq_len, seq_len, kv_heads=[g.query_heads, g.kv_heads, 1])
    return [
        [r.kind, str(r.kv_heads), f"{r.kv_bytes_per_token:,}", f"{r.tokens:,}", f"{r.max_seqs:,.0f}"] for r in rows
    ]
