"""The KV geometry of the engine a stat logger is attached to, read from its ``VllmConfig``.

What the API-server process can see (vLLM 0.32): ``cache_config.num_gpu_blocks`` (filled
by the engine core before the stat loggers are built; the same block count on every rank),
``block_size``, ``cache_dtype``; ``model_config``'s shape; ``parallel_config``. The per-layer
KV cache spec lives only in the engine core (``collective_rpc("get_kv_cache_spec")`` stalls
generation), so shapes whose KV the K/V-head formula does not describe are refused here, at
start, instead of being reported wrong.

Figures are for the whole model: the front end's ``parallel_config.rank`` is 0, so
``get_num_layers`` answers for pipeline stage 0 only; we use the model's total layer count,
and the per-rank KV heads times the tensor-parallel size (which counts KV heads vLLM
replicates when TP > KV heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.kv.geometry import KVGeometry, kv_cache_dtype_bytes

_FULL_ATTENTION = {"attention", "full_attention"}


class UnsupportedKVShape(ValueError):
    """The model's KV cache is not one K and one V per KV head, layer and token."""


@dataclass(frozen=True)
class EngineGeometry:
    """The served model's KV shape (whole model) and the pool the engine allocated."""

    model: str
    geometry: KVGeometry
    num_blocks: int  # usable blocks: vLLM's pool less its null block
    max_model_len: int
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.geometry.block_size

    @property
    def capacity_bytes(self) -> int:
        """Bytes of the pool on all ranks together."""
        return self.num_blocks * self.geometry.kv_bytes_per_block


def usable_blocks(num_gpu_blocks: int | None) -> int:
    """KV blocks that can hold tokens: vLLM keeps one block of the pool as a null block
    (its ``kv_cache_usage`` has the same denominator)."""
    return max(int(num_gpu_blocks or 0) - 1, 0)


def refusal(mc: Any) -> str | None:
    """Why this model's KV cache cannot be accounted exactly, or None."""
    if getattr(mc, "is_attention_free", False):
        return "it is attention-free: it has no KV cache"
    if getattr(mc, "use_mla", False):
        return ("it uses multi-head latent attention (MLA): each layer caches one compressed "
                "latent per token, not a K and a V per KV head")
    if getattr(mc, "is_hybrid", False):
        return ("it is a hybrid model (attention and mamba/linear-attention layers): the "
                "recurrent layers keep a fixed state per sequence, not KV per token")
    if getattr(mc, "has_noops", False):
        return "some of its layers have no attention (no-op blocks): the layer count is not the KV layer count"
    text = getattr(mc, "hf_text_config", None)
    layer_types = getattr(text, "layer_types", None) or []
    odd = sorted({str(t) for t in layer_types} - _FULL_ATTENTION)
    if odd:
        return f"its layers are not all full attention (layer_types: {', '.join(odd)})"
    window = mc.get_sliding_window()
    if window and getattr(text, "use_sliding_window", True) is not False:
        return (f"it uses sliding-window attention (window {window}): a sequence holds at most "
                "the window's KV per layer, which the per-token formula does not describe")
    return None


def geometry_from_vllm_config(vllm_config: Any) -> EngineGeometry:
    """Whole-model KV geometry and pool of the engine; UnsupportedKVShape when the shape
    cannot be accounted exactly."""
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    name = str(mc.served_model_name or mc.model)
    why = refusal(mc)
    if why is not None:
        raise UnsupportedKVShape(
            f"kv-gateway cannot account KV memory for model {name!r}: {why}. "
            "Refusing to start rather than report wrong figures; uninstall the kv-gateway "
            "package or exclude its plugin with VLLM_PLUGINS to serve this model.")
    tp = int(pc.tensor_parallel_size)
    kv_total = int(mc.get_total_num_kv_heads())
    kv_per_rank = int(mc.get_num_kv_heads(pc))
    stored = kv_per_rank * tp  # > kv_total when ranks hold replicas of the same heads
    if stored % kv_total:
        raise UnsupportedKVShape(
            f"kv-gateway cannot account KV memory for model {name!r}: {kv_total} KV heads "
            f"over tensor-parallel size {tp} is not an even split or replication")
    model_dtype = str(mc.dtype).removeprefix("torch.")
    cache_dtype = str(cc.cache_dtype)
    geometry = KVGeometry(
        layers=int(mc.get_total_num_hidden_layers()),
        query_heads=int(mc.get_num_attention_heads(pc)) * tp,
        kv_heads=kv_total,
        head_size=int(mc.get_head_size()),
        dtype_bytes=kv_cache_dtype_bytes(cache_dtype, model_dtype),
        block_size=int(cc.block_size),
        dtype=model_dtype if cache_dtype == "auto" else cache_dtype,
        kv_replicas=stored // kv_total,
    )
    return EngineGeometry(
        model=name, geometry=geometry, num_blocks=usable_blocks(cc.num_gpu_blocks),
        max_model_len=int(mc.max_model_len), tensor_parallel_size=tp,
        pipeline_parallel_size=int(pc.pipeline_parallel_size),
    )
