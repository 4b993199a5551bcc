"""Figures of a conversation run by turn index: the table and the plot.

For every turn index k (1 = a session's first request), over the successful requests of
that turn: client TTFT and TPOT (``loadtest.core.metrics``), and from the joined server
figures (``/v1/requests/{id}/metrics``): prompt tokens, prefix-cache hit tokens
(``cached_tokens``), the hit ratio sum(cached) / sum(prompt), and the KV a request held at
its largest (``kv_used_bytes``: the whole history plus the answer). Server columns are empty
when the server offered no per-request figures.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from loadtest.core.metrics import tpot  # noqa: E402
from loadtest.core.results import RequestRecord, RunResult  # noqa: E402
from loadtest.output.text import num, table_lines  # noqa: E402


class TurnFigures(BaseModel):
    """One turn index's figures (module docstring); times in seconds, KV in bytes."""

    turn: int
    requests: int
    failed: int = 0
    ttft_mean_s: float | None = None
    ttft_p50_s: float | None = None
    tpot_mean_s: float | None = None
    prompt_tokens_mean: float | None = None
    cached_tokens_mean: float | None = None
    hit_ratio: float | None = None
    kv_used_bytes_mean: float | None = None


def _mean(values: Sequence[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.fmean(present) if present else None


def turn_figures(records: Sequence[RequestRecord]) -> list[TurnFigures]:
    """The figures of every turn index present in ``records`` (records without a turn are skipped)."""
    by_turn: dict[int, list[RequestRecord]] = {}
    for record in records:
        if record.turn is not None:
            by_turn.setdefault(record.turn, []).append(record)
    out = []
    for turn in sorted(by_turn):
        group = by_turn[turn]
        ok = [r for r in group if r.success]
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        server = [r.server for r in ok if r.server is not None]
        pairs = [(s.cached_tokens, s.prompt_tokens) for s in server if s.cached_tokens is not None and s.prompt_tokens]
        out.append(TurnFigures(
            turn=turn,
            requests=len(group),
            failed=len(group) - len(ok),
            ttft_mean_s=_mean(ttfts),
            ttft_p50_s=statistics.median(ttfts) if ttfts else None,
            tpot_mean_s=_mean([tpot(r) for r in ok]),
            prompt_tokens_mean=_mean([s.prompt_tokens for s in server]) if server else _mean([r.prompt_tokens for r in ok]),
            cached_tokens_mean=_mean([c for c, _ in pairs]),
            hit_ratio=sum(c for c, _ in pairs) / sum(p for _, p in pairs) if pairs else None,
            kv_used_bytes_mean=_mean([s.kv_used_bytes for s in server]),
        ))  # fmt: skip
    return out


HEADER = ["turn", "requests", "failed", "TTFT mean (ms)", "TTFT p50 (ms)", "TPOT mean (ms)", "prompt tokens",
          "cached tokens", "hit ratio", "KV held (MiB)"]  # fmt: skip


def turn_row(f: TurnFigures) -> list[str]:
    return [
        str(f.turn), str(f.requests), str(f.failed), num(f.ttft_mean_s, 1, 1000.0), num(f.ttft_p50_s, 1, 1000.0),
        num(f.tpot_mean_s, 1, 1000.0), num(f.prompt_tokens_mean, 1), num(f.cached_tokens_mean, 1),
        num(f.hit_ratio, 3), num(None if f.kv_used_bytes_mean is None else f.kv_used_bytes_mean / 2**20, 3),
    ]  # fmt: skip


def turns_markdown(results: Sequence[RunResult]) -> list[str]:
    """The per-turn section of a report: one table per step that played conversations."""
    lines: list[str] = []
    for run in results:
        for step in run.steps:
            figures = turn_figures(step.requests)
            if figures:
                lines += ["", f"### {run.label}, {step.label}", "", *table_lines(HEADER, [turn_row(f) for f in figures])]
    if not lines:
        return []
    intro = ("Per turn index (1 = a session's first request). Cached tokens, hit ratio (sum cached / sum "
             "prompt) and KV held come from the joined per-request server figures.")  # fmt: skip
    return ["", "## Conversations by turn", "", intro, *lines]


def plot_turns(results: Sequence[RunResult], path: Path) -> Path | None:
    """TTFT, hit ratio and KV held by turn index, one line per run and step."""
    series = [(f"{r.label} {s.label}", turn_figures(s.requests)) for r in results for s in r.steps]
    series = [(label, figures) for label, figures in series if figures]
    if not series:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, figures in series:
        turns = [f.turn for f in figures]
        axes[0].plot(turns, [1000 * (f.ttft_mean_s or float("nan")) for f in figures], marker="o", label=label)
        axes[1].plot(turns, [f.hit_ratio if f.hit_ratio is not None else float("nan") for f in figures], marker="o")
        axes[2].plot(turns, [(f.kv_used_bytes_mean or float("nan")) / 2**20 for f in figures], marker="o")
    for ax, title in zip(axes, ("TTFT mean (ms)", "prefix-cache hit ratio", "KV held per request (MiB)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("turn")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
