"""Shared fixtures. The real gateway (vLLM engine + default model) starts once per
test session, as a subprocess on a free loopback port, and is driven over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtest.local.servers import Proc, ProcessFailed, free_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"
START_TIMEOUT = float(os.environ.get("GATEWAY_TEST_START_TIMEOUT", "600"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The CPU roofline probe's cache (service/kv/hardware.py): one per test session, never the
# user's cache folder. The session's first engine (or plugin) probes, the others read it.
os.environ.setdefault("KV_GATEWAY_CACHE_DIR", tempfile.mkdtemp(prefix="kv-gateway-test-cache-"))


@dataclass
class RunningGateway:
    base_url: str  # http://127.0.0.1:PORT (no /v1)
    model: str  # served model name
    model_path: str  # local HF folder (usable as tokenizer)
    proc: Proc  # the process owner (loadtest.local.servers)
    log_path: Path

    @property
    def process(self) -> subprocess.Popen:
        assert self.proc.process is not None
        return self.proc.process

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_gateway(tmp: Path, extra_env: dict[str, str] | None = None, name: str = "gateway") -> RunningGateway:
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_DIR}: run `make model` (make test does)")
    port = free_port()
    env = {
        "GATEWAY_PORT": str(port), "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_MODEL": str(DEFAULT_MODEL_DIR), "HF_HUB_OFFLINE": "1",
        # Eager: starts in ~30 s instead of compiling; serving defaults to compiled.
        "GATEWAY_ENFORCE_EAGER": "true",
        # No KV_GATEWAY_HARDWARE: the roofline's hardware is detected (this CPU, probed once
        # per session into KV_GATEWAY_CACHE_DIR), as on a default start.
        "VLLM_NO_USAGE_STATS": "1",
        # The accounting connector also checks every step's fair shares against vLLM's own
        # block reference counts (gateway_kv_attribution_verify_steps_total).
        "KV_GATEWAY_ATTRIBUTION_VERIFY": "1",
        **(extra_env or {}),
    }
    log_path = tmp / f"{name}.log"
    base_url = f"http://127.0.0.1:{port}"
    proc = Proc(name, [sys.executable, "-m", "service", "serve"], log_path, base_url, "/health/ready", env,
                append_log=False).start()
    gw = RunningGateway(base_url, "SmolLM2-135M-Instruct", str(DEFAULT_MODEL_DIR), proc, log_path)
    try:
        proc.wait_ready(START_TIMEOUT)
    except ProcessFailed:
        stop_gateway(gw)
        pytest.fail(f"gateway did not become ready (exited or {START_TIMEOUT} s):\n{gw.log_text()[-4000:]}")
    return gw


def stop_gateway(gw: RunningGateway, timeout: float = 60) -> int | None:
    return gw.proc.stop(timeout)


@pytest.fixture(scope="session")
def otlp_receiver():
    """A real OTLP/HTTP trace receiver in the test process, for the session's servers."""
    from tests.otlp_receiver import OtlpReceiver

    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, otlp_receiver):
    """The real gateway on the default model, shared by the whole session; it traces to
    ``otlp_receiver`` (vLLM's request spans and ours, tests/engine/test_traces.py)."""
    from tests.otlp_receiver import exporter_env

    gw = start_gateway(tmp_path_factory.mktemp("gateway"), {
        # a tool result in the history and forced tool calls need the parser (also in the profile)
        "GATEWAY_ENABLE_AUTO_TOOL_CHOICE": "true", "GATEWAY_TOOL_CALL_PARSER": "hermes",
        "GATEWAY_OTLP_TRACES_ENDPOINT": otlp_receiver.endpoint, **exporter_env(otlp_receiver),
    })
    yield gw
    stop_gateway(gw)


@pytest.fixture(scope="session")
def openai_client(gateway: RunningGateway):
    import openai

    return openai.OpenAI(base_url=gateway.api_url, api_key="unused", max_retries=0, timeout=120)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that needs the real gateway carries the `engine` marker."""
    for item in items:
        if "gateway" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)
