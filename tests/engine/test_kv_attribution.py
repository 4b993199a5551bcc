"""Per-request KV that adds up to the engine's own count, on the real engine.

With the prefix cache on (the session gateway), a shared system prompt served to
concurrent requests and a multi-turn conversation: every step, the blocks our connector
counts as held (the sum of the fair shares) plus the unattributed remainder equal the used
blocks vLLM reports in ``kv_cache_usage``; the fair shares recomputed from vLLM's own block
reference counts match ours; the engine's block-seconds and ours agree within 1 %; each
request's fair share is at most what it referenced, and the requests' fair shares add up to
the attributed block-seconds. With the prefix cache off, fair share = referenced.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import uuid

import httpx
import pytest

from tests.conftest import start_gateway, stop_gateway
from tests.engine import prom

pytestmark = pytest.mark.engine

SYSTEM = "You are a meticulous assistant who answers in full sentences. " * 40  # ~480 tokens: 3+ blocks


def chat(base_url: str, rid: str, messages: list[dict], max_tokens: int) -> dict:
    r = httpx.post(base_url + "/v1/chat/completions", timeout=300, headers={"X-Request-Id": rid}, json={
        "model": "SmolLM2-135M-Instruct", "messages": messages, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()


def record(base_url: str, rid: str) -> dict:
    r = httpx.get(base_url + f"/v1/requests/{rid}/metrics", timeout=10)
    r.raise_for_status()
    (rec,) = r.json()["data"]
    return rec


def shared_prefix_workload(base_url: str) -> list[str]:
    """Six concurrent requests on one system prompt, then a three-turn conversation."""
    tag = uuid.uuid4().hex[:6]
    system = {"role": "system", "content": tag + " " + SYSTEM}
    ids = [f"share-{tag}-{i}" for i in range(6)]
    with cf.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: chat(base_url, ids[i], [system, {"role": "user", "content": f"Tell me about {i}."}], 24),
                      range(6)))
    history = [system]
    for turn in range(3):
        rid = f"conv-{tag}-{turn}"
        history.append({"role": "user", "content": f"Turn {turn}: and then?"})
        answer = chat(base_url, rid, history, 16)["choices"][0]["message"]["content"]
        history.append({"role": "assistant", "content": answer})
        ids.append(rid)
    return ids


def check_conservation(base_url: str, ids: list[str], before: prom.Snapshot) -> list[dict]:
    after = prom.wait_idle(base_url)
    d = lambda name, **lab: prom.delta(before, after, name, **lab)  # noqa: E731
    assert d("gateway_kv_attribution_steps_total", result="mismatch") == 0
    assert d("gateway_kv_attribution_steps_total", result="exact") + d(
        "gateway_kv_attribution_steps_total", result="remainder") > 10
    assert d("gateway_kv_attribution_verify_steps_total", result="mismatch") == 0
    assert d("gateway_kv_attribution_verify_steps_total", result="ok") > 10
    engine = d("gateway_kv_engine_block_seconds_total")
    attributed = d("gateway_kv_attributed_block_seconds_total")
    unattributed = d("gateway_kv_unattributed_block_seconds_total")
    assert engine > 0
    assert attributed + unattributed == pytest.approx(engine, rel=0.01), (engine, attributed, unattributed)
    records = [record(base_url, rid) for rid in ids]
    for rec in records:
        assert rec["kv_fair_share_block_seconds"] is not None, rec
        assert 0 < rec["kv_fair_share_block_seconds"] <= rec["kv_referenced_block_seconds"] + 1e-9, rec
        assert rec["kv_peak_blocks_held"] >= -(-(rec["prompt_tokens"] + rec["generation_tokens"] - 1) // 128)
    # the requests' fair shares are all the attributed block-seconds of the run
    assert sum(r["kv_fair_share_block_seconds"] for r in records) == pytest.approx(attributed, rel=1e-6)
    block_bytes = 128 * records[0]["kv_used_bytes"] // (records[0]["prompt_tokens"] + records[0]["generation_tokens"] - 1)
    assert d("gateway_kv_fair_share_byte_seconds_total", tenant="default") == pytest.approx(attributed * block_bytes, rel=1e-6)
    return records


def test_fair_shares_add_up_to_the_engines_used_blocks_with_prefix_caching(gateway):
    before = prom.wait_idle(gateway.base_url)
    ids = shared_prefix_workload(gateway.base_url)
    records = check_conservation(gateway.base_url, ids, before)
    # the workload shared blocks: some request's fair share is below what it referenced
    assert any(r["kv_fair_share_block_seconds"] < r["kv_referenced_block_seconds"] - 1e-6 for r in records)
    conversation = [r for r in records if r["request_id"].startswith("chatcmpl-conv-")]
    assert [r["cached_tokens"] > 0 for r in conversation] == [True] * 3  # turns reuse the system prompt


@pytest.fixture(scope="module")
def no_prefix_cache_beside_a_real_connector(tmp_path_factory):
    """Prefix caching off, and vLLM's own ExampleConnector (it stores every request's KV
    on disk and loads it back for later prompts) configured by the user: the gateway puts
    ours beside it under vLLM's MultiConnector."""
    tmp = tmp_path_factory.mktemp("noprefix")
    other = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
             "kv_connector_extra_config": {"shared_storage_path": str(tmp / "kv-store")}}
    gw = start_gateway(tmp, {
        "GATEWAY_ENABLE_PREFIX_CACHING": "false", "GATEWAY_KV_CACHE_GIB": "0.25", "GATEWAY_WARMUP": "false",
        "GATEWAY_KV_TRANSFER_CONFIG": json.dumps(other)}, name="gateway-no-prefix-cache")
    yield gw
    stop_gateway(gw)


def test_without_prefix_caching_fair_share_equals_referenced(no_prefix_cache_beside_a_real_connector):
    gw = no_prefix_cache_beside_a_real_connector
    assert "Creating v1 connector with name: MultiConnector" in gw.log_text()
    before = prom.wait_idle(gw.base_url)
    ids = shared_prefix_workload(gw.base_url)
    records = check_conservation(gw.base_url, ids, before)
    for rec in records:  # no block is shared between requests (loads from the store are private)
        assert rec["kv_fair_share_block_seconds"] == pytest.approx(rec["kv_referenced_block_seconds"], rel=1e-9)
    assert any((gw.log_path.parent / "kv-store").iterdir())  # the other connector did its work
