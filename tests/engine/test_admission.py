"""Admission on predicted KV demand, on the real engine: one gateway for the module with a
small KV cache (20 usable blocks of 128 tokens) and two tenants. Every request here needs
3 blocks (a ~200-token prompt and 60 output tokens): vLLM alone would admit 10 at once on
their prompts' 2 blocks and preempt as they grow; the gateway's budget (19 blocks) runs 6."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import pytest

from tests.conftest import start_gateway, stop_gateway
from tests.engine.test_reliability import metric, wait_for

pytestmark = pytest.mark.engine

STEADY, BURST = "k-steady", "k-burst"
DEADLINE = 8


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("admission"), {
        "GATEWAY_NUM_GPU_BLOCKS_OVERRIDE": "21",  # 20 usable blocks + vLLM's null block
        "GATEWAY_API_KEYS": f"steady:{STEADY},burst:{BURST}",
        "GATEWAY_ADMISSION_DEADLINE_SECONDS": str(DEADLINE),
    }, name="admission")
    yield gw
    stop_gateway(gw)


def body(i: int, max_tokens: int = 60) -> dict:
    # distinct first token: no prefix shared between requests; about 200 prompt tokens
    return {"model": "SmolLM2-135M-Instruct", "prompt": f"{i} " + "tell me more " * 66,
            "max_tokens": max_tokens, "ignore_eos": True}


def post(gw, key: str, i: int, rid: str, **kw) -> tuple[int, float, dict]:
    r = httpx.post(gw.api_url + "/completions", json=body(i, **kw), timeout=300,
                   headers={"Authorization": f"Bearer {key}", "X-Request-Id": rid})
    return r.status_code, time.monotonic(), dict(r.headers)


def figures(gw, rid: str) -> dict:
    r = httpx.get(f"{gw.base_url}/v1/requests/{rid}/metrics", headers={"Authorization": f"Bearer {STEADY}"})
    assert r.status_code == 200, r.text
    return r.json()["data"][-1]


def value(gw, name: str, *labels: str) -> float:
    """Sum of the series of ``name`` that carry every one of ``labels`` (``key="value"``)."""
    text = httpx.get(gw.base_url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.split("{")[0].split(" ")[0] == name and all(w in line for w in labels))


def admission(gw, outcome: str, reason: str, tenant: str = "burst") -> float:
    return value(gw, "gateway_admission_requests_total", f'tenant="{tenant}"', f'outcome="{outcome}"',
                 f'reason="{reason}"')


def queued_now(gw) -> float:
    return value(gw, "gateway_admission_queue_length")


def idle(gw) -> None:
    wait_for(lambda: queued_now(gw) == 0 and value(gw, "gateway_admission_demand_blocks") == 0,
             120, "an idle admission queue")


def test_a_burst_beyond_the_cache_is_queued_then_served_without_preemption(small):
    idle(small)
    pre = metric(small.base_url, "vllm:num_preemptions_total")
    queued = admission(small, "admitted", "queued")
    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: post(small, BURST, i, f"burst-{i}"), range(12)))
    assert [s for s, _, _ in results] == [200] * 12
    assert admission(small, "admitted", "queued") - queued >= 4  # 12 x 3 blocks > 19: some waited
    assert metric(small.base_url, "vllm:num_preemptions_total") == pre
    waits = [figures(small, f"burst-{i}")["admission_wait_seconds"] for i in range(12)]
    assert max(waits) > 0 and all(figures(small, f"burst-{i}")["preemptions"] == 0 for i in range(12))


def test_a_queued_client_that_disconnects_frees_its_place(small):
    idle(small)
    left = admission(small, "left", "disconnect", "steady")
    with cf.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(post, small, BURST, 100 + i, f"hold-{i}", max_tokens=120) for i in range(6)]
        wait_for(lambda: value(small, "gateway_admission_demand_blocks") >= 18, 60, "the budget full")

        def leave() -> None:  # queued, then gives up after 1.5 s
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(small.api_url + "/completions", json=body(200), timeout=httpx.Timeout(60, read=1.5),
                           headers={"Authorization": f"Bearer {STEADY}", "X-Request-Id": "leaver"})

        t = threading.Thread(target=leave)
        t.start()
        wait_for(lambda: queued_now(small) == 1, 30, "the request queued")
        t.join()
        wait_for(lambda: queued_now(small) == 0, 5, "the queue to let the leaver go")
        assert admission(small, "left", "disconnect", "steady") == left + 1
        assert not any(f.done() for f in running)  # it left while the others still ran
        assert [f.result()[0] for f in running] == [200] * 6
    assert figures(small, "leaver")["finish_reason"] == "left"


def test_a_tenant_over_its_share_waits_while_another_goes_first(small):
    idle(small)
    with cf.ThreadPoolExecutor(12) as pool:
        # 6 run (18 of 19 blocks), 4 wait
        burst = [pool.submit(post, small, BURST, 300 + i, f"share-b{i}") for i in range(10)]
        wait_for(lambda: queued_now(small) == 4, 60, "4 burst requests queued")
        steady = pool.submit(post, small, STEADY, 400, "share-s")
        assert steady.result()[0] == 200 and [f.result()[0] for f in burst] == [200] * 10
    admitted = {rid: figures(small, rid) for rid in ["share-s"] + [f"share-b{i}" for i in range(10)]}
    admitted = {rid: f["admission_decided_at"] for rid, f in admitted.items()
                if rid == "share-s" or f["admission_reason"] == "queued"}
    queued_before = [rid for rid in admitted if rid != "share-s"]
    assert len(queued_before) == 4
    # the steady tenant, queued after all of them, is admitted before every one of them
    assert all(admitted["share-s"] < admitted[rid] for rid in queued_before), admitted


def test_the_deadline_gives_429_with_a_retry_after_from_the_drain_rate(small):
    idle(small)
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(24) as pool:
        flood = [pool.submit(post, small, BURST, 500 + i, f"flood-{i}") for i in range(24)]
        results = [f.result() for f in flood]
    codes = [code for code, _, _ in results]
    assert 429 in codes and set(codes) <= {200, 429}, codes
    answered = sorted(t for code, t, _ in results if code == 200)
    checked = 0
    for i, (code, refused_at, headers) in enumerate(results):
        if code != 429:
            continue
        rec = figures(small, f"flood-{i}")
        assert rec["finish_reason"] in ("shed", "expired") and int(headers["retry-after"]) == rec["retry_after_seconds"]
        done = [t for t in answered if t <= refused_at]
        if len(done) < 3:
            continue  # too few answers to measure a rate on the client
        rate = len(done) / (refused_at - t0)  # answers per second the client saw since the flood began
        expected = (rec["admission_queued"] + 1) / rate  # the queue ahead, and this request, at that rate
        assert expected / 2 <= rec["retry_after_seconds"] <= 2 * max(expected, 1), (rec, rate, expected)
        checked += 1
    assert checked, "no refusal came after the client had measured a drain rate"
