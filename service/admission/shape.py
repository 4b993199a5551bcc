"""What a generation request may need, read from its body before it enters the engine:
its prompt's token ids (chat and responses through the model's chat template), its
``max_tokens`` and ``n``.

Tokenizing runs in a worker thread (``asyncio.to_thread``; vLLM's tokenizer wrapper lends
each thread its own tokenizer), so the event loop keeps serving. Bodies over
``EXACT_BODY_BYTES``, and prompts the template cannot render here, get a cheap upper bound
instead: one token per byte of the body (a byte-level BPE token is at least one byte of the
text, and the JSON around the text is longer than the template's special tokens), with no
prefix hits."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from service.kv.admission import full_block_hashes, request_blocks

log = logging.getLogger(__name__)

EXACT_BODY_BYTES = 256 * 1024
#: vLLM's default max_tokens of a completions request (CompletionRequest); chat's runs to the context limit
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Shape:
    prompt_tokens: tuple[int, ...]  # per prompt (a batch completion has several)
    max_tokens: int | None
    n: int
    hashes: tuple[int, ...]  # full prompt blocks of a single prompt (prefix estimate)
    exact: bool  # token counts from the tokenizer (False: the body-size bound)

    def blocks(self, block_size: int, max_model_len: int) -> int:
        return request_blocks(self.prompt_tokens, self.max_tokens, self.n, block_size=block_size,
                              max_model_len=max_model_len)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _ids(out: Any) -> list[int]:
    """apply_chat_template's answer: a list of ids, or a mapping with input_ids."""
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def _prompts(path: str, body: dict[str, Any], tokenizer: Any) -> list[list[int]]:
    if path == "/v1/completions":
        p = body.get("prompt")
        if isinstance(p, str):
            return [tokenizer.encode(p)]
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            return [list(p)]
        if isinstance(p, list) and p:
            return [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in p]
        raise ValueError("no prompt")
    if path == "/v1/chat/completions":
        messages = body["messages"]
    else:  # /v1/responses
        inp = body.get("input")
        messages = [{"role": "user", "content": inp}] if isinstance(inp, str) else list(inp)
        if isinstance(body.get("instructions"), str):
            messages.insert(0, {"role": "system", "content": body["instructions"]})
    kwargs: dict[str, Any] = {"tokenize": True, "add_generation_prompt": True}
    if body.get("tools"):
        kwargs["tools"] = body["tools"]
    return [_ids(tokenizer.apply_chat_template(messages, **kwargs))]


def _max_tokens(path: str, body: dict[str, Any]) -> int | None:
    if path == "/v1/chat/completions":
        v = _int(body.get("max_completion_tokens"))
        return v if v is not None else _int(body.get("max_tokens"))
    if path == "/v1/responses":
        return _int(body.get("max_output_tokens"))
    v = body.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
    return _int(v) if v is not None else COMPLETIONS_DEFAULT_MAX_TOKENS


def read_shape(path: str, raw: bytes, tokenizer: Any, block_size: int) -> Shape:
    """Blocking (run it in a thread): the request's shape from its JSON body."""
    body = json.loads(raw)
    n = _int(body.get("n")) or 1
    max_tokens = _max_tokens(path, body)
    if tokenizer is not None and len(raw) <= EXACT_BODY_BYTES:
        try:
            prompts = _prompts(path, body, tokenizer)
            hashes = full_block_hashes(prompts[0], block_size) if len(prompts) == 1 else ()
            return Shape(tuple(len(p) for p in prompts), max_tokens, n, hashes, True)
        except Exception as e:  # anything the template or our reading cannot render: the bound
            log.debug("admission: upper bound for a body the tokenizer could not read: %s", e)
    prompts = body.get("prompt") if path == "/v1/completions" else None
    count = len(prompts) if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) else 1
    return Shape((len(raw),) * count, max_tokens, n, (), False)


async def measure(path: str, raw: bytes, tokenizer: Any, block_size: int) -> Shape:
    return await asyncio.to_thread(read_shape, path, raw, tokenizer, block_size)
