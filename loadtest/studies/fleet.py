"""A fleet on one machine: N gateway replicas behind vLLM's router, scraped by Prometheus.

    python -m loadtest fleet up                       # make fleet: 2 replicas, cache_aware
    python -m loadtest fleet up --replicas 3 --policy round_robin

Every process listens on 127.0.0.1 only and runs in its own process group. Ctrl-C
(SIGINT) or SIGTERM stops them all: Prometheus, then the router, then each replica
(SIGTERM so it drains, SIGKILL to its whole group after a grace period), so no engine
process is left behind. The replicas also get SIGTERM if this process dies first
(Linux parent-death signal).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loadtest.local.servers import Proc, ProcessFailed

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
MODEL = DEFAULT_MODEL.name  # the served model name the fleet's benchmarks ask for
WORDS = ("apple river stone cloud paper garden window silver forest engine copper lantern harbor meadow "
         "violet thunder marble canyon pepper saddle falcon glacier orchard velvet compass ember willow").split()


def text_of(rng, words: int) -> str:
    """`words` random words: prompts for the fleet benchmarks (a random.Random decides)."""
    return " ".join(rng.choice(WORDS) for _ in range(words))
RULE_DIRS = (REPO / "deploy" / "prometheus" / "rules", REPO / "deploy" / "prometheus" / "fleet")
POLICIES = ("cache_aware", "round_robin", "power_of_two", "consistent_hash", "random", "sticky_least_loaded")
ROUTER_JOB, GATEWAY_JOB = "vllm-router", "kv-gateway"


class FleetError(ProcessFailed):
    """A part of the fleet did not start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_or_free(port: int) -> int:
    """``port`` if it is free on 127.0.0.1 (0 picks one); fails fast when it is taken."""
    if port == 0:
        return free_port()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise FleetError(f"port {port} on 127.0.0.1 is taken: pick another one (or 0 for any free port)") from None
    return port


def router_binary() -> str:
    """The `vllm-router` console script of PyPI vllm-router (the `fleet` extra)."""
    beside = Path(sys.executable).parent / "vllm-router"
    exe = str(beside) if beside.exists() else shutil.which("vllm-router")
    if exe is None:
        raise FleetError("vllm-router is not installed: `make install` (the locks include the fleet extra)")
    return exe


def prometheus_binary() -> str:
    exe = shutil.which("prometheus")
    if exe is None:
        raise FleetError("prometheus is not installed: `make system-deps` (Debian package prometheus)")
    return exe


def cpu_binding(index: int) -> dict[str, str]:
    """vLLM's CPU engine binds itself to the first core by default ("auto": core 0, the next
    one reserved for the API server), so replicas on one machine would all compute on core 0
    and a restarting replica starves beside a busy one. Replica i gets core i mod the CPUs
    this process may use, unless VLLM_CPU_OMP_THREADS_BIND is set (ignored on GPUs)."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": str(cpus[index % len(cpus)])}


def gateway_replica(index: int, port: int, workdir: Path, model: Path, kv_cache_gib: float,
                    extra_env: dict[str, str] | None = None) -> Proc:
    env = {"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), "GATEWAY_MODEL": str(model),
           "GATEWAY_KV_CACHE_GIB": f"{kv_cache_gib:g}", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           # vLLM's render routes (/v1/completions/render, ...): the router's cache_aware policy
           # asks each worker to turn a prompt into token ids through them.
           "GATEWAY_ENABLE_SCALE_OUT": "true",
           **cpu_binding(index),
           **(extra_env or {})}
    return Proc(f"replica-{index}", [sys.executable, "-m", "service", "serve"], workdir / f"replica-{index}.log",
                f"http://127.0.0.1:{port}", "/health/ready", env)


def router(worker_urls: list[str], policy: str, port: int, metrics_port: int, workdir: Path,
           name: str = "router") -> Proc:
    """vllm-router on 127.0.0.1: fast health checks so a dead replica leaves the rotation in seconds."""
    cmd = [router_binary(), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
           "--worker-urls", *worker_urls,
           "--worker-startup-timeout-secs", "120", "--worker-startup-check-interval", "1",
           "--health-check-endpoint", "/health/ready", "--health-check-interval-secs", "2",
           "--health-check-timeout-secs", "2", "--health-failure-threshold", "2", "--health-success-threshold", "1",
           "--cb-failure-threshold", "3", "--cb-timeout-duration-secs", "5",
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port), "--log-level", "warning"]
    return Proc(name, cmd, workdir / f"{name}.log", f"http://127.0.0.1:{port}", "/health")


def prometheus_config(replica_targets: list[str], router_target: str | None, scrape_interval: float) -> dict:
    """Scrape every replica (job kv-gateway, label replica=N) and the router (job vllm-router)."""
    rules = [str(d / "*.yml") for d in RULE_DIRS if d.is_dir()]
    iv = f"{scrape_interval:g}s"
    # Negotiating OpenMetrics, the gateway's prometheus_client writes vLLM's `vllm:x` names as
    # `vllm_x`; store them under vLLM's own names, which dashboards, routers and llm-d use.
    native = {"source_labels": ["__name__"], "regex": "vllm_(.+)", "target_label": "__name__",
              "replacement": "vllm:${1}"}
    jobs = [{"job_name": GATEWAY_JOB, "metric_relabel_configs": [native], "static_configs": [
        {"targets": [t], "labels": {"replica": str(i)}} for i, t in enumerate(replica_targets)]}]
    if router_target:
        jobs.append({"job_name": ROUTER_JOB, "static_configs": [{"targets": [router_target]}]})
    return {"global": {"scrape_interval": iv, "scrape_timeout": iv, "evaluation_interval": iv},
            "rule_files": rules, "scrape_configs": jobs}


def prometheus(replica_targets: list[str], router_target: str | None, port: int, workdir: Path,
               scrape_interval: float = 2.0) -> Proc:
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(replica_targets, router_target, scrape_interval),
                                     sort_keys=False))
    cmd = [prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prometheus-data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    return Proc("prometheus", cmd, workdir / "prometheus.log", f"http://127.0.0.1:{port}", "/-/ready")


@dataclass
class Fleet:
    """Replicas + router (+ Prometheus). Use as a context manager: everything stops on exit."""

    workdir: Path
    replicas: int = 2
    policy: str = "cache_aware"
    kv_cache_gib: float = 1.0
    model: Path = DEFAULT_MODEL
    router_port: int = 0
    router_metrics_port: int = 0
    prometheus_port: int | None = 0  # None: no Prometheus
    replica_ports: list[int] = field(default_factory=list)
    scrape_interval: float = 2.0
    start_timeout: float = 600.0
    gateways: list[Proc] = field(default_factory=list)
    router: Proc | None = None
    prometheus: Proc | None = None

    def start(self) -> "Fleet":
        if not (Path(self.model) / "config.json").is_file():
            raise FleetError(f"model folder {self.model} is missing: run `make model`")
        router_binary()  # fail before the slow part if a binary is missing
        if self.prometheus_port is not None:
            prometheus_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = list(self.replica_ports) or [0] * self.replicas
        ports = [port_or_free(p) for p in ports[: self.replicas]]
        self.router_port, self.router_metrics_port = port_or_free(self.router_port), port_or_free(self.router_metrics_port)
        prom_port = None if self.prometheus_port is None else port_or_free(self.prometheus_port)
        try:
            self.gateways = [gateway_replica(i, p, self.workdir, Path(self.model), self.kv_cache_gib).start()
                             for i, p in enumerate(ports)]
            for g in self.gateways:  # they load in parallel
                g.wait_ready(self.start_timeout)
            self.router = router(self.urls, self.policy, self.router_port, self.router_metrics_port,
                                 self.workdir).start()
            self.router.wait_ready(120)
            if prom_port is not None:
                self.prometheus = prometheus([u.removeprefix("http://") for u in self.urls],
                                             f"127.0.0.1:{self.router_metrics_port}", prom_port, self.workdir,
                                             self.scrape_interval).start()
                self.prometheus.wait_ready(60)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]

    def stop(self) -> None:
        for p in [self.prometheus, self.router, *reversed(self.gateways)]:
            if p is not None:
                p.stop()

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> str:
        r = self.router
        lines = [f"fleet up ({len(self.gateways)} replicas, policy {self.policy}); logs in {self.workdir}",
                 f"  router (OpenAI API)  {r.url}/v1", f"  router metrics       http://127.0.0.1:{self.router_metrics_port}/metrics"]
        lines += [f"  replica {i}            {g.url}/v1   (metrics {g.url}/metrics)" for i, g in enumerate(self.gateways)]
        if self.prometheus:
            lines.append(f"  Prometheus           {self.prometheus.url}")
        lines += ["load test through the router:",
                  f"  .venv/bin/python -m loadtest run --config configs/loadtest/shared-prefix-chat.yaml "
                  f"--base-url {r.url} --model {Path(self.model).name} --no-scrape",
                  "Ctrl-C stops everything."]
        return "\n".join(lines)


def _raise_interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: unwind and stop everything
    raise KeyboardInterrupt


def add_parser(top: argparse._SubParsersAction) -> None:
    ap = top.add_parser("fleet", help=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start the fleet and keep it up until Ctrl-C / SIGTERM")
    up.add_argument("--replicas", type=int, default=2)
    up.add_argument("--policy", choices=POLICIES, default="cache_aware")
    up.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache of each replica (GiB)")
    up.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    up.add_argument("--base-port", type=int, default=8001, help="replica i listens on base-port + i (0: any free)")
    up.add_argument("--router-port", type=int, default=8000)
    up.add_argument("--router-metrics-port", type=int, default=29000)
    up.add_argument("--prometheus-port", type=int, default=9090)
    up.add_argument("--no-prometheus", action="store_true")
    up.add_argument("--scrape-interval", type=float, default=2.0)
    up.add_argument("--workdir", type=Path, help="logs and Prometheus data (default: a new temporary folder)")
    ap.set_defaults(handler=main)


def main(a: argparse.Namespace, argv: list[str] | None = None) -> int:
    # Explicit handlers: a process started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="kv-fleet-"))
    ports = [a.base_port + i if a.base_port else 0 for i in range(a.replicas)]
    fleet = Fleet(workdir, a.replicas, a.policy, a.kv_cache_gib, a.model, a.router_port, a.router_metrics_port,
                  None if a.no_prometheus else a.prometheus_port, ports, a.scrape_interval)
    try:
        print(f"starting {a.replicas} replicas (engine start ~30-100 s each) ...", flush=True)
        fleet.start()
        print(fleet.summary(), flush=True)
        while all(p.alive for p in [*fleet.gateways, fleet.router, fleet.prometheus] if p is not None):
            time.sleep(1)
        dead = [p.name for p in [*fleet.gateways, fleet.router, fleet.prometheus] if p is not None and not p.alive]
        print(f"stopping: {', '.join(dead)} exited", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("stopping the fleet ...", flush=True)
        return 0
    except ProcessFailed as e:  # FleetError, or a process that did not start
        print(f"fleet: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fleet.stop()
        print("fleet stopped", flush=True)

