"""The KV-heads experiment on conversations: spec and prediction (pure).

Same variants, same KV byte budget (``budget``, blocks from each variant's bytes per block,
as in the capacity experiment), prefix caching on, and one multi-turn workload: sessions
of ``turns`` turns, each a user message of ``user_tokens`` random tokens and an answer of
exactly ``output_tokens`` (``ignore_eos``), ``think_time_s`` between an answer and the next
turn; closed loop, one step per number of sessions in flight.

The prediction, from the shapes (B = block size, N = a variant's usable blocks):

- P_k: prompt tokens of turn k (the chat template over the history, counted with the
  tokenizer on the step's own conversations with placeholder answers of G tokens);
  H_k = P_k + G - 1: KV tokens the request holds at its end; b_k = ceil(H_k / B) blocks.
  KV held at turn k = H_k x bytes per token (exact, per variant).
- Sessions that fit: floor(N / b_K), all sessions at their last turn; more in flight
  than that and the scheduler must preempt.
- Hits when the session's history is still cached: the prompt of turn k starts with
  turn k-1's prompt and answer, so the cache can serve B x floor(min(H_{k-1}, P_k - 1) / B)
  tokens (whole blocks; vLLM always computes the last prompt token); turn 1 only shares
  the template's fixed start, B x floor(shared / B).
- With C sessions in flight the pool holds every history only if C x b_{k-1} <= N;
  otherwise at most floor(N / b_{k-1}) of them, so the predicted hit ratio of turn k is
  the full one x min(1, floor(N / b_{k-1}) / C). Fewer KV heads: more blocks for the same
  bytes, more histories kept, more hits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import Field

from loadtest.core.config import Sessions, TokenRange, resolve_config_path
from loadtest.core.sessions import Conversation, TextMaker, synthetic_conversations
from loadtest.core.workload import PromptCounter, Prompt, TokenizerLike
from loadtest.kvheads.spec import BudgetSpec, EngineSpec, OutputSpec, VariantSpec, _Strict


class ConversationWorkload(_Strict):
    turns: int = Field(default=4, ge=1)
    user_tokens: int = Field(default=40, ge=1)
    output_tokens: int = Field(default=24, ge=1)
    system_prompt_tokens: int = Field(default=0, ge=0)
    think_time_s: float = Field(default=1.0, ge=0)
    tokenizer: Path | None = None  # default: the first variant's folder


class ConversationLoad(_Strict):
    """One closed-loop step per C sessions in flight, ``waves`` x C sessions each."""

    concurrency: list[int] = Field(default_factory=lambda: [2, 6, 12])
    waves: int = Field(default=2, ge=1)
    warmup_sessions: int = Field(default=1, ge=0)
    seed: int = 0
    scrape_interval_s: float = Field(default=0.25, gt=0)
    request_timeout_s: float = Field(default=900.0, gt=0)


class ConversationSpec(_Strict):
    kind: Literal["kv-heads-conversations"] = "kv-heads-conversations"
    variants: list[VariantSpec] = Field(default_factory=list)
    budget: BudgetSpec = Field(default_factory=lambda: BudgetSpec(blocks_of_largest=6))
    engine: EngineSpec = Field(default_factory=lambda: EngineSpec(enable_prefix_caching=True, max_model_len=384))
    workload: ConversationWorkload = Field(default_factory=ConversationWorkload)
    load: ConversationLoad = Field(default_factory=ConversationLoad)
    output: OutputSpec = Field(default_factory=lambda: OutputSpec(dir=Path("loadtest-results/kv-heads-conversations")))

    def sessions_spec(self) -> Sessions:
        w = self.workload
        return Sessions(turns=TokenRange(low=w.turns, high=w.turns), user_tokens=TokenRange(low=w.user_tokens,
                        high=w.user_tokens), system_prompt_tokens=w.system_prompt_tokens, think_time_s=w.think_time_s)

    def step_conversations(self, index: int, count: int, tokenizer: TokenizerLike) -> list[Conversation]:
        """The sessions of step ``index`` (the same for every variant: a function of the seed)."""
        out = TokenRange(low=self.workload.output_tokens, high=self.workload.output_tokens)
        return synthetic_conversations(self.sessions_spec(), out, count, np.random.default_rng([self.load.seed, index]),
                                       tokenizer)  # fmt: skip


def load_conversation_spec(path: Path) -> ConversationSpec:
    data = yaml.safe_load(resolve_config_path(path).read_text())
    if not isinstance(data, dict) or data.get("kind") != "kv-heads-conversations":
        raise ValueError(f"{path}: not a kv-heads-conversations spec (kind: kv-heads-conversations)")
    return ConversationSpec.model_validate(data)


class TurnPrediction(_Strict):
    turn: int
    prompt_tokens: float
    kv_tokens: float
    blocks: int
    cached_full: int  # tokens the cache serves when the history is still there
    hit_ratio_full: float


class VariantPrediction(_Strict):
    name: str
    usable_blocks: int
    kv_bytes_per_token: int
    sessions_fit: int
    turns: list[TurnPrediction]
    hit_ratio: dict[int, list[float]]  # C -> predicted hit ratio per turn
    kv_bytes: list[float]  # per turn


def prompt_tokens_by_turn(conversations: list[Conversation], output_tokens: int, tokenizer: TokenizerLike,
                          rng: np.random.Generator) -> tuple[list[float], int]:  # fmt: skip
    """(mean P_k per turn over ``conversations`` with placeholder answers of G tokens, the
    tokens every turn-1 prompt shares at its start)."""
    counter = PromptCounter(tokenizer, "chat")
    maker = TextMaker(tokenizer, rng)
    per_turn: list[list[int]] = []
    firsts: list[list[int]] = []
    for conversation in conversations:
        answers = [maker.text(output_tokens) for _ in conversation.turns]
        for k in range(len(conversation.turns)):
            prompt = Prompt(output_tokens=output_tokens, messages=conversation.messages(k, answers[:k]))
            if len(per_turn) <= k:
                per_turn.append([])
            per_turn[k].append(counter.count(prompt))
        rendered = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            conversation.messages(0, []), tokenize=False, add_generation_prompt=True)
        firsts.append(tokenizer.encode(rendered, add_special_tokens=False))
    shared = len(firsts[0]) if firsts else 0
    for ids in firsts[1:]:
        shared = next((i for i, (a, b) in enumerate(zip(firsts[0], ids, strict=False)) if a != b), min(shared, len(ids)))
    return [float(np.mean(v)) for v in per_turn], shared


def predict(name: str, usable_blocks: int, kv_bytes_per_token: int, block: int, prompts: list[float], shared: int,
            output_tokens: int, concurrency: list[int]) -> VariantPrediction:  # fmt: skip
    """One variant's prediction (module docstring)."""
    turns = []
    for k, p in enumerate(prompts):
        h = p + output_tokens - 1
        if k == 0:
            cached = block * (min(shared, int(p) - 1) // block)
        else:
            cached = block * (int(min(prompts[k - 1] + output_tokens - 1, p - 1)) // block)
        turns.append(TurnPrediction(turn=k + 1, prompt_tokens=p, kv_tokens=h, blocks=math.ceil(h / block),
                                    cached_full=cached, hit_ratio_full=cached / p))  # fmt: skip
    ratios = {}
    for c in concurrency:
        row = []
        for k, t in enumerate(turns):
            held = turns[k - 1].blocks if k else 1
            row.append(t.hit_ratio_full * min(1.0, (usable_blocks // held) / c))
        ratios[c] = row
    return VariantPrediction(
        name=name, usable_blocks=usable_blocks, kv_bytes_per_token=kv_bytes_per_token,
        sessions_fit=usable_blocks // turns[-1].blocks if turns else 0, turns=turns, hit_ratio=ratios,
        kv_bytes=[t.kv_tokens * kv_bytes_per_token for t in turns],
    )  # fmt: skip
