"""Where the project's configs/ folder is, in a checkout and in an installed wheel.

The wheel ships the top-level ``configs/`` folder as the ``configs`` package data
(pyproject.toml), so ``importlib.resources`` finds it wherever the project is installed;
a checkout (editable install, or tests run from the source tree) finds the same folder
beside ``service/``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

_MARKER = "model-shapes.yaml"


def configs_dir() -> Path:
    """The configs folder (it holds model-shapes.yaml, models/ and loadtest/); the checkout's
    path, missing, when neither a checkout nor an installed package has one."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if (checkout / _MARKER).is_file():
        return checkout
    try:
        found = importlib.resources.files("configs")
    except ModuleNotFoundError:
        found = None
    if found is not None:
        for candidate in _paths(found):
            if (candidate / _MARKER).is_file():
                return candidate
    return checkout  # not there: callers that need a file say which one is missing


def config_file(*parts: str) -> Path:
    """A file under the configs folder, e.g. ``config_file("models", "smollm2-135m-cpu.yaml")``."""
    return configs_dir().joinpath(*parts)


def _paths(traversable: object) -> list[Path]:
    """Real folders behind a resources Traversable (a namespace package may have several)."""
    inner = getattr(traversable, "_paths", None)  # MultiplexedPath of a namespace package
    if inner is not None:
        return [Path(str(p)) for p in inner]
    return [Path(str(traversable))]
