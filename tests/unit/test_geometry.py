"""KV geometry against published model shapes (16-bit unless stated)."""

import pytest

from service.kv import geometry as G

PUBLISHED = [
    # name, config.json fields, KV bytes per token, group size
    ("Llama-2-7B", dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096), 524_288, 1),
    ("Llama-3-8B", dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096), 131_072, 4),
    ("Llama-3-70B", dict(num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, hidden_size=8192), 327_680, 8),
    ("Falcon-7B", dict(n_layer=32, n_head=71, multi_query=True, hidden_size=4544), 8_192, 71),
    ("SmolLM2-135M", dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576), 23_040, 3),
    ("Qwen2.5-7B", dict(num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_size=3584), 57_344, 7),
    ("Mistral-7B", dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096, head_dim=128), 131_072, 4),
]


@pytest.mark.parametrize("name, cfg, bytes_per_token, group", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_kv_bytes_per_token(name, cfg, bytes_per_token, group):
    g = G.geometry_from_hf_config({**cfg, "torch_dtype": "bfloat16"})
    assert g.kv_bytes_per_token == bytes_per_token
    assert g.group_size == group
    assert g.mha_kv_bytes_per_token == bytes_per_token * group


@pytest.mark.parametrize("cache_dtype, expected", [("auto", 131_072), ("fp8", 65_536), ("fp8_e5m2", 65_536),
                                                   ("float32", 262_144)])
def test_kv_cache_dtype(cache_dtype, expected):
    g = G.geometry_from_hf_config(dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       hidden_size=4096, torch_dtype="bfloat16"), kv_cache_dtype=cache_dtype)
    assert g.kv_bytes_per_token == expected


@pytest.mark.parametrize("kv, tp, per_rank", [(8, 1, 8), (8, 2, 4), (8, 8, 1), (8, 16, 1), (1, 4, 1), (32, 4, 8)])
def test_tensor_parallel_kv_heads(kv, tp, per_rank):
    assert G.shard_kv_heads(kv, tp) == per_rank


def test_tensor_parallel_geometry_llama70b_tp4():
    g = G.KVGeometry(layers=80, query_heads=64, kv_heads=8, head_size=128, dtype_bytes=2).sharded(4)
    assert (g.query_heads, g.kv_heads, g.kv_bytes_per_token) == (16, 2, 81_920)


@pytest.mark.parametrize("kv, tp", [(8, 3), (3, 2)])
def test_tensor_parallel_rejects_uneven(kv, tp):
    with pytest.raises(ValueError):
        G.shard_kv_heads(kv, tp)


def test_kv_heads_must_divide_query_heads():
    with pytest.raises(ValueError):
        G.KVGeometry(layers=1, query_heads=9, kv_heads=2, head_size=64, dtype_bytes=2)


@pytest.mark.parametrize("tokens, block, blocks", [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (2048, 128, 16)])
def test_blocks_for_tokens(tokens, block, blocks):
    assert G.blocks_for_tokens(tokens, block) == blocks


def test_cache_capacity_smollm2_one_gib():
    # vLLM reported 364 blocks x 128 = 46,592 tokens for 1 GiB on this model
    g = G.KVGeometry(layers=30, query_heads=9, kv_heads=3, head_size=64, dtype_bytes=2, block_size=128)
    blocks = G.cache_blocks(2**30, g)
    assert blocks == 364 and G.cache_tokens(blocks, 128) == 46_592
    assert G.max_concurrent_sequences(blocks, 128, 2048) == pytest.approx(22.75)
    # the MHA and MQA siblings under the same budget
    assert G.cache_blocks(2**30, g.with_kv_heads(9)) == 121
    assert G.cache_blocks(2**30, g.with_kv_heads(1)) == 1092


SMOL = G.KVGeometry(layers=30, query_heads=9, kv_heads=3, head_size=64, dtype_bytes=2, block_size=128)


@pytest.mark.parametrize("p, g, cached, tokens", [(10, 1, 0, 10), (10, 5, 0, 14), (37, 8, 0, 44), (128, 1, 0, 128),
                                                  (128, 2, 0, 129), (5, 0, 0, 5)])
def test_sequence_cost_tokens_blocks_bytes(p, g, cached, tokens):
    c = G.sequence_cost(SMOL, p, g, cached)
    assert c.kv_tokens == tokens
    assert c.kv_blocks == -(-tokens // 128)
    assert c.kv_used_bytes == tokens * 23_040
    assert c.kv_allocated_bytes == c.kv_blocks * 128 * 23_040
    assert c.kv_mha_equivalent_bytes == 3 * c.kv_used_bytes


def test_attention_flops_and_kv_read_by_hand():
    # P=3, G=3: prefill contexts 1,2,3 -> 6; decode passes for tokens 2,3 over 4 and 5 -> 9
    g = G.KVGeometry(layers=2, query_heads=4, kv_heads=2, head_size=8, dtype_bytes=2, block_size=16)
    c = G.sequence_cost(g, 3, 3)
    per = 4 * 2 * 4 * 8
    assert c.prefill_flops == per * 6
    assert c.decode_flops == per * 9
    assert c.kv_read_bytes == g.kv_bytes_per_token * 9
    # prefix-cache hits skip their prefill work: cached 2 of 3 -> only position 3 computed
    assert G.sequence_cost(g, 3, 3, cached_tokens=2).prefill_flops == per * 3


def test_flops_do_not_depend_on_kv_heads_but_reads_do():
    a, b = SMOL.with_kv_heads(9), SMOL.with_kv_heads(1)
    ca, cb = G.sequence_cost(a, 100, 50), G.sequence_cost(b, 100, 50)
    assert ca.prefill_flops == cb.prefill_flops and ca.decode_flops == cb.decode_flops
    assert ca.kv_read_bytes == 9 * cb.kv_read_bytes


def test_never_scheduled_request_holds_nothing():
    c = G.sequence_cost(SMOL, 50, 0, prefilled=False)
    assert c.kv_tokens == 0 and c.prefill_flops == 0 and c.kv_read_bytes == 0


def test_kv_byte_seconds_trapezoid():
    # prefill 1 s holding 10 tokens, decode 2 s growing from 10 to 14 tokens (mean 12)
    assert G.kv_byte_seconds(100, 10, 5, 1.0, 2.0) == pytest.approx(100 * (10 * 1 + 12 * 2))
