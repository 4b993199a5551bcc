"""Workloads: the prompts and output lengths of a run.

Random prompts have an exact prompt length *as the server counts it*:

- completions: len(tokenizer.encode(prompt)), special tokens included (vLLM's
  completions endpoint tokenizes with ``add_special_tokens=True``);
- chat: len(tokenizer.encode(chat_template(messages, add_generation_prompt=True),
  add_special_tokens=False)), i.e. the tokens after the chat template, which is how
  vLLM counts a chat prompt. A template's fixed part (role headers, a default system
  prompt) counts, so the smallest possible chat prompt is that overhead + 1. A
  tokenizer without a chat template falls back to the completions count.

A random prompt is built from token ids drawn uniformly from the vocabulary's clean
tokens (not special, and decode -> encode gives the token back, which excludes stray
UTF-8 byte pieces), decoded, re-encoded and trimmed/extended until the count above
equals the target (decoding and re-encoding a sequence is not the identity, hence
the loop; the loop's last count is the prompt's expected count in any case).
With ``shared_prefix_tokens`` P, every prompt starts with the same P-token text
(prefix caching), then a per-prompt random suffix.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from loadtest.core.config import Endpoint, TokenRange, Workload

_MAX_FIT_ROUNDS = 32


class TokenizerLike(Protocol):
    """What the workload needs from a tokenizer (a transformers tokenizer fits)."""

    vocab_size: int
    all_special_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class Prompt:
    """One request's input: ``text`` for completions, ``messages`` for chat."""

    output_tokens: int
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    expected_prompt_tokens: int | None = None


def wrap(endpoint: Endpoint, content: str) -> Prompt:
    """The request input carrying ``content`` on an endpoint (output length unset)."""
    if endpoint == "chat":
        return Prompt(output_tokens=0, messages=[{"role": "user", "content": content}])
    return Prompt(output_tokens=0, text=content)


def load_tokenizer(path: Path) -> TokenizerLike:
    """Load a local Hugging Face tokenizer folder; never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    return cast(TokenizerLike, AutoTokenizer.from_pretrained(str(path)))


class PromptCounter:
    """Counts prompt tokens the way the server does for one endpoint (module docstring)."""

    def __init__(self, tokenizer: TokenizerLike, endpoint: Endpoint) -> None:
        self.tokenizer = tokenizer
        self.chat = endpoint == "chat" and bool(getattr(tokenizer, "chat_template", None))
        self.endpoint = endpoint

    def count(self, prompt: Prompt) -> int:
        if prompt.messages is not None and self.chat:
            rendered = self.tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                prompt.messages, tokenize=False, add_generation_prompt=True
            )
            return len(self.tokenizer.encode(rendered, add_special_tokens=False))
        if prompt.messages is not None:
            return sum(len(self.tokenizer.encode(str(m.get("content", "")))) for m in prompt.messages)
        return len(self.tokenizer.encode(prompt.text or ""))


def _sample_lengths(rng: np.random.Generator, spec: TokenRange, count: int) -> list[int]:
    return [int(v) for v in rng.integers(spec.low, spec.high + 1, size=count)]


class RandomPromptBuilder:
    """Random prompts of an exact server-side token count (see module docstring)."""

    def __init__(self, tokenizer: TokenizerLike, endpoint: Endpoint, rng: np.random.Generator) -> None:
        self.tokenizer = tokenizer
        self.counter = PromptCounter(tokenizer, endpoint)
        self.rng = rng
        self.special = set(tokenizer.all_special_ids)
        self.clean: dict[int, bool] = {}
        self.overhead = self.counter.count(wrap(self.counter.endpoint, ""))

    def _is_clean(self, token: int) -> bool:
        """A non-special token that survives decode -> encode alone (no stray UTF-8 bytes)."""
        if token not in self.clean:
            self.clean[token] = token not in self.special and self.tokenizer.encode(
                self.tokenizer.decode([token]), add_special_tokens=False
            ) == [token]
        return self.clean[token]

    def random_ids(self, count: int) -> list[int]:
        """``count`` ids drawn uniformly from the clean tokens of the vocabulary."""
        ids: list[int] = []
        for _ in range(1000):
            if len(ids) >= count:
                return ids
            draws = self.rng.integers(0, self.tokenizer.vocab_size, size=2 * (count - len(ids)) + 8)
            ids += [int(t) for t in draws if self._is_clean(int(t))][: count - len(ids)]
        raise ValueError("the tokenizer's vocabulary has (almost) no token that decodes and re-encodes to itself")

    def random_text(self, count: int) -> str:
        """Decoded text of ``count`` random token ids (about ``count`` tokens)."""
        return self.tokenizer.decode(self.random_ids(count))

    def build(self, target: int, prefix: str = "") -> Prompt:
        """A prompt counting exactly ``target`` tokens, starting with ``prefix``."""
        if target <= self.overhead:
            raise ValueError(
                f"a {target}-token prompt is impossible here: the empty prompt already "
                f"counts {self.overhead} tokens (chat template / special tokens)"
            )
        prefix_tokens = len(self.tokenizer.encode(prefix, add_special_tokens=False)) if prefix else 0
        suffix = self.random_ids(target - self.overhead - prefix_tokens)
        for _ in range(_MAX_FIT_ROUNDS):
            text = self.tokenizer.decode(suffix)
            suffix = self.tokenizer.encode(text, add_special_tokens=False)
            prompt = wrap(self.counter.endpoint, prefix + text)
            count = self.counter.count(prompt)
            if count == target:
                break
            if count > target:
                suffix = suffix[: max(len(suffix) - (count - target), 0)]
            else:
                suffix = suffix + self.random_ids(target - count)
        else:
            warnings.warn(
                f"random prompt has {count} tokens instead of {target}; its expected count is {count}",
                stacklevel=2,
            )
        return replace(prompt, expected_prompt_tokens=count)


def random_prompts(
    tokenizer: TokenizerLike,
    endpoint: Endpoint,
    count: int,
    input_tokens: TokenRange,
    output_tokens: TokenRange,
    rng: np.random.Generator,
    shared_prefix_tokens: int = 0,
) -> list[Prompt]:
    """``count`` random prompts; lengths drawn uniformly from the inclusive ranges."""
    builder = RandomPromptBuilder(tokenizer, endpoint, rng)
    prefix = builder.random_text(shared_prefix_tokens) if shared_prefix_tokens else ""
    targets = _sample_lengths(rng, input_tokens, count)
    outputs = _sample_lengths(rng, output_tokens, count)
    return [
        replace(builder.build(target, prefix), output_tokens=out) for target, out in zip(targets, outputs, strict=True)
    ]


def jsonl_prompts(
    path: Path,
    endpoint: Endpoint,
    output_tokens: TokenRange,
    rng: np.random.Generator,
    tokenizer: TokenizerLike | None = None,
) -> list[Prompt]:
    """Prompts from a JSON Lines file.

    Each line: ``{"prompt": "..."}`` or ``{"messages": [...]}`` (chat only), optionally
    ``"output_tokens": N``; lines without it draw from ``output_tokens``. With a
    tokenizer, expected prompt lengths are counted as the server would.
    """
    counter = PromptCounter(tokenizer, endpoint) if tokenizer is not None else None
    prompts: list[Prompt] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        if "messages" in item:
            if endpoint != "chat":
                raise ValueError(f"{path}:{number}: 'messages' needs the chat endpoint")
            prompt = Prompt(output_tokens=0, messages=item["messages"])
        elif "prompt" in item:
            prompt = wrap(endpoint, str(item["prompt"]))
        else:
            raise ValueError(f"{path}:{number}: each line needs 'prompt' or 'messages'")
        out = int(item["output_tokens"]) if "output_tokens" in item else _sample_lengths(rng, output_tokens, 1)[0]
        expected = counter.count(prompt) if counter is not None else None
        prompts.append(replace(prompt, output_tokens=out, expected_prompt_tokens=expected))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def build_workload(
    spec: Workload,
    endpoint: Endpoint,
    count: int,
    rng: np.random.Generator,
    tokenizer: TokenizerLike | None,
) -> list[Prompt]:
    """The prompt pool of a run: ``count`` random prompts, or the JSONL file's prompts."""
    if spec.source == "jsonl":
        assert spec.jsonl is not None
        return jsonl_prompts(spec.jsonl, endpoint, spec.output_tokens, rng, tokenizer)
    if tokenizer is None:
        raise ValueError("random prompts of an exact length need --tokenizer PATH (a local HF folder)")
    return random_prompts(
        tokenizer, endpoint, count, spec.input_tokens, spec.output_tokens, rng, spec.shared_prefix_tokens
    )
