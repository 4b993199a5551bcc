"""A fake engine for fast tests of the HTTP layer (never a substitute for the real-engine
suite). It "generates" token ids 100, 101, ... with the real tokenizer of the default
model, honours n, max_tokens and the output kind, and reports engine-like timestamps."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from vllm.sampling_params import RequestOutputKind

from service.engine import EngineHandle
from service.kv.geometry import geometry_from_model_dir


@dataclass
class _Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: Any = None
    stop_reason: Any = None


@dataclass
class _Stats:
    queued_ts: float
    scheduled_ts: float
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0
    first_token_latency: float = 0.0
    num_preemptions: int = 0


@dataclass
class _Output:
    outputs: list[_Choice]
    finished: bool
    metrics: _Stats
    num_cached_tokens: int = 0
    request_id: str = ""


@dataclass
class FakeEngine:
    tokenizer: Any
    errored: bool = False
    aborted: list[str] = field(default_factory=list)

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[_Output]:
        now = time.monotonic()
        stats = _Stats(queued_ts=now, scheduled_ts=now)
        n, max_tokens = params.n, params.max_tokens
        delta = params.output_kind == RequestOutputKind.DELTA
        ids: list[list[int]] = [[] for _ in range(n)]
        try:
            for step in range(max_tokens):
                await asyncio.sleep(0)
                t = time.monotonic()
                stats.first_token_ts = stats.first_token_ts or t
                stats.first_token_latency = stats.first_token_latency or (t - now)
                stats.last_token_ts = t
                last = step == max_tokens - 1
                for i in range(n):
                    ids[i].append(100 + step)
                if delta or last:
                    outs = [_Choice(i, self.tokenizer.decode([100 + step]) if delta else self.tokenizer.decode(ids[i]),
                                    [100 + step] if delta else list(ids[i]), "length" if last else None)
                            for i in range(n)]
                    yield _Output(outs, last, stats, request_id=request_id)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        return None

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def shutdown(self) -> None:
        return None


def fake_engine_factory(model_dir: str, **kw: Any):
    """An engine factory for ``create_app`` that yields a fake handle."""
    import contextlib

    @contextlib.asynccontextmanager
    async def factory(settings: Any, metrics: Any, state: Any):
        yield fake_handle(model_dir, **kw)

    return factory


def fake_handle(model_dir: str, max_model_len: int = 2048, num_blocks: int = 363) -> EngineHandle:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return EngineHandle(
        engine=FakeEngine(tokenizer), model_name="SmolLM2-135M-Instruct", model_path=model_dir,
        max_model_len=max_model_len, geometry=geometry_from_model_dir(model_dir, block_size=128),
        num_blocks=num_blocks, tokenizer=tokenizer, started_at=time.time(), start_seconds=0.0,
    )
