"""Conversations, datasets and traces against the fake server: what each turn sends, how
sessions are counted, the per-turn report. Only the trace replay checks timing, with a
generous tolerance."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from loadtest.__main__ import main
from loadtest.core.config import RunConfig, TokenRange
from loadtest.core.datasets import build_conversations, read_azure, read_mooncake, read_sharegpt
from loadtest.core.samples import write_samples
from loadtest.core.sessions import Conversation, Turn
from loadtest.local.fakeserver import FakeOpenAIServer
from loadtest.output.report import markdown
from loadtest.output.turns import turn_figures
from loadtest.server.observed import ObservedRunner

SAMPLES = Path(__file__).resolve().parents[2] / "configs" / "loadtest" / "samples"


def config(base_url: str, workload: dict[str, Any], endpoint: str = "chat", **load: Any) -> RunConfig:
    return RunConfig.model_validate({
        "target": {"base_url": base_url, "model": "fake-model", "endpoint": endpoint, "scrape_interval_s": 0.05},
        "workload": workload,
        "load": load,
        "output": {"progress": False, "plots": False},
    })  # fmt: skip


def play(cfg: RunConfig, tokenizer: Any = None):
    conversations = build_conversations(cfg.workload, 64, np.random.default_rng(0), tokenizer)
    return asyncio.run(ObservedRunner(cfg).run_conversations(conversations)), conversations


def fake_answer(server: FakeOpenAIServer, number: int) -> str:
    """What the fake server streamed for its ``number``-th generation request."""
    return "".join(f" r{number}tok{i}" for i in range(int(server.bodies[number]["max_tokens"])))


def bodies_by_id(server: FakeOpenAIServer) -> dict[str, tuple[int, dict]]:
    return {rid: (n, body) for n, (rid, body) in enumerate(zip(server.request_ids, server.bodies, strict=True))}


SESSIONS = {"source": "sessions", "output_tokens": "3:6",
            "sessions": {"turns": "2:4", "user_tokens": "3:5", "system_prompt_tokens": 4}}  # fmt: skip


def test_turn_k_sends_the_earlier_turns_with_the_answers_that_came_back(serve) -> None:
    server = FakeOpenAIServer()
    with serve(server) as url:
        result, conversations = play(config(url, SESSIONS, concurrency=[3], num_requests=6))
    records = result.steps[0].requests
    sent = bodies_by_id(server)
    assert {r.session for r in records} == set(range(6))
    for session in range(6):
        turns = sorted((r for r in records if r.session == session), key=lambda r: r.turn or 0)
        conversation = conversations[session]
        assert [r.turn for r in turns] == list(range(1, len(conversation.turns) + 1))
        answers: list[str] = []
        for k, record in enumerate(turns):
            number, body = sent[record.request_id or ""]
            expected = [{"role": "system", "content": conversation.system}]
            for earlier, answer in zip(conversation.turns[:k], answers, strict=True):
                expected += [{"role": "user", "content": earlier.user}, {"role": "assistant", "content": answer}]
            expected.append({"role": "user", "content": conversation.turns[k].user})
            assert body["messages"] == expected
            assert body["max_tokens"] == conversation.turns[k].output_tokens
            answers.append(fake_answer(server, number))


def test_closed_loop_counts_sessions_not_requests(serve) -> None:
    server = FakeOpenAIServer(ttft_s=0.005)
    spec = {**SESSIONS, "sessions": {"turns": 3, "user_tokens": 3}}
    with serve(server) as url:
        result, _ = play(config(url, spec, concurrency=[2], num_requests=5))
    step = result.steps[0]
    assert step.summary.completed == 15 and step.concurrency == 2
    assert server.max_in_flight <= 2  # one request in flight per session at most
    assert sorted(r.index for r in step.requests) == list(range(15))


def test_open_loop_session_arrivals(serve) -> None:
    server = FakeOpenAIServer()
    spec = {**SESSIONS, "sessions": {"turns": 2, "user_tokens": 3}}
    with serve(server) as url:
        result, _ = play(config(url, spec, rate=[50.0], num_requests=6))
    step = result.steps[0]
    firsts = [r for r in step.requests if r.turn == 1]
    assert len(step.requests) == 12 and len(firsts) == 6 and step.rate == 50.0
    assert all(r.scheduled_s is not None for r in firsts)
    assert all(r.scheduled_s is None for r in step.requests if r.turn == 2)


def test_a_failed_turn_ends_its_session(serve) -> None:
    class FailsThirdRequest(FakeOpenAIServer):
        async def respond(self, writer, method, path, body):  # type: ignore[no-untyped-def]
            if method == "POST" and len(self.bodies) == 2:
                self.bodies.append({})
                self.request_ids.append("failed")
                from loadtest.local.fakeserver import write_json

                write_json(writer, 500, {"error": {"message": "boom", "type": "server_error"}})
                await writer.drain()
                return
            await super().respond(writer, method, path, body)

    server = FailsThirdRequest()
    spec = {**SESSIONS, "sessions": {"turns": 4, "user_tokens": 3}}
    with serve(server) as url:
        result, _ = play(config(url, spec, concurrency=[1], num_requests=1))
    assert [(r.turn, r.success) for r in result.steps[0].requests] == [(1, True), (2, True), (3, False)]


def test_sharegpt_conversations_are_reproduced_turn_by_turn(serve, tmp_path: Path) -> None:
    data = json.loads((SAMPLES / "sharegpt.json").read_text())
    server = FakeOpenAIServer()
    spec = {"source": "sharegpt", "dataset": str(SAMPLES / "sharegpt.json")}
    with serve(server) as url:
        result, _ = play(config(url, spec, concurrency=[1], num_requests=len(data)))
    sent = bodies_by_id(server)
    records = result.steps[0].requests
    for session, item in enumerate(data):
        messages = item["conversations"]
        humans = [m["value"] for m in messages if m["from"] == "human"]
        lengths = [len(m["value"].split()) for m in messages if m["from"] == "gpt"]
        system = [m["value"] for m in messages if m["from"] == "system"]
        turns = sorted((r for r in records if r.session == session), key=lambda r: r.turn or 0)
        assert len(turns) == len(humans)
        for k, record in enumerate(turns):
            body = sent[record.request_id or ""][1]
            users = [m["content"] for m in body["messages"] if m["role"] == "user"]
            assert users == humans[: k + 1]
            assert [m["content"] for m in body["messages"] if m["role"] == "system"] == system
            assert body["max_tokens"] == lengths[k]  # the dataset's answer length, not its text
            assert all(m["content"] not in [g["value"] for g in messages] for m in body["messages"]
                       if m["role"] == "assistant")  # fmt: skip


def test_azure_trace_replays_its_arrival_times(serve) -> None:
    conversations = read_azure(SAMPLES / "azure.csv", np.random.default_rng(0))
    assert len(conversations) == 20 and conversations[0].arrival_s == 0.0
    server = FakeOpenAIServer()
    spec = {"source": "azure", "dataset": str(SAMPLES / "azure.csv")}
    with serve(server) as url:
        result, _ = play(config(url, spec, endpoint="completions", speedup=[4.0]))
    step = result.steps[0]
    assert step.shape == "speedup" and step.speedup == 4.0 and step.summary.completed == 20
    sent = [server.arrivals[i] - server.arrivals[0] for i in range(20)]
    wanted = [(c.arrival_s or 0.0) / 4.0 for c in conversations]
    # arrival i is the i-th arrival in time; scheduling slack is generous (a busy CI machine)
    assert max(abs(a - b) for a, b in zip(sorted(sent), wanted, strict=True)) < 0.5
    assert wanted[-1] > 1.0  # the trace spans long enough for the check to mean something
    assert [int(b["max_tokens"]) for b in server.bodies] == [c.turns[0].output_tokens for c in conversations]


def test_azure_prompts_have_the_trace_lengths_with_a_tokenizer(bpe_tokenizer) -> None:
    conversations = read_azure(SAMPLES / "azure.csv", np.random.default_rng(0), bpe_tokenizer)
    lengths = [int(line.split(",")[1]) for line in (SAMPLES / "azure.csv").read_text().splitlines()[1:]]
    counted = [len(bpe_tokenizer.encode(c.turns[0].user)) for c in conversations]
    assert counted == lengths  # the completions count, BOS included


def test_mooncake_shared_hash_ids_become_shared_prompt_prefixes(bpe_tokenizer) -> None:
    conversations = read_mooncake(SAMPLES / "mooncake.jsonl", bpe_tokenizer, block_tokens=64)
    items = [json.loads(line) for line in (SAMPLES / "mooncake.jsonl").read_text().splitlines()]
    ids = [bpe_tokenizer.encode(c.turns[0].user, add_special_tokens=False) for c in conversations]
    for item, tokens in zip(items, ids, strict=True):
        assert len(tokens) == min(item["input_length"], 64 * len(item["hash_ids"])) or len(tokens) == item["input_length"]
    for i, a in enumerate(items):
        for j, b in enumerate(items):
            common = 0
            while common < min(len(a["hash_ids"]), len(b["hash_ids"])) and a["hash_ids"][common] == b["hash_ids"][common]:
                common += 1
            shared = min(64 * common, len(ids[i]), len(ids[j]))
            assert ids[i][:shared] == ids[j][:shared]
            if common < min(len(a["hash_ids"]), len(b["hash_ids"])):  # a differing block differs
                assert ids[i][64 * common: 64 * (common + 1)] != ids[j][64 * common: 64 * (common + 1)]


def test_mooncake_prompt_lengths_are_exact_with_a_tokenizer(bpe_tokenizer) -> None:
    conversations = read_mooncake(SAMPLES / "mooncake.jsonl", bpe_tokenizer)
    items = [json.loads(line) for line in (SAMPLES / "mooncake.jsonl").read_text().splitlines()]
    assert [len(bpe_tokenizer.encode(c.turns[0].user, add_special_tokens=False)) for c in conversations] == [
        i["input_length"] for i in items
    ]


def test_mooncake_replay_shows_prefix_hits_in_the_joined_figures(serve) -> None:
    server = FakeOpenAIServer()
    spec = {"source": "mooncake", "dataset": str(SAMPLES / "mooncake.jsonl")}
    with serve(server) as url:
        result, conversations = play(config(url, spec, endpoint="completions", speedup=[20.0]))
    by_id = {r.request_id: r for r in result.steps[0].requests}
    sent = bodies_by_id(server)
    seen: list[list[int]] = []
    for rid, (number, body) in sorted(sent.items(), key=lambda kv: kv[1][0]):
        hashes = next(c.meta["hash_ids"] for c in conversations if c.turns[0].user == body["prompt"])
        record = by_id[rid]
        assert record.server is not None
        repeated = any(h[:1] == hashes[:1] for h in seen)
        assert (record.server.cached_tokens or 0) > 0 if repeated else record.server.cached_tokens == 0
        seen.append(hashes)


def test_hits_grow_with_the_turn_in_the_report(serve) -> None:
    server = FakeOpenAIServer()
    spec = {**SESSIONS, "sessions": {"turns": 4, "user_tokens": 20, "system_prompt_tokens": 0}, "output_tokens": 20}
    with serve(server) as url:
        result, _ = play(config(url, spec, concurrency=[2], num_requests=4))
    figures = turn_figures(result.steps[0].requests)
    assert [f.turn for f in figures] == [1, 2, 3, 4] and all(f.requests == 4 for f in figures)
    ratios = [f.hit_ratio or 0.0 for f in figures]
    assert ratios[0] == 0.0 and all(b > a for a, b in zip(ratios, ratios[1:], strict=False))
    kv = [f.kv_used_bytes_mean or 0.0 for f in figures]
    assert all(b > a for a, b in zip(kv, kv[1:], strict=False))
    assert "## Conversations by turn" in markdown([result], plots=False)


def test_trace_and_session_sources_are_checked() -> None:
    with pytest.raises(ValidationError, match="speedup"):
        RunConfig.model_validate({"workload": {"source": "azure", "dataset": "x.csv"}})
    with pytest.raises(ValidationError, match="speedup"):
        RunConfig.model_validate({"load": {"speedup": [2.0]}})
    with pytest.raises(ValidationError, match="chat endpoint"):
        RunConfig.model_validate({"workload": {"source": "sessions"}})
    with pytest.raises(ValidationError, match="dataset"):
        RunConfig.model_validate({"workload": {"source": "sharegpt"}, "target": {"endpoint": "chat"}})


def test_conversation_history_needs_the_earlier_answers() -> None:
    conversation = Conversation(turns=[Turn("a", 1), Turn("b", 1)], system="s")
    assert conversation.messages(1, ["x"]) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "x"}, {"role": "user", "content": "b"},
    ]  # fmt: skip
    with pytest.raises(ValueError):
        conversation.messages(1, [])


def test_sharegpt_lengths_from_the_spec_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a b c"}]}]))
    rng = np.random.default_rng(0)
    assert read_sharegpt(path, TokenRange(low=7, high=7), rng)[0].turns[0].output_tokens == 3
    assert read_sharegpt(path, TokenRange(low=7, high=7), rng, use_dataset_lengths=False)[0].turns[0].output_tokens == 7


def test_samples_are_what_the_generator_writes(tmp_path: Path) -> None:
    for path in write_samples(tmp_path):
        assert path.read_text() == (SAMPLES / path.name).read_text(), f"regenerate: python -m loadtest samples"


def test_cli_runs_sessions_and_writes_the_turn_report(serve, tmp_path: Path) -> None:
    server = FakeOpenAIServer()
    with serve(server) as url:
        code = main(["run", "--base-url", url, "--model", "fake-model", "--endpoint", "chat", "--sessions",
                     "--turns", "3", "--user-tokens", "4", "--output-tokens", "4", "--concurrency", "2",
                     "--num-requests", "3", "--output-dir", str(tmp_path), "--no-progress"])  # fmt: skip
    assert code == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "## Conversations by turn" in summary and (tmp_path / "turns.png").is_file()
    assert len(server.bodies) == 9
