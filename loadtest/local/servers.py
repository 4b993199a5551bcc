"""Start and stop a server under test on a free loopback port: our gateway, or vLLM's
own OpenAI server with the same engine arguments (for side-by-side benchmarks)."""

from __future__ import annotations

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


class ProcessExited(RuntimeError):
    """The process under test exited before it became ready."""


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
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "VLLM_CPU_KVCACHE_SPACE": str(int(self.engine["kv_cache_gib"])), **self.env}
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        ready = "/health/ready" if self.kind == "gateway" else "/health"
        try:
            took = wait_ready(self.process, self.base_url + ready, timeout)
        except ProcessExited as e:
            raise RuntimeError(f"{self.kind} {e} (log: {self.log_path})") from None
        if took is None:
            self.stop()
            raise RuntimeError(f"{self.kind} not ready after {timeout} s (log: {self.log_path})")
        self.start_seconds = took
        return self

    def stop(self, timeout: float = 60) -> None:
        if self.process is not None:
            stop_process(self.process, timeout)
