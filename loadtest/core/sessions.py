"""Conversations: the unit of a multi-turn workload, and the synthetic ones.

A :class:`Conversation` is an optional system prompt and a list of :class:`Turn`: each
turn's user message, the answer length it asks for, and the think time before it. Playing
it (``loadtest.core.session_runner``) sends turn k as the whole history: the system prompt,
the user messages of turns 1..k-1 each followed by the answer the server actually returned,
then turn k's user message. So the context grows turn by turn and a prefix cache can serve
everything but the newest user message.

A trace request (``loadtest.core.datasets``) is a one-turn conversation with an arrival
time (``arrival_s``); on the completions endpoint its user text is the whole prompt.

Synthetic conversations (``workload.source: sessions``, :func:`synthetic_conversations`)
draw turns, user-message and answer lengths uniformly from the spec's ranges; the shared
system prompt is the same text in every session. With a tokenizer, each text counts the
asked number of tokens when encoded alone (the chat template adds its own tokens); without
one, texts are words, which the fake server counts as tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.core.config import Sessions, TokenRange
from loadtest.core.workload import RandomPromptBuilder, TokenizerLike


@dataclass(frozen=True)
class Turn:
    """One user message and the answer it asks for."""

    user: str
    output_tokens: int
    think_s: float = 0.0  # seconds to wait after the previous answer before sending this turn


@dataclass(frozen=True)
class Conversation:
    """A session: its turns in order, an optional system prompt, and (traces) an arrival time."""

    turns: list[Turn]
    system: str | None = None
    arrival_s: float | None = None  # seconds from the trace's first request (before the speed-up)
    meta: dict[str, Any] = field(default_factory=dict)

    def messages(self, turn: int, answers: list[str]) -> list[dict[str, str]]:
        """The chat history turn ``turn`` (0-based) sends: system, then (user, answer) for every
        earlier turn with the answers as they came back, then this turn's user message."""
        if len(answers) < turn:
            raise ValueError(f"turn {turn + 1} needs the {turn} earlier answers, got {len(answers)}")
        out = [{"role": "system", "content": self.system}] if self.system else []
        for earlier, answer in zip(self.turns[:turn], answers, strict=False):
            out += [{"role": "user", "content": earlier.user}, {"role": "assistant", "content": answer}]
        return out + [{"role": "user", "content": self.turns[turn].user}]


class TextMaker:
    """Texts of a given token count: random clean tokens with a tokenizer, words without."""

    def __init__(self, tokenizer: TokenizerLike | None, rng: np.random.Generator) -> None:
        self.rng = rng
        self.builder = RandomPromptBuilder(tokenizer, "completions", rng) if tokenizer is not None else None

    def text(self, tokens: int) -> str:
        if tokens <= 0:
            return ""
        if self.builder is None:
            return " ".join(f"w{int(v)}" for v in self.rng.integers(0, 100_000, size=tokens))
        return self.builder.random_text(tokens)


def _draw(rng: np.random.Generator, spec: TokenRange) -> int:
    return int(rng.integers(spec.low, spec.high + 1))


def think_times(rng: np.random.Generator, spec: Sessions, count: int) -> list[float]:
    """Think times before turns 2..: fixed, or exponential with the spec's mean."""
    if spec.think_time_s <= 0 or count <= 0:
        return [0.0] * max(count, 0)
    if spec.think_time == "fixed":
        return [spec.think_time_s] * count
    return [float(v) for v in rng.exponential(spec.think_time_s, size=count)]


def synthetic_conversations(
    spec: Sessions,
    output_tokens: TokenRange,
    count: int,
    rng: np.random.Generator,
    tokenizer: TokenizerLike | None = None,
) -> list[Conversation]:
    """``count`` sessions drawn from the spec (module docstring)."""
    maker = TextMaker(tokenizer, rng)
    system = maker.text(spec.system_prompt_tokens) or None
    out = []
    for _ in range(count):
        n = max(_draw(rng, spec.turns), 1)
        thinks = [0.0, *think_times(rng, spec, n - 1)]
        turns = [Turn(maker.text(_draw(rng, spec.user_tokens)), _draw(rng, output_tokens), thinks[k]) for k in range(n)]
        out.append(Conversation(turns=turns, system=system))
    return out
