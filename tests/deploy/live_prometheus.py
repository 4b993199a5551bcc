"""A real Prometheus on a loopback port, and a tiny exporter for it to scrape.

The exporter is stdlib http.server in a thread serving prometheus_client's exposition of
one registry, with the Accept header negotiated as the gateway's /metrics does
(OpenMetrics when the scraper asks for it)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from loadtest.local.servers import Proc, ProcessFailed
from loadtest.studies.fleet import FleetError, prometheus_binary


class Exporter:
    """Serves ``registry`` on 127.0.0.1 until ``close``; remembers each scrape's Accept header."""

    def __init__(self, registry: CollectorRegistry):
        accepts = self.accepts = []

        class Handler(MetricsHandler.factory(registry)):
            def do_GET(self):
                accepts.append(self.headers.get("Accept", ""))
                super().do_GET()

            def log_message(self, *args):  # no request log on stderr
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@dataclass
class Prometheus:
    proc: Proc
    _client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))

    @property
    def url(self) -> str:
        return self.proc.url

    def query(self, expr: str) -> list[dict]:
        """The instant vector of ``expr`` (fails on a query error)."""
        body = self._client.get(self.url + "/api/v1/query", params={"query": expr}).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def log_tail(self) -> str:
        return self.proc.tail(40)

    def stop(self) -> None:
        self._client.close()
        self.proc.stop(20)


def start_prometheus(config: dict, workdir: Path, port: int, timeout: float = 60) -> Prometheus:
    """Prometheus listening on 127.0.0.1:``port`` with ``config`` (a parsed prometheus.yml),
    run like the fleet runs it (loadtest.local.servers.Proc: own process group, log file)."""
    try:
        exe = prometheus_binary()
    except FleetError as e:
        pytest.fail(str(e))
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [exe, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    proc = Proc("prometheus", cmd, workdir / "prometheus.log", f"http://127.0.0.1:{port}", "/-/ready").start()
    try:
        proc.wait_ready(timeout)
    except ProcessFailed as e:
        proc.stop(5)
        pytest.fail(str(e))
    return Prometheus(proc)
