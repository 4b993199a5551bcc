"""The handlers behind the OpenAI routers: validate against the model, run the engine,
shape the OpenAI response (JSON or SSE), and account every request once."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from service.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from service.engine import EngineHandle
from service.errors import APIError, BadRequestError, EngineError, NotFoundError, ServiceUnavailableError, sse_error
from service.settings import Settings
from service.telemetry.accounting import EngineTimes, RequestFigures, account, observe
from service.telemetry.metrics import GatewayMetrics

log = logging.getLogger(__name__)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass
class EngineState:
    """The engine's queue and cache as of its last step (written by the stat logger)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


@dataclass
class Gateway:
    """Everything a handler needs; one per app, on ``app.state.gateway``."""

    handle: EngineHandle
    settings: Settings
    metrics: GatewayMetrics
    defaults: dict[str, Any] = field(default_factory=dict)
    engine_state: EngineState = field(default_factory=EngineState)
    draining: bool = False
    in_flight: int = 0  # admitted completion requests not yet answered (middleware counts)


# ---------------------------------------------------------------- request preparation
def check_model(gw: Gateway, model: str | None) -> None:
    if model is not None and model != gw.handle.model_name:
        raise NotFoundError(f"The model `{model}` does not exist.", param="model", code="model_not_found")


def check_limits(gw: Gateway, req: SamplingFields) -> None:
    s = gw.settings
    if req.n > s.max_n:
        raise BadRequestError(f"n must be at most {s.max_n}", param="n")
    if len(req.stop_list) > s.max_stop_sequences:
        raise BadRequestError(f"at most {s.max_stop_sequences} stop sequences are allowed", param="stop")
    k = req.num_logprobs
    if k is not None and k > s.max_logprobs:
        raise BadRequestError(f"logprobs must be at most {s.max_logprobs}", param="logprobs")
    if isinstance(req, ChatCompletionRequest) and len(req.messages) > s.max_messages:
        raise BadRequestError(f"at most {s.max_messages} messages are allowed", param="messages")
    if req.stream_options is not None and not req.stream:
        raise BadRequestError("stream_options is only allowed when stream is true", param="stream_options")


def chat_prompt_ids(gw: Gateway, req: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        ids = gw.handle.tokenizer.apply_chat_template(
            messages, add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message, tokenize=True, return_dict=False,
        )
    except Exception as e:  # template errors are the request's fault (e.g. bad role order)
        raise BadRequestError(f"cannot apply the chat template: {e}", param="messages") from e
    return list(ids)


def completion_prompt_ids(gw: Gateway, req: CompletionRequest) -> list[int]:
    if isinstance(req.prompt, str):
        if not req.prompt:
            raise BadRequestError("prompt must not be empty", param="prompt")
        return list(gw.handle.tokenizer.encode(req.prompt))
    vocab = len(gw.handle.tokenizer)
    bad = [t for t in req.prompt if t < 0 or t >= vocab]
    if bad:
        raise BadRequestError(f"token ids out of vocabulary range [0, {vocab}): {bad[:5]}", param="prompt")
    return list(req.prompt)


def resolve_max_tokens(gw: Gateway, prompt_len: int, requested: int | None) -> int:
    limit = gw.handle.max_model_len
    if prompt_len >= limit:
        raise BadRequestError(
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for the completion.",
            param="messages", code="context_length_exceeded")
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise BadRequestError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
            "completion). Please reduce the prompt or max_tokens.",
            param="max_tokens", code="context_length_exceeded")
    return requested


def sampling_params(gw: Gateway, req: SamplingFields, max_tokens: int, stream: bool) -> SamplingParams:
    d = dict(gw.defaults)
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty"):
        v = getattr(req, name)
        if v is not None:
            d[name] = v
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, min_tokens=min(req.min_tokens, max_tokens),
            seed=req.seed, stop=req.stop_list or None, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, logprobs=req.num_logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            **d,
        )
    except (ValueError, TypeError) as e:
        raise BadRequestError(str(e)) from e


# ---------------------------------------------------------------- logprobs in OpenAI shape
def _tok(tokenizer: Any, token_id: int, lp: Any) -> str:
    return lp.decoded_token if lp.decoded_token is not None else tokenizer.decode([token_id])


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict] | None, k: int) -> list[dict]:
    out = []
    for tid, entries in zip(token_ids, logprobs or []):
        chosen = entries.get(tid)
        if chosen is None:
            continue
        text = _tok(tokenizer, tid, chosen)
        top = sorted(entries.items(), key=lambda kv: -kv[1].logprob)[:k]
        out.append({
            "token": text, "logprob": max(chosen.logprob, -9999.0), "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := _tok(tokenizer, i, e)), "logprob": max(e.logprob, -9999.0),
                              "bytes": list(t.encode())} for i, e in top],
        })
    return out


def completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict] | None, k: int,
                        offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entries in zip(token_ids, logprobs or []):
        chosen = entries.get(tid)
        if chosen is None:
            continue
        text = _tok(tokenizer, tid, chosen)
        tokens.append(text)
        token_lps.append(max(chosen.logprob, -9999.0))
        top = sorted(entries.items(), key=lambda kv: -kv[1].logprob)[:k]
        tops.append({_tok(tokenizer, i, e): max(e.logprob, -9999.0) for i, e in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


# ---------------------------------------------------------------- one generation
@dataclass
class Run:
    """A request in flight: what it asked for and what it has produced so far."""

    gw: Gateway
    kind: str  # "chat" | "completion"
    req: ChatCompletionRequest | CompletionRequest
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    cached_tokens: int = 0
    last_stats: Any = None
    figures: RequestFigures | None = None
    texts: list[str] | None = None  # completion text, kept only when log_prompts is on

    def __post_init__(self) -> None:
        self.generated = [0] * self.req.n
        self.finish = [None] * self.req.n
        if self.gw.settings.log_prompts:
            self.texts = [""] * self.req.n

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.request_id

    def outputs(self) -> AsyncIterator[Any]:
        return self.gw.handle.engine.generate(
            {"prompt_token_ids": self.prompt_ids}, self.params, self.request_id)

    def track(self, out: Any) -> None:
        delta = self.params.output_kind == RequestOutputKind.DELTA
        for o in out.outputs:
            n = len(o.token_ids)
            self.generated[o.index] = self.generated[o.index] + n if delta else n
            if self.texts is not None:
                self.texts[o.index] = self.texts[o.index] + o.text if delta else o.text
            if o.finish_reason is not None:
                self.finish[o.index] = o.finish_reason
        if out.num_cached_tokens:
            self.cached_tokens = out.num_cached_tokens
        if out.metrics is not None:
            self.last_stats = out.metrics

    def usage(self) -> dict:
        p, c = len(self.prompt_ids), sum(self.generated)
        u = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        if self.cached_tokens:
            u["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return u

    def close(self, finish_reason: str | None = None) -> None:
        """Account the request once (finished, aborted or failed)."""
        if self.figures is not None:
            return
        if finish_reason is None:
            done = [f for f in self.finish if f]
            if len(done) < len(self.finish):
                finish_reason = "abort"
            else:  # one label per request: "length" if any choice was cut off
                finish_reason = "length" if "length" in done else done[0]
        if not self.gw.settings.request_telemetry:
            return
        h = self.gw.handle
        self.figures = account(
            h.geometry, request_id=self.request_id, model=h.model_name, finish_reason=finish_reason,
            prompt_tokens=len(self.prompt_ids), generated=self.generated,
            cached_tokens=self.cached_tokens, times=EngineTimes.from_stats(self.last_stats),
            e2e_seconds=time.monotonic() - self.started,
        )
        if self.texts is not None:  # debug setting: content in the request's log line
            self.figures.extra.update(prompt=h.tokenizer.decode(self.prompt_ids), completions=self.texts)
        observe(self.gw.metrics, self.figures)

    def x_metrics(self) -> dict | None:
        if self.req.return_metrics and self.figures is not None:
            return self.figures.as_dict()
        return None


def engine_failure(gw: Gateway, e: BaseException) -> APIError:
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError) or gw.handle.engine.errored:
        return ServiceUnavailableError("the inference engine is not running", code="engine_dead")
    if isinstance(e, (ValueError, TypeError)):
        return BadRequestError(str(e))
    cause = e.__cause__
    if isinstance(cause, (ValueError, TypeError)):
        return BadRequestError(str(cause))
    log.exception("engine request failed", exc_info=e)
    return EngineError(f"the engine failed to process the request ({type(e).__name__})")


# ---------------------------------------------------------------- response shapes
def _chat_choice_final(run: Run, out_o: Any) -> dict:
    k = run.req.num_logprobs
    return {
        "index": out_o.index,
        "message": {"role": "assistant", "content": out_o.text},
        "logprobs": {"content": chat_logprobs(run.gw.handle.tokenizer, list(out_o.token_ids), out_o.logprobs, k)}
        if k is not None else None,
        "finish_reason": out_o.finish_reason,
    }


def _completion_choice_final(run: Run, out_o: Any) -> dict:
    k = run.req.num_logprobs
    return {
        "index": out_o.index,
        "text": out_o.text,
        "logprobs": completion_logprobs(run.gw.handle.tokenizer, list(out_o.token_ids), out_o.logprobs, k, 0)
        if k is not None else None,
        "finish_reason": out_o.finish_reason,
    }


async def respond(run: Run, request: Request) -> JSONResponse | StreamingResponse:
    if run.req.stream:
        return StreamingResponse(_stream(run), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(run, request)


async def _listen_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _complete(run: Run, request: Request) -> JSONResponse:
    final = None

    async def consume() -> None:
        nonlocal final
        async for out in run.outputs():
            run.track(out)
            final = out

    gen_task = asyncio.ensure_future(consume())
    dis_task = asyncio.ensure_future(_listen_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({gen_task, dis_task}, return_when=asyncio.FIRST_COMPLETED)
        if gen_task not in done:  # the client went away: cancelling aborts the engine request
            gen_task.cancel()
            await asyncio.gather(gen_task, return_exceptions=True)
            run.close("abort")
            return JSONResponse({}, status_code=499)
        gen_task.result()
    except asyncio.CancelledError:
        gen_task.cancel()
        run.close("abort")
        raise
    except Exception as e:
        run.close("error")
        raise engine_failure(run.gw, e) from e
    finally:
        dis_task.cancel()

    run.close()
    shape = _chat_choice_final if run.kind == "chat" else _completion_choice_final
    choices = sorted((shape(run, o) for o in final.outputs), key=lambda c: c["index"]) if final else []
    body = {
        "id": run.response_id,
        "object": "chat.completion" if run.kind == "chat" else "text_completion",
        "created": run.created,
        "model": run.gw.handle.model_name,
        "choices": choices,
        "usage": run.usage(),
    }
    if (xm := run.x_metrics()) is not None:
        body["x_metrics"] = xm
    return JSONResponse(body)


async def _stream(run: Run) -> AsyncIterator[str]:
    chat = run.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = f'{{"id":{_dumps(run.response_id)},"object":"{obj}","created":{run.created},"model":{_dumps(run.gw.handle.model_name)},'
    opts = run.req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(opts and opts.continuous_usage_stats and include_usage)
    k = run.req.num_logprobs
    tokenizer = run.gw.handle.tokenizer
    offsets = [0] * run.req.n

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        tail = f',"usage":{_dumps(usage)}' if usage is not None else ""
        return f"data: {head}\"choices\":{_dumps(choices)}{tail}}}\n\n"

    status = "abort"
    try:
        role_sent = not chat
        async for out in run.outputs():
            run.track(out)
            if not role_sent:  # like vLLM's server: the role chunk comes with the first token
                role_sent = True
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None} for i in range(run.req.n)],
                            None if not continuous else run.usage())
            choices = []
            for o in out.outputs:
                if not o.token_ids and o.finish_reason is None and not o.text:
                    continue
                if chat:
                    c = {"index": o.index, "delta": {"content": o.text} if o.text or o.finish_reason is None else {},
                         "logprobs": {"content": chat_logprobs(tokenizer, list(o.token_ids), o.logprobs, k)} if k is not None else None,
                         "finish_reason": o.finish_reason}
                else:
                    c = {"index": o.index, "text": o.text,
                         "logprobs": completion_logprobs(tokenizer, list(o.token_ids), o.logprobs, k, offsets[o.index]) if k is not None else None,
                         "finish_reason": o.finish_reason}
                    offsets[o.index] += len(o.text)
                choices.append(c)
            if choices:
                yield chunk(choices, run.usage() if continuous else None)
        status = "ok"
        run.close()
        if include_usage or run.req.return_metrics:
            final = {"id": run.response_id, "object": obj, "created": run.created,
                     "model": run.gw.handle.model_name, "choices": []}
            if include_usage:
                final["usage"] = run.usage()
            if (xm := run.x_metrics()) is not None:
                final["x_metrics"] = xm
            yield f"data: {_dumps(final)}\n\n"
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        raise  # client went away; finally accounts it as aborted
    except Exception as e:
        status = "error"
        err = engine_failure(run.gw, e)
        run.close("error")
        yield sse_error(err)
        yield "data: [DONE]\n\n"
    finally:
        if status == "abort":
            run.close("abort")


# ---------------------------------------------------------------- entry points
def new_request_id(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    return rid or uuid.uuid4().hex


async def create(gw: Gateway, kind: str, req: ChatCompletionRequest | CompletionRequest,
                 request: Request) -> JSONResponse | StreamingResponse:
    if gw.handle.engine.errored:
        raise ServiceUnavailableError("the inference engine is not running", code="engine_dead")
    check_model(gw, req.model)
    check_limits(gw, req)
    to_ids: Callable = chat_prompt_ids if kind == "chat" else completion_prompt_ids
    prompt_ids = to_ids(gw, req)
    max_tokens = resolve_max_tokens(gw, len(prompt_ids), req.requested_max_tokens)
    params = sampling_params(gw, req, max_tokens, req.stream)
    run = Run(gw, kind, req, new_request_id(request), prompt_ids, params)
    return await respond(run, request)
