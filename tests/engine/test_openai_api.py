"""The gateway's own surface on vLLM's OpenAI app, on the real engine and model, through the
official `openai` client: KV card, request ids, errors, health, disconnects, and the cases
where vLLM 0.32's server is wrong (docs/api.md)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert not isinstance(err["code"], int), err  # OpenAI codes are strings or null
    return err


def post(gateway, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gateway.api_url + path, content=content, timeout=60,
                      headers={"content-type": "application/json", **kw.pop("headers", {})}, **kw)


def test_models_list_carries_the_kv_card(openai_client, gateway):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [gateway.model]
    card = models.data[0].model_extra
    assert card["kv_cache"]["kv_heads"] == 3 and card["kv_cache"]["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4  # float32
    assert card["max_model_len"] == 2048
    one = httpx.get(gateway.api_url + "/models/" + gateway.model).json()
    assert one["kv_cache"] == card["kv_cache"]
    assert assert_openai_error(httpx.get(gateway.api_url + "/models/nope"), 404)["code"] == "model_not_found"


def test_greedy_chat_answers_paris(openai_client, gateway):
    r = openai_client.chat.completions.create(model=gateway.model, messages=CAPITAL, temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_request_id_names_the_engine_request(gateway):
    r = post(gateway, "/chat/completions", {"messages": CAPITAL, "max_tokens": 2}, headers={"X-Request-Id": "my-id-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-id-42"
    assert r.json()["id"] == "chatcmpl-my-id-42"
    r2 = post(gateway, "/chat/completions", {"messages": CAPITAL, "max_tokens": 2})
    rid = r2.headers["x-request-id"]
    assert len(rid) >= 16 and r2.json()["id"] == "chatcmpl-" + rid
    assert httpx.get(gateway.api_url + "/models", headers={"X-Request-Id": "m-1"}).headers["x-request-id"] == "m-1"


def test_request_metrics_route_is_404_openai_shaped_when_unknown(gateway):
    err = assert_openai_error(httpx.get(gateway.api_url + "/requests/never-seen/metrics"), 404)
    assert err["code"] == "request_not_found" and err["type"] == "not_found_error"


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_tokens=100000), "max_tokens"),
    (dict(temperature=5.0), "temperature"),
    (dict(n=0), "n"),
    (dict(logprobs=True, top_logprobs=99), "logprobs"),
    # vLLM 0.32 ignores fields its request model lacks: a typo, or a constraint it removed
    (dict(extra_body={"temprature": 0.1}), "temprature"),
    (dict(extra_body={"guided_json": {"type": "object"}}), "guided_json"),
])
def test_bad_requests_are_400(openai_client, gateway, kwargs, param):
    """Bad arguments, and arguments the server would otherwise drop without a word."""
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model=gateway.model, messages=CAPITAL, **kwargs)
    err = e.value.body
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param or param in err["message"]


def test_prompt_longer_than_model_is_400(openai_client, gateway):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.completions.create(model=gateway.model, prompt="hello " * 3000, max_tokens=1)
    assert "maximum context length" in e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_404(openai_client):
    with pytest.raises(openai.NotFoundError) as e:
        openai_client.chat.completions.create(model="no-such-model", messages=CAPITAL)
    assert e.value.body["code"] == "model_not_found" and e.value.body["type"] == "not_found_error"


# ------------------------------------------------------------ where vLLM 0.32 is wrong (docs/api.md)
@pytest.mark.parametrize("body, param", [
    (b"{not json", None),  # vLLM: pydantic's json_invalid dump, type "Bad Request", code 400
    (b"[]", None),
    (b'{"messages": "hi"}', "messages"),
    (b'{"messages": []}', None),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),  # vLLM: accepted
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),  # vLLM: true
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 100}', "n"),  # vLLM: 100 sequences
])
def test_malformed_chat_bodies_are_400_openai_shaped(gateway, body, param):
    err = assert_openai_error(post(gateway, "/chat/completions", body), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param, err


def test_unparsable_json_says_so(gateway):
    err = assert_openai_error(post(gateway, "/completions", b'{"prompt": "x",'), 400)
    assert err["message"].startswith("request body is not valid JSON")


def test_null_means_default(openai_client, gateway):
    r = post(gateway, "/chat/completions", {"messages": CAPITAL, "max_tokens": 3, "n": None, "stream": None,
                                            "temperature": None, "stop": None})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_stop_token_ids_are_bounded(gateway):
    many = {"prompt": "Hi", "max_tokens": 1, "stop_token_ids": [5] * 100_000}  # vLLM: accepted
    assert assert_openai_error(post(gateway, "/completions", many), 400)["param"] == "stop_token_ids"
    oov = {"prompt": "Hi", "max_tokens": 1, "stop_token_ids": [10**9]}
    assert assert_openai_error(post(gateway, "/completions", oov), 400)["param"] == "stop_token_ids"
    ok = post(gateway, "/completions", {"prompt": "Hi", "max_tokens": 2, "stop_token_ids": [2, 3]})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_call_arguments_follow_the_schema(openai_client, gateway, tool_choice):
    """vLLM 0.32 + hermes: the arguments came back as the JSON string "Paris"."""
    r = openai_client.chat.completions.create(
        model=gateway.model, temperature=0, max_tokens=60, tools=TOOLS, tool_choice=tool_choice,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    args = json.loads(calls[0].function.arguments)
    assert isinstance(args, dict) and isinstance(args.get("city"), str), args


def test_named_tool_choice_for_a_missing_tool_is_400(gateway):
    body = {"messages": CAPITAL, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    assert assert_openai_error(post(gateway, "/chat/completions", body), 400)["param"] == "tool_choice"


def test_unknown_route_is_404_openai_shaped(gateway):
    assert assert_openai_error(httpx.get(gateway.api_url + "/no-such-route"), 404)["type"] == "not_found_error"


def test_health_endpoints(gateway):
    for path in ("/health", "/health/live", "/health/ready"):
        assert httpx.get(gateway.base_url + path).status_code == 200


def test_metrics_has_vllm_and_gateway_families(gateway):
    text = httpx.get(gateway.base_url + "/metrics").text
    assert "vllm:num_requests_running" in text and "vllm:kv_cache_usage_perc" in text
    assert "gateway_kv_cache_blocks" in text and "gateway_http_requests_total" in text


def test_client_disconnect_mid_stream_aborts_engine_request(gateway):
    """A stream closed after its first chunks frees its engine request and its KV blocks."""
    body = {"model": gateway.model, "prompt": "Count forever:", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", gateway.api_url + "/completions", json=body) as r:
            lines = 0
            for line in r.iter_lines():
                lines += line.startswith("data:")
                if lines >= 3:
                    break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(gateway.base_url + "/metrics").text
        vals = {l.split("{")[0]: float(l.split()[-1]) for l in text.splitlines()
                if l.startswith(("gateway_requests_running{", "gateway_kv_cache_blocks_used{"))}
        if vals and all(v == 0 for v in vals.values()):
            return
        time.sleep(0.2)
    pytest.fail("engine request was not aborted after the client disconnected")


def test_stream_request_errors_are_a_plain_400_before_the_stream(gateway):
    r = post(gateway, "/chat/completions", {"messages": CAPITAL, "stream": True, "max_tokens": 10**6})
    assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"


def test_health_answers_while_a_4mib_prompt_is_refused(gateway):
    """Ordering only (tests never assert timings): health polls interleave with the refusal."""
    import concurrent.futures as cf

    prompt = "hello " * (4 * 2**20 // 6 - 100)
    with cf.ThreadPoolExecutor(2) as pool:
        big = pool.submit(post, gateway, "/completions", {"prompt": prompt, "max_tokens": 1})
        statuses = []
        while not big.done():
            statuses.append(httpx.get(gateway.base_url + "/health", timeout=30).status_code)
        r = big.result()
    assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"
    assert statuses and set(statuses) == {200}
