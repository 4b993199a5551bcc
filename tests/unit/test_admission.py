"""Admission on predicted KV demand: the block arithmetic, the fair queue per tenant, and the
middleware around it (in-process stub of vLLM's app). The real engine: tests/engine/test_admission.py."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from prometheus_client import CollectorRegistry

from service.admission.book import ADMISSIONS
from service.admission.gate import Gate
from service.admission.policy import Policy
from service.admission.queue import Admission, Disconnected, Refused
from service.admission.shape import read_shape
from service.kv.admission import PrefixIndex, full_block_hashes, request_blocks
from service.settings import Settings
from service.telemetry.ledger import LEDGER
from service.telemetry.metrics import AdmissionMetrics


@pytest.fixture
def anyio_backend():
    return "asyncio"


# ---- arithmetic
@pytest.mark.parametrize("prompts,max_tokens,n,blocks", [
    ((120,), 100, 1, 2),  # 220 tokens -> 2 blocks of 128
    ((128,), 0, 1, 1),
    ((100,), None, 1, 16),  # no max_tokens: the context limit, 2048 / 128
    ((300,), 100, 3, 3 * 4 - 2 * 2),  # 400 tokens -> 4 blocks each; the 2 full prompt blocks are shared
    ((10, 10), 10, 1, 2),  # a batch completion: one sequence per prompt
    ((5000,), 10, 1, 16),  # longer than the context: capped at it
])
def test_request_blocks(prompts, max_tokens, n, blocks):
    assert request_blocks(prompts, max_tokens, n, block_size=128, max_model_len=2048) == blocks


def test_prefix_index_counts_leading_full_blocks_held_now():
    a = full_block_hashes(list(range(300)), 128)
    assert len(a) == 2
    b = full_block_hashes(list(range(256)) + [7] * 200, 128)
    c = full_block_hashes([9] + list(range(1, 300)), 128)
    idx = PrefixIndex()
    idx.add(a)
    assert idx.hits(b) == 2 and idx.hits(c) == 0 and idx.hits(a) == 2
    idx.add(a)
    idx.remove(a)
    assert idx.hits(b) == 2  # still one holder
    idx.remove(a)
    assert idx.hits(b) == 0 and len(idx) == 0


# ---- the queue
def make(budget_blocks=10, **policy) -> Admission:
    policy.setdefault("kv_fraction", 1.0)
    return Admission(Policy(**policy), budget_blocks, metrics=AdmissionMetrics(CollectorRegistry()))


@pytest.mark.anyio
async def test_a_burst_beyond_the_budget_waits_and_is_served_in_order(anyio_backend):
    adm = make(10)
    first = [await adm.acquire("a", 4), await adm.acquire("a", 4)]
    waiting = [asyncio.create_task(adm.acquire("a", 4)) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert adm.reserved == 8 and adm.queued == 3 and not any(t.done() for t in waiting)
    adm.release(first[0])
    await asyncio.sleep(0.01)
    assert waiting[0].done() and not waiting[1].done() and adm.reserved == 8
    adm.release(first[1])
    adm.release(await waiting[0])
    await asyncio.sleep(0.01)
    assert waiting[1].done() and waiting[2].done() and adm.reserved == 8
    assert (await waiting[1]).reason == "queued" and first[0].reason == "immediate"
    for t in waiting[1:]:
        adm.release(await t)
    assert adm.reserved == 0 and adm.queued == 0 and not adm.by_tenant


@pytest.mark.anyio
async def test_a_request_larger_than_the_budget_runs_alone(anyio_backend):
    adm = make(10)
    t = await adm.acquire("a", 30)
    assert t.admitted
    later = asyncio.create_task(adm.acquire("a", 1))
    await asyncio.sleep(0.05)
    assert not later.done()
    adm.release(t)
    assert (await later).admitted


@pytest.mark.anyio
async def test_a_tenant_over_its_share_waits_while_another_goes_first(anyio_backend):
    adm = make(12)
    held = [await adm.acquire("burst", 4) for _ in range(3)]  # alone, it may take the whole budget
    burst_more = [asyncio.create_task(adm.acquire("burst", 4)) for _ in range(2)]
    await asyncio.sleep(0.01)
    steady = asyncio.create_task(adm.acquire("steady", 4))  # queued after the burst's requests
    await asyncio.sleep(0.01)
    adm.release(held[0])
    await asyncio.sleep(0.01)
    assert steady.done() and not any(t.done() for t in burst_more)
    adm.release(held[1])
    await asyncio.sleep(0.01)
    assert burst_more[0].done()  # burst back under half of the budget
    for t in [held[2], await steady, await burst_more[0]]:
        adm.release(t)
    adm.release(await burst_more[1])


@pytest.mark.anyio
async def test_weights_and_priorities_order_the_tenants(anyio_backend):
    adm = make(8, weights={"big": 3.0}, priorities={"vip": 1})
    held_x, filler = await adm.acquire("x", 4), await adm.acquire("y", 4)
    tasks = {k: asyncio.create_task(adm.acquire(k, 4)) for k in ("x", "big", "vip")}
    await asyncio.sleep(0.01)
    adm.release(filler)
    await asyncio.sleep(0.01)
    assert [k for k, t in tasks.items() if t.done()] == ["vip"]  # priority first
    adm.release(await tasks["vip"])
    await asyncio.sleep(0.01)
    assert [k for k, t in tasks.items() if t.done()] == ["big", "vip"]  # then least held per weight (x holds 4)
    adm.release(await tasks["big"])
    adm.release(held_x)
    adm.release(await tasks["x"])
    assert adm.reserved == 0


@pytest.mark.anyio
async def test_a_client_that_disconnects_leaves_the_queue_at_once(anyio_backend):
    adm = make(4)
    hold = await adm.acquire("a", 4)
    gone = asyncio.Event()

    async def disconnected():
        await gone.wait()

    waiter = asyncio.create_task(adm.acquire("a", 4, disconnected=disconnected))
    behind = asyncio.create_task(adm.acquire("b", 4))
    await asyncio.sleep(0.01)
    assert adm.queued == 2
    gone.set()
    with pytest.raises(Disconnected):
        await waiter
    assert adm.queued == 1
    adm.release(hold)
    assert (await behind).admitted
    m = adm.metrics.decisions.labels("a", "left", "disconnect")._value.get()
    assert m == 1


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_the_queue(anyio_backend):
    adm = make(4)
    hold = await adm.acquire("a", 4)
    waiter = asyncio.create_task(adm.acquire("a", 4))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert adm.queued == 0
    adm.release(hold)
    assert adm.reserved == 0


@pytest.mark.anyio
async def test_the_deadline_refuses_with_a_retry_after_from_the_drain_rate(anyio_backend):
    now = [0.0]
    adm = Admission(Policy(kv_fraction=1.0, deadline_seconds=5), 4, clock=lambda: now[0])
    assert adm.retry_after(0) == (5, None)  # nothing measured yet: the deadline
    for i in range(5):  # 5 requests finished in the 8 s since the first admission
        t = await adm.acquire("a", 4)
        now[0] = 2.0 * i
        adm.release(t)
    assert adm.drain_rate() == pytest.approx(5 / 8)
    hold = await adm.acquire("a", 4)
    waiter = asyncio.create_task(adm.acquire("a", 4))
    await asyncio.sleep(0.01)
    now[0] += 10.0  # past the deadline
    with pytest.raises(Refused) as e:
        await waiter
    assert e.value.outcome == "expired" and e.value.reason == "deadline"
    # (0 others queued + itself) / (1 finished in the 10 s since the queue filled)
    assert (e.value.retry_after, e.value.queued, e.value.drain_rate) == (10, 0, pytest.approx(0.1))
    adm.release(hold)


@pytest.mark.anyio
async def test_full_queue_and_predicted_wait_shed_at_once(anyio_backend):
    adm = make(4, max_queue=2, deadline_seconds=30)
    hold = await adm.acquire("a", 4)
    waiters = [asyncio.create_task(adm.acquire("a", 4)) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(Refused) as e:
        await adm.acquire("a", 4)
    assert (e.value.outcome, e.value.reason) == ("shed", "queue_full")
    adm._first_admission = adm._busy_since = adm.clock() - 40
    adm._finished.extend([adm.clock() - 40, adm.clock() - 20, adm.clock()])  # 3 in 40 s: 0.075 requests/s
    adm.policy = Policy(kv_fraction=1.0, max_queue=10, deadline_seconds=30)
    with pytest.raises(Refused) as e:
        await adm.acquire("a", 4)  # 3rd in line at 0.075/s: 40 s > 30 s
    assert (e.value.outcome, e.value.reason) == ("shed", "predicted_wait")
    assert 40 <= e.value.retry_after <= 41  # (2 queued + itself) / 0.075 per s
    adm.release(hold)
    for w in waiters:
        adm.release(await w)


@pytest.mark.anyio
async def test_the_engine_count_limits_admission_when_higher(anyio_backend):
    used = [0]
    adm = Admission(Policy(kv_fraction=1.0), 10, engine_used_blocks=lambda: used[0])
    t = await adm.acquire("a", 2)
    used[0] = 9  # blocks in use that no reservation accounts
    later = asyncio.create_task(adm.acquire("a", 2))
    await asyncio.sleep(0.05)
    assert not later.done()
    used[0] = 2
    assert (await later).admitted
    adm.release(t)


@pytest.mark.anyio
async def test_probable_prefix_hits_lower_the_reservation(anyio_backend):
    adm = make(10)
    prefix = full_block_hashes(list(range(512)), 128)  # 4 full blocks
    a = await adm.acquire("a", 5, prefix)
    b = await adm.acquire("a", 5, prefix)
    assert (a.blocks, b.blocks, b.hit_blocks) == (5, 1, 4)
    adm.release(a)
    adm.release(b)
    assert len(adm.prefix) == 0


# ---- request shapes
class WordTokenizer:
    def encode(self, text):
        return [hash(w) % 1000 for w in text.split()]

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=True, **kw):
        ids = [1]
        for m in messages:
            ids += [2] + self.encode(m["content"]) + [3]
        return {"input_ids": ids + [2]}


def test_read_shape_counts_prompts_and_limits():
    tok = WordTokenizer()
    s = read_shape("/v1/completions", json.dumps({"prompt": "a b c", "max_tokens": 5, "n": 2}).encode(), tok, 2)
    assert (s.prompt_tokens, s.max_tokens, s.n, s.exact, len(s.hashes)) == ((3,), 5, 2, True, 1)
    s = read_shape("/v1/completions", json.dumps({"prompt": [[1, 2], [3]]}).encode(), tok, 2)
    assert (s.prompt_tokens, s.max_tokens) == ((2, 1), 16)  # vLLM's completions default
    s = read_shape("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x y"}], "max_completion_tokens": 7}).encode(), tok, 128)
    assert (s.prompt_tokens, s.max_tokens) == ((6,), 7)
    s = read_shape("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), tok, 128)
    assert s.max_tokens is None  # chat without a limit: up to the context
    s = read_shape("/v1/responses", json.dumps({"input": "a b", "instructions": "c", "max_output_tokens": 3}).encode(), tok, 128)
    assert (s.prompt_tokens, s.max_tokens) == ((9,), 3)
    raw = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode()
    s = read_shape("/v1/chat/completions", raw, tok, 128)  # the template cannot render it: the bound
    assert not s.exact and s.prompt_tokens == (len(raw),) and s.hashes == ()


# ---- settings
@pytest.mark.parametrize("kw,msg", [
    ({"admission_kv_fraction": 0}, "greater than 0"),
    ({"admission_kv_fraction": 1.2}, "less than or equal to 1"),
    ({"admission_deadline_seconds": 0}, "greater than 0"),
    ({"admission_max_queue": 0}, "greater than or equal to 1"),
    ({"tenant_weights": "default=0"}, "not a valid value"),
    ({"tenant_weights": "nobody=2"}, "unknown tenant(s) nobody"),
    ({"api_keys": "a:k1", "tenant_priorities": "a=1,b=2"}, "unknown tenant(s) b"),
    ({"tenant_priorities": "default=high"}, "not a valid value"),
    ({"tenant_weights": "default"}, "is not name=value"),
    ({"tenant_weights": "default=1,default=2"}, "given twice"),
])
def test_bad_admission_settings_fail_with_a_clear_error(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        Settings(profile=None, **kw)


def test_admission_settings_parse():
    s = Settings(profile=None, api_keys="steady:k1,burst:k2", tenant_weights="steady=3, burst=1",
                 tenant_priorities="steady=1")
    p = Policy.from_settings(s)
    assert s.admission and p.weight("steady") == 3.0 and p.weight("other") == 1.0 and p.priority("steady") == 1


# ---- the middleware around the queue (stub app)
async def stub_app(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"choices":[{"index":0,"text":"x","finish_reason":"stop"}]}'})


@pytest.mark.anyio
async def test_middleware_queues_refuses_with_retry_after_and_records_the_wait(anyio_backend):
    from service.middleware import GatewayMiddleware
    from service.runtime import Runtime
    from service.telemetry.ledger import EngineState

    s = Settings(profile=None, admission_deadline_seconds=0.3)
    rt = Runtime(settings=s, engine_state=EngineState(), vocab_size=49152)
    rt.gate = Gate(make(2, deadline_seconds=0.3), WordTokenizer(), 128, 2048)
    app = GatewayMiddleware(stub_app, rt)
    hold = await rt.gate.admission.acquire("default", 2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 5}, headers={"X-Request-Id": "q1"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "overloaded"
        rec = LEDGER.get("q1")[-1]
        assert rec["finish_reason"] == "expired" and rec["admission_wait_seconds"] >= 0.3
        rt.gate.release(hold)
        r = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 5}, headers={"X-Request-Id": "q2"})
        assert r.status_code == 200
        assert ADMISSIONS.extra_of("cmpl-q2-0")["admission_outcome"] == "admitted"
    assert rt.gate.admission.reserved == 0 and rt.in_flight == 0
