"""Offline checks of the fleet's parts: the generated scrape config, the dashboard's
conventions, the fleet rules (promtool), and that stopping a process group leaves no
grandchild behind. No engine, a few seconds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from loadtest.studies import fleet as F
from tests.observability.helpers import DATASOURCE_UID, iter_panels, metric_names

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "fleet" / "kv-gateway-fleet.json"
RULES = REPO / "deploy" / "prometheus" / "fleet" / "fleet-rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "tests" / "fleet_rules_test.yml"


def test_scrape_config_covers_every_replica_and_the_router_on_loopback():
    cfg = F.prometheus_config(["127.0.0.1:8001", "127.0.0.1:8002"], "127.0.0.1:29000", 2.0)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"kv-gateway", "vllm-router"}
    gw = jobs["kv-gateway"]["static_configs"]
    assert [(s["targets"], s["labels"]["replica"]) for s in gw] == [(["127.0.0.1:8001"], "0"), (["127.0.0.1:8002"], "1")]
    assert jobs["vllm-router"]["static_configs"][0]["targets"] == ["127.0.0.1:29000"]
    (relabel,) = jobs["kv-gateway"]["metric_relabel_configs"]
    assert re.fullmatch(relabel["regex"], "vllm_num_requests_waiting") and relabel["replacement"] == "vllm:${1}"
    assert "metric_relabel_configs" not in jobs["vllm-router"]  # vllm_router_* are the router's own names
    assert any(r.endswith("deploy/prometheus/fleet/*.yml") for r in cfg["rule_files"])


def test_promtool_accepts_the_generated_config(tmp_path):
    promtool = shutil.which("promtool") or pytest.fail("promtool missing: run `make system-deps`")
    import yaml
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(F.prometheus_config(["127.0.0.1:8001"], "127.0.0.1:29000", 1.0)))
    res = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_checks_and_unit_tests_the_fleet_rules():
    promtool = shutil.which("promtool") or pytest.fail("promtool missing: run `make system-deps`")
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULES_TEST)]):
        res = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def test_fleet_dashboard_follows_the_dashboard_conventions():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == DASHBOARD.stem and d["id"] is None and d["schemaVersion"] == 39 and "kv-gateway" in d["tags"]
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "model", "instance"]
    assert d["templating"]["list"][0]["current"]["value"] == DATASOURCE_UID
    panels = list(iter_panels(d))
    assert len({p["id"] for p in panels}) == len(panels) and len({p["title"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        assert p["fieldConfig"]["defaults"].get("unit") and p.get("description"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["legendFormat"] and t["datasource"] == p["datasource"]
            windows = re.findall(r"\[([^\]]+)\]", t["expr"])
            assert all(w == "$__rate_interval" for w in windows), (p["title"], windows)
            for name in metric_names(t["expr"]) | set(re.findall(r"vllm_router_\w+", t["expr"])):
                for m in re.finditer(re.escape(name) + r"(\{[^}]*\})?", t["expr"]):
                    sel = m.group(1) or ""
                    if name.startswith("vllm_router_"):
                        assert 'job="vllm-router"' in sel, (p["title"], name)
                    else:  # replica metrics: the dashboard's instance and model filters apply
                        assert 'instance=~"$instance"' in sel, (p["title"], name)
                        assert ('model_name=~"$model"' if name.startswith("vllm:") else 'model=~"$model"') in sel
        gp = p["gridPos"]
        for x in range(gp["x"], gp["x"] + gp["w"]):
            for y in range(gp["y"], gp["y"] + gp["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_fleet_doc_names_every_fleet_panel():
    doc = " ".join((REPO / "docs" / "fleet.md").read_text().split())  # titles may wrap
    for p in iter_panels(json.loads(DASHBOARD.read_text())):
        assert p["title"] in doc, p["title"]


def test_stop_kills_the_whole_process_group(tmp_path):
    """A leader that ignores SIGTERM and has a grandchild: stop() leaves neither behind."""
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); print('up', flush=True); "
              "time.sleep(600)")
    p = F.Proc("stand-in", [sys.executable, "-c", script], tmp_path / "p.log", "http://127.0.0.1:1", "/").start()
    deadline = time.monotonic() + 30
    while "up" not in (tmp_path / "p.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    kids = psutil.Process(p.process.pid).children(recursive=True)
    assert kids
    p.stop(grace=1)
    assert p.process.returncode is not None
    time.sleep(0.5)
    assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]


def test_a_taken_port_fails_fast():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(F.FleetError, match="taken"):
            F.port_or_free(s.getsockname()[1])


# ------------------------------------------------------------------ the failover benchmark's arithmetic
def _sample(t: float, victim_decisions: float, victim_health: float, errors: float = 0.0) -> dict:
    return {"t": t, "decisions": {"http://v": victim_decisions, "http://o": t}, "health": {"http://v": victim_health},
            "counters": {'vllm_router_request_errors_total{}': errors}}


def test_failover_router_timeline_reads_when_the_router_changed_its_mind():
    from loadtest.studies.fleet_failover import router_timeline

    events = {"kill": 10.0, "restart": 20.0, "ready_again": 30.0}
    samples = [_sample(8, 5, 1), _sample(10.5, 6, 1), _sample(11, 7, 1), _sample(12, 7, 0, 2),
               _sample(25, 7, 0, 2), _sample(30.5, 7, 0, 2), _sample(31, 7, 1, 2), _sample(32, 9, 1, 3)]
    t = router_timeline(samples, "http://v", events)
    assert t["last_routed_to_victim_s_after_kill"] == 1.0  # its decisions last grew at t=11
    assert t["marked_unhealthy_s_after_kill"] == 2.0
    assert t["marked_healthy_s_after_ready"] == 1.0
    assert t["routed_to_victim_again_s_after_ready"] == 2.0
    assert t["router_error_counters_delta"] == {'vllm_router_request_errors_total{}': 3.0}


def test_failover_summary_counts_in_flight_failures_and_how_fast_they_failed():
    from loadtest.studies.fleet_failover import summarize

    def req(start, end, ok, stream=False, chunks=0, error=None):
        return {"start": start, "end": end, "ok": ok, "stream": stream, "chunks": chunks, "error": error}
    results = [req(0, 5, True), req(9, 10.4, False, True, 12, "stream ended without [DONE] after 12 chunks"),
               req(9.5, 11, True), req(10.5, 10.6, False, error="HTTP 503: x"), req(12, 13, True)]
    events = {"kill": 10.0, "restart": 20.0, "ready_again": 30.0, "load_start": 0.1, "load_end": 0.2}
    s = summarize(results, events, {}, 4, {})
    assert (s["requests"], s["ok"], s["failed"]) == (5, 3, 2)
    assert (s["in_flight_at_kill"], s["in_flight_at_kill_failed"]) == (2, 1)
    assert s["in_flight_failed_streams_mid_generation"] == 1
    assert s["in_flight_failure_seconds_after_kill"] == [0.4]
    assert s["failed_started_after_kill"] == 1
    assert s["errors"] == {"stream ended without [DONE] after 12 chunks": 1, "HTTP 503: x": 1}


def test_replicas_compute_on_different_cores(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(F.os, "sched_getaffinity", lambda pid: {0, 1})
    binds = [F.gateway_replica(i, 8001 + i, Path("/x"), Path("/m"), 1.0).env["VLLM_CPU_OMP_THREADS_BIND"]
             for i in range(3)]
    assert binds == ["0", "1", "0"]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the user's choice wins
    assert "VLLM_CPU_OMP_THREADS_BIND" not in F.gateway_replica(0, 8001, Path("/x"), Path("/m"), 1.0).env
