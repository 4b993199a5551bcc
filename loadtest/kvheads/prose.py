"""The report's prose lives in ``templates/report.md`` (package data): this module loads its
snippets and offers the small formatting helpers every section uses."""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Sequence
from string import Template

_SNIPPET = re.compile(r"^@@ (\S+)\n", re.MULTILINE)


@functools.cache
def snippets() -> dict[str, Template]:
    """name -> Template of every ``@@ name`` snippet of templates/report.md."""
    text = importlib.resources.files("loadtest.kvheads").joinpath("templates", "report.md").read_text()
    parts = _SNIPPET.split(text)[1:]  # [name, body, name, body, ...]
    return {name: Template(body.removesuffix("\n")) for name, body in zip(parts[::2], parts[1::2], strict=True)}


def fill(snippet: str, /, **values: object) -> str:
    """The named snippet with its placeholders filled (a missing value is an error)."""
    return snippets()[snippet].substitute({k: str(v) for k, v in values.items()})


def num(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:,.{digits}f}"


def mib(value: float | None) -> str:
    return num(None if value is None else value / 2**20, 2)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
