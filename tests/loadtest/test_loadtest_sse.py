"""SSE decoding robust to arbitrary splits, and the request payloads."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.core.client import RequestOptions, SSEDecoder, api_root, build_payload, endpoint_url
from loadtest.core.workload import Prompt

EVENTS = [
    {"choices": [{"index": 0, "text": "héllo 😀"}]},
    {"choices": [{"index": 0, "text": " wörld", "finish_reason": "length"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
]


def stream(newline: str = "\n") -> bytes:
    parts = [f": ping{newline}{newline}"]
    parts += [f"data: {json.dumps(e, ensure_ascii=False)}{newline}{newline}" for e in EVENTS]
    parts.append(f"event: done{newline}data: [DONE]{newline}{newline}")
    return "".join(parts).encode()


def decode_in_pieces(data: bytes, cuts: list[int]) -> list[str]:
    decoder = SSEDecoder()
    out: list[str] = []
    previous = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += decoder.feed(data[previous:cut])
        previous = cut
    return out


def expected() -> list[str]:
    return [json.dumps(e, ensure_ascii=False) for e in EVENTS] + ["[DONE]"]


def test_whole_stream() -> None:
    assert SSEDecoder().feed(stream()) == expected()


@settings(max_examples=200, deadline=None)
@given(newline=st.sampled_from(["\n", "\r\n", "\r"]), cuts=st.lists(st.integers(0, 400), max_size=30))
def test_any_split_gives_the_same_events(newline: str, cuts: list[int]) -> None:
    data = stream(newline)
    assert decode_in_pieces(data, [c for c in cuts if c <= len(data)]) == expected()


def test_byte_by_byte_and_multiline_data() -> None:
    data = b"data: line one\ndata:line two\n\n"
    assert decode_in_pieces(data, list(range(len(data)))) == ["line one\nline two"]


def test_incomplete_event_is_held_back() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a": 1}\n') == []
    assert decoder.feed(b"\n") == ['{"a": 1}']


def test_payloads() -> None:
    prompt = Prompt(output_tokens=8, text="hi", messages=[{"role": "user", "content": "hi"}])
    completions = build_payload(RequestOptions("u", "m", "completions"), prompt)
    assert completions == {
        "model": "m", "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True},
        "prompt": "hi", "ignore_eos": True,
    }  # fmt: skip
    chat = build_payload(RequestOptions("u", "m", "chat", ignore_eos=False, extra_body={"min_tokens": 8}), prompt)
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert "ignore_eos" not in chat and chat["min_tokens"] == 8 and "prompt" not in chat


def test_urls() -> None:
    assert endpoint_url("http://h:1", "chat") == "http://h:1/v1/chat/completions"
    assert endpoint_url("http://h:1/v1/", "completions") == "http://h:1/v1/completions"
    assert api_root("http://h:1/v1") == "http://h:1"
