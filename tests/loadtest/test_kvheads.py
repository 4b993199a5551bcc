"""The KV-heads experiment without an engine: budget -> blocks, the prediction, the
sustained-running statistic, the spec, targets mode against the fake server, and the
report rebuilt from a small synthetic result. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.__main__ import main
from loadtest.core.config import Load, RunConfig, Slo, Target
from loadtest.local.fakeserver import FakeOpenAIServer
from loadtest.kvheads.measure import is_saturated, measure, ratios, waiting_fraction, within
from loadtest.kvheads.plan import budget_bytes_for, check_plan, kv_tokens_per_sequence, plan_from_server, plan_variant
from loadtest.kvheads.procs import other_engines, serve_command, summarize_log
from loadtest.kvheads.report import markdown, markdown_path, write_report
from loadtest.kvheads.result import KvHeadsResult, VariantRun, load_result, strip_itl
from loadtest.kvheads.spec import DEFAULT_CONFIG, BudgetSpec, KvHeadsSpec, load_spec, parse_targets
from loadtest.server.saturation import sustained_running
from loadtest.core.metrics import summarize
from loadtest.core.results import (
    HistogramMean,
    RequestRecord,
    RunResult,
    ServerSample,
    ServerSummary,
    StepResult,
    environment,
    save,
)
from service.kv.geometry import KVGeometry

# SmolLM2-135M: 30 layers, 9 query heads, head size 64, bf16, CPU block 128
SMOL = KVGeometry(layers=30, query_heads=9, kv_heads=3, head_size=64, dtype_bytes=2, block_size=128)
VARIANTS = {"MHA": SMOL.with_kv_heads(9), "GQA-3": SMOL, "MQA": SMOL.with_kv_heads(1)}


# ---------------------------------------------------------------- budget and prediction
def test_budget_in_blocks_of_the_largest_variant_gives_1_3_9_blocks() -> None:
    budget = budget_bytes_for(BudgetSpec(blocks_of_largest=4), VARIANTS.values())
    assert budget == 4 * 128 * 69_120 == 35_389_440
    plans = [plan_variant(n, n, g, budget, 32, 64, 256, reserved_blocks=1) for n, g in VARIANTS.items()]
    assert [p.kv_bytes_per_token for p in plans] == [69_120, 23_040, 7_680]
    assert [p.num_blocks for p in plans] == [4, 12, 36]
    assert [p.engine_blocks for p in plans] == [5, 13, 37]  # + vLLM's null block
    assert {p.num_blocks * p.kv_bytes_per_block for p in plans} == {budget}  # the same usable bytes
    assert [p.kind for p in plans] == ["MHA", "GQA-3", "MQA"]


def test_budget_in_bytes_rounds_down_to_whole_blocks_and_warns() -> None:
    budget = budget_bytes_for(BudgetSpec(bytes=10 * 2**20), VARIANTS.values())
    plans = [plan_variant(n, n, g, budget, 32, 64, 256) for n, g in VARIANTS.items()]
    assert [p.num_blocks for p in plans] == [1, 3, 10]  # 10 MiB // 8.4, 2.8, 0.94 MiB blocks
    spec = KvHeadsSpec(budget=BudgetSpec(bytes=budget))
    _, warnings = check_plan(spec, plans)
    assert any("not a whole number of its blocks" in w for w in warnings)


def test_prediction_one_block_per_sequence_is_the_block_count() -> None:
    assert kv_tokens_per_sequence(32, 64) == 95  # P + G - 1
    plan = plan_variant("GQA-3", "m", SMOL, 12 * SMOL.kv_bytes_per_block, 32, 64, 256)
    assert (plan.blocks_per_seq, plan.admission_blocks_per_seq) == (1, 1)
    assert not plan.grows_after_admission
    assert plan.predicted_max_seqs == 12.0 and plan.predicted_running == 12


def test_prediction_two_blocks_per_sequence_and_growth_after_admission() -> None:
    # hand-worked: 120 prompt + 100 output on 20 blocks of 128 -> 219 tokens = 2 blocks each -> 10 at a time
    plan = plan_variant("GQA-3", "m", SMOL, 20 * SMOL.kv_bytes_per_block, 120, 100, 2048)
    assert plan.kv_tokens_per_seq == 219 and plan.blocks_per_seq == 2
    assert plan.predicted_running == 10
    assert plan.admission_blocks_per_seq == 1 and plan.grows_after_admission
    odd = plan_variant("GQA-3", "m", SMOL, 21 * SMOL.kv_bytes_per_block, 120, 100, 2048)
    assert odd.predicted_max_seqs == 10.5 and odd.predicted_running == 10  # whole sequences


def test_check_plan_errors_and_warnings() -> None:
    spec = KvHeadsSpec(budget=BudgetSpec(blocks_of_largest=1))
    budget = budget_bytes_for(spec.budget, VARIANTS.values())
    plans = [plan_variant(n, n, g, budget, 32, 64, 256) for n, g in VARIANTS.items()]
    errors, _ = check_plan(spec, plans)
    assert any("max_model_len 256 does not fit" in e for e in errors)  # MHA: 1 block = 128 tokens
    spec = KvHeadsSpec(budget=BudgetSpec(blocks_of_largest=8))
    spec.engine.max_num_seqs = 32
    budget = budget_bytes_for(spec.budget, VARIANTS.values())
    plans = [plan_variant(n, n, g, budget, 32, 64, 256) for n, g in VARIANTS.items()]
    errors, warnings = check_plan(spec, plans)
    assert not errors
    assert any("max_num_seqs binds first" in w for w in warnings)  # MQA: 72 >= 32
    assert any("does not exceed the predicted capacity" in w for w in warnings)  # 72 >= 48
    spec = KvHeadsSpec()
    spec.workload.input_tokens, spec.workload.output_tokens = 64, 65  # 129 vs 128 tokens
    plans = [plan_variant("GQA-3", "m", SMOL, 12 * SMOL.kv_bytes_per_block, 64, 65, 256)]
    _, warnings = check_plan(spec, plans)
    assert any("block boundary" in w for w in warnings)


def test_serve_command_gives_the_engine_usable_plus_reserved_blocks() -> None:
    spec = KvHeadsSpec()
    plan = plan_variant("MQA", "m", VARIANTS["MQA"], 4 * VARIANTS["MHA"].kv_bytes_per_block, 32, 64, 256)
    cmd = serve_command(plan, spec, 8123, Path("/models/kv1"))
    assert cmd[1:4] == ["-m", "service", "serve"]
    flags = dict(zip(cmd[4::1], cmd[5::1], strict=False))
    assert flags["--num-gpu-blocks-override"] == "37"
    assert flags["--port"] == "8123" and flags["--max-num-seqs"] == "64" and flags["--max-model-len"] == "256"
    assert "--no-enable-prefix-caching" in cmd and "--enforce-eager" in cmd


def test_the_shipped_spec_validates_and_plans_1_3_9() -> None:
    spec = load_spec(DEFAULT_CONFIG)
    assert [v.name for v in spec.variants] == ["MHA", "GQA-3", "MQA"]
    assert spec.budget.blocks_of_largest == 4 and not spec.engine.enable_prefix_caching
    assert spec.engine.max_num_seqs > 36 and max(spec.load.concurrency) > 36
    assert spec.load.requests_for(1) == 8 and spec.load.requests_for(48) == 144


def test_plan_from_server_reads_gateway_metrics() -> None:
    check = {
        "kv_blocks": 37.0, "kv_bytes_per_token": 7680.0,
        "info": {"block_size": "128", "query_heads": "9", "kv_heads": "1", "layers": "30", "head_size": "64"},
    }  # fmt: skip
    plan = plan_from_server("mqa", "m", check, KvHeadsSpec(), reserved_blocks=1)
    assert plan.kind == "MQA" and plan.num_blocks == 36 and plan.predicted_running == 36
    assert plan.budget_bytes == 36 * 128 * 7680
    unknown = plan_from_server("x", "m", {"scraped": False}, KvHeadsSpec(), reserved_blocks=1)
    assert unknown.predicted_running is None and unknown.kind is None


def test_other_engines_skips_our_own_engine(tmp_path: Path) -> None:
    # pid -> (cmdline, ppid): our gateway 5 -> its engine core 10 -> worker 11; a foreign gateway
    # 30 -> engine 20; a foreign vLLM server still importing (no engine core yet); a load test; noise
    procs = {
        5: ("python -m service serve --port 1", 1), 10: ("VLLM::EngineCore", 5), 11: ("VLLM::Worker", 10),
        30: ("python -m service serve --port 2", 1), 20: ("VLLM::EngineCore", 30),
        50: ("python -m vllm.entrypoints.openai.api_server --model m", 1),
        60: ("python -m loadtest compare --servers gateway", 1), 61: ("python -m loadtest report x", 1),
        40: ("bash", 1), 41: ("", 1),
    }  # fmt: skip
    for pid, (cmdline, ppid) in procs.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")
        (tmp_path / str(pid) / "comm").write_text((cmdline.split(" ")[0] or "kworker")[:15] + "\n")
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (x y) S {ppid} {pid} {pid} 0 -1\n")
    assert other_engines(proc=tmp_path) == [5, 10, 11, 20, 30, 50, 60]
    assert other_engines(own_root=5, proc=tmp_path) == [20, 30, 50, 60]


def test_parse_targets() -> None:
    targets = parse_targets("llama2=http://10.0.0.1:8000, falcon=http://h:9/v1#falcon-7b")
    assert [(t.name, t.base_url, t.model) for t in targets] == [
        ("llama2", "http://10.0.0.1:8000", None),
        ("falcon", "http://h:9/v1", "falcon-7b"),
    ]
    with pytest.raises(ValueError):
        parse_targets("just-a-url")


# ---------------------------------------------------------------- the statistic
def _samples(pairs: list[tuple[float, float]]) -> list[ServerSample]:
    return [ServerSample(t_s=0.25 * i, running=r, waiting=w) for i, (r, w) in enumerate(pairs)]


def test_sustained_running_is_the_median_and_mode_while_requests_wait() -> None:
    # saturated at 12 with a dip when a wave ends and a short over-admission peak; no queue at the end
    pairs = [(0, 0), (12, 36)] + [(12, 36)] * 20 + [(0, 48), (12, 36), (19, 29)] + [(12, 36)] * 10 + [(6, 0)] * 8
    stat = sustained_running([_samples(pairs)])  # one saturated step: 34 of 43 scrapes saw a queue
    assert stat.samples == 34 and stat.median == 12 and stat.mode == 12
    assert sustained_running([_samples([(3, 0), (4, 0)])]).samples == 0  # never waited
    assert sustained_running([_samples([(3, 0), (4, 0)])]).median is None
    assert sustained_running([_samples([(4, 1), (5, 1)])]).mode == 5  # ties go to the larger batch
    # a step that queued in fewer than half of its scrapes is not saturated: it does not count
    brief = [(4, 0)] * 6 + [(3, 1)] * 2
    assert sustained_running([_samples(brief)]).samples == 0
    assert sustained_running([_samples(brief), _samples([(12, 4)] * 3)]).median == 12


def _step(concurrency: int, pairs: list[tuple[float, float]], preemptions: float = 0, kv_heads: int = 3) -> StepResult:
    records = [
        RequestRecord(
            index=i, start_s=0.1 * i, end_s=0.1 * i + 2.0 + 0.05 * concurrency, ttft_s=0.2 + 0.02 * concurrency * i,
            e2e_s=2.0 + 0.05 * concurrency, content_chunks=8, expected_prompt_tokens=32, requested_output_tokens=8,
            prompt_tokens=32, output_tokens=8, success=True,
        )
        for i in range(6)
    ]  # fmt: skip
    samples = _samples(pairs)
    per_request = {
        "kv_used_bytes": HistogramMean(count=6, mean=39 * 7680 * kv_heads),
        "kv_allocated_bytes": HistogramMean(count=6, mean=128 * 7680 * kv_heads),
        "kv_mha_equivalent_bytes": HistogramMean(count=6, mean=39 * 7680 * 9),
        "attention_flops_prefill": HistogramMean(count=6, mean=3.6e7),
        "attention_flops_decode": HistogramMean(count=6, mean=4.0e7),
        "kv_read_bytes": HistogramMean(count=6, mean=250 * 7680 * kv_heads),
    }
    server = ServerSummary(
        source="gateway", scrapes=len(samples), running_peak=max(r for r, _ in pairs),
        waiting_peak=max(w for _, w in pairs), running_mean=sum(r for r, _ in pairs) / len(pairs),
        preemptions=preemptions, per_request=per_request, samples=samples, kv_usage_peak=0.9,
    )  # fmt: skip
    return StepResult(
        index=0, shape="concurrency", concurrency=concurrency, started_at="2025-01-01T00:00:00+00:00",
        offset_s=0.0, requests=records, summary=summarize(records, 3.0, Slo(), True), server=server,
    )  # fmt: skip


def _run(label: str, capacity: int, kv_heads: int) -> RunResult:
    steps = []
    for i, c in enumerate((1, 4, 16)):
        if c <= capacity:  # below capacity: a queue only for an instant between requests
            pairs = [(0, 0)] + [(c, 0)] * 9 + [(c - 1, 1)] + [(0, 0)]
        else:
            pairs = [(0, 0)] + [(capacity, c - capacity)] * 10 + [(capacity + 2, c - capacity - 2)] + [(0, 0)]
        step = _step(c, pairs, preemptions=2 if c > capacity else 0, kv_heads=kv_heads)
        steps.append(step.model_copy(update={"index": i, "offset_s": 10.0 * i}))
    config = RunConfig(
        target=Target(base_url="http://x", model=label), load=Load(concurrency=[1, 4, 16], num_requests=6)
    )
    return RunResult(label=label, created_at="2025-01-01T00:00:00+00:00", config=config,
                     environment=environment(["kv-heads"]), steps=steps)  # fmt: skip


def test_saturation_and_measure_pool_only_saturated_steps() -> None:
    run = _run("GQA-3", capacity=4, kv_heads=3)
    low, at, high = run.steps
    for unsaturated in (low, at):  # the instant queue between two requests does not count
        assert 0 < waiting_fraction(unsaturated) < 0.5 and not is_saturated(unsaturated)
    assert waiting_fraction(high) == 1.0 and is_saturated(high)
    m = measure(run)
    assert m.saturated_concurrencies == [16] and m.queueing_from == 16
    assert m.sustained.median == 4 and m.sustained.mode == 4 and m.running_peak == 6
    assert m.preemptions == 2 and m.preemptions_from == 16


def test_within_and_ratios() -> None:
    assert within(11.0, 12, 0.10) and within(13.2, 12, 0.10) and not within(10.7, 12, 0.10)
    assert within(None, 12, 0.1) is None and within(3, None, 0.1) is None
    assert ratios([4, 12, 36]) == [1.0, 3.0, 9.0]
    assert ratios([None, 1]) == [None, None]


def test_summarize_log_keeps_cache_lines_and_problems_once() -> None:
    log = "\n".join([
        "2025-01-01 10:00:00 INFO service.engine: engine ready in 27.1 s: MQA, 37 blocks x 128 tokens, 7680 B/token",
        "2025-01-01 10:00:01 INFO gateway.requests: {\"request_id\": \"a\"}",
        "INFO 01-01 10:00:02 [cpu_worker.py:1] Reducing Torch threads from 2 to 1 for serving.",
        "WARNING 01-01 10:00:03 something odd 1",
        "WARNING 01-01 10:00:04 something odd 2",
        "INFO: 127.0.0.1:5 - \"POST /v1/completions HTTP/1.1\" 200 OK",
    ])  # fmt: skip
    lines = summarize_log(log)
    assert len(lines) == 3 and "engine ready" in lines[0] and "Reducing" in lines[1] and "odd 1" in lines[2]


# ---------------------------------------------------------------- report from JSON
@pytest.fixture()
def synthetic_result() -> KvHeadsResult:
    spec = load_spec(DEFAULT_CONFIG)
    spec.load.concurrency = [1, 4, 16]
    budget = budget_bytes_for(spec.budget, VARIANTS.values())
    runs = []
    for (name, g), capacity in zip(VARIANTS.items(), (1, 3, 9), strict=True):
        plan = plan_variant(name, f"models/{name}", g, budget, 32, 8, 256).model_copy(
            update={"predicted_running": capacity, "predicted_max_seqs": float(capacity)}
        )
        runs.append(VariantRun(
            plan=plan, served_model=name, engine_start_s=27.0, wall_s=60.0,
            engine_check={"kv_blocks": float(capacity + 1), "kv_bytes_per_token": float(g.kv_bytes_per_token)},
            log_summary=["engine ready in 27.0 s"], run=_run(name, capacity, g.kv_heads),
        ))  # fmt: skip
    return KvHeadsResult(
        command="python -m loadtest kv-heads --config configs/loadtest/kv-heads-cpu.yaml", mode="managed",
        created_at="2025-01-01T00:00:00+00:00", finished_at="2025-01-01T00:10:00+00:00", wall_s=600.0,
        spec=spec, budget_bytes=budget, environment=environment(["kv-heads"]), variants=runs,
    )  # fmt: skip


def test_markdown_has_the_command_the_tables_and_the_explanation(synthetic_result: KvHeadsResult) -> None:
    text = markdown(synthetic_result, "kv")
    assert text.startswith("# KV heads: MHA vs GQA-3 vs MQA")
    assert "python -m loadtest kv-heads --config configs/loadtest/kv-heads-cpu.yaml" in text
    assert "## Predicted vs measured maximum concurrent running requests" in text
    assert "measured 1.00 : 3.00 : 9.00" in text  # capacities 1, 3, 9 in the synthetic samples
    assert "| MHA | 1.0 | 1 | 1.0 | 1 |" in text
    for heading in (
        "## Where queueing and preemption start", "## KV bytes and attention work per request", "## Explain it",
        "Llama-2-7B", "Falcon-7B", "Llama-3.1-8B", "2307.09288", "uptraining",
    ):  # fmt: skip
        assert heading in text
    assert "![sweep](kv/sweep.png)" in text
    assert "Decode KV bytes read relative to the first variant: 1.000 : 0.333 : 0.111" in text


def test_report_only_rebuilds_markdown_and_pngs_from_json(synthetic_result: KvHeadsResult, tmp_path: Path) -> None:
    out = tmp_path / "kv-heads-cpu"
    path = save(synthetic_result, out / "result.json")
    assert load_result(path) == synthetic_result
    assert main(["kv-heads", "--report-only", str(path)]) == 0
    md = markdown_path(out)
    assert md == tmp_path / "kv-heads-cpu.md" and md.is_file()
    assert "![capacity](kv-heads-cpu/capacity.png)" in md.read_text()
    for name in ("capacity", "sweep", "timeline", "kv_attention"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = write_report(synthetic_result, tmp_path / "again", plots=False)
    assert written == [tmp_path / "again.md"] and "![" not in written[0].read_text()


def test_load_result_refuses_other_files(tmp_path: Path) -> None:
    other = tmp_path / "run.json"
    other.write_text(json.dumps({"schema_version": 1, "label": "x"}))
    with pytest.raises(ValueError, match="not a kv-heads result"):
        load_result(other)


def test_strip_itl_keeps_the_summaries(synthetic_result: KvHeadsResult) -> None:
    run = synthetic_result.variants[0].run
    assert run is not None
    with_itl = run.model_copy(update={"steps": [
        s.model_copy(update={"requests": [r.model_copy(update={"itl_s": [0.1, 0.2]}) for r in s.requests]})
        for s in run.steps
    ]})  # fmt: skip
    stripped = strip_itl(with_itl)
    assert all(r.itl_s == [] for s in stripped.steps for r in s.requests)
    assert [s.summary for s in stripped.steps] == [s.summary for s in with_itl.steps]


# ---------------------------------------------------------------- targets mode, end to end
def test_targets_mode_against_the_fake_server(tmp_path: Path, word_tokenizer_dir: Path, serve) -> None:
    out = tmp_path / "targets"
    with serve(FakeOpenAIServer(itl_s=0.001)) as url:
        status = main([
            "kv-heads", "--targets", f"fake={url}#fake-model", "--tokenizer", str(word_tokenizer_dir),
            "--concurrency", "1,2", "--input-tokens", "12", "--output-tokens", "4", "--output-dir", str(out),
        ])  # fmt: skip
    assert status == 0
    result = load_result(out / "result.json")
    assert result.mode == "targets" and result.command.startswith("python -m loadtest kv-heads --targets")
    (variant,) = result.variants
    assert variant.served_model == "fake-model" and variant.plan.predicted_running is None  # no block gauge
    assert variant.run is not None and [s.concurrency for s in variant.run.steps] == [1, 2]
    assert all(s.summary.completed == s.summary.completed + s.summary.failed == 8 for s in variant.run.steps)
    assert (tmp_path / "targets.md").is_file() and (out / "sweep.png").is_file()


def test_select_variants_keeps_spec_order_and_refuses_unknown_names():
    from types import SimpleNamespace

    from loadtest.kvheads.spec import select_variants

    vs = [SimpleNamespace(name=n) for n in ("mha", "gqa", "mqa")]
    assert [v.name for v in select_variants(vs, "mqa, mha")] == ["mha", "mqa"]
    with pytest.raises(ValueError, match="unknown variants"):
        select_variants(vs, "gqa,nope")
