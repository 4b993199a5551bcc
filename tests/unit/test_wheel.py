"""configs/ and the report templates ship in the wheel: build it, install it into a folder and
find them from there, away from the checkout (service.resources.configs_dir())."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # a clean copy of the sources: no build/ or egg-info left over from another build
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("service", "loadtest", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # --no-build-isolation: build with this venv's setuptools, no download
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (found,) = out.glob("kv_gateway-*.whl")
    return found


def test_wheel_holds_configs_and_templates(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "configs/model-shapes.yaml" in names
    shipped_profiles = {n for n in names if n.startswith("configs/models/") and n.endswith(".yaml")}
    assert shipped_profiles == {f"configs/models/{p.name}" for p in (ROOT / "configs" / "models").glob("*.yaml")}
    assert "configs/loadtest/kv-heads-cpu.yaml" in names
    assert {f"configs/loadtest/samples/{n}" for n in ("sharegpt.json", "azure.csv", "mooncake.jsonl")} <= names
    assert "loadtest/kvheads/templates/report.md" in names


def test_installed_wheel_finds_its_configs(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = (
        "import json, service, service.resources as r, service.kv.planner as p, loadtest.kvheads.spec as s\n"
        "from loadtest.kvheads.prose import snippets\n"
        "print(json.dumps({'service': service.__file__, 'configs': str(r.configs_dir()),"
        " 'shapes': str(p.SHAPES_FILE), 'spec': str(s.DEFAULT_CONFIG),"
        " 'gpt2': p.load_shape('openai-community/gpt2')['n_layer'], 'snippets': len(snippets())}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True, timeout=120).stdout
    found = json.loads(out)
    assert found["service"].startswith(str(target))  # the installed copy, not the checkout
    assert found["configs"] == str(target / "configs")
    assert found["shapes"] == str(target / "configs" / "model-shapes.yaml") and found["gpt2"] == 12
    assert found["spec"] == str(target / "configs" / "loadtest" / "kv-heads-cpu.yaml")
    assert found["snippets"] > 10
