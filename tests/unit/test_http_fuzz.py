"""The gateway middleware and request hooks, in-process on a stub of vLLM's app (fast; the
real app is covered by tests/engine): no input produces a 5xx from the gateway layer, every
error body has the OpenAI shape, and an engine abort/error never reaches a client in a 200."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from service.api.fixes import IGNORED_HINTS, UNSUPPORTED, RequestRefused, check_fields, fix_request, known_fields
from service.middleware import GatewayMiddleware
from service.runtime import Runtime
from service.settings import Settings
from service.telemetry.ledger import EngineState

@pytest.fixture
def anyio_backend():
    return "asyncio"


VLLM_400 = {"error": {"message": "bad", "type": "BadRequestError", "param": "body.n", "code": 400}}


class StubVllm:
    """Answers like vLLM's app: 200 JSON, SSE, vLLM-shaped or FastAPI-shaped errors."""

    def __init__(self):
        self.seen: list[dict] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.seen.append({"headers": dict(scope["headers"]), "body": body})
        mode = scope["path"].rsplit("/", 1)[-1]
        if scope["path"] == "/v1/completions":
            mode = json.loads(body).get("prompt", "ok")
        if mode in ("abort", "error", "ok", "vllm400"):
            status, payload = (400, VLLM_400) if mode == "vllm400" else (
                200, {"id": "x", "choices": [{"index": 0, "text": "hi", "finish_reason": "stop" if mode == "ok" else mode}]})
            data = json.dumps(payload).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
        elif mode in ("stream-abort", "stream-ok"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n', "more_body": True})
            reason = b'"abort"' if mode == "stream-abort" else b'"length"'
            await send({"type": "http.response.body", "body": b'data: {"choices":[{"index":0,"text":"","finish_reason":' + reason + b'}]}\n\n', "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        else:
            data = b'{"detail":"Not Found"}'
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": data})


def make(**kw):
    s = Settings(profile=None, **kw)
    rt = Runtime(settings=s, engine_state=EngineState(), vocab_size=49152)
    stub = StubVllm()
    return GatewayMiddleware(stub, rt), rt, stub


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def openai_error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert not isinstance(body["error"]["code"], int)
    return body["error"]


@pytest.mark.anyio
async def test_request_id_goes_into_the_request_and_the_response(anyio_backend):
    app, _, stub = make()
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "ok"}, headers={"X-Request-Id": "abc"})
        assert r.headers["x-request-id"] == "abc" and stub.seen[-1]["headers"][b"x-request-id"] == b"abc"
        r = await c.post("/v1/completions", json={"prompt": "ok", "request_id": "from-body"})
        assert stub.seen[-1]["headers"][b"x-request-id"] == b"from-body" == r.headers["x-request-id"].encode()
        r = await c.post("/v1/completions", json={"prompt": "ok"})
        assert len(r.headers["x-request-id"]) == 32


@pytest.mark.anyio
async def test_engine_abort_or_error_never_reaches_a_client_in_a_200(anyio_backend):
    app, _, _ = make()
    async with client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "abort"})
        assert r.status_code == 503 and openai_error(r)["code"] == "aborted"
        r = await c.post("/v1/completions", json={"prompt": "error"})
        assert r.status_code == 500 and openai_error(r)["code"] == "generation_error"
        r = await c.post("/v1/completions", json={"prompt": "stream-abort"})
        events = [e for e in r.text.split("\n\n") if e]
        assert '"finish_reason"' not in events[1] and json.loads(events[1][6:])["error"]["code"] == "aborted"
        assert events[-1] == "data: [DONE]"
        r = await c.post("/v1/completions", json={"prompt": "stream-ok"})
        assert '"finish_reason":"length"' in r.text


@pytest.mark.anyio
async def test_vllm_and_fastapi_errors_are_reshaped(anyio_backend):
    app, _, _ = make()
    async with client(app) as c:
        err = openai_error(await c.post("/v1/completions", json={"prompt": "vllm400"}))
        assert err == {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
        r = await c.get("/nowhere")
        assert r.status_code == 404 and openai_error(r)["type"] == "not_found_error"


@pytest.mark.anyio
async def test_keys_limits_drain_and_admission(anyio_backend):
    app, rt, _ = make(api_keys="k1,k2", max_body_bytes=2048, max_in_flight=1, protect_metrics=True)
    async with client(app) as c:
        assert (await c.post("/v1/completions", json={"prompt": "ok"})).status_code == 401
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/health")).status_code == 404  # open (the stub has no route)
        auth = {"Authorization": "Bearer k2"}
        assert (await c.post("/v1/completions", json={"prompt": "ok"}, headers=auth)).status_code == 200
        r = await c.post("/v1/completions", json={"prompt": "x" * 4000}, headers=auth)
        assert r.status_code == 413 and openai_error(r)["code"] == "request_too_large"
        rt.in_flight = 1
        r = await c.post("/v1/completions", json={"prompt": "ok"}, headers=auth)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        rt.in_flight, rt.engine_state.kv_usage = 0, 0.99
        assert (await c.post("/v1/completions", json={"prompt": "ok"}, headers=auth)).status_code == 200
        rt.draining = True
        r = await c.post("/v1/completions", json={"prompt": "ok"}, headers=auth)
        assert r.status_code == 503 and openai_error(r)["code"] == "draining"


@pytest.mark.anyio
async def test_kv_pressure_sheds(anyio_backend):
    app, rt, _ = make(shed_kv_usage=0.9, max_waiting=4)
    async with client(app) as c:
        rt.engine_state.kv_usage = 0.95
        assert (await c.post("/v1/completions", json={"prompt": "ok"})).status_code == 429
        rt.engine_state.kv_usage, rt.engine_state.waiting = 0.1, 4
        assert (await c.post("/v1/completions", json={"prompt": "ok"})).status_code == 429


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [], "stream": "yes"}, "stream"),
    ({"messages": [], "n": 9}, "n"),
    ({"messages": [], "stop_token_ids": [1] * 65}, "stop_token_ids"),
    ({"messages": [], "stop_token_ids": [49152]}, "stop_token_ids"),
    ({"messages": [], "tools": [{"type": "function", "function": {"name": "a"}}],
      "tool_choice": {"type": "function", "function": {"name": "b"}}}, "tool_choice"),
])
def test_refused(body, param):
    with pytest.raises(RequestRefused) as e:
        fix_request("/v1/chat/completions", body, Settings(profile=None), 49152)
    assert e.value.param == param


def test_nulls_dropped_and_forced_tools_pinned():
    body = {"messages": [], "n": None, "stream": None, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
                      {"type": "function", "function": {"name": "b", "strict": False}}]}
    assert fix_request("/v1/chat/completions", body, Settings(profile=None))
    assert "n" not in body and "stream" not in body
    assert body["tools"][0]["function"]["strict"] is True and body["tools"][1]["function"]["strict"] is False
    auto = {"messages": [], "tools": [{"type": "function", "function": {"name": "a"}}], "tool_choice": "auto"}
    assert not fix_request("/v1/chat/completions", auto, Settings(profile=None))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)
FIELDS = st.fixed_dictionaries({}, optional={k: JSON for k in (
    "messages", "prompt", "n", "stream", "stop", "stop_token_ids", "tools", "tool_choice", "best_of", "input")})


@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/responses"]),
       body=FIELDS | JSON, raw=st.binary(max_size=64))
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_no_5xx_and_openai_shaped(path, body, raw):
    import asyncio

    async def go():
        app, _, _ = make()
        async with client(app) as c:
            for content in (json.dumps(body).encode(), raw):
                r = await c.post(path, content=content, headers={"content-type": "application/json"})
                assert r.status_code < 500 or r.status_code in (500, 503) and "engine" in r.text
                if r.status_code >= 400:
                    openai_error(r)

    asyncio.run(go())


@pytest.mark.parametrize("path, body, param, code", [
    ("/v1/chat/completions", {"messages": [], "temprature": 0.2}, "temprature", "unknown_parameter"),
    ("/v1/chat/completions", {"messages": [], "guided_json": {"type": "object"}}, "guided_json",
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [], "functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of", "unsupported_parameter"),
    ("/v1/responses", {"input": "x", "conversation": "c1"}, "conversation", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [], "store": True}, "store", "unsupported_parameter"),
])
def test_unknown_fields_refused_like_openai(path, body, param, code):
    with pytest.raises(RequestRefused) as e:
        check_fields(path, body)
    assert (e.value.param, e.value.code, e.value.status) == (param, code, 400)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [], "store": False, "metadata": {"a": "b"}, "service_tier": "auto",
                              "max_completion_tokens": 3, "response_format": {"type": "json_object"},
                              "structured_outputs": {"json": {}}, "chat_template_kwargs": {}, "top_k": 2}),
    ("/v1/completions", {"prompt": "x", "best_of": 1, "ignore_eos": True, "return_tokens_as_token_ids": True}),
    ("/v1/responses", {"input": "x", "stream_options": {}, "max_output_tokens": 5}),
])
def test_known_fields_and_harmless_hints_pass(path, body):
    check_fields(path, body)


# What vllm-router 0.1.17 forwards for a plain request (captured from the real router
# in front of a recording server): SGLang's fields at their defaults.
ROUTED = {
    "/v1/completions": {"model": "m", "prompt": "hello", "max_tokens": 4, "stream": False, "echo": False,
                        "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
                        "return_hidden_states": False},
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                             "max_tokens": 4, "logprobs": False, "no_stop_trim": False, "ignore_eos": False,
                             "continue_final_message": False, "skip_special_tokens": True,
                             "separate_reasoning": True, "stream_reasoning": True, "return_hidden_states": False,
                             "include_reasoning": True},
}


@pytest.mark.parametrize("path", sorted(ROUTED))
def test_what_vllm_router_forwards_passes_and_other_values_do_not(path):
    check_fields(path, dict(ROUTED[path]))
    with pytest.raises(RequestRefused) as e:
        check_fields(path, {**ROUTED[path], "return_hidden_states": True})
    assert e.value.param == "return_hidden_states" and e.value.code == "unsupported_parameter"


def test_known_fields_come_from_vllms_request_models():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    assert set(ChatCompletionRequest.model_fields) <= known_fields("/v1/chat/completions")
    assert "tools" in known_fields("/v1/chat/completions") and "prompt" in known_fields("/v1/completions")
    assert not IGNORED_HINTS & set(UNSUPPORTED)
