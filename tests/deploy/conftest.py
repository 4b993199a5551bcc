"""Shared helpers for the deploy checks: paths, kustomize rendering, Dockerfile parsing.

Everything here is offline: `kubectl kustomize` renders locally, kubernetes-validate
ships its schemas, yamllint is a library.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
PROFILES = REPO / "configs" / "models"
README = DEPLOY / "README.md"

#: every kustomization in the repository (name -> directory)
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "gpu-tp": K8S / "overlays" / "gpu-tp",
    "prometheus-adapter": K8S / "prometheus-adapter",
}
#: the deployable variants
OVERLAYS = ("cpu", "gpu", "gpu-tp")
GPU_OVERLAYS = ("gpu", "gpu-tp")

#: where the images keep the repository's configs/ (GATEWAY_PROFILE=/app/configs/...)
IMAGE_APP_DIR = "/app"

#: the keys a model profile may contain (the profile contract)
PROFILE_KEYS = frozenset({
    "model", "served_model_name", "device", "dtype", "max_model_len", "kv_cache_gib",
    "gpu_memory_utilization", "kv_cache_dtype", "block_size", "num_gpu_blocks_override",
    "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size",
    "pipeline_parallel_size", "enable_prefix_caching", "enforce_eager",
    # vLLM flags for the chat surface (any vLLM flag is allowed; these are the ones profiles use)
    "enable_auto_tool_choice", "tool_call_parser", "reasoning_parser", "chat_template",
})

#: the gateway's documented settings (env var = GATEWAY_ + upper-case name)
SETTINGS = PROFILE_KEYS | {
    "host", "port", "log_level", "profile", "api_keys", "shutdown_grace_seconds",
}

#: the gateway's serve command, as the README documents it
SERVE_CMD = ["python", "-m", "service", "serve"]


def kubectl_or_skip() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed: cannot render kustomizations "
                    "(install kubectl >= 1.27, which bundles Kustomize)")
    return exe


@functools.lru_cache(maxsize=None)
def _render_text(name: str) -> str:
    exe = kubectl_or_skip()
    proc = subprocess.run([exe, "kustomize", str(KUSTOMIZATIONS[name])],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {name} failed:\n{proc.stderr}")
    return proc.stdout


def render_text(name: str) -> str:
    """The rendered manifests of a kustomization (skips if kubectl is absent)."""
    return _render_text(name)


def render(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_text(name)) if d]


def adapter_rules() -> list[dict]:
    """The Prometheus Adapter's rules, as the adapter reads them (the ConfigMap's config.yaml)."""
    cm = one(render("prometheus-adapter"), "ConfigMap")
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def adapter_metrics() -> set[str]:
    """The custom metrics the adapter's rules expose."""
    return {r["name"]["as"] for r in adapter_rules()}


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def env_config(docs: list[dict]) -> dict[str, str]:
    """The settings ConfigMap the gateway container reads with envFrom."""
    dep = one(docs, "Deployment")
    c = gateway_container(dep)
    names = [s["configMapRef"]["name"] for s in c.get("envFrom", []) if "configMapRef" in s]
    assert len(names) == 1, "the gateway reads exactly one settings ConfigMap"
    cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == names[0]]
    assert len(cms) == 1, f"ConfigMap {names[0]} is not in the rendered output"
    return {k: str(v) for k, v in cms[0].get("data", {}).items()}


def gateway_container(dep: dict) -> dict:
    cs = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    assert len(cs) == 1, "the Deployment has one container named gateway"
    return cs[0]


def profile_path_in_repo(image_path: str) -> Path:
    """Map a GATEWAY_PROFILE path inside an image to the file in this repository."""
    prefix = IMAGE_APP_DIR + "/"
    assert image_path.startswith(prefix), f"{image_path} is not under {IMAGE_APP_DIR}"
    return REPO / image_path[len(prefix):]


def load_profile(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


# ---------------------------------------------------------------- Dockerfiles

@dataclass
class Instruction:
    name: str   # upper-case keyword
    args: str   # the rest, continuation lines joined
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """A small Dockerfile reader: comments, line continuations, one instruction a line."""
    out: list[Instruction] = []
    buf, start = "", 0
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if not buf:
            start = no
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        name, _, args = buf.partition(" ")
        out.append(Instruction(name.upper(), args.strip(), start))
        buf = ""
    assert not buf, f"{path}: unterminated line continuation"
    return out


def exec_form(instr: Instruction) -> list[str]:
    """The JSON array of an exec-form instruction (fails on shell form)."""
    args = instr.args
    if instr.name == "HEALTHCHECK":
        m = re.search(r"\bCMD\s+(.*)$", args)
        assert m, f"line {instr.line}: HEALTHCHECK without CMD"
        args = m.group(1)
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        raise AssertionError(f"line {instr.line}: {instr.name} is not in exec (JSON) form: {args}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def last(instrs: list[Instruction], name: str) -> Instruction:
    found = [i for i in instrs if i.name == name]
    assert found, f"no {name} instruction"
    return found[-1]


def arg_defaults(instrs: list[Instruction]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i in instrs:
        if i.name == "ARG" and "=" in i.args:
            k, _, v = i.args.partition("=")
            out[k.strip()] = v.strip().strip('"')
    return out


def env_values(instrs: list[Instruction]) -> dict[str, str]:
    """Every ENV key=value (later ones win)."""
    out: dict[str, str] = {}
    for i in instrs:
        if i.name != "ENV":
            continue
        for tok in shlex.split(i.args):
            assert "=" in tok, f"line {i.line}: use ENV key=value, not the legacy form"
            k, _, v = tok.partition("=")
            out[k] = v
    return out
