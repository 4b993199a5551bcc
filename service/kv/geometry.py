"""KV-cache and attention geometry: pure functions, no engine, no I/O.

Definitions (all integers; d = head size, L = layers, Hq = query heads, Hkv = KV heads):

- KV bytes per token      = L * 2 (K and V) * Hkv * d * bytes(kv dtype)
- MHA-equivalent per token = the same with Hkv = Hq
- group size              = Hq / Hkv (query heads sharing one KV head)
- KV tokens a sequence holds after P prompt and G generated tokens = P + G - 1 when
  G >= 1 (the last sampled token is returned but never fed back, so its K/V are never
  written), P when the prompt was prefilled but nothing sampled, 0 when never scheduled.
- attention FLOPs for one query token over a causal context of c tokens
  = 4 * L * Hq * d * c  (QK^T: 2*c*d per head, AV: 2*c*d per head)
  -> independent of Hkv: grouping KV heads saves memory and bandwidth, not FLOPs.
- prefill over prompt positions C+1..P (C prefix-cache hits skipped)
  = 4 * L * Hq * d * (P(P+1) - C(C+1)) / 2
- decode: token j (2..G) is produced by a forward pass of token j-1 over a context of
  P + j - 1 tokens -> FLOPs = 4 * L * Hq * d * sum_{j=2..G} (P + j - 1)
- KV bytes read by decode attention = KV bytes per token * sum_{j=2..G} (P + j - 1)
  (every decode step reads the whole context's K and V once: this is what grows with Hkv)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

# bytes per element of the KV cache for the dtype names vLLM and HF use
_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "fp8_ds_mla": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1,
}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element for a dtype name or torch dtype ('auto' is not resolvable here)."""
    name = str(dtype).removeprefix("torch.").lower()
    try:
        return _DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"unknown KV cache dtype: {dtype!r}") from None


def kv_cache_dtype_bytes(cache_dtype: str, model_dtype: Any) -> int:
    """KV element size: the cache dtype, or the model dtype when the cache says 'auto'."""
    if str(cache_dtype) == "auto":
        return dtype_bytes(model_dtype)
    return dtype_bytes(cache_dtype)


@dataclass(frozen=True)
class KVGeometry:
    """The shape of a model's KV cache: the whole model (every layer, every KV head, on
    all tensor- and pipeline-parallel ranks together) unless built with ``sharded``."""

    layers: int
    query_heads: int
    kv_heads: int
    head_size: int
    dtype_bytes: int
    block_size: int = 16
    dtype: str = "bfloat16"
    # copies of each KV head held across tensor-parallel ranks: vLLM replicates KV heads
    # when TP > KV heads (each rank holds max(1, Hkv / TP)), so the bytes held grow by this
    kv_replicas: int = 1

    def __post_init__(self) -> None:
        for name in ("layers", "query_heads", "kv_heads", "head_size", "dtype_bytes", "block_size",
                     "kv_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.query_heads % self.kv_heads:
            raise ValueError(
                f"query heads ({self.query_heads}) must be a multiple of KV heads ({self.kv_heads})"
            )

    # ---- per token
    @property
    def group_size(self) -> int:
        return self.query_heads // self.kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.layers, self.kv_heads, self.head_size, self.dtype_bytes) * self.kv_replicas

    @property
    def mha_kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.layers, self.query_heads, self.head_size, self.dtype_bytes)

    @property
    def kv_bytes_per_block(self) -> int:
        return self.kv_bytes_per_token * self.block_size

    @property
    def attention_flops_per_context_token(self) -> int:
        """FLOPs of one query token attending to one context token, all layers and heads."""
        return 4 * self.layers * self.query_heads * self.head_size

    def with_kv_heads(self, kv_heads: int) -> "KVGeometry":
        """The sibling model with another KV-head count (MHA: = query heads, MQA: 1)."""
        return KVGeometry(self.layers, self.query_heads, kv_heads, self.head_size,
                          self.dtype_bytes, self.block_size, self.dtype)

    def sharded(self, tensor_parallel_size: int) -> "KVGeometry":
        """What one tensor-parallel rank holds (vLLM replicates KV heads when TP > Hkv)."""
        return KVGeometry(
            self.layers,
            shard_heads(self.query_heads, tensor_parallel_size),
            shard_kv_heads(self.kv_heads, tensor_parallel_size),
            self.head_size, self.dtype_bytes, self.block_size, self.dtype,
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(group_size=self.group_size, kv_bytes_per_token=self.kv_bytes_per_token,
                 mha_kv_bytes_per_token=self.mha_kv_bytes_per_token)
        return d


def kv_bytes_per_token(layers: int, kv_heads: int, head_size: int, dtype_bytes: int) -> int:
    return layers * 2 * kv_heads * head_size * dtype_bytes


def shard_heads(heads: int, tp: int) -> int:
    if heads % tp:
        raise ValueError(f"{heads} attention heads are not divisible by tensor parallel size {tp}")
    return heads // tp


def shard_kv_heads(kv_heads: int, tp: int) -> int:
    """KV heads per rank: split when TP <= Hkv, else each rank holds a replica of one."""
    if tp <= kv_heads:
        if kv_heads % tp:
            raise ValueError(f"{kv_heads} KV heads are not divisible by tensor parallel size {tp}")
        return kv_heads // tp
    if tp % kv_heads:
        raise ValueError(f"tensor parallel size {tp} is not a multiple of {kv_heads} KV heads")
    return 1


# ---- cache capacity
def blocks_for_tokens(tokens: int, block_size: int) -> int:
    return -(-max(tokens, 0) // block_size)


def cache_blocks(budget_bytes: int, geometry: KVGeometry) -> int:
    """Whole blocks that fit a KV byte budget."""
    return budget_bytes // geometry.kv_bytes_per_block


def used_blocks(kv_cache_usage: float, usable_blocks: int) -> int:
    """The engine's used KV blocks from vLLM's ``kv_cache_usage`` (1 - free / usable, where
    usable = the pool less its null block): an exact integer, recovered by rounding."""
    return round(kv_cache_usage * usable_blocks)


def cache_tokens(num_blocks: int, block_size: int) -> int:
    return num_blocks * block_size


def max_concurrent_sequences(num_blocks: int, block_size: int, tokens_per_sequence: int) -> float:
    """Sequences of a given length the pool holds at once (each rounds up to whole blocks)."""
    per_seq = blocks_for_tokens(tokens_per_sequence, block_size)
    return num_blocks / per_seq if per_seq else 0.0


# ---- one sequence
def kv_tokens_held(prompt_tokens: int, generated_tokens: int, prefilled: bool = True) -> int:
    if generated_tokens >= 1:
        return prompt_tokens + generated_tokens - 1
    return prompt_tokens if prefilled else 0


def prefill_context_sum(prompt_tokens: int, cached_tokens: int = 0) -> int:
    """sum of causal context lengths over the prompt positions actually computed."""
    p, c = prompt_tokens, min(cached_tokens, prompt_tokens)
    return (p * (p + 1) - c * (c + 1)) // 2


def decode_context_sum(prompt_tokens: int, generated_tokens: int) -> int:
    """sum_{j=2..G} (P + j - 1): context lengths of the decode forward passes."""
    g = generated_tokens - 1
    if g <= 0:
        return 0
    return g * prompt_tokens + g * (g + 1) // 2


@dataclass(frozen=True)
class SequenceCost:
    """What one sequence (one choice of a request) cost in KV memory and attention."""

    kv_tokens: int
    kv_blocks: int
    kv_used_bytes: int
    kv_allocated_bytes: int
    kv_mha_equivalent_bytes: int
    prefill_flops: int
    decode_flops: int
    kv_read_bytes: int


def sequence_cost(
    g: KVGeometry, prompt_tokens: int, generated_tokens: int,
    cached_tokens: int = 0, prefilled: bool = True,
) -> SequenceCost:
    tokens = kv_tokens_held(prompt_tokens, generated_tokens, prefilled)
    blocks = blocks_for_tokens(tokens, g.block_size)
    fpt = g.attention_flops_per_context_token
    computed = prefilled or generated_tokens > 0
    dsum = decode_context_sum(prompt_tokens, generated_tokens)
    return SequenceCost(
        kv_tokens=tokens,
        kv_blocks=blocks,
        kv_used_bytes=tokens * g.kv_bytes_per_token,
        kv_allocated_bytes=blocks * g.kv_bytes_per_block,
        kv_mha_equivalent_bytes=tokens * g.mha_kv_bytes_per_token,
        prefill_flops=fpt * prefill_context_sum(prompt_tokens, cached_tokens) if computed else 0,
        decode_flops=fpt * dsum,
        kv_read_bytes=g.kv_bytes_per_token * dsum,
    )


def kv_byte_seconds(
    kv_bytes_per_token: int, prompt_tokens: int, generated_tokens: int,
    prefill_seconds: float, decode_seconds: float,
) -> float:
    """Integral of KV bytes held over the request's life in the engine.

    Prefill holds the P prompt tokens; decode grows linearly from P to P + G - 1
    tokens (trapezoid). Time in the queue holds nothing.
    """
    p, g = prompt_tokens, generated_tokens
    if g <= 0:
        return float(kv_bytes_per_token * p * prefill_seconds)
    decode_mean = p + (g - 1) / 2
    return kv_bytes_per_token * (p * prefill_seconds + decode_mean * decode_seconds)


# ---- from configs
def geometry_from_hf_config(
    config: Mapping[str, Any], *, block_size: int = 16, kv_cache_dtype: str = "auto",
    dtype: str | None = None,
) -> KVGeometry:
    """KV geometry from an HF config.json mapping (Llama, Mistral, Qwen2, Falcon, GPT-2 names)."""
    cfg = dict(config.get("text_config") or config)
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    q = _first(cfg, "num_attention_heads", "n_head")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    kv = cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or cfg.get("n_head_kv")
    if kv is None:
        if cfg.get("multi_query"):  # Falcon-7B style
            kv = 1
        elif cfg.get("new_decoder_architecture") and cfg.get("num_kv_heads"):
            kv = cfg["num_kv_heads"]
        else:
            kv = q
    head = cfg.get("head_dim") or hidden // q
    model_dtype = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return KVGeometry(
        layers=int(layers), query_heads=int(q), kv_heads=int(kv), head_size=int(head),
        dtype_bytes=kv_cache_dtype_bytes(kv_cache_dtype, model_dtype),
        block_size=block_size,
        dtype=str(model_dtype) if kv_cache_dtype == "auto" else kv_cache_dtype,
    )


def geometry_from_model_dir(path: str | Path, **kw: Any) -> KVGeometry:
    return geometry_from_hf_config(json.loads((Path(path) / "config.json").read_text()), **kw)


def _first(cfg: Mapping[str, Any], *names: str) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    raise ValueError(f"config has none of {names}")


