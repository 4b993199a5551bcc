"""Capacity planner: how many tokens and sequences a KV budget holds, for a model and its
MHA/GQA/MQA siblings (same layers and head size, other KV-head counts)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from service.kv.geometry import (KVGeometry, cache_blocks, cache_tokens, geometry_from_hf_config,
                                 max_concurrent_sequences)
from service.resources import config_file

GIB = 2**30
# Published shapes, from the checkout's configs/ or the installed wheel's (service.resources).
SHAPES_FILE = config_file("model-shapes.yaml")


@dataclass(frozen=True)
class PlanRow:
    kv_heads: int
    group_size: int
    kind: str
    kv_bytes_per_token: int
    num_blocks: int  # usable blocks: the pool less vLLM's null block
    tokens: int
    max_seqs: float  # at the planned sequence length
    max_seqs_at_max_len: float


def kind(q: int, kv: int) -> str:
    return "MHA" if kv == q else "MQA" if kv == 1 else f"GQA-{kv}"


def plan(geometry: KVGeometry, budget_bytes: int, seq_len: int, max_model_len: int,
         kv_heads: list[int] | None = None, tensor_parallel_size: int = 1,
         reserved_blocks: int = 1) -> list[PlanRow]:
    """One row per KV-head count of the whole model (default: every divisor of the query
    heads); bytes and blocks are per GPU when tensor_parallel_size > 1.

    vLLM sizes its pool as budget // block bytes and keeps one block as a "null block"
    that never holds KV (``reserved_blocks``); rows count the usable blocks. Pass 0 when
    ``budget_bytes`` is already the usable part."""
    q = geometry.query_heads
    counts = kv_heads or [n for n in range(q, 0, -1) if q % n == 0]
    rows = []
    for n in counts:
        try:
            g = geometry.with_kv_heads(n).sharded(tensor_parallel_size)
        except ValueError:
            continue  # this count cannot be split over the GPUs
        blocks = max(cache_blocks(budget_bytes, g) - reserved_blocks, 0)
        rows.append(PlanRow(n, q // n, kind(q, n), g.kv_bytes_per_token, blocks, cache_tokens(blocks, g.block_size),
                            max_concurrent_sequences(blocks, g.block_size, seq_len),
                            max_concurrent_sequences(blocks, g.block_size, max_model_len)))
    return rows


def weights_bytes(cfg: dict[str, Any], dtype_bytes: int = 2) -> int:
    """Parameter bytes of a decoder-only transformer from its config (untied head unless tied)."""
    c = dict(cfg.get("text_config") or cfg)
    if c.get("num_parameters"):
        return int(c["num_parameters"]) * dtype_bytes
    h = c.get("hidden_size") or c["n_embd"]
    L = c.get("num_hidden_layers") or c["n_layer"]
    q = c.get("num_attention_heads") or c["n_head"]
    kv = c.get("num_key_value_heads") or q
    d = c.get("head_dim") or h // q
    inter = c.get("intermediate_size") or 4 * h
    vocab = c["vocab_size"]
    mlp = 3 * h * inter if c.get("hidden_act", "silu") in ("silu", "swiglu") else 2 * h * inter
    per_layer = h * q * d + 2 * h * kv * d + q * d * h + mlp + 2 * h
    emb = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    return (L * per_layer + emb + h) * dtype_bytes


def load_shape(model: str) -> dict[str, Any]:
    """config.json of a local folder, or the published shape in configs/model-shapes.yaml."""
    p = Path(model)
    if (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        count = safetensors_parameters(p)
        if count and not cfg.get("num_parameters"):
            cfg["num_parameters"] = count  # exact: the checkpoint's own tensors
        return cfg
    shapes = load_shapes()
    if model in shapes:
        return shapes[model]
    raise ValueError(f"no config.json at {model} and no published shape for it in {SHAPES_FILE.name}")


def safetensors_parameters(folder: Path) -> int | None:
    """Elements of every tensor in a folder's *.safetensors files, from their JSON headers
    (8-byte little-endian length, then the header); None when the folder has none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                n = 1
                for dim in meta["shape"]:
                    n *= int(dim)
                total += n
    return total


def load_shapes() -> dict[str, Any]:
    """Every published shape in configs/model-shapes.yaml, by model id."""
    return (yaml.safe_load(SHAPES_FILE.read_text()) or {}) if SHAPES_FILE.is_file() else {}


def budget_bytes(*, kv_cache_gib: float | None, gpu_memory_gib: float | None, gpu_memory_utilization: float,
                 weights: int, tensor_parallel_size: int = 1, overhead_gib: float = 0.0) -> int:
    """CPU: the KV budget itself. GPU: memory x utilization - weights/TP - overhead (per GPU)."""
    if gpu_memory_gib:
        return int((gpu_memory_gib * gpu_memory_utilization - overhead_gib) * GIB - weights / tensor_parallel_size)
    if kv_cache_gib is None:
        raise ValueError("give a KV budget (kv_cache_gib) or a GPU memory size (gpu_memory_gib)")
    return int(kv_cache_gib * GIB)


def render_table(rows: list[PlanRow], seq_len: int, max_model_len: int, current: int) -> str:
    head = (f"| KV heads | kind | group | KV bytes/token | usable blocks | tokens | max seqs @ {seq_len} tok "
            f"| max seqs @ {max_model_len} tok |\n|---:|---|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r.kv_heads}{' (this model)' if r.kv_heads == current else ''} | {r.kind} | {r.group_size} "
        f"| {r.kv_bytes_per_token:,} | {r.num_blocks:,} | {r.tokens:,} | {r.max_seqs:,.1f} | {r.max_seqs_at_max_len:,.1f} |\n"
        for r in rows)
    return head + body


def geometry_for(model: str, block_size: int, kv_cache_dtype: str = "auto", dtype: str | None = None,
                 tensor_parallel_size: int = 1) -> tuple[KVGeometry, dict[str, Any]]:
    cfg = load_shape(model)
    g = geometry_from_hf_config(cfg, block_size=block_size, kv_cache_dtype=kv_cache_dtype,
                                dtype=None if dtype in (None, "auto") else dtype)
    g.sharded(tensor_parallel_size)  # fails early if the model cannot be split this way
    return g, cfg
