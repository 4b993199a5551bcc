"""PNG plots of one or several runs (matplotlib, Agg backend, no display needed).

- ``latency_vs_<concurrency|rate>.png``: TTFT, TPOT, ITL and E2E (p50 solid, p90
  dashed, p99 dotted) against the swept value, one colour per run;
- ``throughput_vs_<concurrency|rate>.png``: output tokens/s, requests/s and goodput;
- ``server_timeline_<run>.png``: KV-cache usage and running/waiting requests over the
  run's time, steps marked, when the target exposed them;
- ``request_kv_<run>.png``: each request's KV bytes held (the server's ``kv_used_bytes``,
  joined by request id) against its TTFT and its TPOT, one colour per step, when the
  server offered per-request figures.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import EngFormatter

from loadtest.core.metrics import tpot
from loadtest.core.results import Distribution, RequestRecord, RunResult, StepResult

_LATENCIES = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E latency"))
_PERCENTILE_STYLES = (("p50", "-"), ("p90", "--"), ("p99", ":"))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _xlabel(shape: str) -> str:
    return {"concurrency": "concurrency (requests in flight)", "speedup": "trace speed-up (x)"}.get(
        shape, "request rate (requests/s)"
    )


def _runs_with_shape(results: Sequence[RunResult], shape: str) -> list[tuple[RunResult, list[StepResult]]]:
    picked = [(r, [s for s in r.steps if s.shape == shape]) for r in results]
    return [(r, steps) for r, steps in picked if steps]


def _ms(dist: Distribution, field: str) -> float:
    value = getattr(dist, field)
    return float("nan") if value is None else value * 1000.0


def plot_latency(results: Sequence[RunResult], shape: str, path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, steps) in enumerate(_runs_with_shape(results, shape)):
        xs = [s.x for s in steps]
        for ax, (attr, title) in zip(axes.flat, _LATENCIES, strict=True):
            for field, style in _PERCENTILE_STYLES:
                ys = [_ms(getattr(s.summary, attr), field) for s in steps]
                ax.plot(xs, ys, style, marker="o", color=colors[i % len(colors)], label=f"{run.label} {field}")
            ax.set_title(f"{title} (ms)")
            ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(_xlabel(shape))
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_throughput(results: Sequence[RunResult], shape: str, path: Path) -> Path:
    fig, (tok_ax, req_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, steps) in enumerate(_runs_with_shape(results, shape)):
        color = colors[i % len(colors)]
        xs = [s.x for s in steps]
        tok_ax.plot(xs, [s.summary.output_throughput for s in steps], "-o", color=color, label=run.label)
        req_ax.plot(xs, [s.summary.request_throughput for s in steps], "-o", color=color, label=f"{run.label} req/s")
        goodput = [s.summary.goodput for s in steps]
        if any(g is not None for g in goodput):
            req_ax.plot(
                xs,
                [float("nan") if g is None else g for g in goodput],
                "--s",
                color=color,
                label=f"{run.label} goodput",
            )
    tok_ax.set_title("output tokens/s")
    req_ax.set_title("requests/s")
    for ax in (tok_ax, req_ax):
        ax.set_xlabel(_xlabel(shape))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_timeline(run: RunResult, path: Path) -> Path | None:
    """KV usage and running/waiting over the run; None when no step has server samples."""
    steps = [s for s in run.steps if s.server is not None and s.server.samples]
    if not steps:
        return None
    fig, (kv_ax, req_ax) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for step in steps:
        assert step.server is not None
        times = [step.offset_s + p.t_s for p in step.server.samples]
        kv = [float("nan") if p.kv_usage is None else 100.0 * p.kv_usage for p in step.server.samples]
        running = [float("nan") if p.running is None else p.running for p in step.server.samples]
        waiting = [float("nan") if p.waiting is None else p.waiting for p in step.server.samples]
        first = step is steps[0]
        kv_ax.plot(times, kv, "-", color="tab:purple", label="KV cache usage" if first else None)
        req_ax.step(times, running, where="post", color="tab:blue", label="running" if first else None)
        req_ax.step(times, waiting, where="post", color="tab:red", label="waiting" if first else None)
        for ax in (kv_ax, req_ax):
            ax.axvline(step.offset_s, color="grey", alpha=0.4)
        kv_ax.annotate(
            step.label,
            (step.offset_s, 1.0),
            xycoords=("data", "axes fraction"),
            fontsize="x-small",
            va="top",
            rotation=90,
        )
    kv_ax.set_ylabel("KV usage (%)")
    req_ax.set_ylabel("requests")
    req_ax.set_xlabel("time since the first step started (s)")
    for ax in (kv_ax, req_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="upper right")
    kv_ax.set_title(f"server: {run.label}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _with_kv(step: StepResult) -> list[RequestRecord]:
    """The step's successful requests that carry the server's ``kv_used_bytes``."""
    return [r for r in step.requests if r.success and r.server is not None and r.server.kv_used_bytes is not None]


def request_kv_plot_name(run: RunResult) -> str | None:
    """File name of the run's per-request KV plot; None when no request has the figure."""
    return f"request_kv_{slug(run.label)}.png" if any(_with_kv(step) for step in run.steps) else None


def plot_request_kv(run: RunResult, path: Path) -> Path:
    """Per request: KV bytes held (``kv_used_bytes``) against TTFT and against TPOT."""
    fig, (ttft_ax, tpot_ax) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for step in run.steps:
        joined = _with_kv(step)
        kv = [r.server.kv_used_bytes for r in joined if r.server is not None]
        ttft_ax.scatter([1000.0 * (r.ttft_s or float("nan")) for r in joined], kv, s=12, alpha=0.7, label=step.label)
        tpots = [tpot(r) for r in joined]
        tpot_ax.scatter([float("nan") if t is None else 1000.0 * t for t in tpots], kv, s=12, alpha=0.7)
    ttft_ax.set_xlabel("TTFT (ms, client)")
    tpot_ax.set_xlabel("TPOT (ms, client)")
    ttft_ax.set_ylabel("peak KV bytes held by the request\n(server's kv_used_bytes: K and V of its tokens)")
    ttft_ax.yaxis.set_major_formatter(EngFormatter(unit="B"))
    for ax in (ttft_ax, tpot_ax):
        ax.grid(True, alpha=0.3)
    ttft_ax.legend(fontsize="small")
    fig.suptitle(f"per request, joined by request id: {run.label}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: Sequence[RunResult], out_dir: Path) -> list[Path]:
    """Every plot for ``results`` into ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for shape in ("concurrency", "rate", "speedup"):
        if _runs_with_shape(results, shape):
            written.append(plot_latency(results, shape, out_dir / f"latency_vs_{shape}.png"))
            written.append(plot_throughput(results, shape, out_dir / f"throughput_vs_{shape}.png"))
    for run in results:
        timeline = plot_timeline(run, out_dir / f"server_timeline_{slug(run.label)}.png")
        if timeline is not None:
            written.append(timeline)
        name = request_kv_plot_name(run)
        if name is not None:
            written.append(plot_request_kv(run, out_dir / name))
    return written
