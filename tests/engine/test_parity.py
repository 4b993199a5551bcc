"""Parity with `vllm serve`: the kinds of request real clients send, through the official
`openai` client, answered correctly by the gateway (each one is answered correctly by
vLLM 0.32's own server on this model; the cases where it is not are in test_openai_api)."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import BaseModel

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
               "required": ["city", "country"], "additionalProperties": False}


class City(BaseModel):
    city: str
    country: str


def test_parse_with_a_pydantic_model(openai_client, gateway):
    r = openai_client.chat.completions.parse(model=gateway.model, messages=CAPITAL, response_format=City,
                                             temperature=0, max_tokens=60)
    assert isinstance(r.choices[0].message.parsed, City)


def test_response_format_json_object(openai_client, gateway):
    r = openai_client.chat.completions.create(
        model=gateway.model, temperature=0, max_tokens=400, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}])
    if r.choices[0].finish_reason == "length":
        pytest.skip("the model wrote a JSON object longer than max_tokens")
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_response_format_json_schema(openai_client, gateway):
    r = openai_client.chat.completions.create(
        model=gateway.model, messages=CAPITAL, temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}})
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"city", "country"}


def test_vllm_structured_outputs_choice_and_regex(openai_client, gateway):
    r = openai_client.chat.completions.create(
        model=gateway.model, messages=CAPITAL, max_tokens=5, temperature=0,
        extra_body={"structured_outputs": {"choice": ["Paris", "London"]}})
    assert r.choices[0].message.content in ("Paris", "London")
    r = openai_client.completions.create(model=gateway.model, prompt="The year is", max_tokens=8, temperature=0,
                                         extra_body={"structured_outputs": {"regex": r" [0-9]{4}"}})
    assert r.choices[0].text[1:].isdigit() and len(r.choices[0].text) == 5


def test_streamed_tool_call(openai_client, gateway):
    stream = openai_client.chat.completions.create(
        model=gateway.model, temperature=0, max_tokens=60, stream=True, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    name, args = None, ""
    for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name = name or tc.function.name
            args += tc.function.arguments or ""
    assert name == "get_weather" and isinstance(json.loads(args), dict)


def test_tool_result_in_the_history(openai_client, gateway):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees Celsius"},
    ]
    r = openai_client.chat.completions.create(model=gateway.model, messages=messages, tools=TOOLS,
                                              temperature=0, max_tokens=40)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


def test_responses_api(openai_client, gateway):
    r = openai_client.responses.create(model=gateway.model, input="What is the capital of France?",
                                       max_output_tokens=20, temperature=0)
    assert "Paris" in r.output_text and r.status == "completed"
    assert r.id.startswith("resp_")


def test_completion_echo(openai_client, gateway):
    r = openai_client.completions.create(model=gateway.model, prompt="One, two, three,", echo=True,
                                         max_tokens=3, temperature=0)
    assert r.choices[0].text.startswith("One, two, three,")


def test_batch_prompts_as_strings_and_token_ids(openai_client, gateway):
    r = openai_client.completions.create(model=gateway.model, prompt=["Hello", "The sky is"], max_tokens=2,
                                         temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    ids = httpx.post(gateway.base_url + "/tokenize", json={"prompt": "The sky is"}).json()["tokens"]
    r2 = openai_client.completions.create(model=gateway.model, prompt=[ids, ids], max_tokens=2, temperature=0)
    assert [c.text for c in r2.choices] == [r.choices[1].text] * 2


def test_tokenize_detokenize_round_trip(gateway):
    tok = httpx.post(gateway.base_url + "/tokenize", json={"model": gateway.model, "prompt": "hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 2048
    det = httpx.post(gateway.base_url + "/detokenize", json={"model": gateway.model, "tokens": tok["tokens"]}).json()
    assert det["prompt"] == "hello world"


def test_chat_logprobs(openai_client, gateway):
    r = openai_client.chat.completions.create(model=gateway.model, messages=CAPITAL, temperature=0,
                                              max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely


def test_completion_logprobs(openai_client, gateway):
    r = openai_client.completions.create(model=gateway.model, prompt="The sky is", max_tokens=3,
                                         temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == r.choices[0].text


def test_n_stop_max_tokens(openai_client, gateway):
    r = openai_client.completions.create(model=gateway.model, prompt="One, two, three,", n=2,
                                         max_tokens=7, temperature=0.8, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1] and r.usage.completion_tokens <= 14
    g = openai_client.completions.create(model=gateway.model, prompt="One, two, three,", max_tokens=30,
                                         temperature=0, stop=[" six"])
    assert g.choices[0].finish_reason == "stop" and "six" not in g.choices[0].text
    m = openai_client.completions.create(model=gateway.model, prompt="Write a long story:", max_tokens=5,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert m.choices[0].finish_reason == "length" and m.usage.completion_tokens == 5


def test_seed_makes_sampling_reproducible(openai_client, gateway):
    kw = dict(model=gateway.model, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=1234)
    assert openai_client.completions.create(**kw).choices[0].text == openai_client.completions.create(**kw).choices[0].text


def test_streaming_chat_with_usage(openai_client, gateway):
    chunks = list(openai_client.chat.completions.create(
        model=gateway.model, messages=CAPITAL, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    full = openai_client.chat.completions.create(model=gateway.model, messages=CAPITAL, temperature=0, max_tokens=20)
    assert text == full.choices[0].message.content and "Paris" in text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_vllm_extra_sampling_params(openai_client, gateway):
    r = openai_client.chat.completions.create(
        model=gateway.model, messages=CAPITAL, max_tokens=8,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 8, "ignore_eos": True})
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"


def test_logit_bias_is_applied(openai_client, gateway):
    ids = httpx.post(gateway.base_url + "/tokenize", json={"prompt": " banana"}).json()["tokens"]
    r = openai_client.completions.create(model=gateway.model, prompt="My favourite fruit is", max_tokens=1,
                                         temperature=0, logit_bias={str(ids[0]): 100})
    assert r.choices[0].text == " banana"[: len(r.choices[0].text)] and r.choices[0].text.strip()


def test_embeddings_are_not_served_for_a_generation_model(gateway):
    r = httpx.post(gateway.api_url + "/embeddings", json={"model": gateway.model, "input": "hi"})
    assert r.status_code in (400, 404, 501)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize"])
def test_routes_exist(gateway, path):
    assert any(path == p for p in httpx.get(gateway.base_url + "/openapi.json").json()["paths"])
