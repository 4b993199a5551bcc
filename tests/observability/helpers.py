"""What the observability checks share: the dashboard and rule files, how Grafana would
expand a panel's query, the metric names a query uses, and a real Prometheus server."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from loadtest.local.servers import Proc, ProcessFailed, free_port

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARD_DIR.glob("*.json"))
DATASOURCE_UID = "prometheus"
#: the scrape job the alert rules expect (deploy/prometheus/prometheus.yml uses it too)
JOB = "kv-gateway"

# How the live checks expand Grafana's variables. The test Prometheus scrapes every 1 s,
# so a 30 s rate window holds ~30 samples and covers the whole traffic burst.
RATE_INTERVAL = "30s"
INTERVAL = "5s"
RANGE = "5m"


# ---------------------------------------------------------------- files
def wait_until(predicate, timeout: float, what: str, interval: float = 0.25) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, including those collapsed inside rows; rows themselves are skipped."""
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # file stem
    panel: str  # title
    panel_type: str
    ref: str
    expr: str
    instant: bool

    @property
    def id(self) -> str:
        return f"{self.dashboard}:{self.panel}:{self.ref}"


def panel_queries() -> list[PanelQuery]:
    out = []
    for path in DASHBOARD_FILES:
        d = load_dashboard(path)
        for p in iter_panels(d):
            for t in p.get("targets", []):
                out.append(PanelQuery(path.stem, p["title"], p["type"], t["refId"], t["expr"],
                                      bool(t.get("instant")) and not t.get("range")))
    return out


def load_rule_groups() -> list[dict]:
    groups = []
    for f in RULE_FILES:
        groups.extend(yaml.safe_load(f.read_text())["groups"])
    return groups


def rules(kind: str) -> list[dict]:
    """kind: "record" or "alert"."""
    return [r for g in load_rule_groups() for r in g["rules"] if kind in r]


def recording_rule_names() -> set[str]:
    return {r["record"] for r in rules("record")}


# ---------------------------------------------------------------- PromQL text
def regex_value(values: list[str]) -> str:
    """What Grafana puts in place of a multi-value variable used in `=~"$var"`: the values
    regex-escaped (backslashes doubled for the PromQL string), joined as an alternation."""
    esc = [re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\\\1", v) for v in values]
    return esc[0] if len(esc) == 1 else "(" + "|".join(esc) + ")"


def expand(expr: str, *, model: str, instance: str, datasource: str = DATASOURCE_UID) -> str:
    """A panel query as Grafana sends it, with one model and one instance selected."""
    repl = {
        "__rate_interval": RATE_INTERVAL, "__interval": INTERVAL, "__range": RANGE,
        "model": regex_value([model]), "instance": regex_value([instance]), "datasource": datasource,
    }
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in repl:
            raise KeyError(f"unknown variable ${name} in {expr!r}")
        return repl[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric (and recording-rule) names a query reads: identifiers that contain
    `gateway_` or start with `vllm:`, outside string literals."""
    code = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return {t for t in _IDENT.findall(code) if "gateway_" in t or t.startswith("vllm:")}


# ---------------------------------------------------------------- Prometheus
def finite_values(result: dict) -> list[float]:
    """Finite sample values of a query result (vector, matrix or scalar)."""
    kind, data = result["resultType"], result["result"]
    if kind == "scalar":
        raw = [data[1]]
    elif kind == "vector":
        raw = [s["value"][1] for s in data]
    elif kind == "matrix":
        raw = [v[1] for s in data for v in s["values"]]
    else:
        raw = []
    vals = [float(v) for v in raw]
    return [v for v in vals if math.isfinite(v)]


@dataclass
class PrometheusServer:
    """A real Prometheus (Debian's binary) on a loopback port."""

    url: str
    process: subprocess.Popen
    workdir: Path
    log_path: Path
    config_path: Path
    scrape_interval: float
    proc: Proc | None = None  # the process owner (loadtest.local.servers)
    _client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    def api(self, path: str, **params: Any) -> dict:
        r = self._client.get(self.url + "/api/v1/" + path, params=params)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {r.status_code} {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> dict:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)

    def query_raw(self, expr: str, at: float | None = None) -> httpx.Response:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._client.get(self.url + "/api/v1/query", params=params)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self._client.close()
        if self.proc is not None:
            self.proc.stop(20)


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("the `prometheus` binary is not installed: run `make system-deps` "
                    "(Debian package prometheus; `make test` installs it)")
    return path


def start_prometheus(workdir: Path, target: str, scrape_interval: float = 1.0,
                     rule_files: list[Path] = RULE_FILES, timeout: float = 60) -> PrometheusServer:
    """Prometheus scraping `target` (host:port) as job kv-gateway, with our rule files."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "global": {"scrape_interval": f"{scrape_interval:g}s", "scrape_timeout": f"{scrape_interval:g}s",
                   "evaluation_interval": f"{scrape_interval:g}s"},
        "rule_files": [str(f) for f in rule_files],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "prometheus.log"
    cmd = [prometheus_binary(), f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage", "--log.level=warn"]
    proc = Proc("prometheus", cmd, log_path, f"http://127.0.0.1:{port}", "/-/ready", append_log=False).start()
    assert proc.process is not None
    server = PrometheusServer(proc.url, proc.process, workdir, log_path, config_path, scrape_interval, proc)
    try:
        proc.wait_ready(timeout)
    except ProcessFailed:
        server.stop()
        pytest.fail(f"prometheus did not become ready in {timeout} s:\n{server.log_text()[-3000:]}")
    return server
