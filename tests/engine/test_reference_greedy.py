"""The engine's numerics against a reference: the gateway's greedy tokens for a handful of
chat and completion prompts equal transformers' greedy tokens on the same model folder
(float32 on the CPU).

As in vLLM's own model tests (``check_logprobs_close``), the two may part ways only after a
near-tie: where the reference's top two tokens are within ``TIE_MARGIN`` nats, either is a
correct greedy answer, and the sequences are compared no further. Where the tokens agree,
the gateway's logprob of the chosen token must be within ``LOGPROB_TOL`` of the
reference's: a kernel, dtype or weight change moves those long before it flips a token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import pytest

MAX_TOKENS = 24
TIE_MARGIN = 0.2  # nats between the reference's first and second choice
LOGPROB_TOL = 0.02  # nats; float32 engine vs float32 reference agree to ~1e-3 here

CHATS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
]
COMPLETIONS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


@dataclass
class Step:
    token: int
    logprob: float
    runner_up: int
    runner_up_logprob: float


@lru_cache(maxsize=1)
def _reference(model_dir: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return torch, tok, model


def reference_greedy(model_dir: str, prompt_ids: list[int], max_tokens: int) -> list[Step]:
    """Greedy decoding in float32 with the top-2 logprobs of every step."""
    torch, tok, model = _reference(model_dir)
    ids = list(prompt_ids)
    steps: list[Step] = []
    eos = set(tok.all_special_ids) & {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    with torch.no_grad():
        past = None
        x = torch.tensor([ids])
        for _ in range(max_tokens):
            out = model(input_ids=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            top = torch.topk(lp, 2)
            (a, b), (la, lb) = top.indices.tolist(), top.values.tolist()
            steps.append(Step(a, la, b, lb))
            if a in eos:
                break
            x = torch.tensor([[a]])
    return steps


def _token_id(entry_token: str, tok) -> int | None:
    if entry_token.startswith("token_id:"):
        return int(entry_token.split(":", 1)[1])
    return None


def compare(label: str, ref: list[Step], got: list[tuple[str, float]], tok) -> None:
    """``got``: (token as the API returned it, its logprob) for each generated token."""
    for i, (step, (text, lp)) in enumerate(zip(ref, got)):
        gid = _token_id(text, tok)
        same = gid == step.token if gid is not None else text == tok.decode([step.token])
        if not same:
            margin = step.logprob - step.runner_up_logprob
            runner_up = gid == step.runner_up if gid is not None else text == tok.decode([step.runner_up])
            assert runner_up and margin <= TIE_MARGIN, (
                f"{label}: greedy token {i} differs from the float32 reference: gateway {text!r}, "
                f"reference {tok.decode([step.token])!r} (logprob {step.logprob:.3f}, runner-up "
                f"{tok.decode([step.runner_up])!r} at {step.runner_up_logprob:.3f}, margin {margin:.3f} nats "
                f"> {TIE_MARGIN}). The engine's numerics changed (dtype, kernels, weights).")
            return  # a near-tie: both continuations are correct; compare no further
        assert abs(lp - step.logprob) <= LOGPROB_TOL, (
            f"{label}: token {i} {text!r} agrees, but its logprob {lp:.4f} is {abs(lp - step.logprob):.4f} "
            f"nats from the float32 reference's {step.logprob:.4f} (tolerance {LOGPROB_TOL}). "
            "The engine's numerics changed (dtype, kernels, weights).")
    assert len(got) == len(ref) or len(got) >= MAX_TOKENS, (
        f"{label}: gateway generated {len(got)} tokens, reference {len(ref)} (one stopped early)")


@pytest.mark.parametrize("question", CHATS)
def test_chat_greedy_matches_transformers(openai_client, gateway, question):
    _, tok, _ = _reference(gateway.model_path)
    messages = [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    r = openai_client.chat.completions.create(
        model=gateway.model, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
        logprobs=True, top_logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    assert r.usage.prompt_tokens == len(prompt), "the gateway rendered another prompt than the chat template"
    got = [(c.token, c.logprob) for c in r.choices[0].logprobs.content]
    compare(f"chat {question!r}", reference_greedy(gateway.model_path, list(prompt), MAX_TOKENS), got, tok)


@pytest.mark.parametrize("prompt", COMPLETIONS)
def test_completion_greedy_matches_transformers(openai_client, gateway, prompt):
    _, tok, _ = _reference(gateway.model_path)
    ids = tok.encode(prompt)
    r = openai_client.completions.create(
        model=gateway.model, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS, logprobs=2,
        extra_body={"return_tokens_as_token_ids": True})
    assert r.usage.prompt_tokens == len(ids), "the gateway tokenized the prompt differently"
    lp = r.choices[0].logprobs
    got = list(zip(lp.tokens, lp.token_logprobs))
    compare(f"completion {prompt!r}", reference_greedy(gateway.model_path, ids, MAX_TOKENS), got, tok)


def test_compare_fails_on_a_real_divergence():
    """The comparison itself: a token that is not a near-tie runner-up fails; a near-tie passes."""

    class Tok:
        def decode(self, ids):
            return {1: "a", 2: "b", 3: "c"}[ids[0]]

    ref = [Step(1, -0.1, 2, -3.0), Step(1, -0.5, 2, -0.6)]
    compare("agree", ref, [("a", -0.1), ("a", -0.5)], Tok())
    compare("near-tie at step 1", ref, [("a", -0.1), ("b", -0.6)], Tok())
    with pytest.raises(AssertionError, match="differs"):
        compare("far from a tie", ref, [("b", -3.0)], Tok())
    with pytest.raises(AssertionError, match="logprob"):
        compare("drifted", ref, [("a", -0.3)], Tok())
    with pytest.raises(AssertionError, match="differs"):
        compare("ids", ref, [("token_id:3", -9.0)], Tok())
