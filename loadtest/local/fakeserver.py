"""A trivial OpenAI-compatible streaming server for the self-test and the tests.

HTTP/1.1 with keep-alive on raw asyncio streams (no framework, so the server is never
the bottleneck of a client benchmark). ``POST /v1/completions`` and
``/v1/chat/completions`` stream ``max_tokens`` one-word chunks (a chat stream starts
with a role-only chunk, as vLLM's does), then a usage chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``. Prompt tokens are
counted as whitespace-separated words. ``GET /metrics`` exposes gateway-named
Prometheus metrics of the server's own state (requests in flight, a pretend KV cache
of ``kv_capacity_tokens`` tokens). ``GET /v1/requests/{id}/metrics`` answers like the
gateway's ledger, from the server's own requests keyed by the ``X-Request-Id`` they
came with (one record per request: its token counts, a pretend KV of
``KV_BYTES_PER_TOKEN`` bytes per prompt and output token, its measured times), or, with
``request_ledger=False`` (``--no-ledger``), 404s like a plain ``vllm serve``. Binds
127.0.0.1 only.

Every answer is unique (its words name the request's arrival number), so a conversation's
history shows which answers it carried; ``bodies`` and ``arrivals`` keep every generation
request's JSON body and arrival time. A pretend prefix cache counts a request's
``cached_tokens`` as the longest word prefix it shares with an earlier prompt, in whole
blocks of ``BLOCK_TOKENS`` (chat prompts are the words of their messages, roles included).

Run it alone: ``python -m loadtest fake-server --port 0`` prints ``listening on URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import time
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}
KV_BYTES_PER_TOKEN = 1024
BLOCK_TOKENS = 16
ATTENTION_WIDTH = 64  # pretend query heads x head size, for attention FLOPs
_LEDGER_ROUTE = re.compile(r"/v1/requests/([^/]+)/metrics")
# the headers of the request being answered (each connection is its own task)
_HEADERS: ContextVar[dict[str, str] | None] = ContextVar("headers", default=None)


class FakeOpenAIServer:
    """The server; ``await start()`` returns the port. Counters are for instrumentation."""

    def __init__(
        self,
        *,
        ttft_s: float = 0.0,
        itl_s: float = 0.0,
        default_tokens: int = 16,
        kv_capacity_tokens: int = 1_000_000,
        model: str = "fake-model",
        request_ledger: bool = True,
    ) -> None:
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        self.default_tokens = default_tokens
        self.kv_capacity_tokens = kv_capacity_tokens
        self.model = model
        self.in_flight = 0
        self.max_in_flight = 0
        self.completed = 0
        self.live_tokens = 0
        self.kv_bytes_sum = 0.0
        self.request_ledger = request_ledger
        self.ledger: dict[str, list[dict[str, Any]]] = {}
        self.request_ids: list[str] = []  # X-Request-Id of each completion request, in arrival order
        self.bodies: list[dict[str, Any]] = []  # every generation request's body, in arrival order
        self.arrivals: list[float] = []  # perf_counter() of each, same order
        self._prompts: list[list[str]] = []  # prompt words seen, for the pretend prefix cache
        self.ledger_lookups = 0  # GET /v1/requests/... answered, the route offered or not
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._connection, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in header_lines if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                _HEADERS.set(headers)
                await self.respond(writer, method, path, body)
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def respond(self, writer: asyncio.StreamWriter, method: str, path: str, body: bytes) -> None:
        """Route one request; subclasses override this to inject failures."""
        if method == "GET" and path == "/metrics":
            write_response(writer, 200, self.metrics_text().encode(), "text/plain; version=0.0.4")
        elif method == "GET" and path.startswith("/v1/requests/"):
            self.ledger_lookups += 1
            self.lookup(writer, path)
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            request = json.loads(body or b"{}")
            if not request.get("stream"):
                write_json(writer, 400, {"error": {"message": "this server only streams", "type": "invalid_request"}})
            else:
                await self.stream(writer, path.endswith("chat/completions"), request)
        else:
            write_json(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})
        await writer.drain()

    async def stream(self, writer: asyncio.StreamWriter, chat: bool, request: dict[str, Any]) -> None:
        """Stream one completion (module docstring)."""
        tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or self.default_tokens)
        number = len(self.bodies)
        self.bodies.append(request)
        self.arrivals.append(time.perf_counter())
        words = _prompt_words(request)
        prompt_tokens = _count_words(request)
        cached = self._cached(words)
        request_id = (_HEADERS.get() or {}).get("x-request-id")
        if request_id:
            self.request_ids.append(request_id)
        self._admit(prompt_tokens + tokens)
        start = time.perf_counter()
        first: float | None = None
        sent = 0
        try:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            await asyncio.sleep(self.ttft_s)
            base = {
                "id": "cmpl-fake",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": request.get("model", self.model),
            }
            if chat:
                role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                await self.send_event(writer, {**base, "choices": [role]})
            for i in range(tokens):
                if i:
                    await asyncio.sleep(self.itl_s)
                finish = "length" if i == tokens - 1 else None
                word = f" r{number}tok{i}"
                choice: dict[str, Any] = (
                    {"index": 0, "delta": {"content": word}, "finish_reason": finish}
                    if chat
                    else {"index": 0, "text": word, "finish_reason": finish}
                )
                await self.send_event(writer, {**base, "choices": [choice]})
                first, sent = first or time.perf_counter(), sent + 1
            if (request.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": tokens,
                    "total_tokens": prompt_tokens + tokens,
                }
                await self.send_event(writer, {**base, "choices": [], "usage": usage})
            await self.send_event(writer, "[DONE]")
            writer.write(b"0\r\n\r\n")
        finally:
            self._release(prompt_tokens + tokens)
            if request_id:
                record = self.ledger_record(request_id, prompt_tokens, sent, start, first, time.perf_counter())
                record["cached_tokens"] = cached
                self.ledger.setdefault(request_id, []).append(record)

    def _cached(self, words: list[str]) -> int:
        """Prefix-cache hits of a prompt: its longest word prefix shared with an earlier one,
        in whole blocks (never the whole prompt: the last token is always computed)."""
        best = 0
        for seen in self._prompts:
            n = 0
            for a, b in zip(seen, words, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        self._prompts.append(words)
        return min(best, max(len(words) - 1, 0)) // BLOCK_TOKENS * BLOCK_TOKENS

    def ledger_record(
        self, request_id: str, prompt: int, generated: int, start: float, first: float | None, end: float
    ) -> dict[str, Any]:
        """Plausible figures of one finished request, in the gateway ledger's fields."""
        first = end if first is None else first
        tokens = prompt + generated
        blocks = -(-tokens // BLOCK_TOKENS)
        prefill_s, decode_s = first - start, end - first
        decode_context = max(generated - 1, 0) * prompt + generated * (generated - 1) // 2  # sum of P + j, j < G
        return {
            "request_id": f"cmpl-{request_id}-0", "model": self.model, "kv_heads": 1,
            "finish_reason": "length" if generated else "abort", "prompt_tokens": prompt,
            "generation_tokens": generated, "cached_tokens": 0, "choices": 1, "kv_tokens": tokens,
            "kv_blocks": blocks, "kv_used_bytes": tokens * KV_BYTES_PER_TOKEN,
            "kv_allocated_bytes": blocks * BLOCK_TOKENS * KV_BYTES_PER_TOKEN,
            "kv_mha_equivalent_bytes": tokens * KV_BYTES_PER_TOKEN,
            "kv_byte_seconds": KV_BYTES_PER_TOKEN * (prompt * prefill_s + (prompt + generated / 2) * decode_s),
            "attention_flops_prefill": 2 * ATTENTION_WIDTH * prompt * (prompt + 1),
            "attention_flops_decode": 4 * ATTENTION_WIDTH * decode_context,
            "kv_read_bytes": KV_BYTES_PER_TOKEN * decode_context, "queue_seconds": 0.0,
            "ttft_seconds": prefill_s, "tpot_seconds": decode_s / (generated - 1) if generated > 1 else None,
            "prefill_seconds": prefill_s, "decode_seconds": decode_s, "e2e_seconds": end - start,
            "preemptions": 0,
        }  # fmt: skip

    def lookup(self, writer: asyncio.StreamWriter, path: str) -> None:
        """``GET /v1/requests/{id}/metrics`` as the gateway answers it (module docstring)."""
        match = _LEDGER_ROUTE.fullmatch(path)
        if not self.request_ledger or match is None:
            write_json(writer, 404, {"detail": "Not Found"})  # what a plain vllm serve (FastAPI) says
            return
        request_id = unquote(match.group(1))
        records = self.ledger.get(request_id)
        if records is None:
            error = {"message": f"no figures for request `{request_id}`", "type": "not_found_error",
                     "param": "request_id", "code": "request_not_found"}  # fmt: skip
            write_json(writer, 404, {"error": error})
        else:
            write_json(writer, 200, {"object": "request.metrics", "id": request_id, "data": records})

    async def send_event(self, writer: asyncio.StreamWriter, data: dict[str, Any] | str) -> None:
        """Write one SSE event as its own HTTP chunk, then yield to the loop."""
        payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        event = f"data: {payload}\n\n".encode()
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await asyncio.sleep(0)

    def _admit(self, tokens: int) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.live_tokens += tokens

    def _release(self, tokens: int) -> None:
        self.in_flight -= 1
        self.live_tokens -= tokens
        self.completed += 1
        self.kv_bytes_sum += tokens * KV_BYTES_PER_TOKEN

    def metrics_text(self) -> str:
        """Gateway-named exposition of this server's state."""
        labels = f'model="{self.model}",kv_heads="1"'
        usage = self.live_tokens / self.kv_capacity_tokens
        lines = [
            ("gauge", "gateway_kv_cache_usage_ratio", f"{{{labels}}} {usage}"),
            ("gauge", "gateway_kv_cache_capacity_tokens", f"{{{labels}}} {self.kv_capacity_tokens}"),
            ("gauge", "gateway_kv_bytes_per_token", f"{{{labels}}} {KV_BYTES_PER_TOKEN}"),
            ("gauge", "gateway_requests_running", f"{{{labels}}} {self.in_flight}"),
            ("gauge", "gateway_requests_waiting", f"{{{labels}}} 0"),
            ("counter", "gateway_preemptions_total", f"{{{labels}}} 0"),
        ]
        text = [f"# TYPE {name} {kind}\n{name}{value}" for kind, name, value in lines]
        text.append(
            "# TYPE gateway_request_kv_used_bytes histogram\n"
            f'gateway_request_kv_used_bytes_bucket{{{labels},le="+Inf"}} {self.completed}\n'
            f"gateway_request_kv_used_bytes_sum{{{labels}}} {self.kv_bytes_sum}\n"
            f"gateway_request_kv_used_bytes_count{{{labels}}} {self.completed}"
        )
        return "\n".join(text) + "\n"


def _prompt_words(request: dict[str, Any]) -> list[str]:
    if "messages" in request:
        return [w for m in request["messages"] for w in [f"<{m.get('role')}>", *str(m.get("content", "")).split()]]
    return str(request.get("prompt", "")).split()


def _count_words(request: dict[str, Any]) -> int:
    if "messages" in request:
        return sum(len(str(m.get("content", "")).split()) for m in request["messages"])
    return len(str(request.get("prompt", "")).split())


def write_response(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)


def write_json(writer: asyncio.StreamWriter, status: int, obj: dict[str, Any]) -> None:
    write_response(writer, status, json.dumps(obj).encode(), "application/json")


async def serve(port: int, **options: Any) -> None:
    server = FakeOpenAIServer(**options)
    bound = await server.start(port=port)
    print(f"listening on http://127.0.0.1:{bound}", flush=True)
    await asyncio.Event().wait()


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("fake-server", help=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds before the first chunk")
    parser.add_argument("--itl", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--default-tokens", type=int, default=16, help="chunks when max_tokens is absent")
    parser.add_argument("--no-ledger", action="store_true", help="no /v1/requests/{id}/metrics (as vllm serve)")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    options = {"ttft_s": args.ttft, "itl_s": args.itl, "default_tokens": args.default_tokens}
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, request_ledger=not args.no_ledger, **options))
    return 0
