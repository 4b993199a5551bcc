"""The latency sweep without an engine: the context grid, the roofline prediction of a point
on a hand-worked example, residuals and fits, and the report section from a synthetic result.
No timing is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.__main__ import main
from loadtest.core.config import Slo
from loadtest.kvheads.latency import (
    DEFAULT_LATENCY_CONFIG,
    LatencyLoad,
    Point,
    VariantModel,
    context_grid,
    fill_prompt,
    kv_limited,
    linear_fit,
    load_latency_spec,
    predict_point,
    residual,
    sweep_points,
    worst,
)
from loadtest.kvheads.latency_report import fits, rows, section
from loadtest.kvheads.latency_run import LatencyResult, PointRun, load_latency, ordered_points
from loadtest.kvheads.result import KvHeadsResult
from loadtest.core.metrics import summarize
from loadtest.core.results import RequestRecord, StepResult, environment, save
from service.kv.roofline import Hardware
from tests.loadtest.test_kvheads import synthetic_result  # noqa: F401  (the capacity report's fixture)

# A GQA-3 model shaped like SmolLM2-135M (30 layers, 9 query heads, 3 KV heads, d 64, bf16)
# with round weights: 134,500,000 parameters = 269,000,000 bytes, all in matmuls.
GQA = VariantModel(name="GQA-3", kv_heads=3, query_heads=9, layers=30, head_size=64, dtype_bytes=2, block_size=128,
                   kv_bytes_per_token=23_040, parameters=134_500_000, weight_bytes=269_000_000,
                   matmul_parameters=134_500_000, usable_blocks=48)  # fmt: skip
HW = Hardware("test CPU", bandwidth=5e9, peak_flops=33e9, memory_bytes=None, source="hand-worked")


def test_prediction_hand_worked_batch_4_prompt_100_three_tokens() -> None:
    # G = 3: TPOT spans the steps producing tokens 2 and 3, over contexts 101 and 102.
    # c = 101: KV = 4 x 101 x 23,040 = 9,308,160 B; (269,000,000 + 9,308,160) / 5e9 = 55.661632 ms
    #          FLOPs = 4 x 2 x 134.5e6 + 4 x 30 x 9 x 64 x (4 x 101) = 1,103,924,480 -> 33.452 ms < memory
    # c = 102: KV = 9,400,320 B -> 278,400,320 / 5e9 = 55.680064 ms; FLOPs 1,104,200,960
    # mean = 55.670848 ms, memory-bound; mean KV 9,354,240 B = 0.034774 of the weights
    p = predict_point(GQA, batch=4, prompt_tokens=100, output_tokens=3, hw=HW)
    assert p.tpot_s == pytest.approx(0.055670848, rel=1e-12)
    assert p.memory_s == pytest.approx(0.055670848, rel=1e-12)
    assert p.compute_s == pytest.approx((1_103_924_480 + 1_104_200_960) / 2 / 33e9, rel=1e-12)
    assert p.bound == "memory" and p.mean_context == 101.5
    assert p.kv_bytes == 9_354_240
    assert p.kv_over_weights == pytest.approx(9_354_240 / 269_000_000)


def test_prediction_turns_compute_bound_when_bandwidth_is_plentiful() -> None:
    fast_memory = Hardware("x", bandwidth=1e12, peak_flops=33e9, memory_bytes=None, source="")
    p = predict_point(GQA, batch=16, prompt_tokens=100, output_tokens=2, hw=fast_memory)
    # one step, context 101: FLOPs = 16 x 2 x 134.5e6 + 69,120 x 16 x 101 = 4,415,697,920 -> 133.8 ms
    flops = 16 * 2 * 134_500_000 + 4 * 30 * 9 * 64 * 16 * 101
    assert p.bound == "compute" and p.tpot_s == pytest.approx(flops / 33e9)
    with pytest.raises(ValueError):
        predict_point(GQA, batch=1, prompt_tokens=10, output_tokens=1, hw=HW)


def test_crossover_context_is_weights_over_batch_kv_bytes() -> None:
    assert GQA.crossover_context(4) == pytest.approx(269_000_000 / (4 * 23_040))  # 2,918.8 tokens
    assert GQA.crossover_context(1) == pytest.approx(4 * GQA.crossover_context(4))


def test_residual_and_worst() -> None:
    assert residual(0.06, 0.05) == pytest.approx(0.2)
    assert residual(0.04, 0.05) == pytest.approx(-0.2)
    assert residual(None, 0.05) is None and residual(0.05, 0.0) is None
    table = [{"tpot_residual": 0.3}, {"tpot_residual": -0.5}, {"tpot_residual": None}]
    assert worst(table) == {"tpot_residual": -0.5}  # furthest from 0, either sign
    assert worst([{"tpot_residual": None}]) is None


def test_linear_fit() -> None:
    assert linear_fit([0, 1, 2], [1, 3, 5]) == pytest.approx((1.0, 2.0))
    assert linear_fit([1, 1], [2, 3]) is None


# ---------------------------------------------------------------- grid
def test_fill_prompt_and_what_limits_it() -> None:
    # 16 usable blocks of 128, G = 16: batch 16 -> 1 block each -> P + 15 <= 128 -> 113
    assert fill_prompt(16, 128, 16, 16, 256) == 113 and kv_limited(16, 128, 16, 16, 256)
    # batch 4 -> 4 blocks each (497) but max_model_len 256 binds: 240
    assert fill_prompt(16, 128, 4, 16, 256) == 240 and not kv_limited(16, 128, 4, 16, 256)
    assert fill_prompt(16, 128, 32, 16, 256) == 0  # not one block per sequence


def test_context_grid_adds_geometric_midpoints_of_the_widest_gap() -> None:
    assert context_grid([113, 240, 240], 32, 3) == [32, 113, 240]
    assert context_grid([4064, 4064], 64, 4) == [64, 510, 1440, 4064]
    assert context_grid([40], 32, 5) == [32, 40]  # gaps under 1.5x are not split
    assert context_grid([10], 32, 3) == [32]  # a fill below the shortest prompt is dropped


def test_sweep_points_each_variant_up_to_its_own_fill() -> None:
    load = LatencyLoad(batches=[16], points=3, min_prompt_tokens=32)
    points = sweep_points(["MHA", "GQA-3", "MQA"], [16, 48, 144], 128, load, 16, 256)
    by = {(p.variant, p.prompt_tokens): p.fills_cache for p in points}
    assert by == {("MHA", 32): False, ("GQA-3", 32): False, ("MQA", 32): False,
                  ("MHA", 113): True, ("GQA-3", 113): False, ("MQA", 113): False,
                  ("GQA-3", 240): False, ("MQA", 240): False}  # fmt: skip


def test_shipped_spec_and_alternating_order() -> None:
    spec = load_latency_spec(DEFAULT_LATENCY_CONFIG)
    assert [v.name for v in spec.variants] == ["MHA", "GQA-3", "MQA"] and spec.load.batches == [1, 4, 16]
    models = [GQA.model_copy(update={"name": n, "usable_blocks": b}) for n, b in (("MHA", 16), ("GQA-3", 48),
                                                                                 ("MQA", 144))]  # fmt: skip
    order = ordered_points(spec, models)
    firsts = [order[i].variant for i in range(0, 9, 3)]  # batch 1: three groups of three
    assert firsts == ["MHA", "GQA-3", "MQA"]  # the first variant rotates from point to point
    assert len(order) == len({(p.variant, p.batch, p.prompt_tokens) for p in order})


# ---------------------------------------------------------------- report from a synthetic result
def _step(batch: int, tpot: float, output: int = 16) -> StepResult:
    records = [RequestRecord(index=i, start_s=0.0, end_s=1.0 + tpot * (output - 1), ttft_s=1.0 + 0.1 * i,
                             e2e_s=1.0 + 0.1 * i + tpot * (output - 1), itl_s=[tpot] * (output - 1),
                             content_chunks=output, output_tokens=output, requested_output_tokens=output,
                             success=True) for i in range(batch)]  # fmt: skip
    return StepResult(index=0, shape="concurrency", concurrency=batch, started_at="2025-01-01T00:00:00+00:00",
                      offset_s=0.0, requests=records, summary=summarize(records, 5.0, Slo(), True))  # fmt: skip


@pytest.fixture()
def latency_result() -> LatencyResult:
    spec = load_latency_spec(DEFAULT_LATENCY_CONFIG)
    spec.load.batches = [4]
    points = [PointRun(point=Point(variant="GQA-3", batch=4, prompt_tokens=p, fills_cache=p == 240), order=i,
                       started_at="2025-01-01T00:00:00+00:00", step=_step(4, t))
              for i, (p, t) in enumerate(((32, 0.110), (240, 0.060)))]  # fmt: skip
    hw = {"name": HW.name, "bandwidth": HW.bandwidth, "peak_flops": HW.peak_flops, "memory_bytes": None,
          "source": HW.source}  # fmt: skip
    return LatencyResult(command="python -m loadtest kv-heads --latency", created_at="2025-01-01T00:00:00+00:00",
                         spec=spec, budget_bytes=141_557_760, hardware=hw, models=[GQA], points=points,
                         environment=environment(["kv-heads"]))  # fmt: skip


def test_rows_fits_and_section(latency_result: LatencyResult) -> None:
    table = rows(latency_result)
    assert [r["prompt_tokens"] for r in table] == [32, 240]
    first = table[0]
    assert first["tpot_p50_s"] == pytest.approx(0.110)
    assert first["tpot_residual"] == pytest.approx(0.110 / first["predicted_tpot_s"] - 1)
    fit = fits(table)
    assert len(fit) == 1 and fit[0]["slope_s_per_gb"] < 0  # synthetic: the step got faster with more KV
    text = section(latency_result, "kv/latency.png")
    assert "## Latency per variant" in text and "![latency](kv/latency.png)" in text
    assert "**Worst residual**: GQA-3 at batch 4, prompt 32" in text  # 110 ms vs ~54 ms
    assert "python -m loadtest kv-heads --latency" in text


@pytest.fixture()
def synthetic_result_path(synthetic_result: KvHeadsResult, tmp_path: Path) -> Path:  # noqa: F811
    return save(synthetic_result, tmp_path / "kv-heads-cpu" / "result.json")


def test_latency_json_becomes_a_section_of_the_kv_heads_report(latency_result: LatencyResult, tmp_path: Path,
                                                               synthetic_result_path: Path) -> None:
    out = synthetic_result_path.parent
    latency_result.spec.output.report = synthetic_result_path
    path = save(latency_result, out / "latency.json")
    assert load_latency(path) == latency_result
    assert main(["kv-heads", "--latency", "--report-only", str(path)]) == 0
    text = (out.parent / f"{out.name}.md").read_text()
    assert "## Predicted vs measured maximum concurrent running requests" in text  # the capacity report
    assert "## Latency per variant" in text and (out / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_gemmprobe_shapes_of_smollm2_and_its_variants() -> None:
    from loadtest.kvheads.gemmprobe import linear_shapes

    cfg = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "num_hidden_layers": 30, "vocab_size": 49152}  # fmt: skip
    layer, head, layers = linear_shapes(cfg)
    assert layer == [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    assert head == (576, 49152) and layers == 30
    # 30 x 3,538,944 + 28,311,552 (the tied head) = 134,479,872 matmul parameters: the checkpoint's
    # 134,515,008 less its 61 RMSNorm weight vectors of 576
    assert layers * sum(i * o for i, o in layer) + head[0] * head[1] == 134_479_872 == 134_515_008 - 61 * 576
    assert linear_shapes({**cfg, "num_key_value_heads": 9})[0][1] == (576, 576)  # MHA sibling


def test_commands_in_results_carry_no_machine_path() -> None:
    import sys

    from loadtest.kvheads.latency_run import portable
    from loadtest.kvheads.plan import ROOT

    cmd = [sys.executable, "-m", "service", "serve", "--model", str(ROOT / "models" / "M-kv9"), "--port", "1"]
    assert portable(cmd) == "python -m service serve --model models/M-kv9 --port 1"
