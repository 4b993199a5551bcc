"""Offline checks of the Prometheus configuration, the rules and the compose files:
promtool (from Debian's prometheus package) and docker-compose 1.29 validate them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.observability.helpers import (
    GRAFANA_DIR, JOB, PROMETHEUS_DIR, REPO, RULE_FILES, load_rule_groups, rules,
)

RUNBOOK_DOCS = (REPO / "docs" / "observability.md", REPO / "deploy" / "README.md")
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed: run `make system-deps` (Debian package prometheus; `make test` installs it)")
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=REPO)


# ---------------------------------------------------------------- Prometheus
def test_promtool_check_config():
    res = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(RULE_FILES)} rule files found" in res.stdout + res.stderr


def test_promtool_check_rules():
    res = promtool("check", "rules", *map(str, RULE_FILES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_rule_unit_tests():
    """Each alert fires on a series that breaks its threshold (and not before its `for:`)."""
    res = promtool("test", "rules", str(PROMETHEUS_DIR / "tests" / "rules_test.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "tests" / "rules_test.yml").read_text()))
    assert tested == {r["alert"] for r in rules("alert")}, "every alert has a unit test"


def test_compose_prometheus_scrapes_the_gateway_service():
    cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    assert job["static_configs"][0]["targets"] == ["gateway:8000"]
    assert cfg["rule_files"] == ["rules/*.yml"]


def test_recording_rules_follow_the_naming_convention():
    for r in rules("record"):
        level, metric, op = r["record"].split(":")
        assert level and metric.startswith("gateway_") and op, r["record"]


def test_every_alert_has_summary_runbook_severity_and_its_runbook_line_in_the_docs():
    names = set()
    for r in rules("alert"):
        names.add(r["alert"])
        ann = r["annotations"]
        assert ann.get("summary") and ann.get("runbook"), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r.get("for"), f"{r['alert']}: alerts wait before firing"
        # one line per alert in each runbook table: | `Alert` | severity | runbook |
        for doc in RUNBOOK_DOCS:
            line = [ln for ln in doc.read_text().splitlines() if ln.startswith(f"| `{r['alert']}` |")]
            assert len(line) == 1, f"{doc.name} needs one runbook line for {r['alert']}"
            assert ann["runbook"].replace("|", "\\|") in line[0], f"runbook of {r['alert']} differs in {doc.name}"
    assert len(names) >= 5


def test_alerts_cover_what_an_operator_needs():
    exprs = " ".join(r["expr"] for r in rules("alert"))
    for needle in ("up{", "gateway_kv_cache_usage_ratio", "gateway_preemptions_total",
                   "gateway_request_queue_seconds", "gateway_http_5xx"):
        assert needle in exprs, needle
    groups = {g["name"] for g in load_rule_groups()}
    assert groups == {"kv-gateway-latency", "kv-gateway-throughput-and-kv", "kv-gateway-alerts"}


def test_yaml_files_pass_yamllint_without_warnings():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(REPO / ".yamllint"))
    files = [COMPOSE, COMPOSE_GPU, *sorted(PROMETHEUS_DIR.rglob("*.yml")),
             *sorted((GRAFANA_DIR / "provisioning").rglob("*.yaml"))]
    problems = [f"{f.relative_to(REPO)}:{p.line}: {p.level} {p.desc}"
                for f in files for p in linter.run(f.read_text(), conf, str(f))]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- docker-compose
def compose_config(*files: Path, password: str | None = "test-password") -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; `make system-deps` installs it)")
    env = {k: v for k, v in os.environ.items() if k not in ("GRAFANA_ADMIN_PASSWORD", "HF_TOKEN")}
    if password is not None:
        env["GRAFANA_ADMIN_PASSWORD"] = password
    args = [exe, "--project-directory", str(REPO)]
    for f in files:
        args += ["-f", str(f)]
    return subprocess.run(args + ["config"], capture_output=True, text=True, cwd=REPO, env=env)


def rendered(*files: Path) -> dict:
    res = compose_config(*files)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def test_compose_config_cpu():
    cfg = rendered(COMPOSE)
    gw, prom, graf = (cfg["services"][s] for s in ("gateway", "prometheus", "grafana"))
    assert gw["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu" and Path(gw["build"]["context"]) == REPO
    assert gw["environment"]["GATEWAY_HOST"] == "0.0.0.0" and gw["environment"]["GATEWAY_PORT"] == "8000"
    profile = gw["environment"]["GATEWAY_PROFILE"]
    assert (REPO / profile.removeprefix("/app/")).is_file(), profile
    assert any(v.endswith(":/models:rw") or v.endswith(":/models") for v in _volumes(gw))
    hc = gw["healthcheck"]
    assert "/health" in " ".join(hc["test"]) and _seconds(hc["start_period"]) >= 120
    assert graf["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "test-password"
    for svc in (prom, graf):
        image, _, tag = svc["image"].partition(":")
        assert tag and tag != "latest" and re.match(r"v?\d+\.\d+\.\d+$", tag), svc["image"]
    # every bind mount exists in the repository
    for svc in (prom, graf):
        for v in _volumes(svc):
            src = v.split(":")[0]
            if src.startswith("/"):
                assert Path(src).exists(), v
    assert any(v.endswith("/etc/grafana/provisioning:ro") for v in _volumes(graf))
    assert any(v.endswith("/etc/grafana/dashboards:ro") for v in _volumes(graf))
    assert any(v.endswith("/etc/prometheus/rules:ro") for v in _volumes(prom))


def test_compose_config_gpu_override():
    cfg = rendered(COMPOSE, COMPOSE_GPU)
    gw = cfg["services"]["gateway"]
    assert gw["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
    assert gw["environment"]["GATEWAY_DEVICE"] == "cuda"
    profile = gw["environment"]["GATEWAY_PROFILE"]
    prof = yaml.safe_load((REPO / profile.removeprefix("/app/")).read_text())
    assert prof["device"] == "cuda" and gw["environment"]["GATEWAY_MODEL"] == prof["model"]
    (dev,) = gw["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    assert _seconds(gw["healthcheck"]["start_period"]) >= 600
    assert set(cfg["services"]) == {"gateway", "prometheus", "grafana"}


def test_compose_refuses_to_run_without_a_grafana_password():
    res = compose_config(COMPOSE, password=None)
    assert res.returncode != 0 and "set GRAFANA_ADMIN_PASSWORD" in res.stderr, res.stderr


def _volumes(svc: dict) -> list[str]:
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            out.append(v)
        else:
            out.append(f"{v['source']}:{v['target']}" + (":ro" if v.get("read_only") else ""))
    return out


def _seconds(duration: str) -> float:
    total = 0.0
    for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u]
    return total
