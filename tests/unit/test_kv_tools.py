"""KV-head variants and the capacity planner."""

from __future__ import annotations

import json

import pytest

from service.kv import planner
from service.__main__ import main
from service.kv.geometry import KVGeometry, geometry_from_model_dir
from tests.conftest import DEFAULT_MODEL_DIR

SMOL = KVGeometry(layers=30, query_heads=9, kv_heads=3, head_size=64, dtype_bytes=2, block_size=128)


def test_plan_default_model_one_gib():
    rows = {r.kv_heads: r for r in planner.plan(SMOL, 2**30, seq_len=220, max_model_len=2048)}
    assert sorted(rows) == [1, 3, 9]
    # vLLM: 364 blocks of 128 for 1 GiB, one of them its null block
    assert (rows[3].num_blocks, rows[3].tokens, rows[3].kv_bytes_per_token) == (363, 46_464, 23_040)
    assert rows[9].num_blocks == 120 and rows[1].num_blocks == 1091
    assert rows[3].max_seqs == pytest.approx(363 / 2)  # 220 tokens -> 2 blocks of 128
    assert rows[3].max_seqs_at_max_len == pytest.approx(363 / 16)
    assert planner.plan(SMOL, 2**30, 220, 2048, [3], reserved_blocks=0)[0].num_blocks == 364
    assert [rows[n].kind for n in (9, 3, 1)] == ["MHA", "GQA-3", "MQA"]


def test_plan_tensor_parallel_per_gpu():
    llama70 = KVGeometry(layers=80, query_heads=64, kv_heads=8, head_size=128, dtype_bytes=2, block_size=16)
    rows = {r.kv_heads: r for r in planner.plan(llama70, 40 * 2**30, 4096, 8192, [64, 8, 1], tensor_parallel_size=4)}
    assert rows[8].kv_bytes_per_token == 81_920  # 2 KV heads per GPU
    assert rows[1].kv_bytes_per_token == 40_960  # MQA: the one KV head is replicated on each GPU
    assert rows[64].kv_bytes_per_token == 655_360


@pytest.mark.parametrize("profile, kv_heads, bpt", [
    ("llama-2-7b-chat", 32, 524_288), ("llama-3.1-8b-instruct", 8, 131_072),
    ("mistral-7b-instruct-v0.3", 8, 131_072), ("qwen2.5-7b-instruct", 4, 57_344),
    ("falcon-7b-instruct", 1, 8_192),
])
def test_kv_plan_cli_for_gpu_profiles(capsys, profile, kv_heads, bpt):
    assert main(["kv-plan", "--profile", f"configs/models/{profile}.yaml", "--gpu-memory-gib", "80",
                 "--seq-len", "2048", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["geometry"]["kv_heads"] == kv_heads and out["geometry"]["kv_bytes_per_token"] == bpt
    mine = [r for r in out["rows"] if r["kv_heads"] == kv_heads][0]
    assert mine["num_blocks"] == out["budget_bytes"] // (bpt * 16) - 1
    assert 10 * 2**30 < out["weights_bytes"] < 20 * 2**30  # 7-8B parameters in bf16


def test_weights_estimate_matches_published_count():
    cfg = planner.load_shape("meta-llama/Llama-3.1-8B-Instruct")
    est = planner.weights_bytes({k: v for k, v in cfg.items() if k != "num_parameters"})
    assert est == pytest.approx(cfg["num_parameters"] * 2, rel=0.01)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.fail("default model missing: run `make model`")
    from service.variants import make_variant

    root = tmp_path_factory.mktemp("variants")
    return {n: make_variant(DEFAULT_MODEL_DIR, root / f"kv{n}", n) for n in (9, 1)}


@pytest.mark.parametrize("n, bpt", [(9, 69_120), (1, 7_680)])
def test_variant_config_and_kv_bytes(variants, n, bpt):
    cfg = json.loads((variants[n] / "config.json").read_text())
    assert cfg["num_key_value_heads"] == n and cfg["num_attention_heads"] == 9 and cfg["num_hidden_layers"] == 30
    assert geometry_from_model_dir(variants[n]).kv_bytes_per_token == bpt
    from safetensors import safe_open

    with safe_open(variants[n] / "model.safetensors", "pt") as f:
        assert tuple(f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape) == (n * 64, 576)


def test_variant_rejects_non_divisor():
    from service.variants import VariantError, make_variant

    with pytest.raises(VariantError):
        make_variant(DEFAULT_MODEL_DIR, DEFAULT_MODEL_DIR.parent / "never", 2)


def test_mha_variant_greedy_output_equals_original(variants):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    outs = []
    for path in (DEFAULT_MODEL_DIR, variants[9]):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        with torch.no_grad():
            outs.append(model.generate(ids, max_new_tokens=16, do_sample=False)[0].tolist())
    assert outs[0] == outs[1]
    assert "Paris" in tok.decode(outs[0][ids.shape[1]:])
