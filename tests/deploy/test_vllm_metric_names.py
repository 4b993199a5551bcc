"""vLLM's `vllm:` metric names survive the scrape.

Asked for OpenMetrics without `escaping=allow-utf-8` (Prometheus 2.x), prometheus_client
escapes the colon: `vllm:num_requests_running` is served as `vllm_num_requests_running`.
The compose Prometheus config and the gateway's ServiceMonitor rename it back. The live
test runs the real Prometheus binary with those rules against an exporter of
prometheus_client's own exposition; the static one keeps dashboards and rules off the
escaped names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge

from conftest import DEPLOY, K8S, REPO
from live_prometheus import Exporter, Prometheus, start_prometheus
from loadtest.local.servers import free_port
from tests.observability.helpers import iter_panels

COMPOSE = REPO / "docker-compose.yml"
NATIVE = "vllm:num_requests_running"
ESCAPED = "vllm_num_requests_running"
#: vllm-router's own metrics: natively `vllm_router_*`, scraped without the rename
ROUTER_PREFIX = "vllm_router_"


def compose_prometheus() -> tuple[Path, set[str]]:
    """The Prometheus config file the compose stack mounts at its --config.file, and the
    compose services built from this repository (the gateway) that it scrapes."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    (prom,) = [s for s in services.values() if str(s.get("image", "")).startswith("prom/prometheus")]
    (flag,) = [a for a in prom["command"] if a.startswith("--config.file=")]
    (mount,) = [v for v in prom["volumes"] if v.split(":")[1] == flag.partition("=")[2]]
    return (REPO / mount.split(":")[0]).resolve(), {n for n, s in services.items() if "build" in s}


def _operator_to_prometheus(rule: dict) -> dict:
    """A Prometheus Operator RelabelConfig as the Operator writes it into prometheus.yml."""
    return {re.sub(r"([A-Z])", r"_\1", k).lower(): v for k, v in rule.items()}


def local_config(exporter: str, itself: str) -> tuple[dict, list[str]]:
    """The compose config with its gateway targets pointed at `exporter` (other targets at
    the test Prometheus `itself`), plus a job with the ServiceMonitor's relabelings and a
    control job without any. Returns the config and the jobs that must rename."""
    path, gateways = compose_prometheus()
    cfg = yaml.safe_load(path.read_text())
    cfg["rule_files"] = [str(path.parent / f) for f in cfg.get("rule_files", [])]  # relative to the file
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s")  # the rules under test are per job
    renaming = []
    for job in cfg["scrape_configs"]:
        for sc in job["static_configs"]:
            ours = {t.rsplit(":", 1)[0] for t in sc["targets"]} <= gateways
            sc["targets"] = [exporter if ours else itself]
            renaming += [job["job_name"]] if ours else []
    assert renaming, f"{path.name} scrapes none of the compose services {gateways}"
    (ep,) = yaml.safe_load((K8S / "base" / "servicemonitor.yaml").read_text())["spec"]["endpoints"]
    cfg["scrape_configs"] += [
        {"job_name": "servicemonitor", "metrics_path": ep["path"], "static_configs": [{"targets": [exporter]}],
         "metric_relabel_configs": [_operator_to_prometheus(r) for r in ep.get("metricRelabelings", [])]},
        {"job_name": "control", "static_configs": [{"targets": [exporter]}]},
    ]
    return cfg, renaming + ["servicemonitor"]


def _wait_until(predicate, timeout: float, what: str, prom: Prometheus) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{prom.log_tail()}")
        time.sleep(0.5)


@pytest.mark.prometheus
def test_vllm_names_reach_prometheus_under_their_native_names(tmp_path):
    registry = CollectorRegistry()
    Gauge(NATIVE, "Requests in the running batch.", ["model_name"], registry=registry).labels("m").set(3)
    exporter = Exporter(registry)
    port = free_port()
    cfg, renaming = local_config(exporter.address, f"127.0.0.1:{port}")
    prom = start_prometheus(cfg, tmp_path, port)
    try:
        jobs = [*renaming, "control"]
        _wait_until(lambda: all(prom.query(f'up{{job="{j}"}} == 1') for j in jobs), 60, f"scrapes of {jobs}", prom)
        assert exporter.accepts and all("application/openmetrics-text" in a for a in exporter.accepts)
        for job in renaming:
            got = prom.query(f'{NATIVE}{{job="{job}"}}')
            assert [(s["metric"]["model_name"], s["value"][1]) for s in got] == [("m", "3")], job
            assert not prom.query(f'{{__name__=~"vllm_.*", job="{job}"}}'), job
        # control: the same exposition without a rule is stored escaped, so the rule did it
        assert prom.query(f'{ESCAPED}{{job="control"}}')
        assert not prom.query(f'{ESCAPED}{{job!="control"}}')
    finally:
        prom.stop()
        exporter.close()


def test_compose_mounts_that_prometheus_config():
    """`docker-compose config` still accepts the stack, and its Prometheus reads the file
    the live test loads."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; `make system-deps`)")
    env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "test-password"}
    res = subprocess.run([exe, "--project-directory", str(REPO), "-f", str(COMPOSE), "config"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    prom = yaml.safe_load(res.stdout)["services"]["prometheus"]
    config_file = next(a for a in prom["command"] if a.startswith("--config.file=")).partition("=")[2]
    mounts = {(v["source"], v["target"]) if isinstance(v, dict) else tuple(v.split(":")[:2])
              for v in prom["volumes"]}
    path, _ = compose_prometheus()
    assert (str(path), config_file) in mounts


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every rule and dashboard panel under deploy/."""
    out = []
    for f in sorted((DEPLOY / "prometheus").rglob("*.yml")):
        for group in (yaml.safe_load(f.read_text()) or {}).get("groups", []):
            out += [(f"{f.name}:{r.get('record') or r.get('alert')}", r["expr"]) for r in group["rules"]]
    for f in sorted((DEPLOY / "grafana").rglob("*.json")):
        out += [(f"{f.name}:{p.get('title')}", t["expr"]) for p in iter_panels(json.loads(f.read_text()))
                for t in p.get("targets", [])]
    return out


def test_dashboards_and_rules_read_vllm_metrics_by_their_native_names():
    queries = _queries()
    names = {(where, n) for where, q in queries
             for n in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", re.sub(r'"(?:[^"\\]|\\.)*"', '""', q))}
    escaped = sorted(f"{w}: {n}" for w, n in names if n.startswith("vllm_") and not n.startswith(ROUTER_PREFIX))
    assert not escaped, "query the renamed `vllm:` names:\n" + "\n".join(escaped)
    assert any(n.startswith("vllm:") for _, n in names), "the scan found no vLLM metric at all"
