"""Decode-step roofline and seed-model tables against published shapes and hand-worked examples.

Conventions that reproduce the hand-worked Llama-3.1-8B example (service/kv/roofline.py):
GB = 1e9 and TB/s = 1e12 B/s (the datasheets' units); the weights are every published
parameter (8,030,261,248: embeddings and the untied LM head included) x 2 bytes (bf16);
the MHA sibling keeps those weight bytes (only its KV cache grows). With the K/V
projections resized as well, the MHA sibling reads 1.61 GB more weights (46.3 ms).
"""

from __future__ import annotations

import json

import pytest

from service.__main__ import main
from service.kv import planner, roofline, seeds
from service.kv.geometry import KVGeometry

H100 = roofline.GPUS["H100-SXM"]
LLAMA31_8B = KVGeometry(layers=32, query_heads=32, kv_heads=8, head_size=128, dtype_bytes=2)
LLAMA31_8B_CFG = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                      num_parameters=8_030_261_248)


def _step(kv_heads: int, cfg: dict = LLAMA31_8B_CFG) -> roofline.StepCost:
    return roofline.uniform_step(LLAMA31_8B.with_kv_heads(kv_heads), roofline.weights_bytes(cfg, 2),
                                 roofline.matmul_parameters(cfg), batch=64, context=4096, hw=H100)


def test_llama31_8b_batch64_4k_on_h100_by_hand() -> None:
    step = _step(8)
    assert step.weight_bytes / 1e9 == pytest.approx(16.06, abs=0.005)  # "16.1 GB of weights"
    assert step.kv_bytes == 64 * 4096 * 131_072  # 34,359,738,368 B: "34.4 GB of KV"
    assert round(step.kv_bytes / 1e9, 1) == 34.4
    assert step.memory_s * 1e3 == pytest.approx(15.05, abs=0.01)  # "about 15.1 ms"
    assert step.bound == "memory" and step.tpot_s == step.memory_s
    assert step.compute_s is not None and step.compute_s < step.memory_s / 10  # ~1.1 ms of FLOPs at 989 TFLOPS


def test_llama31_8b_mha_sibling_by_hand() -> None:
    mha = _step(32)
    assert mha.kv_bytes == 4 * 64 * 4096 * 131_072  # 137.4 GB
    assert mha.tpot_s * 1e3 == pytest.approx(45.8, abs=0.05)
    assert mha.tpot_s / _step(8).tpot_s == pytest.approx(3.04, abs=0.01)
    resized = roofline.resized_kv_weights(LLAMA31_8B_CFG, LLAMA31_8B, 32, 2)
    assert resized - roofline.weights_bytes(LLAMA31_8B_CFG, 2) == 2 * 32 * 4096 * 128 * 24 * 2  # 1.61 GB
    step = roofline.uniform_step(LLAMA31_8B.with_kv_heads(32), resized, 0, 64, 4096, H100)
    assert step.memory_s * 1e3 == pytest.approx(46.3, abs=0.05)


def test_flops_count_matmul_parameters_and_attention() -> None:
    # untied: the input embedding table does no FLOPs, the LM head does
    assert roofline.matmul_parameters(LLAMA31_8B_CFG) == 8_030_261_248 - 128256 * 4096
    step = roofline.uniform_step(LLAMA31_8B, 0, 1000, batch=2, context=10, hw=H100)
    assert step.flops == 2 * 2 * 1000 + 4 * 32 * 32 * 128 * 20
    gpt2 = planner.load_shape("openai-community/gpt2")  # tied, learned positions
    assert roofline.matmul_parameters(gpt2) == 124_439_808 - 1024 * 768


def test_mixed_contexts_sum_over_the_batch() -> None:
    g = KVGeometry(layers=2, query_heads=4, kv_heads=2, head_size=8, dtype_bytes=2)
    hw = roofline.Hardware("toy", bandwidth=1000.0, peak_flops=None, memory_bytes=None, source="test")
    step = roofline.decode_step(g, 500, 0, [3, 7], hw)
    assert step.kv_bytes == g.kv_bytes_per_token * 10 and step.memory_s == (500 + g.kv_bytes_per_token * 10) / 1000
    assert step.compute_s is None and step.bound == "memory"


def test_compute_bound_when_flops_dominate() -> None:
    hw = roofline.Hardware("slow-alu", bandwidth=1e12, peak_flops=1e9, memory_bytes=None, source="test")
    step = roofline.uniform_step(LLAMA31_8B, 1000, 10**6, batch=4, context=1, hw=hw)
    assert step.bound == "compute" and step.tpot_s == step.compute_s


def test_tensor_parallel_splits_weights_kv_and_flops() -> None:
    one = _step(8)
    four = roofline.uniform_step(LLAMA31_8B, roofline.weights_bytes(LLAMA31_8B_CFG, 2),
                                 roofline.matmul_parameters(LLAMA31_8B_CFG), 64, 4096, H100, tensor_parallel_size=4)
    assert four.weight_bytes == one.weight_bytes / 4 and four.kv_bytes == one.kv_bytes / 4
    assert four.flops == pytest.approx(one.flops / 4)


def test_crossover_context() -> None:
    w = roofline.weights_bytes(LLAMA31_8B_CFG, 2)
    ctx = roofline.crossover_context(LLAMA31_8B, w, batch=64)
    assert ctx == pytest.approx(w / (64 * 131_072))  # ~1,915 tokens: past it KV reads dominate
    step = roofline.uniform_step(LLAMA31_8B, w, 0, 64, round(ctx), H100)
    assert step.kv_bytes == pytest.approx(step.weight_bytes, rel=1e-3)


@pytest.mark.parametrize("bad", [dict(bandwidth=0.0), dict(peak_flops=-1.0)])
def test_hardware_refuses_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError):
        roofline.Hardware(**{**dict(name="x", bandwidth=1.0, peak_flops=1.0, memory_bytes=1, source=""), **bad})


def test_refuses_a_shape_without_a_parameter_count() -> None:
    cfg = {k: v for k, v in LLAMA31_8B_CFG.items() if k != "num_parameters"}
    with pytest.raises(ValueError, match="num_parameters"):
        roofline.weights_bytes(cfg, 2)
    with pytest.raises(ValueError):
        roofline.uniform_step(LLAMA31_8B, 1, 1, batch=0, context=1, hw=H100)


def test_published_gpu_figures() -> None:
    assert (H100.bandwidth, roofline.GPUS["H200"].bandwidth) == (3.35e12, 4.8e12)
    assert H100.peak_flops == roofline.GPUS["H200"].peak_flops == 989.5e12  # 1,979 with sparsity / 2
    assert "datasheet" in H100.source and "datasheet" in roofline.GPUS["H200"].source


def test_hardware_from_hwprobe_json() -> None:
    hw = roofline.hardware_from_dict({"name": "cpu", "bandwidth": 1.2e10, "peak_flops": None, "memory_bytes": None})
    assert hw.bandwidth == 1.2e10 and hw.peak_flops is None
    with pytest.raises(ValueError):
        roofline.hardware_from_dict({"name": "cpu"})


# ---------------------------------------------------------------- published shapes
def _llama_like_parameters(c: dict, qkv_bias: bool = False) -> int:
    h, L, q, kv = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h // q
    attn = h * q * d + 2 * h * kv * d + q * d * h + ((q + 2 * kv) * d if qkv_bias else 0)
    layer = attn + 3 * h * c["intermediate_size"] + 2 * h  # gated MLP (SwiGLU / GeGLU), two RMSNorms
    emb = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    return L * layer + emb + h


def _falcon7b_parameters(c: dict) -> int:
    h, q, d = c["hidden_size"], c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
    layer = h * (q * d + 2 * d) + h * h + 2 * h * 4 * h + 2 * h  # fused QKV (MQA), dense, MLP, one LayerNorm
    return c["num_hidden_layers"] * layer + c["vocab_size"] * h + 2 * h


def _gpt2_parameters(c: dict) -> int:
    h = c["n_embd"]
    layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h)
    return c["n_layer"] * layer + c["vocab_size"] * h + c["n_positions"] * h + 2 * h


SHAPES = [
    # id, parameter count from the shape, query heads, KV heads, head size, layers, KV bytes/token in bf16
    ("meta-llama/Llama-3.1-8B-Instruct", _llama_like_parameters, 32, 8, 128, 32, 131_072),
    ("meta-llama/Llama-3.1-70B-Instruct", _llama_like_parameters, 64, 8, 128, 80, 327_680),
    ("meta-llama/Meta-Llama-3-70B", _llama_like_parameters, 64, 8, 128, 80, 327_680),
    ("meta-llama/Llama-2-7b-chat-hf", _llama_like_parameters, 32, 32, 128, 32, 524_288),
    ("mistralai/Mistral-7B-Instruct-v0.3", _llama_like_parameters, 32, 8, 128, 32, 131_072),
    ("Qwen/Qwen2.5-7B-Instruct", lambda c: _llama_like_parameters(c, qkv_bias=True), 28, 4, 128, 28, 57_344),
    ("google/gemma-7b", _llama_like_parameters, 16, 16, 256, 28, 458_752),
    ("tiiuae/falcon-7b-instruct", _falcon7b_parameters, 71, 1, 64, 32, 8_192),
    ("openai-community/gpt2", _gpt2_parameters, 12, 12, 64, 12, 36_864),
]


@pytest.mark.parametrize("model, count, q, kv, d, layers, bpt", SHAPES, ids=[s[0] for s in SHAPES])
def test_published_shapes_add_up(model, count, q, kv, d, layers, bpt) -> None:
    cfg = planner.load_shape(model)
    assert count(cfg) == cfg["num_parameters"]  # the shape and the published count agree exactly
    g, _ = planner.geometry_for(model, 16, "auto", "bfloat16")
    assert (g.query_heads, g.kv_heads, g.head_size, g.layers, g.kv_bytes_per_token) == (q, kv, d, layers, bpt)


@pytest.mark.parametrize("q, kv, siblings", [(32, 8, [32, 8, 1]), (32, 32, [32, 8, 1]), (16, 16, [16, 8, 1]),
                                             (12, 12, [12, 6, 1]), (71, 1, [71, 1]), (9, 3, [9, 3, 1])])
def test_sibling_kv_heads(q, kv, siblings) -> None:
    assert seeds.sibling_kv_heads(q, kv) == siblings


def test_seed_tables_llama31_8b_on_h100() -> None:
    tables = seeds.seed_tables([H100], models=[("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B")])
    assert tables["label"] == "predictions on paper, not measurements"
    rows = {r["kind"]: r for r in tables["rows"]}
    assert set(rows) == {"MHA", "GQA-8", "MQA"}
    gqa = rows["GQA-8"]
    budget = int(80 * 2**30 * 0.9 - 8_030_261_248 * 2)
    usable = budget // (131_072 * 16) - 1
    assert gqa["usable_blocks"] == usable
    assert gqa["max_concurrency"] == {2048: usable // 128, 8192: usable // 512, 32768: usable // 2048}
    assert gqa["tpot"][64]["tpot_s"] * 1e3 == pytest.approx(15.05, abs=0.01)  # the hand-worked example
    assert gqa["tpot"][64]["fits"] is True  # 64 x 4k tokens: 34.4 GB of a ~61 GB budget
    assert rows["MHA"]["tpot"][64]["tpot_s"] * 1e3 == pytest.approx(45.8, abs=0.05)
    assert rows["MHA"]["tpot"][64]["fits"] is False  # 137 GB of KV


def test_seed_tables_cover_every_seed_and_refuse_what_does_not_fit() -> None:
    tables = seeds.seed_tables([H100, roofline.GPUS["H200"]])
    assert tables["models"] == [s for _, s in seeds.SEED_MODELS]
    gpt2 = [r for r in tables["rows"] if r["name"] == "GPT-2"][0]
    assert gpt2["max_concurrency"][2048] is None and gpt2["tpot_context"] == 1024  # beyond its 1,024 positions
    big = [r for r in tables["rows"] if r["name"] == "Llama-3-70B"]
    assert big and not any(r["weights_fit"] for r in big)  # 141 GB of bf16 weights on one GPU
    text = seeds.render_seed_tables(tables)
    assert "Predictions on paper, not measurements" in text and "### H200" in text and "weights do not fit" in text


def test_kv_plan_seed_models_json(capsys) -> None:
    assert main(["kv-plan", "--seed-models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["label"] == "predictions on paper, not measurements"
    assert {r["hardware"] for r in out["rows"]} == {"H100-SXM", "H200"}
    assert {"Gemma-7B", "GPT-2", "Llama-3-70B", "Falcon-7B"} <= set(out["models"])


def test_kv_plan_roofline_cli(capsys) -> None:
    assert main(["kv-plan", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--roofline", "--batch", "64",
                 "--context", "4096", "--hardware", "H100-SXM", "--json"]) == 0
    rows = {r["kind"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["GQA-8"]["tpot_s"] * 1e3 == pytest.approx(15.05, abs=0.01)
    assert rows["MHA"]["tpot_s"] * 1e3 == pytest.approx(45.8, abs=0.05)
    assert main(["kv-plan", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--roofline", "--hardware", "B300"]) == 2
