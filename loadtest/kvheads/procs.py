"""Gateway processes of a managed run, and the other engines on the machine that would skew it."""

from __future__ import annotations

import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

from loadtest.kvheads.plan import VariantPlan
from loadtest.kvheads.spec import KvHeadsSpec
from loadtest.local.servers import Proc, ProcessFailed


def log(message: str) -> None:
    print(f"[kv-heads {datetime.now():%H:%M:%S}] {message}", flush=True)


def serve_command(plan: VariantPlan, spec: KvHeadsSpec, port: int, model_dir: Path) -> list[str]:
    """``python -m service serve`` with the variant's model and the shared engine limits."""
    e = spec.engine
    cmd = [
        sys.executable, "-m", "service", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", str(model_dir), "--served-model-name", plan.name,
        "--dtype", e.dtype, "--block-size", str(e.block_size),
        "--max-model-len", str(e.max_model_len), "--max-num-seqs", str(e.max_num_seqs),
        "--kv-cache-gib", f"{e.kv_cache_gib:g}",
        "--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching",
        "--enforce-eager" if e.enforce_eager else "--no-enforce-eager",
    ]  # fmt: skip
    if plan.engine_blocks is not None:
        cmd += ["--num-gpu-blocks-override", str(plan.engine_blocks)]
    if e.max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(e.max_num_batched_tokens)]
    return cmd + list(e.extra_args)


class Gateway(Proc):
    """One variant's gateway (``loadtest.local.servers.Proc``: own process group, a fresh log)."""

    def __init__(self, cmd: list[str], log_path: Path, base_url: str) -> None:
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        super().__init__("the gateway", cmd, log_path, base_url, "/health/ready", env, append_log=False)
        self.start_s: float | None = None

    @property
    def base_url(self) -> str:
        return self.url

    def start(self, timeout_s: float) -> None:  # type: ignore[override]
        """Start it and wait until ready (ProcessFailed, a RuntimeError, when it does not get there)."""
        super().start()
        try:
            self.start_s = self.wait_ready(timeout_s)
        except ProcessFailed:
            self.stop(5)
            raise


def _ppid(pid: int, proc: Path = Path("/proc")) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# Processes that load the CPU the way an engine does: engine cores, servers starting up
# (imports and model loading take a core for a minute before the engine core exists) and
# other load generators.
_BUSY = re.compile(
    r"^VLLM::|-m service serve|vllm\.entrypoints|\bvllm serve\b|-m loadtest (?:run|compare|soak|selftest)\b"
)


def _cmdline(entry: Path) -> str:
    try:
        raw = (entry / "cmdline").read_bytes()
    except OSError:
        return ""
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    if not text:  # kernel threads, zombies: fall back to the name
        try:
            text = (entry / "comm").read_text().strip()
        except OSError:
            return ""
    return text


def other_engines(own_root: int | None = None, proc: Path = Path("/proc")) -> list[int]:
    """Pids of vLLM engines, model servers and load generators on this machine that are
    neither ``own_root`` (our gateway) nor its descendants nor this process: they would
    share the 2 cores and skew latencies. Reads /proc only (empty where there is none)."""
    me = os.getpid()
    found = []
    for entry in proc.glob("[0-9]*"):
        pid = int(entry.name)
        if pid == me or not _BUSY.search(_cmdline(entry)):
            continue
        parent: int | None = pid
        for _ in range(64):
            if parent is None or parent <= 1 or parent == own_root:
                break
            parent = _ppid(parent, proc)
        if own_root is None or parent != own_root:
            found.append(pid)
    return sorted(found)


def wait_for_idle(timeout_s: float, poll_s: float = 5.0, own_root: int | None = None) -> float:
    """Wait until no other vLLM engine runs (at most ``timeout_s``); returns the seconds waited."""
    t0 = time.monotonic()
    announced = False
    while (pids := other_engines(own_root)) and time.monotonic() - t0 < timeout_s:
        if not announced:
            log(f"waiting for other engines, servers or load tests to end (pids {pids}; up to {timeout_s:g} s)")
            announced = True
        time.sleep(poll_s)
    return time.monotonic() - t0


_LOG_PATTERNS = (
    r"engine ready in", r"Maximum concurrency", r"num_gpu_blocks", r"KV cache", r"# CPU blocks",
    r"Overriding", r"Reducing Torch threads", r"\bWARNING\b", r"\bERROR\b", r"Traceback", r"Error:",
)  # fmt: skip
_NOISE = re.compile(r"gateway\.requests|GET /metrics|POST /v1/")


def summarize_log(text: str, limit: int = 20, width: int = 240) -> list[str]:
    """The lines of a gateway log that explain its cache and its problems (request lines skipped)."""
    wanted = re.compile("|".join(_LOG_PATTERNS))
    lines: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        if _NOISE.search(line) or not wanted.search(line):
            continue
        key = re.sub(r"^\S+ \S+ |\d+", "", line)[:120]  # same message, other time or number
        if key in seen:
            continue
        seen.add(key)
        lines.append(line.strip()[:width])
        if len(lines) >= limit:
            break
    return lines

