"""Conversation datasets and request traces, read offline (docs/loadtest.md, "Datasets and traces").

- ShareGPT JSON (the format vLLM's and GuideLLM's clients read): a list of
  ``{"id": ..., "conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}``.
  Every human message is one turn; the gpt message after it gives the answer's length
  (its token count with a tokenizer, its word count without), or ``workload.output_tokens``
  when there is none or ``dataset_output_tokens`` is off. The dataset's own answers are
  never sent: each turn's history carries the answers the server returned.
- Azure LLM inference trace CSV (Azure/AzurePublicDataset, 2023 and 2024 traces): header
  ``TIMESTAMP,ContextTokens,GeneratedTokens``; a timestamp is a date-time
  (``2023-11-16 18:15:46.6805900``) or seconds. Each row is one request of
  ``ContextTokens`` random prompt tokens (exact with a tokenizer) asking for
  ``GeneratedTokens``.
- Mooncake trace JSONL (kvcache-ai/Mooncake): one request per line,
  ``{"timestamp": ms, "input_length": N, "output_length": M, "hash_ids": [...]}``, where
  hash id i stands for the i-th 512-token block of the prompt and equal ids mean equal
  blocks. Each id becomes one deterministic block text (the same for every request that
  names it), so requests that share leading ids share a prompt prefix, as in the trace;
  the last block is cut to ``input_length``.

A trace's requests are one-turn conversations with ``arrival_s`` (seconds from its first
request); the runner replays them at ``arrival_s / speedup``.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.core.config import TokenRange, Workload
from loadtest.core.sessions import Conversation, TextMaker, Turn, synthetic_conversations
from loadtest.core.workload import TokenizerLike

MOONCAKE_BLOCK_TOKENS = 512
_USER = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}


def _length(text: str, tokenizer: TokenizerLike | None) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer is not None else len(text.split())


def read_sharegpt(
    path: Path,
    output_tokens: TokenRange,
    rng: np.random.Generator,
    tokenizer: TokenizerLike | None = None,
    *,
    use_dataset_lengths: bool = True,
) -> list[Conversation]:
    """The conversations of a ShareGPT JSON file, in file order (module docstring)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{conversations: [...]}}")
    out = []
    for number, item in enumerate(data):
        messages = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(messages, list):
            raise ValueError(f"{path}: item {number} has no 'conversations' list")
        system, turns = None, []
        for i, message in enumerate(messages):
            role, value = str(message.get("from", "")).lower(), str(message.get("value", ""))
            if role == "system":
                system = value
            elif role in _USER:
                answer = messages[i + 1] if i + 1 < len(messages) else None
                answered = answer is not None and str(answer.get("from", "")).lower() in _ASSISTANT
                length = _length(str(answer.get("value", "")), tokenizer) if answered and answer else 0
                if not (use_dataset_lengths and length > 0):
                    length = int(rng.integers(output_tokens.low, output_tokens.high + 1))
                turns.append(Turn(user=value, output_tokens=max(length, 1)))
            elif role not in _ASSISTANT:
                raise ValueError(f"{path}: item {number} message {i}: unknown role {role!r}")
        if turns:
            out.append(Conversation(turns=turns, system=system, meta={"id": item.get("id", number)}))
    if not out:
        raise ValueError(f"{path}: no conversation with a user message")
    return out


def _seconds(stamp: str) -> float:
    """A trace timestamp as seconds: a number, or a date-time with up to 7 fraction digits."""
    try:
        return float(stamp)
    except ValueError:
        head, _, fraction = stamp.strip().partition(".")
        moment = datetime.fromisoformat(head)
        return moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


def _relative(times: list[float]) -> list[float]:
    start = min(times) if times else 0.0
    return [t - start for t in times]


def read_azure(path: Path, rng: np.random.Generator, tokenizer: TokenizerLike | None = None) -> list[Conversation]:
    """The requests of an Azure LLM inference trace CSV, in time order (module docstring)."""
    with Path(path).open(newline="") as f:
        rows = [{k.strip().lower(): v for k, v in row.items()} for row in csv.DictReader(f)]
    need = {"timestamp", "contexttokens", "generatedtokens"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{path}: an Azure trace needs the columns TIMESTAMP, ContextTokens, GeneratedTokens")
    times = _relative([_seconds(r["timestamp"]) for r in rows])
    builder = TextMaker(tokenizer, rng)
    out = []
    for t, row in sorted(zip(times, rows, strict=True), key=lambda pair: pair[0]):
        context, generated = int(row["contexttokens"]), max(int(row["generatedtokens"]), 1)
        text = builder.builder.build(context).text if builder.builder is not None and context > 1 else builder.text(context)
        out.append(Conversation(turns=[Turn(user=text or "", output_tokens=generated)], arrival_s=t))
    return out


class BlockTexts:
    """One deterministic 512-token text per Mooncake hash id (module docstring).

    With a tokenizer a block is built from word tokens (a leading space, then letters) that
    encode back to themselves, so blocks join without merging across their boundary and a
    prompt of n tokens' worth of blocks encodes to n tokens; without one, a block is words.
    """

    def __init__(self, tokenizer: TokenizerLike | None, seed: int = 0, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> None:
        self.tokenizer, self.seed, self.block_tokens = tokenizer, seed, block_tokens
        self.words: list[int] = []
        if tokenizer is not None:
            special = set(tokenizer.all_special_ids)
            for token in range(tokenizer.vocab_size):
                text = tokenizer.decode([token])
                if token in special or len(text) < 3 or text[0] != " " or not text[1:].isalpha():
                    continue
                if tokenizer.encode(text, add_special_tokens=False) == [token]:
                    self.words.append(token)
            if not self.words:
                raise ValueError("the tokenizer has no space-prefixed word token to build blocks from")

    def pieces(self, key: tuple[int, ...], tokens: int) -> list[Any]:
        """The first ``tokens`` pieces (token ids or words) of the block named ``key``:
        ``(0, hash_id)`` for a trace's block, ``(1, request, k)`` for a request's own."""
        rng = np.random.default_rng([self.seed, *(part for v in key for part in (v & 0xFFFFFFFF, v >> 32))])
        if self.tokenizer is None:
            return [f"b{'-'.join(map(str, key))}w{int(v)}" for v in rng.integers(0, 100_000, size=tokens)]
        return [self.words[int(i)] for i in rng.integers(0, len(self.words), size=tokens)]

    def prompt(self, hash_ids: list[int], length: int, unique: int) -> str:
        """``length`` tokens: the blocks of ``hash_ids`` in order, the last one cut; past the
        listed blocks (an inconsistent line), a block of its own (``unique``)."""
        pieces: list[Any] = []
        ids = list(hash_ids)
        while len(pieces) < length:
            key = (0, ids.pop(0)) if ids else (1, unique, len(pieces))
            pieces += self.pieces(key, min(self.block_tokens, length - len(pieces)))
        if self.tokenizer is None:
            return " ".join(pieces)
        return self.tokenizer.decode(pieces)


def read_mooncake(
    path: Path, tokenizer: TokenizerLike | None = None, seed: int = 0, block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> list[Conversation]:
    """The requests of a Mooncake trace JSONL, in time order (module docstring)."""
    blocks = BlockTexts(tokenizer, seed, block_tokens)
    items = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            item = json.loads(line)
            missing = {"timestamp", "input_length", "output_length"} - set(item)
            if missing:
                raise ValueError(f"{path}:{number}: missing {sorted(missing)}")
            items.append(item)
    times = _relative([float(item["timestamp"]) / 1000.0 for item in items])
    out = []
    for index, (t, item) in enumerate(sorted(zip(times, items, strict=True), key=lambda pair: pair[0])):
        text = blocks.prompt([int(h) for h in item.get("hash_ids", [])], int(item["input_length"]), index)
        turn = Turn(user=text, output_tokens=max(int(item["output_length"]), 1))
        out.append(Conversation(turns=[turn], arrival_s=t, meta={"hash_ids": item.get("hash_ids", [])}))
    return out


def build_conversations(
    spec: Workload, count: int, rng: np.random.Generator, tokenizer: TokenizerLike | None, seed: int = 0
) -> list[Conversation]:
    """The conversations of a conversation source: ``count`` synthetic ones, or a file's."""
    if spec.source == "sessions":
        return synthetic_conversations(spec.sessions, spec.output_tokens, count, rng, tokenizer)
    assert spec.dataset is not None
    if spec.source == "sharegpt":
        return read_sharegpt(
            spec.dataset, spec.output_tokens, rng, tokenizer, use_dataset_lengths=spec.dataset_output_tokens
        )
    if spec.source == "azure":
        return read_azure(spec.dataset, rng, tokenizer)
    if spec.source == "mooncake":
        return read_mooncake(spec.dataset, tokenizer, seed)
    raise ValueError(f"{spec.source!r} is not a conversation source")
