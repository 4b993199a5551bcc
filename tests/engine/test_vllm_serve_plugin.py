"""The accounting plugin inside a PLAIN `vllm serve` (nothing of ours but the installed
package): its /metrics gains the per-sequence figures, and every histogram moves by exactly
what the formulas give for the usage the server returns (or, for an aborted request, for
the tokens vLLM's own counters saw).

The server runs in float32 (the default model's bf16 output is garbled on the CPU build),
so one token's KV is 30 layers x 2 x 3 heads x 64 x 4 bytes = 46,080 bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from loadtest.local.servers import Proc, ProcessFailed, free_port
from service.kv import geometry as G
from service.telemetry import kv_connector
from tests.conftest import DEFAULT_MODEL_DIR, START_TIMEOUT
from tests.engine.prom import PLUGIN_FAMILIES, delta, scrape, value, wait_idle
from tests.engine.traces import check_aborted_root, check_children, stream_then_disconnect
from tests.otlp_receiver import exporter_env

pytestmark = pytest.mark.engine

MODEL = "SmolLM2-135M-Instruct"
SMOL32 = G.KVGeometry(layers=30, query_heads=9, kv_heads=3, head_size=64, dtype_bytes=4, block_size=128)
KVB, MHAB = 46_080, 138_240  # by hand: 30*2*3*64*4, 30*2*9*64*4
F = 4 * 30 * 9 * 64  # attention FLOPs per context token
LABELS = dict(model=MODEL, kv_heads=3)


@dataclass
class VllmServe:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def vllm_serve(tmp_path_factory: pytest.TempPathFactory, otlp_receiver):
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_DIR}: run `make model`")
    port = free_port()
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "KV_GATEWAY_ATTRIBUTION_VERIFY": "1", "VLLM_PLUGINS": None,
           **exporter_env(otlp_receiver)}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(DEFAULT_MODEL_DIR), "--served-model-name", MODEL, "--dtype", "float32",
           "--max-model-len", "2048", "--block-size", "128", "--enforce-eager",
           # the accounting KV connector, as a user of a plain vllm serve enables it
           "--kv-transfer-config", json.dumps(kv_connector.transfer_config()),
           "--otlp-traces-endpoint", otlp_receiver.endpoint]  # vLLM's request spans and ours
    log_path = tmp_path_factory.mktemp("vllm-serve") / "vllm-serve.log"
    proc = Proc("vllm serve", cmd, log_path, f"http://127.0.0.1:{port}", "/health", env, append_log=False).start()
    assert proc.process is not None
    server = VllmServe(proc.url, proc.process, log_path)
    try:
        proc.wait_ready(START_TIMEOUT)
    except ProcessFailed:
        proc.stop()
        pytest.fail(f"vllm serve did not become ready:\n{server.log_text()[-4000:]}")
    yield server
    proc.stop()


@pytest.fixture(scope="session")
def client(vllm_serve: VllmServe) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm_serve.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def records(server: VllmServe, request_id: str, count: int, timeout: float = 20) -> list[dict]:
    """The plugin's JSON log lines for one engine request id (one per sequence)."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for line in server.log_text().splitlines():
            head, sep, body = line.partition("gateway.requests: ")
            if sep and f'"request_id":{json.dumps(request_id)}' in body:
                found.append(json.loads(body))
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def unique_words(n: int) -> str:
    # a distinct start each call: no prefix-cache hits from earlier tests
    return uuid.uuid4().hex[:8] + " " + " ".join(["apple"] * n)


def check_exact(before: dict, after: dict, seqs: list[tuple[int, int, int]], finish_reason: str) -> None:
    """Every histogram moved by one observation per sequence (P, G, C), by the formulas."""
    n = len(seqs)
    costs = [G.sequence_cost(SMOL32, p, g, c) for p, g, c in seqs]
    exact = {
        "gateway_request_prompt_tokens": sum(p for p, _, _ in seqs),
        "gateway_request_generation_tokens": sum(g for _, g, _ in seqs),
        "gateway_request_cached_tokens": sum(c for _, _, c in seqs),
        "gateway_request_kv_used_bytes": sum((p + g - 1) * KVB for p, g, _ in seqs),
        "gateway_request_kv_mha_equivalent_bytes": sum((p + g - 1) * MHAB for p, g, _ in seqs),
        "gateway_request_kv_blocks": sum(-(-(p + g - 1) // 128) for p, g, _ in seqs),
        "gateway_request_kv_allocated_bytes": sum(c.kv_allocated_bytes for c in costs),
        "gateway_request_kv_read_bytes": sum(KVB * G.decode_context_sum(p, g) for p, g, _ in seqs),
    }
    for name, want in exact.items():
        assert delta(before, after, name + "_count", **LABELS) == n, name
        assert delta(before, after, name + "_sum", **LABELS) == want, name
    pre = sum(F * (p * (p + 1) - c * (c + 1)) // 2 for p, _, c in seqs)
    dec = sum(F * G.decode_context_sum(p, g) for p, g, _ in seqs)
    assert delta(before, after, "gateway_request_attention_flops_sum", phase="prefill") == pre
    assert delta(before, after, "gateway_request_attention_flops_sum", phase="decode") == dec
    assert delta(before, after, "gateway_attention_flops_total", phase="prefill") == pre
    assert delta(before, after, "gateway_kv_used_bytes_total") == exact["gateway_request_kv_used_bytes"]
    assert delta(before, after, "gateway_requests_total", finish_reason=finish_reason) == n
    assert delta(before, after, "gateway_requests_total") == n
    for timing in ("queue", "e2e", "prefill", "decode"):
        assert delta(before, after, f"gateway_request_{timing}_seconds_count") == n, timing


def test_plain_vllm_serve_serves_the_plugin_metrics(vllm_serve, client):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)  # a first request: every family exists
    wait_idle(vllm_serve.base_url)
    from prometheus_client.parser import text_string_to_metric_families
    import httpx

    text = httpx.get(vllm_serve.base_url + "/metrics").text
    ours = {f.name: f.type for f in text_string_to_metric_families(text) if f.name.startswith("gateway_")}
    assert ours == PLUGIN_FAMILIES
    assert "vllm:num_requests_running" in text
    s = scrape(vllm_serve.base_url)
    assert value(s, "gateway_kv_bytes_per_token") == KVB and value(s, "gateway_kv_mha_bytes_per_token") == MHAB
    assert value(s, "gateway_kv_group_size") == 3
    blocks = value(s, "gateway_kv_cache_blocks")
    assert blocks > 0 and value(s, "gateway_kv_cache_capacity_bytes") == blocks * 128 * KVB


@pytest.mark.parametrize("mode", ["chat", "completion", "chat-stream"])
def test_one_request_moves_every_histogram_by_the_formulas(vllm_serve, client, mode):
    before = wait_idle(vllm_serve.base_url)
    kw = dict(model=MODEL, max_tokens=9, temperature=0.7, seed=5, extra_body={"ignore_eos": True})
    if mode == "completion":
        r = client.completions.create(prompt=unique_words(20), **kw)
        rid, usage = r.id + "-0", r.usage  # engine id of prompt 0: cmpl-<id>-0
    elif mode == "chat":
        r = client.chat.completions.create(messages=[{"role": "user", "content": unique_words(10)}], **kw)
        rid, usage = r.id, r.usage
    else:
        chunks = list(client.chat.completions.create(
            messages=[{"role": "user", "content": unique_words(10)}], stream=True,
            stream_options={"include_usage": True}, **kw))
        rid, usage = chunks[-1].id, chunks[-1].usage
    p, g = usage.prompt_tokens, usage.completion_tokens
    assert g == 9
    after = wait_idle(vllm_serve.base_url)
    c = int(delta(before, after, "vllm:prompt_tokens_cached_total"))  # vLLM's own count of hits
    (rec,) = records(vllm_serve, rid, 1)
    assert rec["prompt_tokens"] == p and rec["generation_tokens"] == g and rec["finish_reason"] == "length"
    check_exact(before, after, [(p, g, c)], "length")
    assert delta(before, after, "gateway_request_kv_byte_seconds_sum") == pytest.approx(rec["kv_byte_seconds"])
    assert rec["kv_byte_seconds"] > 0


def test_n3_children_are_accounted_each_on_its_own(vllm_serve, client):
    prompt = unique_words(1000)
    kw = dict(model=MODEL, prompt=prompt, n=3, max_tokens=5, temperature=0.9, seed=11, extra_body={"ignore_eos": True})
    # cold: the children share the prompt; which of them hit the prefix cache is up to the scheduler
    before = wait_idle(vllm_serve.base_url)
    r = client.completions.create(**kw)
    p = r.usage.prompt_tokens
    assert 897 <= p <= 1024 and r.usage.completion_tokens == 15  # 7 full blocks of the prompt can be shared
    after = wait_idle(vllm_serve.base_url)
    recs = records(vllm_serve, r.id + "-0", 3)
    assert len(recs) == 3 and all(x["generation_tokens"] == 5 and x["prompt_tokens"] == p for x in recs)
    hits = [x["cached_tokens"] for x in recs]
    assert sum(hits) == delta(before, after, "vllm:prompt_tokens_cached_total")  # vLLM's own count
    assert all(h % 128 == 0 and h < p for h in hits)
    assert [x["attention_flops_prefill"] for x in recs] == [F * G.prefill_context_sum(p, h) for h in hits]
    check_exact(before, after, [(p, 5, h) for h in hits], "length")

    # warm: the same prompt again, its 7 full blocks cached: every child hits exactly 896 tokens
    before = wait_idle(vllm_serve.base_url)
    r = client.completions.create(**kw)
    after = wait_idle(vllm_serve.base_url)
    assert delta(before, after, "vllm:prompt_tokens_cached_total") == 3 * 896
    check_exact(before, after, [(p, 5, 896)] * 3, "length")
    # each child's own prefill: (P(P+1) - 896*897) / 2 context tokens, not the request's
    assert delta(before, after, "gateway_request_attention_flops_sum", phase="prefill") == \
        3 * F * (p * (p + 1) - 896 * 897) // 2


def test_aborted_non_streaming_request_is_counted_with_what_it_held(vllm_serve):
    rid = "abort-" + uuid.uuid4().hex[:12]
    impatient = openai.OpenAI(base_url=vllm_serve.base_url + "/v1", api_key="unused", max_retries=0, timeout=6)
    before = wait_idle(vllm_serve.base_url)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": unique_words(15)}], max_tokens=1900,
            extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": rid})
    (rec,) = records(vllm_serve, "chatcmpl-" + rid, 1, timeout=60)  # the server noticed the disconnect
    after = wait_idle(vllm_serve.base_url)
    # what vLLM itself counted for the request before it was aborted
    p = int(delta(before, after, "vllm:prompt_tokens_total"))
    g = int(delta(before, after, "vllm:generation_tokens_total"))
    c = int(delta(before, after, "vllm:prompt_tokens_cached_total"))
    if g == 0:
        pytest.skip("the client gave up before the first token: nothing held to check")
    assert rec["finish_reason"] == "abort"
    assert (rec["prompt_tokens"], rec["generation_tokens"], rec["cached_tokens"]) == (p, g, c)
    assert rec["kv_used_bytes"] == (p + g - 1) * KVB > 0
    check_exact(before, after, [(p, g, c)], "abort")
    assert value(after, "gateway_kv_cache_blocks_used") == 0  # its blocks went back to the pool


def test_plain_vllm_serve_attributes_kv_that_adds_up_to_its_used_blocks(vllm_serve):
    """The same shared-prefix workload as the gateway's test; a plain server has no ledger
    route, so the check is on the counters: no mismatch step, vLLM's ref_cnt agrees, the
    engine's and the attributed block-seconds agree within 1 %, and the tenant counter
    (one tenant: no API keys here) carries exactly the attributed block-seconds in bytes."""
    from tests.engine.test_kv_attribution import shared_prefix_workload

    before = wait_idle(vllm_serve.base_url)
    shared_prefix_workload(vllm_serve.base_url)
    after = wait_idle(vllm_serve.base_url)
    d = lambda name, **lab: delta(before, after, name, **lab)  # noqa: E731
    assert d("gateway_kv_attribution_steps_total", result="mismatch") == 0
    assert d("gateway_kv_attribution_verify_steps_total", result="mismatch") == 0
    assert d("gateway_kv_attribution_verify_steps_total", result="ok") > 10
    engine = d("gateway_kv_engine_block_seconds_total")
    attributed = d("gateway_kv_attributed_block_seconds_total")
    assert engine > 0 and attributed + d("gateway_kv_unattributed_block_seconds_total") == pytest.approx(engine, rel=0.01)
    fair = d("gateway_kv_fair_share_byte_seconds_total", tenant="default")
    assert fair == pytest.approx(attributed * SMOL32.kv_bytes_per_block, rel=1e-6)
    assert d("gateway_kv_referenced_byte_seconds_total", tenant="default") > fair  # the prompt was shared


def test_plain_vllm_serve_traces_the_figures_on_a_child_of_its_request_span(vllm_serve, client, otlp_receiver):
    """With --otlp-traces-endpoint: each sequence's record (the plugin's log line) on a
    child of vLLM's llm_request span; a request the client dropped on a root span."""
    r = client.completions.create(model=MODEL, prompt=unique_words(12), max_tokens=5, n=2, temperature=0.9,
                                  seed=7, extra_body={"ignore_eos": True})
    rid = r.id + "-0"
    check_children(otlp_receiver, rid, records(vllm_serve, rid, 2))

    aborted = "trace-abort-" + uuid.uuid4().hex[:12]
    stream_then_disconnect(vllm_serve.base_url + "/v1/completions", {
        "model": MODEL, "prompt": unique_words(15), "max_tokens": 1500, "ignore_eos": True}, aborted)
    # vLLM's server names the engine request cmpl-<X-Request-Id>-<prompt index>
    (rec,) = records(vllm_serve, f"cmpl-{aborted}-0", 1, timeout=60)
    check_aborted_root(otlp_receiver, f"cmpl-{aborted}-0", rec, late_in_record=False)  # a log line
