"""KV geometry from what the API-server process sees of the engine (fake vLLM configs)."""

import pytest

from service.telemetry.engine_geometry import UnsupportedKVShape, geometry_from_vllm_config
from tests.unit.fake_vllm import fake_vllm_config

LLAMA70B = dict(layers=80, query_heads=64, kv_heads=8, head_size=128, served_model_name="llama-70b")

# name, config, (layers, query heads, KV heads, KV bytes per token whole model, usable blocks)
ACCOUNTED = [
    ("SmolLM2 GQA", fake_vllm_config(), (30, 9, 3, 23_040, 364)),
    ("SmolLM2 float32", fake_vllm_config(dtype="torch.float32"), (30, 9, 3, 46_080, 364)),
    ("fp8 cache", fake_vllm_config(cache_dtype="fp8", **LLAMA70B), (80, 64, 8, 163_840, 364)),
    ("Llama-70B TP=1", fake_vllm_config(**LLAMA70B), (80, 64, 8, 327_680, 364)),
    # TP splits heads over ranks: the whole model still holds 8 KV heads per layer
    ("Llama-70B TP=2", fake_vllm_config(tp=2, **LLAMA70B), (80, 64, 8, 327_680, 364)),
    # PP: the front end's get_num_layers is stage 0's 40 layers; the model has 80
    ("Llama-70B PP=2", fake_vllm_config(pp=2, **LLAMA70B), (80, 64, 8, 327_680, 364)),
    ("Llama-70B TP=2 PP=2", fake_vllm_config(tp=2, pp=2, **LLAMA70B), (80, 64, 8, 327_680, 364)),
    # TP=16 > 8 KV heads: every rank holds one KV head, i.e. each head twice
    ("Llama-70B TP=16", fake_vllm_config(tp=16, **LLAMA70B), (80, 64, 8, 2 * 327_680, 364)),
    ("Qwen2 window off", fake_vllm_config(sliding_window=4096, text={"use_sliding_window": False}), (30, 9, 3, 23_040, 364)),
    ("layer_types all full", fake_vllm_config(text={"layer_types": ["full_attention"] * 30}), (30, 9, 3, 23_040, 364)),
]


@pytest.mark.parametrize("name, cfg, expected", ACCOUNTED, ids=[a[0] for a in ACCOUNTED])
def test_whole_model_geometry(name, cfg, expected):
    e = geometry_from_vllm_config(cfg)
    g = e.geometry
    assert (g.layers, g.query_heads, g.kv_heads, g.kv_bytes_per_token, e.num_blocks) == expected
    assert e.capacity_tokens == e.num_blocks * cfg.cache_config.block_size
    assert e.capacity_bytes == e.capacity_tokens * g.kv_bytes_per_token
    assert g.mha_kv_bytes_per_token == g.layers * 2 * g.query_heads * g.head_size * g.dtype_bytes


REFUSED = [
    ("MLA", fake_vllm_config(use_mla=True, served_model_name="deepseek-v2-lite"), "latent"),
    ("sliding window", fake_vllm_config(sliding_window=4096, served_model_name="mistral-7b-v0.1"), "sliding-window"),
    ("sliding layers", fake_vllm_config(text={"layer_types": ["sliding_attention", "full_attention"] * 15},
                                        served_model_name="gemma-3"), "sliding_attention"),
    ("hybrid", fake_vllm_config(is_hybrid=True, served_model_name="jamba-mini"), "hybrid"),
    ("attention-free", fake_vllm_config(is_attention_free=True, served_model_name="mamba-130m"), "attention-free"),
    ("no-op layers", fake_vllm_config(has_noops=True, served_model_name="nemotron-nas"), "no-op"),
]


@pytest.mark.parametrize("name, cfg, why", REFUSED, ids=[r[0] for r in REFUSED])
def test_shapes_we_cannot_account_are_refused_with_the_model_named(name, cfg, why):
    with pytest.raises(UnsupportedKVShape) as e:
        geometry_from_vllm_config(cfg)
    msg = str(e.value)
    assert cfg.model_config.served_model_name in msg and why in msg
