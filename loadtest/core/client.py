"""The streaming OpenAI client: one aiohttp session, SSE parsing, per-request timings.

aiohttp rather than httpx: it is what vLLM's benchmark client uses and it sustained
more streamed chunks per second on one core in ``python -m loadtest selftest``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from loadtest.core.config import Endpoint
from loadtest.core.results import RequestRecord
from loadtest.core.workload import Prompt, TokenizerLike

_ERROR_TEXT_LIMIT = 300
REQUEST_ID_HEADER = "X-Request-Id"


def new_run_id() -> str:
    """A short random id for one run: ``lt`` + 10 hex digits, unique across runs."""
    return "lt" + secrets.token_hex(5)


def request_id(run_id: str, step: int | str, index: int) -> str:
    """The ``X-Request-Id`` of request ``index`` of a step (``w`` for the warm-up): unique
    within and across runs, short, printable, no spaces (what the gateway keeps)."""
    return f"{run_id}-{step}-{index}"


class SSEDecoder:
    """Incremental Server-Sent Events decoder: bytes in, complete ``data`` payloads out.

    Follows the SSE line rules: lines end with LF, CRLF or CR; an empty line ends an
    event; ``:`` lines are comments; multi-line ``data`` fields join with LF; other
    fields (``event``, ``id``, ``retry``) are ignored. Input may be split anywhere,
    including inside a UTF-8 sequence or between CR and LF.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        # A read that ended in CR has ended a line; an LF opening the next read is its CRLF tail.
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        events: list[str] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data).decode("utf-8"))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return events


@dataclass(frozen=True)
class RequestOptions:
    """What is the same for every request of a run."""

    url: str
    model: str
    endpoint: Endpoint
    ignore_eos: bool = True
    extra_body: dict[str, Any] | None = None
    stream: bool = True


def build_payload(options: RequestOptions, prompt: Prompt) -> dict[str, Any]:
    """The JSON body: streaming with usage, ``max_tokens``, vLLM's ``ignore_eos`` if asked."""
    payload: dict[str, Any] = {"model": options.model, "max_tokens": prompt.output_tokens, "stream": options.stream}
    if options.stream:
        payload["stream_options"] = {"include_usage": True}
    if options.endpoint == "chat":
        payload["messages"] = prompt.messages
    else:
        payload["prompt"] = prompt.text
    if options.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(options.extra_body or {})
    return payload


def endpoint_url(base_url: str, endpoint: Endpoint) -> str:
    """``http://host:port[/v1]`` -> the full endpoint URL."""
    root = api_root(base_url)
    return f"{root}/v1/chat/completions" if endpoint == "chat" else f"{root}/v1/completions"


def api_root(base_url: str) -> str:
    """The server root (no ``/v1``), where ``/metrics`` lives."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _content(choice: dict[str, Any]) -> str:
    """Generated text of one streamed choice (completions ``text``, chat ``delta``)."""
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""


class _StreamError(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class StreamClient:
    """Sends one streaming request and times it (definitions in ``loadtest.core.metrics``)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        options: RequestOptions,
        tokenizer: TokenizerLike | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.session = session
        self.options = options
        self.tokenizer = tokenizer
        self.headers = headers or {}

    async def send(
        self, index: int, prompt: Prompt, t0: float, scheduled_s: float | None = None, request_id: str | None = None
    ) -> RequestRecord:
        """Send ``prompt`` (with ``X-Request-Id: request_id`` if given); every offset in the
        record is relative to ``t0`` (perf_counter)."""
        record, _ = await self.exchange(index, prompt, t0, scheduled_s, request_id)
        return record

    async def exchange(
        self, index: int, prompt: Prompt, t0: float, scheduled_s: float | None = None, request_id: str | None = None
    ) -> tuple[RequestRecord, str]:
        """``send``, also returning the answer's text as it came back (a conversation's next
        turn carries it in its history); the text is empty when the request failed."""
        payload = build_payload(self.options, prompt)
        headers = {**self.headers, REQUEST_ID_HEADER: request_id} if request_id else self.headers
        state = _Stream()
        start = time.perf_counter()
        error_type: str | None = None
        error: str | None = None
        try:
            await self._stream(payload, state, headers)
        except _StreamError as exc:
            error_type, error = exc.error_type, str(exc)
        except asyncio.TimeoutError:
            error_type, error = "timeout", f"no complete response within {self.session.timeout.total} s"
        except aiohttp.ClientPayloadError as exc:
            error_type, error = "broken_stream", repr(exc)
        except aiohttp.ClientError as exc:
            error_type, error = "connection", repr(exc)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            error_type, error = "bad_chunk", repr(exc)
        end = time.perf_counter()
        if error_type is None and state.first is None:
            error_type, error = "no_content", "the stream carried no content chunk"
        if error_type is None and not state.done:
            error_type, error = "incomplete_stream", "the stream ended without data: [DONE]"
        retokenized = None
        text = "".join(state.text) if error_type is None else ""
        if error_type is None and self.tokenizer is not None:
            retokenized = len(self.tokenizer.encode(text, add_special_tokens=False))
        record = RequestRecord(
            index=index,
            request_id=request_id,
            scheduled_s=scheduled_s,
            start_s=start - t0,
            end_s=end - t0,
            ttft_s=None if state.first is None else state.first - start,
            e2e_s=None if state.last_choice is None else state.last_choice - start,
            itl_s=state.itl,
            content_chunks=state.chunks,
            expected_prompt_tokens=prompt.expected_prompt_tokens,
            requested_output_tokens=prompt.output_tokens,
            prompt_tokens=state.prompt_tokens,
            output_tokens=state.completion_tokens,
            retokenized_output_tokens=retokenized,
            success=error_type is None,
            error_type=error_type,
            error=None if error is None else error[:_ERROR_TEXT_LIMIT],
        )
        return record, text

    async def _stream(self, payload: dict[str, Any], state: _Stream, headers: dict[str, str]) -> None:
        async with self.session.post(self.options.url, json=payload, headers=headers) as response:
            if response.status != 200:
                body = (await response.text())[:_ERROR_TEXT_LIMIT]
                raise _StreamError(f"http_{response.status}", body)
            if not self.options.stream:  # one JSON body: TTFT = E2E = when it arrived
                body = await response.read()
                state.handle_whole(json.loads(body), time.perf_counter())
                return
            decoder = SSEDecoder()
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                for data in decoder.feed(chunk):
                    state.handle(data, now)


class _Stream:
    """Per-request parsing state: timestamps of content chunks and the usage block."""

    __slots__ = (
        "chunks", "completion_tokens", "done", "first", "itl", "last_choice", "previous", "prompt_tokens", "text",
    )  # fmt: skip

    def __init__(self) -> None:
        self.first: float | None = None
        self.previous = 0.0
        self.last_choice: float | None = None
        self.itl: list[float] = []
        self.chunks = 0
        self.text: list[str] = []
        self.done = False
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def handle(self, data: str, now: float) -> None:
        if data == "[DONE]":
            self.done = True
            return
        message = json.loads(data)
        if "error" in message:
            error = message["error"]
            text = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            raise _StreamError("stream_error", text)
        choices = message.get("choices")
        if choices:
            self.last_choice = now
            content = _content(choices[0])
            if content:
                if self.first is None:
                    self.first = now
                else:
                    self.itl.append(now - self.previous)
                self.previous = now
                self.chunks += 1
                self.text.append(content)
        usage = message.get("usage")
        if usage:
            self.completion_tokens = usage.get("completion_tokens")
            self.prompt_tokens = usage.get("prompt_tokens")

    def handle_whole(self, message: dict[str, Any], now: float) -> None:
        """A non-streaming response: the whole answer is one 'chunk'."""
        choices = message.get("choices") or []
        content = "".join((c.get("text") or (c.get("message") or {}).get("content") or "") for c in choices)
        self.first = self.last_choice = self.previous = now
        self.chunks = 1 if content else 0
        self.text.append(content)
        self.done = True
        usage = message.get("usage") or {}
        self.completion_tokens = usage.get("completion_tokens")
        self.prompt_tokens = usage.get("prompt_tokens")
