"""The one owner of the server processes the load tester starts on this machine.

``Proc``: a child process in its own process group (so a stop reaches the engine core and
its workers), logging to a file, dying with its parent, ready when a URL answers 200, and
stopped with SIGTERM (it drains) then SIGKILL to the whole group. Every server the load
tester, its studies and the tests start is one: ``Server`` (our gateway or vLLM's own
OpenAI server with the same engine arguments, for side-by-side benchmarks), the fleet's
replicas, router and Prometheus, the KV-heads experiment's gateways and the test suite's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# The engine arguments both servers get (the CPU default profile's values).
ENGINE_DEFAULTS = {"dtype": "float32", "max_model_len": 2048, "block_size": 128, "max_num_seqs": 64,
                   "kv_cache_gib": 1, "enforce_eager": False, "enable_prefix_caching": True, "seed": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[2]


class ProcessExited(RuntimeError):
    """The process under test exited before it became ready."""


class ProcessFailed(RuntimeError):
    """A started process exited or was not ready in time (the message ends with its log's tail)."""


def wait_ready(process: subprocess.Popen, url: str, timeout: float, interval: float = 0.5) -> float | None:
    """Poll ``url`` until it answers 200: seconds it took, or None after ``timeout``.

    Raises ProcessExited as soon as ``process`` has exited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if process.poll() is not None:
            raise ProcessExited(f"exited with status {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    return None


def stop_process(process: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM, then SIGKILL to its process group (started with ``start_new_session``)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Proc:
    """One child process in its own process group, logging to a file (module docstring)."""

    name: str
    cmd: list[str]
    log_path: Path
    url: str  # what it serves (for the printout and readiness)
    ready_path: str
    env: dict[str, str | None] = field(default_factory=dict)  # over os.environ; None removes a variable
    process: subprocess.Popen | None = None
    append_log: bool = True  # False: a fresh log file for this start

    def start(self) -> "Proc":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab" if self.append_log else "wb")
        env = {k: v for k, v in {**os.environ, **self.env}.items() if v is not None}
        self.process = subprocess.Popen(self.cmd, env=env, cwd=REPO, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float) -> float:
        """Seconds until ``url + ready_path`` answered 200; ProcessFailed if it exits first or
        is not ready within ``timeout``."""
        assert self.process is not None, "start() first"
        try:
            took = wait_ready(self.process, self.url + self.ready_path, timeout)
        except ProcessExited:
            raise ProcessFailed(f"{self.name} exited ({self.process.returncode}); last log lines:\n{self.tail()}") from None
        if took is None:
            raise ProcessFailed(f"{self.name} not ready after {timeout:.0f} s; last log lines:\n{self.tail()}")
        return took

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM to the leader (it drains), then SIGKILL to the whole group, always; the
        leader's exit status."""
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # children left in the group (engine core, workers)
        except (ProcessLookupError, PermissionError):
            pass
        return p.wait()

    def kill(self) -> None:
        """Crash it: SIGKILL the whole group at once (no drain)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Server:
    """A server process; ``kind`` is ``gateway`` or ``vllm``."""

    kind: str
    model_dir: str
    served_name: str
    env: dict[str, str] = field(default_factory=dict)
    engine: dict = field(default_factory=lambda: dict(ENGINE_DEFAULTS))
    log_path: Path | None = None
    port: int = 0
    process: subprocess.Popen | None = None
    start_seconds: float = 0.0
    proc: Proc | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        e = self.engine
        if self.kind == "gateway":
            cmd = [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--model", self.model_dir,
                   "--served-model-name", self.served_name, "--max-model-len", str(e["max_model_len"]),
                   "--dtype", e["dtype"], "--block-size", str(e["block_size"]), "--max-num-seqs", str(e["max_num_seqs"]),
                   "--kv-cache-gib", str(e["kv_cache_gib"]), "--seed", str(e["seed"]),
                   "--enforce-eager" if e["enforce_eager"] else "--no-enforce-eager",
                   "--enable-prefix-caching" if e["enable_prefix_caching"] else "--no-enable-prefix-caching"]
            return cmd
        if self.kind == "vllm":
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--model", self.model_dir, "--served-model-name", self.served_name,
                   "--max-model-len", str(e["max_model_len"]), "--dtype", e["dtype"], "--block-size", str(e["block_size"]),
                   "--max-num-seqs", str(e["max_num_seqs"]), "--seed", str(e["seed"]),
                   "--enable-prefix-caching" if e["enable_prefix_caching"] else "--no-enable-prefix-caching",
                   "--disable-uvicorn-access-log"]
            if e["enforce_eager"]:
                cmd.append("--enforce-eager")
            return cmd
        raise ValueError(f"unknown server kind {self.kind!r}")

    def start(self, timeout: float = 600) -> "Server":
        self.port = free_port()
        env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "VLLM_CPU_KVCACHE_SPACE": str(int(self.engine["kv_cache_gib"])), **self.env}  # fmt: skip
        ready = "/health/ready" if self.kind == "gateway" else "/health"
        log = self.log_path or Path(os.devnull)
        self.proc = Proc(self.kind, self.command(), log, self.base_url, ready, env, append_log=False).start()
        self.process = self.proc.process
        try:
            self.start_seconds = self.proc.wait_ready(timeout)
        except ProcessFailed as e:
            self.stop()
            raise RuntimeError(f"{e} (log: {self.log_path})") from None
        return self

    def stop(self, timeout: float = 60) -> None:
        if self.proc is not None:
            self.proc.stop(timeout)
