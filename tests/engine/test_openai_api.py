"""The OpenAI API on the real engine and model, through the official `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list(openai_client, gateway):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [gateway.model]
    card = models.data[0].model_extra
    assert card["kv_cache"]["kv_heads"] == 3 and card["kv_cache"]["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4  # float32


def test_greedy_chat_answers_paris(openai_client, gateway):
    r = openai_client.chat.completions.create(model=gateway.model, messages=CAPITAL, temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_yields_chunks_and_usage(openai_client, gateway):
    stream = openai_client.chat.completions.create(
        model=gateway.model, messages=CAPITAL, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    # the streamed answer equals the non-streamed one, and usage counts it exactly
    full = openai_client.chat.completions.create(model=gateway.model, messages=CAPITAL, temperature=0, max_tokens=20)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_n_stop_max_tokens(openai_client, gateway):
    r = openai_client.completions.create(model=gateway.model, prompt="One, two, three,", n=2,
                                         max_tokens=7, temperature=0.8, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason in ("length", "stop") for c in r.choices)
    assert r.usage.completion_tokens <= 14
    # greedy with a stop sequence: the text ends before the stop string, finish_reason stop
    g = openai_client.completions.create(model=gateway.model, prompt="One, two, three,", max_tokens=30,
                                         temperature=0, stop=[" six"])
    assert g.choices[0].finish_reason == "stop"
    assert "six" not in g.choices[0].text
    # max_tokens cuts off with finish_reason length and exactly that many tokens
    m = openai_client.completions.create(model=gateway.model, prompt="Write a long story:", max_tokens=5,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert m.choices[0].finish_reason == "length" and m.usage.completion_tokens == 5


def test_seed_makes_sampling_reproducible(openai_client, gateway):
    kw = dict(model=gateway.model, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=1234)
    a = openai_client.completions.create(**kw).choices[0].text
    b = openai_client.completions.create(**kw).choices[0].text
    assert a == b


def test_vllm_extra_sampling_params(openai_client, gateway):
    r = openai_client.chat.completions.create(
        model=gateway.model, messages=CAPITAL, max_tokens=8,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 8, "ignore_eos": True})
    assert r.usage.completion_tokens == 8
    assert r.choices[0].finish_reason == "length"


def test_chat_logprobs(openai_client, gateway):
    r = openai_client.chat.completions.create(model=gateway.model, messages=CAPITAL, temperature=0,
                                              max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token


def test_completion_logprobs(openai_client, gateway):
    r = openai_client.completions.create(model=gateway.model, prompt="The sky is", max_tokens=3,
                                         temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == r.choices[0].text


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_tokens=100000), "max_tokens"),
    (dict(temperature=5.0), "temperature"),
    (dict(n=0), "n"),
    (dict(top_p=0), "top_p"),
    (dict(logprobs=True, top_logprobs=99), "top_logprobs"),
])
def test_bad_requests_are_400(openai_client, gateway, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model=gateway.model, messages=CAPITAL, **kwargs)
    err = e.value.body
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param or param in err["message"]


def test_prompt_longer_than_model_is_400(openai_client, gateway):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.completions.create(model=gateway.model, prompt="hello " * 3000, max_tokens=1)
    assert "maximum context length" in e.value.body["message"]


def test_unknown_model_is_404(openai_client):
    with pytest.raises(openai.NotFoundError) as e:
        openai_client.chat.completions.create(model="no-such-model", messages=CAPITAL)
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"messages": "hi"}', b'{"messages": []}',
                                  b'{"messages": [{"role": "wizard", "content": "x"}]}'])
def test_malformed_bodies_are_400_openai_shaped(gateway, body):
    r = httpx.post(gateway.api_url + "/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_request_id_echoed_or_generated(gateway):
    r = httpx.get(gateway.api_url + "/models", headers={"X-Request-Id": "my-id-42"})
    assert r.headers["x-request-id"] == "my-id-42"
    r2 = httpx.get(gateway.api_url + "/models")
    assert len(r2.headers["x-request-id"]) >= 16


def test_health_endpoints(gateway):
    for path in ("/health", "/health/live", "/health/ready"):
        assert httpx.get(gateway.base_url + path).status_code == 200


def test_client_disconnect_mid_stream_aborts_engine_request(gateway):
    """A stream closed after its first chunks frees its engine request."""
    body = {"model": gateway.model, "prompt": "Count forever:", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", gateway.api_url + "/completions", json=body) as r:
            lines = 0
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines += 1
                if lines >= 3:
                    break
    # the engine must report it aborted, not finished after 1500 tokens
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(gateway.base_url + "/metrics").text
        running = [l for l in text.splitlines() if l.startswith("gateway_requests_running{")]
        aborted = [l for l in text.splitlines() if l.startswith("gateway_requests_total{") and 'finish_reason="abort"' in l]
        if running and float(running[0].split()[-1]) == 0 and aborted:
            return
        time.sleep(0.2)
    pytest.fail("engine request was not aborted after the client disconnected")


def test_error_in_stream_is_openai_shaped_sse(gateway):
    """Validation errors on a stream request are a normal 400 before any SSE starts."""
    r = httpx.post(gateway.api_url + "/chat/completions",
                   json={"messages": CAPITAL, "stream": True, "max_tokens": 10**6})
    assert r.status_code == 400
    assert json.loads(r.text)["error"]["code"] == "context_length_exceeded"
