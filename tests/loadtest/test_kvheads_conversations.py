"""The KV-heads conversation experiment without an engine: the prediction from shapes
(hand-worked), and the sweep, result and report against the fake server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from loadtest.__main__ import main
from loadtest.core.results import environment, now_iso, save
from loadtest.core.workload import load_tokenizer
from loadtest.kvheads.conversations import (
    ConversationLoad, ConversationSpec, ConversationWorkload, load_conversation_spec, predict, prompt_tokens_by_turn,
)  # fmt: skip
from loadtest.kvheads.conversations_report import capacity_rows, section, turn_rows
from loadtest.kvheads.conversations_run import ConversationsResult, capacity_spec, load_conversations, plan, sweep
from loadtest.kvheads.plan import VariantPlan
from loadtest.kvheads.result import VariantRun
from loadtest.local.fakeserver import FakeOpenAIServer


def test_prediction_hand_worked() -> None:
    # B = 128, G = 24: H_k = P_k + 23 = 95, 172, 250, 328 -> 1, 2, 2, 3 blocks
    pred = predict("MHA", 6, 69_120, 128, [72.0, 149.0, 227.0, 305.0], 34, 24, [2, 6])
    assert [t.blocks for t in pred.turns] == [1, 2, 2, 3]
    assert pred.sessions_fit == 2  # 6 blocks / 3 at the last turn
    # turn 2 could reuse 95 tokens (< one block); turn 3 172 -> 128; turn 4 250 -> 128
    assert [t.cached_full for t in pred.turns] == [0, 0, 128, 128]
    assert pred.hit_ratio[2] == [0.0, 0.0, 128 / 227, 128 / 305]  # 2 sessions x 2 blocks fit in 6
    assert pred.hit_ratio[6][2] == pytest.approx(128 / 227 * 3 / 6)  # only 6 // 2 = 3 histories stay
    assert pred.kv_bytes[0] == 95 * 69_120
    mqa = predict("MQA", 54, 7_680, 128, [72.0, 149.0, 227.0, 305.0], 34, 24, [6])
    assert mqa.sessions_fit == 18 and mqa.hit_ratio[6][2] == pytest.approx(128 / 227)


def test_shipped_spec_plans_the_same_bytes_for_every_variant() -> None:
    spec = load_conversation_spec(Path("configs/loadtest/kv-heads-conversations-cpu.yaml"))
    assert spec.engine.enable_prefix_caching and [v.name for v in spec.variants] == ["MHA", "GQA-3", "MQA"]
    kv = capacity_spec(spec, 305)
    assert kv.workload.input_tokens == 305 and kv.engine == spec.engine


def test_sweep_result_and_report_against_the_fake_server(serve, word_tokenizer_dir: Path, tmp_path: Path) -> None:
    spec = ConversationSpec(
        workload=ConversationWorkload(turns=3, user_tokens=20, output_tokens=8, think_time_s=0.0,
                                      tokenizer=word_tokenizer_dir),
        load=ConversationLoad(concurrency=[2], waves=1, warmup_sessions=0),
    )  # fmt: skip
    tokenizer = load_tokenizer(word_tokenizer_dir)
    steps = [spec.step_conversations(0, 2, tokenizer)]
    prompts, shared = prompt_tokens_by_turn(steps[0], 8, tokenizer, np.random.default_rng(1))
    assert prompts[0] < prompts[1] < prompts[2]
    server = FakeOpenAIServer()
    with serve(server) as url:
        run = asyncio.run(sweep(spec, url, "fake", [], steps, tokenizer, []))
    assert len(server.bodies) == 6 and run.steps[0].concurrency == 2
    prediction = predict("fake", 100, 1024, 16, prompts, shared, 8, [2])
    vplan = VariantPlan(name="fake", model="m", block_size=16, kv_tokens_per_seq=1, blocks_per_seq=1,
                        admission_blocks_per_seq=1, num_blocks=100, kv_bytes_per_token=1024)  # fmt: skip
    result = ConversationsResult(
        command="test", created_at=now_iso(), spec=spec, budget_bytes=100 * 16 * 1024, prompt_tokens_by_turn=prompts,
        shared_prefix_tokens=shared, predictions=[prediction], environment=environment([]),
        variants=[VariantRun(plan=vplan, run=run)],
    )  # fmt: skip
    path = save(result, tmp_path / "conversations" / "result.json")
    assert load_conversations(path) == result
    rows = turn_rows(result)
    assert [r[2] for r in rows] == ["1", "2", "3"]
    measured_hits = [float(r[8]) for r in rows]
    assert measured_hits[0] == 0.0 and measured_hits[2] > 0.0  # the fake server's prefix cache
    assert capacity_rows(result)[0][6] == "2"  # no preemption at C = 2
    text = section(result, "conversations.png", "result.json")
    assert "## Conversations" in text and "ignore_eos" in text and "| fake | 2 | 3 |" in text
    assert main(["kv-heads", "--conversations", "--report-only", str(path)]) == 0
    assert (tmp_path / "conversations" / "conversations.png").is_file()
    assert "hit ratio meas." in (tmp_path / "conversations" / "summary.md").read_text()


def test_plan_refuses_a_model_len_that_does_not_fit(tmp_path: Path) -> None:
    spec = load_conversation_spec(Path("configs/loadtest/kv-heads-conversations-cpu.yaml"))
    base = json.loads(Path("models/SmolLM2-135M-Instruct/config.json").read_text())
    for v, heads in zip(spec.variants, (9, 3, 1)):  # the variants' shapes (weights are not read)
        folder = tmp_path / v.name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**base, "num_key_value_heads": heads}))
        v.model = str(folder)
    spec.engine.max_model_len = 256
    with pytest.raises(ValueError, match="max_model_len"):
        plan(spec, [72.0, 149.0, 227.0, 305.0], 34)


def test_a_gateway_that_does_not_start_is_recorded_not_raised(monkeypatch, tmp_path: Path) -> None:
    from loadtest.kvheads import run as kvrun
    from loadtest.kvheads.spec import KvHeadsSpec, VariantSpec

    def refuse(self, timeout_s: float) -> None:
        raise RuntimeError("the gateway exited with status 1")

    monkeypatch.setattr(kvrun.Gateway, "start", refuse)
    monkeypatch.setattr(kvrun.Gateway, "stop", lambda self, timeout_s=60.0: None)
    vplan = VariantPlan(name="v", model="m", block_size=16, kv_tokens_per_seq=1, blocks_per_seq=1,
                        admission_blocks_per_seq=1)  # fmt: skip
    vrun = VariantRun(plan=vplan)
    ran = []
    with kvrun.variant_gateway(vrun, VariantSpec(name="v", model=tmp_path), KvHeadsSpec(), tmp_path, []) as gateway:
        if gateway is not None:
            ran.append(gateway)
    assert ran == [] and vrun.error == "RuntimeError: the gateway exited with status 1" and vrun.wall_s is not None


def test_the_saved_result_holds_no_machine_path(serve, word_tokenizer_dir: Path) -> None:
    from loadtest.kvheads.conversations_cli import portable
    from loadtest.kvheads.plan import ROOT

    spec = ConversationSpec(workload=ConversationWorkload(tokenizer=ROOT / "models" / "x"))
    result = ConversationsResult(command="c", created_at=now_iso(), spec=spec, budget_bytes=1, prompt_tokens_by_turn=[],
                                 shared_prefix_tokens=0, predictions=[], environment=environment([]), variants=[])
    result.warnings.append(f"log: 'model': '{ROOT}/models/x'")
    text = portable(result).model_dump_json()
    assert str(ROOT) not in text and '"models/x"' in text
