"""Overload, disconnects, shutdown, engine death and hostile input, on the real engine."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import start_gateway, stop_gateway

# Every test here runs a real engine (some start their own gateway, not the shared fixture).
pytestmark = pytest.mark.engine

KEYS = ("key-one", "key-two")


def metric(base_url: str, name: str, headers: dict | None = None) -> float:
    text = httpx.get(base_url + "/metrics", headers=headers or {}, timeout=10).text
    vals = [float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + "{")]
    return sum(vals)


def wait_for(predicate, timeout: float = 30, what: str = "condition", detail=lambda: "") -> None:
    """Poll until ``predicate()``; on timeout fail naming ``what``, plus ``detail()`` if given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}{detail()}")


def stream_lines(client: httpx.Client, url: str, body: dict, headers: dict,
                 admitted: list | None = None) -> list[str]:
    """The stream's data lines; `admitted` gets an entry once the gateway has answered 200."""
    with client.stream("POST", url, json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        if admitted is not None:
            admitted.append(time.monotonic())
        return [l for l in r.iter_lines() if l.startswith("data:")]


def start_streams(gw, pool: cf.Executor, client: httpx.Client, body: dict, n: int) -> list[cf.Future]:
    """n streams, returned once the gateway has admitted all of them (each counts as in flight
    until its last byte), so what follows sees them in flight; fails with the reason otherwise."""
    admitted: list[float] = []
    futures = [pool.submit(stream_lines, client, gw.api_url + "/completions", body, AUTH, admitted)
               for _ in range(n)]
    def ended() -> list:
        return [f.exception() or "finished" for f in futures if f.done()]

    def detail() -> str:
        return f"; {len(admitted)} admitted, ended early: {ended()}\ngateway log tail:\n{gw.log_text()[-4000:]}"
    wait_for(lambda: len(admitted) == n or any(f.done() for f in futures), 120, f"{n} streams admitted", detail)
    if ended():
        pytest.fail(f"a stream ended before all {n} were admitted{detail()}")
    return futures


# ------------------------------------------------------------------ hostile input (shared gateway)
def post_raw(gateway, path: str, content: bytes) -> httpx.Response:
    return httpx.post(gateway.api_url + path, content=content, headers={"content-type": "application/json"}, timeout=30)


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert not isinstance(err["code"], int), err
    return err


def test_invalid_utf8_is_400(gateway):
    assert_openai_error(post_raw(gateway, "/completions", b'{"prompt": "\xff\xfe bad", "max_tokens": 1}'), 400)


def test_deeply_nested_json_is_400(gateway):
    body = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_openai_error(post_raw(gateway, "/completions", body), 400)


@pytest.mark.parametrize("patch, param", [
    ({"n": 100}, "n"),
    ({"best_of": 100, "n": 1}, "best_of"),
    ({"stop": [f"s{i}" for i in range(100)]}, "stop"),
    ({"stop_token_ids": list(range(1000))}, "stop_token_ids"),
    ({"logprobs": True, "top_logprobs": 50}, "logprobs"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
])
def test_bounds_are_400(gateway, patch, param):
    body = {"model": gateway.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **patch}
    err = assert_openai_error(post_raw(gateway, "/chat/completions", json.dumps(body).encode()), 400)
    assert err["param"] == param or param in err["message"]


def test_token_ids_out_of_vocab_are_400(gateway):
    err = assert_openai_error(post_raw(gateway, "/completions", b'{"prompt": [1, 2, 999999], "max_tokens": 1}'), 400)
    assert "vocab" in err["message"].lower()


def test_many_mid_stream_disconnects_free_every_block(gateway):
    body = {"model": gateway.model, "prompt": "Tell me everything:", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}

    def open_and_drop(i: int) -> int:
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", gateway.api_url + "/completions", json=body) as r:
                got = 0
                for line in r.iter_lines():
                    got += line.startswith("data:")
                    if got >= 1 + i % 3:  # leave after the 1st, 2nd or 3rd chunk
                        return got
        return 0

    with cf.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(open_and_drop, range(24)))
    # non-streaming requests whose client gives up before the answer
    for _ in range(4):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gateway.api_url + "/completions", timeout=0.5,
                       json={**body, "stream": False})
    wait_for(lambda: metric(gateway.base_url, "gateway_requests_running") == 0
             and metric(gateway.base_url, "gateway_kv_cache_blocks_used") == 0, 60, "engine to free every block")
    # the gateway still serves
    r = httpx.post(gateway.api_url + "/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


# ------------------------------------------------------------------ a gateway with keys and tight limits
@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("strict"), {
        "GATEWAY_API_KEYS": f"alice:{KEYS[0]},{KEYS[1]}", "GATEWAY_PROTECT_METRICS": "true",
        "GATEWAY_MAX_IN_FLIGHT": "3", "GATEWAY_MAX_BODY_BYTES": "65536",
        "GATEWAY_SHUTDOWN_GRACE_SECONDS": "60", "GATEWAY_KV_CACHE_GIB": "1",
    }, name="strict")
    yield gw
    stop_gateway(gw)


AUTH = {"Authorization": f"Bearer {KEYS[1]}"}


def test_api_keys(strict):
    url = strict.api_url + "/completions"
    body = {"prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"}):
        r = httpx.post(url, json=body, headers=headers)
        assert assert_openai_error(r, 401)["type"] == "authentication_error"
    for key in KEYS:
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    assert httpx.get(strict.base_url + "/metrics").status_code == 401
    assert httpx.get(strict.base_url + "/metrics", headers=AUTH).status_code == 200
    assert httpx.get(strict.base_url + "/health").status_code == 200  # left open by default


def test_each_request_is_accounted_to_its_keys_name(strict):
    """The tenant: a named key ("alice:<key>") and a bare one (named by position, "key2")."""
    for key, tenant in ((KEYS[0], "alice"), (KEYS[1], "key2")):
        rid = f"tenant-{tenant}"
        r = httpx.post(strict.api_url + "/completions", json={"prompt": "Hi", "max_tokens": 3},
                       headers={"Authorization": f"Bearer {key}", "X-Request-Id": rid}, timeout=60)
        assert r.status_code == 200
        rec = httpx.get(strict.api_url + f"/requests/{rid}/metrics", headers=AUTH, timeout=10).json()["data"][0]
        assert rec["tenant"] == tenant, rec
        assert rec["kv_fair_share_block_seconds"] is not None
    text = httpx.get(strict.base_url + "/metrics", headers=AUTH, timeout=10).text
    for tenant in ("alice", "key2"):
        assert f'gateway_kv_fair_share_byte_seconds_total{{kv_heads="3",model="SmolLM2-135M-Instruct",tenant="{tenant}"}}' in text
    assert KEYS[0] not in text and KEYS[1] not in text


def test_api_keys_are_not_logged(strict):
    assert KEYS[0] not in strict.log_text() and KEYS[1] not in strict.log_text()


def test_body_limit_is_413(strict):
    big = {"prompt": "x" * 70_000, "max_tokens": 1}
    r = httpx.post(strict.api_url + "/completions", json=big, headers=AUTH)
    assert assert_openai_error(r, 413)["code"] == "request_too_large"

    def chunks():  # no content-length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}'
    r = httpx.post(strict.api_url + "/completions", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert_openai_error(r, 413)


def test_overload_sheds_with_429_and_admitted_requests_complete(strict):
    body = {"prompt": "Count:", "max_tokens": 200, "ignore_eos": True, "stream": True}
    url = strict.api_url + "/completions"
    with cf.ThreadPoolExecutor(3) as pool, httpx.Client(timeout=300) as c:
        futures = start_streams(strict, pool, c, body, 3)
        shed = [httpx.post(url, json={"prompt": "x", "max_tokens": 1}, headers=AUTH) for _ in range(5)]
        assert not any(f.done() for f in futures), "a stream ended before the overload was tested"
        results = [f.result() for f in futures]
    for r in shed:
        err = assert_openai_error(r, 429)
        assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    for lines in results:
        assert lines[-1] == "data: [DONE]"
        finals = [json.loads(l[6:]) for l in lines if l.startswith("data: {")]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
    # capacity is back once they are done
    assert httpx.post(url, json={"prompt": "x", "max_tokens": 1}, headers=AUTH, timeout=30).status_code == 200


def test_sigterm_drains_in_flight_then_exits_0(strict):
    """Runs last in this module: the strict gateway is gone afterwards."""
    url = strict.api_url + "/completions"
    body = {"prompt": "Count:", "max_tokens": 150, "ignore_eos": True, "stream": True}
    with cf.ThreadPoolExecutor(1) as pool, httpx.Client(timeout=300) as c:
        [fut] = start_streams(strict, pool, c, body, 1)
        strict.process.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(strict.base_url + "/health/ready").status_code == 503, 10, "readiness 503")
        assert httpx.get(strict.base_url + "/health/live").status_code == 200
        r = httpx.post(url, json={"prompt": "x", "max_tokens": 1}, headers=AUTH)
        assert assert_openai_error(r, 503)["code"] == "draining"
        lines = fut.result()
    assert lines[-1] == "data: [DONE]"
    finals = [json.loads(l[6:]) for l in lines if l.startswith("data: {")]
    assert sum(len(c.get("text", "")) > 0 for f in finals for c in f["choices"]) >= 100
    assert strict.process.wait(60) == 0


# ------------------------------------------------------------------ engine death
def test_dead_engine_turns_health_503_and_requests_fail_fast(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("doomed"), name="doomed")
    try:
        children = psutil.Process(gw.process.pid).children(recursive=True)
        assert children, "engine core runs in a child process"
        for ch in children:
            ch.kill()
        wait_for(lambda: httpx.get(gw.base_url + "/health").status_code == 503, 30, "health 503")
        assert httpx.get(gw.base_url + "/health/ready").status_code == 503
        assert httpx.get(gw.base_url + "/health/live").status_code == 503  # restart me
        # fails fast instead of hanging: a request still open after 10 s raises ReadTimeout here
        r = httpx.post(gw.api_url + "/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert assert_openai_error(r, 503)["code"] == "engine_dead"
    finally:
        stop_gateway(gw)
