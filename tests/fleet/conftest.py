"""The fleet as `make fleet` runs it (python -m loadtest fleet up), started once per session:
2 gateway replicas, vllm-router, Prometheus, all on free loopback ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from loadtest.studies.fleet import FleetError, prometheus_binary, router_binary
from tests.observability import helpers

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
START_TIMEOUT = float(os.environ.get("GATEWAY_TEST_START_TIMEOUT", "600")) * 1.5
# What `make fleet` runs. Note: vllm-router 0.1.17's cache_aware gets no token ids from the
# gateway (test_cache_aware_gets_token_ids_from_the_workers) and then picks by load, so
# concurrent traffic still reaches both replicas.
POLICY = "cache_aware"


@dataclass
class FleetUnderTest:
    process: subprocess.Popen
    workdir: Path
    output: str
    router: str
    router_metrics: str
    replicas: list[str]
    prometheus: str
    tree: list[psutil.Process] = field(default_factory=list)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def start_fleet_cli(workdir: Path, *extra: str) -> subprocess.Popen:
    """`python -m loadtest fleet up` on free ports, output to workdir/fleet.out."""
    out = open(workdir / "fleet.out", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "loadtest", "fleet", "up", "--base-port", "0", "--router-port", "0",
         "--router-metrics-port", "0", "--prometheus-port", "0", "--scrape-interval", "1",
         "--workdir", str(workdir), *extra],
        cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        # eager replicas: the suite starts engines without compiling (serving defaults to compiled)
        env={**os.environ, "HF_HUB_OFFLINE": "1", "GATEWAY_ENFORCE_EAGER": "true"})


def _url(text: str, label: str) -> str:
    m = re.search(rf"^\s*{label}\s+(http://127\.0\.0\.1:\d+)", text, re.M)
    assert m, f"no {label} URL in:\n{text}"
    return m.group(1)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory) -> FleetUnderTest:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail("default model missing: run `make model` (make test does)")
    try:
        router_binary(), prometheus_binary()
    except FleetError as e:
        pytest.fail(str(e))
    workdir = tmp_path_factory.mktemp("fleet")
    proc = start_fleet_cli(workdir, "--policy", POLICY)
    deadline = time.monotonic() + START_TIMEOUT
    text = ""
    while time.monotonic() < deadline:
        text = (workdir / "fleet.out").read_text()
        if "Ctrl-C stops everything" in text or proc.poll() is not None:
            break
        time.sleep(1)
    if "Ctrl-C stops everything" not in text:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
        pytest.fail(f"fleet did not come up:\n{text}")
    f = FleetUnderTest(proc, workdir, text, _url(text, r"router \(OpenAI API\)").removesuffix("/v1"),
                       _url(text, "router metrics"), re.findall(r"replica \d+\s+(http://127\.0\.0\.1:\d+)", text),
                       _url(text, "Prometheus"))
    f.tree = f.descendants()
    yield f
    if proc.poll() is None:  # the shutdown test normally stopped it already
        proc.send_signal(signal.SIGINT)
        proc.wait(180)


def prom_query(fleet: FleetUnderTest, expr: str) -> list[dict]:
    body = httpx.get(fleet.prometheus + "/api/v1/query", params={"query": expr}, timeout=30).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5) -> None:
    helpers.wait_until(predicate, timeout, what, interval)
