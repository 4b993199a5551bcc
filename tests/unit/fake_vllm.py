"""Fake vLLM 0.32 config objects: the attributes and methods the API-server process reads
(model_config, parallel_config, cache_config), with vLLM's own per-rank rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any


@dataclass
class FakeModelConfig:
    layers: int = 30
    query_heads: int = 9
    kv_heads: int = 3
    head_size: int = 64
    dtype: str = "torch.bfloat16"
    max_model_len: int = 2048
    served_model_name: str = "SmolLM2-135M-Instruct"
    model: str = "models/SmolLM2-135M-Instruct"
    use_mla: bool = False
    is_hybrid: bool = False
    is_attention_free: bool = False
    has_noops: bool = False
    sliding_window: int | None = None
    text: dict[str, Any] = field(default_factory=dict)

    @property
    def hf_text_config(self) -> Any:
        return SimpleNamespace(sliding_window=self.sliding_window, **self.text)

    def get_sliding_window(self) -> int | None:
        return self.sliding_window

    def get_total_num_hidden_layers(self) -> int:
        return self.layers

    def get_num_layers(self, pc: Any) -> int:  # pipeline stage of rank 0 (what the front end sees)
        pp = pc.pipeline_parallel_size
        return self.layers // pp + (1 if self.layers % pp else 0)

    def get_num_attention_heads(self, pc: Any) -> int:
        return self.query_heads // pc.tensor_parallel_size

    def get_total_num_kv_heads(self) -> int:
        return self.kv_heads

    def get_num_kv_heads(self, pc: Any) -> int:
        return 1 if self.use_mla else max(1, self.kv_heads // pc.tensor_parallel_size)

    def get_head_size(self) -> int:
        return self.head_size


def fake_vllm_config(tp: int = 1, pp: int = 1, block_size: int = 128, num_gpu_blocks: int = 365,
                     cache_dtype: str = "auto", **model: Any) -> Any:
    return SimpleNamespace(
        model_config=FakeModelConfig(**model),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp, rank=0),
        cache_config=SimpleNamespace(block_size=block_size, num_gpu_blocks=num_gpu_blocks, cache_dtype=cache_dtype),
    )
