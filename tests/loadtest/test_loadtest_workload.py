"""Workloads: exact prompt lengths with any encode/decode tokenizer, ranges, prefixes, JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loadtest.core.config import TokenRange, Workload
from loadtest.core.workload import PromptCounter, build_workload, jsonl_prompts, random_prompts

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("length", [2, 17, 128])
def test_random_completion_prompts_have_exact_length(bpe_tokenizer, length: int) -> None:
    prompts = random_prompts(
        bpe_tokenizer, "completions", 20, TokenRange(low=length, high=length), TokenRange(low=8, high=8), rng()
    )
    counter = PromptCounter(bpe_tokenizer, "completions")
    for p in prompts:
        assert p.text is not None and p.messages is None
        assert counter.count(p) == p.expected_prompt_tokens == length
        assert p.output_tokens == 8


def test_chat_prompts_count_tokens_after_the_template(bpe_chat_tokenizer) -> None:
    prompts = random_prompts(
        bpe_chat_tokenizer, "chat", 10, TokenRange(low=40, high=40), TokenRange(low=4, high=4), rng()
    )
    for p in prompts:
        assert p.messages is not None and p.text is None
        rendered = bpe_chat_tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
        assert len(bpe_chat_tokenizer.encode(rendered, add_special_tokens=False)) == 40
        assert p.expected_prompt_tokens == 40


def test_chat_prompt_shorter_than_the_template_is_refused(bpe_chat_tokenizer) -> None:
    with pytest.raises(ValueError, match="impossible"):
        random_prompts(bpe_chat_tokenizer, "chat", 1, TokenRange(low=3, high=3), TokenRange(low=1, high=1), rng())


def test_ranges_are_inclusive_and_seeded(bpe_tokenizer) -> None:
    args = (bpe_tokenizer, "completions", 60, TokenRange(low=10, high=14), TokenRange(low=2, high=5))
    prompts = random_prompts(*args, rng(5))
    assert {p.expected_prompt_tokens for p in prompts} == {10, 11, 12, 13, 14}
    assert {p.output_tokens for p in prompts} == {2, 3, 4, 5}
    again = random_prompts(*args, rng(5))
    assert [p.text for p in again] == [p.text for p in prompts]
    assert [p.text for p in random_prompts(*args, rng(6))] != [p.text for p in prompts]


def test_shared_prefix(bpe_tokenizer) -> None:
    prompts = random_prompts(
        bpe_tokenizer,
        "completions",
        8,
        TokenRange(low=48, high=48),
        TokenRange(low=1, high=1),
        rng(),
        shared_prefix_tokens=32,
    )
    texts = [p.text or "" for p in prompts]
    common = texts[0]
    for t in texts[1:]:
        while not t.startswith(common):
            common = common[:-1]
    assert len(bpe_tokenizer.encode(common, add_special_tokens=False)) >= 28
    assert len(set(texts)) == len(texts)
    assert all(p.expected_prompt_tokens == 48 for p in prompts)


def test_jsonl_prompts(tmp_path: Path, bpe_chat_tokenizer) -> None:
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "the quick brown fox", "output_tokens": 5},
        {"prompt": "lazy dog"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    chat = jsonl_prompts(path, "chat", TokenRange(low=3, high=3), rng(), bpe_chat_tokenizer)
    assert [p.output_tokens for p in chat] == [5, 3, 3]
    assert chat[0].messages == [{"role": "user", "content": "the quick brown fox"}]
    assert chat[2].messages is not None and chat[2].messages[0]["role"] == "system"
    assert all(p.expected_prompt_tokens and p.expected_prompt_tokens > 0 for p in chat)
    with pytest.raises(ValueError, match="chat endpoint"):
        jsonl_prompts(path, "completions", TokenRange(low=3, high=3), rng())
    plain_path = tmp_path / "plain.jsonl"
    plain_path.write_text('{"prompt": "a b"}\n')
    plain = jsonl_prompts(plain_path, "completions", TokenRange(low=3, high=3), rng())
    assert plain[0].text == "a b" and plain[0].expected_prompt_tokens is None


def test_random_workload_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="--tokenizer"):
        build_workload(Workload(), "completions", 4, rng(), None)


@pytest.mark.skipif(not MODEL_DIR.is_dir(), reason="default model folder not prepared")
def test_real_smollm2_tokenizer_exact_lengths() -> None:
    from loadtest.core.workload import load_tokenizer

    tokenizer = load_tokenizer(MODEL_DIR)
    for endpoint, length in (("completions", 128), ("chat", 64)):
        prompts = random_prompts(
            tokenizer, endpoint, 16, TokenRange(low=length, high=length), TokenRange(low=1, high=1), rng()
        )
        counter = PromptCounter(tokenizer, endpoint)
        assert all(counter.count(p) == length for p in prompts)
