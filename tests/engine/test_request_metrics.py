"""Per-request KV/attention accounting on the real engine: every histogram's count and
sum moves by exactly what the formulas give for the requests sent."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.kv import geometry as G
from tests.engine import prom
from tests.engine.prom import HTTP_FAMILIES, PLUGIN_FAMILIES, delta, value

# The CPU default profile serves float32 (4-byte KV).
SMOL = G.KVGeometry(layers=30, query_heads=9, kv_heads=3, head_size=64, dtype_bytes=4, block_size=128)

# The metric names are a contract (docs/metrics.md explains each).
EXPECTED_FAMILIES = {**PLUGIN_FAMILIES, **HTTP_FAMILIES}

# histogram -> function(P, [G per choice], cached) giving the exact value observed per request
EXACT = {
    "gateway_request_prompt_tokens": lambda p, gs, c: p * len(gs),  # every sequence holds the prompt
    "gateway_request_generation_tokens": lambda p, gs, c: sum(gs),
    "gateway_request_kv_blocks": lambda p, gs, c: sum(G.sequence_cost(SMOL, p, g, c).kv_blocks for g in gs),
    "gateway_request_kv_used_bytes": lambda p, gs, c: sum((p + g - 1) * SMOL.kv_bytes_per_token for g in gs),
    "gateway_request_kv_allocated_bytes": lambda p, gs, c: sum(G.sequence_cost(SMOL, p, g, c).kv_allocated_bytes for g in gs),
    "gateway_request_kv_mha_equivalent_bytes": lambda p, gs, c: sum((p + g - 1) * SMOL.mha_kv_bytes_per_token for g in gs),
    "gateway_request_kv_read_bytes": lambda p, gs, c: sum(SMOL.kv_bytes_per_token * G.decode_context_sum(p, g) for g in gs),
}
FLOPS_PER_CONTEXT_TOKEN = 4 * 30 * 9 * 64


def scrape(gateway) -> prom.Snapshot:
    return prom.scrape(gateway.base_url)


def wait_idle(gateway, timeout: float = 30) -> None:
    prom.wait_idle(gateway.base_url, timeout)


def unique_prompt(words: int) -> str:
    # distinct text each call, shorter than one 128-token block: no prefix-cache hits
    return uuid.uuid4().hex[:8] + " " + " ".join(["apple"] * words)


def test_metric_names_are_the_contract(gateway):
    text = httpx.get(gateway.base_url + "/metrics").text
    ours = {f.name: f.type for f in text_string_to_metric_families(text) if f.name.startswith("gateway_")}
    assert ours == EXPECTED_FAMILIES
    assert "vllm:num_requests_running" in text  # the engine's own metrics are served next to ours
    assert not any("vllm" in name for name in ours)


def test_model_shape_metrics(gateway):
    s = scrape(gateway)
    assert value(s, "gateway_kv_bytes_per_token") == SMOL.kv_bytes_per_token == 46_080  # float32
    assert value(s, "gateway_kv_mha_bytes_per_token") == SMOL.mha_kv_bytes_per_token
    assert value(s, "gateway_kv_group_size") == 3
    info = [dict(l) for (n, l) in s if n == "gateway_model_info"][0]
    assert info["kv_heads"] == "3" and info["query_heads"] == "9" and info["layers"] == "30"
    blocks = value(s, "gateway_kv_cache_blocks")
    assert blocks > 0 and value(s, "gateway_kv_cache_capacity_tokens") == blocks * 128
    assert value(s, "gateway_predicted_max_concurrency", basis="max_model_len") == pytest.approx(blocks / 16)


@pytest.mark.parametrize("mode", ["chat", "completion", "completion-stream", "chat-stream-n3"])
def test_histograms_move_by_the_formulas_exactly(gateway, mode):
    wait_idle(gateway)
    n = 3 if mode.endswith("n3") else 1
    max_tokens = 9
    body = {"model": gateway.model, "max_tokens": max_tokens, "ignore_eos": True, "n": n,
            "temperature": 0.7, "seed": 5}
    stream = "stream" in mode
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    if mode.startswith("chat"):
        url = "/chat/completions"
        body["messages"] = [{"role": "user", "content": unique_prompt(10)}]
    else:
        url = "/completions"
        body["prompt"] = unique_prompt(20)
    before = scrape(gateway)
    rid = f"exact-{mode}-" + uuid.uuid4().hex
    r = httpx.post(gateway.api_url + url, json=body, timeout=120, headers={"X-Request-Id": rid})
    assert r.status_code == 200
    if stream:
        events = [json.loads(l[6:]) for l in r.text.splitlines() if l.startswith("data: {")]
        last = events[-1]
    else:
        last = r.json()
    usage = last["usage"]
    p, gs = usage["prompt_tokens"], [max_tokens] * n
    assert usage["completion_tokens"] == sum(gs)
    wait_idle(gateway)
    after = scrape(gateway)
    # the request's own figures, by its X-Request-Id: one record per engine sequence
    ledger = httpx.get(f"{gateway.api_url}/requests/{rid}/metrics", timeout=10)
    assert ledger.status_code == 200, ledger.text
    recs = ledger.json()["data"]
    assert len(recs) == n
    assert all(x["prompt_tokens"] == p and x["cached_tokens"] == 0 for x in recs)
    xm = {k: sum(x[k] for x in recs) for k in ("kv_used_bytes", "kv_mha_equivalent_bytes",
                                                 "attention_flops_decode", "kv_byte_seconds")}
    labels = dict(model=gateway.model, kv_heads=3)
    for name, f in EXACT.items():
        # one observation per engine sequence: each choice of an n>1 request on its own
        assert delta(before, after, name + "_count", **labels) == n, name
        assert delta(before, after, name + "_sum", **labels) == f(p, gs, 0), name
    flops_pre = sum(FLOPS_PER_CONTEXT_TOKEN * p * (p + 1) // 2 for _ in gs)
    flops_dec = sum(FLOPS_PER_CONTEXT_TOKEN * G.decode_context_sum(p, g) for g in gs)
    assert delta(before, after, "gateway_request_attention_flops_sum", phase="prefill") == flops_pre
    assert delta(before, after, "gateway_request_attention_flops_sum", phase="decode") == flops_dec
    assert delta(before, after, "gateway_attention_flops_total", phase="decode") == flops_dec
    assert delta(before, after, "gateway_kv_used_bytes_total") == EXACT["gateway_request_kv_used_bytes"](p, gs, 0)
    assert delta(before, after, "gateway_requests_total", finish_reason="length") == n
    # the ledger's figures are the ones that went into Prometheus
    assert xm["kv_used_bytes"] == EXACT["gateway_request_kv_used_bytes"](p, gs, 0)
    assert xm["kv_mha_equivalent_bytes"] == 3 * xm["kv_used_bytes"]
    assert xm["attention_flops_decode"] == flops_dec
    # byte-seconds: sum equals the ledger's figures (timestamps come from the engine)
    assert delta(before, after, "gateway_request_kv_byte_seconds_sum") == pytest.approx(xm["kv_byte_seconds"])
    assert delta(before, after, "gateway_request_kv_byte_seconds_sum") > 0
    assert xm["kv_byte_seconds"] > 0
    for timing in ("queue", "ttft", "tpot", "e2e", "prefill", "decode"):
        assert delta(before, after, f"gateway_request_{timing}_seconds_count") == n, timing


def test_aborted_request_is_accounted_once_from_its_log_line(gateway):
    wait_idle(gateway)
    before = scrape(gateway)
    rid = "abort-" + uuid.uuid4().hex
    body = {"model": gateway.model, "prompt": unique_prompt(15), "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", gateway.api_url + "/completions", json=body, headers={"X-Request-Id": rid}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data:")
                if seen >= 4:
                    break
    wait_idle(gateway)
    after = scrape(gateway)
    deadline = time.monotonic() + 10
    record = None
    while record is None and time.monotonic() < deadline:
        for line in gateway.log_text().splitlines():
            # vLLM's server names a completion's engine request cmpl-<X-Request-Id>-<prompt index>
            if f'"request_id":"cmpl-{rid}-0"' in line:
                record = json.loads(line[line.index("{"):])
        time.sleep(0.1)
    assert record is not None, "no JSON log line for the aborted request"
    assert record["finish_reason"] == "abort"
    p, g = record["prompt_tokens"], record["generation_tokens"]
    assert 4 <= g < 1500
    assert delta(before, after, "gateway_requests_total", finish_reason="abort") == 1
    for name, f in EXACT.items():
        assert delta(before, after, name + "_count") == 1, name
        assert delta(before, after, name + "_sum") == f(p, [g], 0), name
    # its KV blocks went back to the pool
    assert value(after, "gateway_kv_cache_blocks_used") == 0


def test_exemplars_carry_the_request_id_in_openmetrics(gateway):
    rid = "exemplar-" + uuid.uuid4().hex[:12]
    httpx.post(gateway.api_url + "/completions", headers={"X-Request-Id": rid},
               json={"model": gateway.model, "prompt": "Hello", "max_tokens": 2}, timeout=60).raise_for_status()
    r = httpx.get(gateway.base_url + "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")
    assert f'# {{request_id="cmpl-{rid}-0"}}' in r.text  # the engine id: cmpl-<X-Request-Id>-<prompt index>


def test_promtool_check_metrics_is_clean(gateway):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make test installs Debian's prometheus)")
    text = httpx.get(gateway.base_url + "/metrics").text
    ours = "\n".join(l for l in text.splitlines() if "gateway_" in l) + "\n"
    res = subprocess.run([promtool, "check", "metrics"], input=ours, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr


def test_decode_steps_carry_the_roofline_next_to_their_measured_time(gateway):
    """The test gateway detects its hardware (this CPU, probed at start): every decode step
    adds its measured time and its roofline floor."""
    before = scrape(gateway)
    httpx.post(gateway.api_url + "/completions", timeout=60, json={
        "model": gateway.model, "prompt": unique_prompt(12), "max_tokens": 8, "ignore_eos": True}).raise_for_status()
    wait_idle(gateway)
    after = scrape(gateway)
    steps = delta(before, after, "gateway_decode_steps_total")
    # 8 tokens: the first from prefill, then 7 decode steps; the step that finishes the
    # request is not counted (its state is gone from the front end when record() runs)
    assert steps == 6
    measured = delta(before, after, "gateway_decode_step_seconds_total")
    predicted = delta(before, after, "gateway_decode_step_predicted_seconds_total")
    memory = delta(before, after, "gateway_decode_step_memory_seconds_total")
    assert measured > 0 and predicted >= memory > 0
    assert value(after, "gateway_decode_bandwidth_efficiency_ratio") > 0
