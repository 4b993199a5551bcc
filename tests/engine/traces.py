"""Checks on what a real server exported to the test's OTLP receiver (tests/otlp_receiver.py):
vLLM's ``llm_request`` spans and the plugin's ``kv_gateway.accounting`` spans."""

from __future__ import annotations

import json
from typing import Any

import httpx

from service.telemetry.attribution import FIELDS as LATE_FIELDS
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

VLLM_SPAN = "llm_request"
OURS = "kv_gateway.accounting"


def expected_attributes(record: dict[str, Any]) -> dict[str, Any]:
    """What the span must carry for a ledger / log record: every non-null scalar field."""
    return {"kv_gateway." + k: v for k, v in record.items()
            if v is not None and isinstance(v, (str, int, float, bool))}


def vllm_spans(receiver: OtlpReceiver, request_id: str, count: int, timeout: float = 30) -> list[ReceivedSpan]:
    return receiver.wait_for(lambda s: s.name == VLLM_SPAN and s.attributes.get("gen_ai.request.id") == request_id,
                             count, timeout)


def our_spans(receiver: OtlpReceiver, request_id: str, count: int, timeout: float = 30) -> list[ReceivedSpan]:
    return receiver.wait_for(lambda s: s.name == OURS and s.attributes.get("kv_gateway.request_id") == request_id,
                             count, timeout)


def _key(attrs: dict[str, Any]) -> str:
    return json.dumps(attrs, sort_keys=True)


def check_children(receiver: OtlpReceiver, request_id: str, records: list[dict[str, Any]]) -> list[ReceivedSpan]:
    """One child per record under one vLLM span each (same trace, parent span id, the
    parent's own e2e and token counts), carrying exactly the records' fields."""
    n = len(records)
    parents = vllm_spans(receiver, request_id, n)
    children = our_spans(receiver, request_id, n)
    assert len(parents) == n and len(children) == n, (len(parents), len(children), n)
    by_id = {p.span_id: p for p in parents}
    assert len({c.parent_span_id for c in children}) == n  # each vLLM span has one child
    for c in children:
        parent = by_id[c.parent_span_id]
        assert c.trace_id == parent.trace_id
        assert (c.start_ns, c.end_ns) == (parent.start_ns, parent.end_ns)
        a, pa = c.attributes, parent.attributes
        assert a["kv_gateway.e2e_seconds"] == pa["gen_ai.latency.e2e"]
        assert a["kv_gateway.prompt_tokens"] == pa["gen_ai.usage.prompt_tokens"]
        assert a["kv_gateway.generation_tokens"] == pa["gen_ai.usage.completion_tokens"]
    assert sorted(_key(c.attributes) for c in children) == sorted(_key(expected_attributes(r)) for r in records)
    return children


def check_aborted_root(receiver: OtlpReceiver, request_id: str, record: dict[str, Any],
                       late_in_record: bool = True) -> ReceivedSpan:
    """An aborted sequence: a root span of its own, with exactly the record's fields. The
    fair-share figures reach the ledger record a step after the abort, and the span waits
    for them; a log line, written at the abort, lacks them (``late_in_record=False``)."""
    (span,) = our_spans(receiver, request_id, 1)
    assert span.parent_span_id == "" and span.attributes["kv_gateway.finish_reason"] == "abort"
    assert vllm_spans(receiver, request_id, 1, timeout=0) == []  # vLLM traced nothing for it
    want = expected_attributes(record)
    late = {"kv_gateway." + f for f in LATE_FIELDS}
    assert late <= set(span.attributes)  # the accounting connector runs in these servers
    if late_in_record:
        assert span.attributes == want
    else:
        assert {k: v for k, v in span.attributes.items() if k not in late} == want
    assert span.end_ns - span.start_ns == int(record["e2e_seconds"] * 1e9)
    return span


def stream_then_disconnect(url: str, body: dict[str, Any], request_id: str, events: int = 4) -> None:
    """A streamed request the client drops after a few events: the server aborts it."""
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url, json={**body, "stream": True}, headers={"X-Request-Id": request_id}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data:")
                if seen >= events:
                    break
