"""Formatting shared by every Markdown report: numbers and tables."""

from __future__ import annotations

from collections.abc import Sequence


def num(value: float | None, digits: int = 1, scale: float = 1.0, *, grouping: bool = True) -> str:
    """``value x scale`` with ``digits`` decimals (thousands grouped unless told not to); ``-`` for None."""
    if value is None:
        return "-"
    return f"{value * scale:,.{digits}f}" if grouping else f"{value * scale:.{digits}f}"


def mib(value: float | None) -> str:
    """Bytes as MiB with two decimals."""
    return num(None if value is None else value / 2**20, 2)


def table_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table as lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table as one string."""
    return "\n".join(table_lines(header, rows))
