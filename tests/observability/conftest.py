"""A real Prometheus scraping the session's real gateway every second with our rule files,
and one burst of mixed traffic that every live check then reads."""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
import pytest

from tests.observability.helpers import PrometheusServer, start_prometheus, wait_until
from tests.observability.traffic import TrafficResult, send_mixed_traffic


@pytest.fixture(scope="session")
def prometheus(gateway, tmp_path_factory) -> PrometheusServer:
    target = urlparse(gateway.base_url).netloc
    server = start_prometheus(tmp_path_factory.mktemp("prometheus"), target, scrape_interval=1.0)
    yield server
    server.stop()


@dataclass
class Observed:
    prometheus: PrometheusServer
    traffic: TrafficResult
    at: float  # unix time to evaluate instant queries at: the traffic is inside every window
    model: str
    instance: str  # the gateway's address as Prometheus labels it


def _gateway_total(gateway, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(gateway.base_url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


@pytest.fixture(scope="session")
def observed(gateway, prometheus) -> Observed:
    """Send the traffic once, then wait until Prometheus has scraped its final counters
    and evaluated the rules on them."""
    instance = urlparse(gateway.base_url).netloc
    wait_until(lambda: prometheus.query(f'up{{instance="{instance}"}}')["result"], 30, "the first scrape")
    traffic = send_mixed_traffic(gateway.api_url, gateway.model, rounds=2)

    def idle() -> bool:
        return _gateway_total(gateway, "gateway_requests_running") == 0 and \
            _gateway_total(gateway, "gateway_requests_waiting") == 0
    wait_until(idle, 30, "the engine to become idle")
    finished = _gateway_total(gateway, "gateway_requests_total")
    http = _gateway_total(gateway, "gateway_http_requests_total")

    def scraped() -> bool:
        r = prometheus.query("sum(gateway_requests_total)")["result"]
        h = prometheus.query('sum(gateway_http_requests_total{route=~"/v1/.*"})')["result"]
        return bool(r and h) and float(r[0]["value"][1]) >= finished and float(h[0]["value"][1]) > 0 and http > 0
    wait_until(scraped, 30, "Prometheus to scrape the final counters")
    time.sleep(3 * prometheus.scrape_interval)  # the rules evaluate on that scrape too
    return Observed(prometheus, traffic, time.time(), gateway.model, instance)
