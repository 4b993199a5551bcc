"""The fleet end to end: traffic through the real vllm-router reaches both real gateway
replicas, a real Prometheus has every replica's per-request KV series and the router's
decisions, every fleet dashboard panel returns data, and Ctrl-C leaves no process behind.
The last test stops the session's fleet: keep it last in this file."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fleet.conftest import REPO, prom_query, wait_until
from tests.observability.helpers import finite_values, iter_panels, regex_value

pytestmark = [pytest.mark.engine, pytest.mark.prometheus, pytest.mark.fleet]

MODEL = "SmolLM2-135M-Instruct"
DASHBOARD = REPO / "deploy" / "grafana" / "fleet" / "kv-gateway-fleet.json"


def _total(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _complete(base: str, i: int) -> int:
    r = httpx.post(base + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": f"Request {i}: name a colour and a number {i * 7919}.", "max_tokens": 4})
    return r.status_code


def test_fleet_prints_its_urls_and_the_load_test_command(fleet):
    assert len(fleet.replicas) == 2 and fleet.router not in fleet.replicas
    assert "python -m loadtest run" in fleet.output and f"--base-url {fleet.router}" in fleet.output
    for url in [fleet.router, fleet.prometheus, *fleet.replicas]:
        assert url.startswith("http://127.0.0.1:")


def test_traffic_through_the_router_reaches_both_replicas(fleet):
    before = [_total(u, "gateway_requests_total") for u in fleet.replicas]
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda i: _complete(fleet.router, i), range(8)))
    assert codes == [200] * 8
    served = [_total(u, "gateway_requests_total") - b for u, b in zip(fleet.replicas, before)]
    assert sum(served) == 8 and all(s > 0 for s in served), served


def test_prometheus_has_each_replicas_per_request_kv_series(fleet):
    want = {u.removeprefix("http://") for u in fleet.replicas}

    def both() -> bool:
        r = prom_query(fleet, 'sum by (instance) (gateway_request_kv_used_bytes_count{job="kv-gateway"}) > 0')
        return {s["metric"]["instance"] for s in r} == want
    wait_until(both, 30, "both replicas' gateway_request_kv_used_bytes_count in Prometheus")


def test_prometheus_scrapes_the_router_and_its_decisions(fleet):
    def decided() -> bool:
        r = prom_query(fleet, 'sum by (worker) (vllm_router_policy_decisions_total{job="vllm-router"}) > 0')
        return {s["metric"]["worker"] for s in r} == set(fleet.replicas)
    wait_until(decided, 30, "the router's decisions for both workers")


def test_vllm_native_names_reach_prometheus(fleet):
    """The generated scrape config keeps vLLM's `vllm:` names (routers and llm-d use them)."""
    r = prom_query(fleet, 'count by (instance) (vllm:prefix_cache_queries_total{job="kv-gateway"})')
    assert len(r) == 2
    assert not prom_query(fleet, '{__name__=~"vllm_prefix_cache.*", job="kv-gateway"}')


_last_traffic = 0.0


def _queries() -> list[tuple[str, str, str]]:
    d = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["refId"], t["expr"]) for p in iter_panels(d) for t in p["targets"]]


@pytest.mark.parametrize("title, ref, expr", _queries(), ids=[f"{t}:{r}" for t, r, _ in _queries()])
def test_fleet_dashboard_panel_returns_data(fleet, title, ref, expr):
    global _last_traffic
    if time.monotonic() - _last_traffic > 10:  # traffic inside the 30 s window of $__rate_interval
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda i: _complete(fleet.router, 100 + i), range(8))) == [200] * 8
        _last_traffic = time.monotonic()
    q = (expr.replace("$__rate_interval", "30s").replace("$model", regex_value([MODEL]))
         .replace("$instance", regex_value([u.removeprefix("http://") for u in fleet.replicas])))

    def has_data() -> bool:
        body = httpx.get(fleet.prometheus + "/api/v1/query", params={"query": q}, timeout=30).json()
        assert body["status"] == "success", (title, body)
        return bool(finite_values(body["data"]))
    wait_until(has_data, 20, f"data for panel {title!r} {ref}")


def test_fleet_rules_loaded_and_healthy(fleet):
    groups = httpx.get(fleet.prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    names = {g["name"] for g in groups}
    assert {"kv-gateway-fleet", "kv-gateway-fleet-alerts", "kv-gateway-latency"} <= names
    for g in groups:
        for r in g["rules"]:
            assert r["health"] in ("ok", "unknown"), (r["name"], r.get("lastError"))
    firing = [a for a in httpx.get(fleet.prometheus + "/api/v1/alerts").json()["data"]["alerts"]
              if a["state"] == "firing"]
    assert not firing, firing


def test_cache_aware_gets_token_ids_from_the_workers(fleet):
    """vllm-router 0.1.17's cache_aware renders prompts to tokens through each worker's
    /v1/completions/render (vLLM's --enable-scale-out routes, which the replicas turn on):
    without them every decision is outcome=missing_tokens and the policy falls back to load."""
    text = httpx.get(fleet.router_metrics, timeout=10).text
    outcomes = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "vllm_router_prefix_routing_decisions_total"}
    assert outcomes, "no cache_aware decision recorded"
    assert not outcomes.get("missing_tokens"), outcomes


def test_ctrl_c_stops_every_process_of_the_fleet(fleet):
    """SIGINT (Ctrl-C) to `python -m loadtest fleet up`: exit 0, nothing left, ports closed."""
    tree = fleet.tree + [p for p in fleet.descendants() if p.pid not in {t.pid for t in fleet.tree}]
    assert len(tree) >= 5, tree  # 2 gateways (+ their engine cores), router, Prometheus
    fleet.process.send_signal(signal.SIGINT)
    assert fleet.process.wait(180) == 0
    alive = [p for p in tree if p.is_running() and p.status() != "zombie"]
    assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
    for url in [fleet.router, fleet.prometheus, *fleet.replicas]:
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/", timeout=2)
    assert "fleet stopped" in (Path(fleet.workdir) / "fleet.out").read_text()
