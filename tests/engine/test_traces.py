"""Traces from the real gateway (started with ``--otlp-traces-endpoint``, see the
``gateway`` fixture) to a real OTLP/HTTP receiver in the test process: vLLM's request span
per sequence, our accounting span as its child with the ledger's figures, and a root span
for a request the client dropped."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.engine import prom
from tests.engine.traces import check_aborted_root, check_children, our_spans, stream_then_disconnect, vllm_spans

pytestmark = pytest.mark.engine


def ledger(gateway, request_id: str) -> list[dict]:
    r = httpx.get(f"{gateway.base_url}/v1/requests/{request_id}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_each_child_of_n2_has_its_figures_on_a_child_of_vllms_span(gateway, otlp_receiver):
    prom.wait_idle(gateway.base_url)
    rid = "trace-" + uuid.uuid4().hex[:12]
    trace_id = uuid.uuid4().hex  # the client's trace: vLLM continues it, and so do we
    body = {"model": gateway.model, "max_tokens": 6, "n": 2, "ignore_eos": True, "temperature": 0.8, "seed": 3,
            "messages": [{"role": "user", "content": uuid.uuid4().hex[:8] + " tell me about apples"}]}
    r = httpx.post(gateway.api_url + "/chat/completions", json=body, timeout=120,
                   headers={"X-Request-Id": rid, "traceparent": f"00-{trace_id}-{'1' * 16}-01"})
    assert r.status_code == 200, r.text
    engine_id = "chatcmpl-" + rid
    records = ledger(gateway, engine_id)
    assert len(records) == 2 and {x["generation_tokens"] for x in records} == {6}
    children = check_children(otlp_receiver, engine_id, records)
    assert {c.trace_id for c in children} == {trace_id}
    assert {p.parent_span_id for p in vllm_spans(otlp_receiver, engine_id, 2)} == {"1" * 16}
    a = children[0].attributes
    assert a["kv_gateway.tenant"] == "default" and a["kv_gateway.kv_heads"] == 3
    # the fair-share figures of the accounting connector are on the span too
    assert a["kv_gateway.kv_fair_share_block_seconds"] > 0 and a["kv_gateway.kv_referenced_byte_seconds"] > 0


def test_request_dropped_by_the_client_gets_a_root_span_of_its_own(gateway, otlp_receiver):
    prom.wait_idle(gateway.base_url)
    rid = "trace-abort-" + uuid.uuid4().hex[:12]
    body = {"model": gateway.model, "prompt": uuid.uuid4().hex[:8] + " apple" * 15, "max_tokens": 1500,
            "ignore_eos": True}
    stream_then_disconnect(gateway.api_url + "/completions", body, rid)
    prom.wait_idle(gateway.base_url)
    engine_id = f"cmpl-{rid}-0"
    assert our_spans(otlp_receiver, engine_id, 1)  # it left once its fair-share figures were in
    (record,) = ledger(gateway, engine_id)
    assert record["finish_reason"] == "abort" and record["generation_tokens"] >= 4
    check_aborted_root(otlp_receiver, engine_id, record)
