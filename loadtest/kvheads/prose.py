"""The report's prose lives in ``templates/report.md`` (package data): this module loads its
snippets; the number and table helpers are ``loadtest.output.text``'s."""

from __future__ import annotations

import functools
import importlib.resources
import re
from string import Template

from loadtest.output.text import mib, num, table

__all__ = ["fill", "mib", "num", "snippets", "table"]

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
