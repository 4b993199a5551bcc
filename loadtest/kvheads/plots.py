"""Plots of the KV-heads report (PNG), drawn from the result JSON alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.kvheads.measure import during_samples, measure  # noqa: E402
from loadtest.kvheads.result import KvHeadsResult, VariantRun  # noqa: E402
from loadtest.core.results import StepResult  # noqa: E402


def heads(n: int | None) -> str:
    return "? KV heads" if n is None else f"{n} KV head{'' if n == 1 else 's'}"


def pooled_mean(v: VariantRun, name: str) -> float | None:
    """Count-weighted mean of a per-request server histogram over every step of a variant."""
    if v.run is None:
        return None
    total = count = 0.0
    for step in v.run.steps:
        h = step.server.per_request.get(name) if step.server else None
        if h is not None and h.mean is not None and h.count:
            total += h.mean * h.count
            count += h.count
    return total / count if count else None


_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def plot_capacity(result: KvHeadsResult, path: Path) -> Path:
    fraction = result.spec.criteria.saturation_fraction
    runs = [(v, measure(v.run, fraction) if v.run is not None else None) for v in result.variants]
    tol = result.spec.criteria.tolerance
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = range(len(runs))
    width = 0.27
    pred = [v.plan.predicted_running or 0 for v, _ in runs]
    med = [m.sustained.median if m and m.sustained.median is not None else float("nan") for _, m in runs]
    peak = [m.running_peak if m and m.running_peak is not None else float("nan") for _, m in runs]
    ax.bar([x - width for x in xs], pred, width, color="lightgrey", edgecolor="black", label="predicted (planner)")
    ax.errorbar([x - width for x in xs], pred, yerr=[tol * p for p in pred], fmt="none", ecolor="black",
                capsize=4, label=f"±{tol:.0%}")  # fmt: skip
    ax.bar(list(xs), med, width, color=[_color(i) for i in xs], label="measured sustained (median while waiting)")
    ax.bar([x + width for x in xs], peak, width, color=[_color(i) for i in xs], alpha=0.35, hatch="//",
           label="measured peak")  # fmt: skip
    for x, values in zip(xs, zip(pred, med, peak, strict=True), strict=True):
        for dx, value, lift in zip((-width, 0, width), values, (1 + tol, 1, 1), strict=True):
            if value == value:  # not NaN
                ax.annotate(f"{value:.0f}", (x + dx, value * lift), ha="center", va="bottom", fontsize="small")
    from matplotlib.patches import Patch

    by_label = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    by_label["measured sustained (median while waiting)"] = Patch(facecolor="dimgray")
    by_label["measured peak"] = Patch(facecolor="white", edgecolor="dimgray", hatch="//")
    labels = ["predicted (planner)", f"±{tol:.0%}", "measured sustained (median while waiting)", "measured peak"]
    handles = [by_label[label] for label in labels]
    ax.set_xticks(list(xs), [f"{v.plan.name}\n{heads(v.plan.kv_heads)}" for v, _ in runs])
    ax.set_ylabel("concurrent running requests")
    ax.set_title(f"Same KV bytes ({(result.budget_bytes or 0) / 2**20:.1f} MiB): running batch under saturation")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(handles, labels, fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _series(steps: Sequence[StepResult], getter) -> list[float]:
    out = []
    for s in steps:
        value = getter(s)
        out.append(float("nan") if value is None else float(value))
    return out


def plot_sweep(result: KvHeadsResult, path: Path) -> Path:
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = (
        ("output tokens/s", lambda s: s.summary.output_throughput, False),
        ("TTFT p50 (s)", lambda s: s.summary.ttft_s.p50, True),
        ("TTFT p99 (s)", lambda s: s.summary.ttft_s.p99, True),
        ("TPOT p50 (ms)", lambda s: None if s.summary.tpot_s.p50 is None else 1000 * s.summary.tpot_s.p50, False),
        ("running requests: median over the step (o), peak (^)", lambda s: _median_running(s), False),
        ("waiting requests: mean over the step", lambda s: _mean_waiting(s), False),
    )
    for i, v in enumerate(result.variants):
        if v.run is None:
            continue
        steps = sorted(v.run.steps, key=lambda s: s.x)
        xs = [s.x for s in steps]
        for ax, (title, getter, _) in zip(axes.flat, panels, strict=True):
            ax.plot(xs, _series(steps, getter), "-o", color=_color(i), label=v.plan.name)
        axes[1][1].plot(xs, _series(steps, lambda s: s.server.running_peak if s.server else None), "^",
                        color=_color(i), alpha=0.6)  # fmt: skip
        if v.plan.predicted_running:
            for ax in axes.flat:
                ax.axvline(v.plan.predicted_running, color=_color(i), linestyle=":", alpha=0.7)
            axes[1][1].axhline(v.plan.predicted_running, color=_color(i), linestyle="--", alpha=0.5)
    concurrencies = sorted({s.x for v in result.variants if v.run for s in v.run.steps})
    if concurrencies:
        axes[1][1].plot(concurrencies, concurrencies, color="grey", alpha=0.4, label="everyone admitted (y = x)")
        axes[1][1].legend(fontsize="small")
    for ax, (title, _, log) in zip(axes.flat, panels, strict=True):
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("offered concurrency (closed loop)")
        if log:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle("KV heads under one KV byte budget: dotted lines = predicted capacity of each variant")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _median_running(step: StepResult) -> float | None:
    """Median running over the whole step (every scrape taken while it ran, queue or not)."""
    rows = sorted(s.running for s in during_samples(step) if s.running is not None)
    if not rows:
        return None
    mid = len(rows) // 2
    return rows[mid] if len(rows) % 2 else (rows[mid - 1] + rows[mid]) / 2


def _mean_waiting(step: StepResult) -> float | None:
    rows = [s.waiting for s in during_samples(step) if s.waiting is not None]
    return sum(rows) / len(rows) if rows else None


def plot_timeline(result: KvHeadsResult, path: Path) -> Path:
    runs = [v for v in result.variants if v.run is not None]
    fig, axes = plt.subplots(max(len(runs), 1), 1, figsize=(13, 3.2 * max(len(runs), 1)), squeeze=False)
    for ax, v in zip(axes[:, 0], runs, strict=False):
        assert v.run is not None
        for step in v.run.steps:
            if step.server is None or not step.server.samples:
                continue
            t = [step.offset_s + p.t_s for p in step.server.samples]
            running = [float("nan") if p.running is None else p.running for p in step.server.samples]
            waiting = [float("nan") if p.waiting is None else p.waiting for p in step.server.samples]
            first = step is v.run.steps[0]
            ax.step(t, running, where="post", color="tab:blue", label="running" if first else None)
            ax.step(t, waiting, where="post", color="tab:red", alpha=0.7, label="waiting" if first else None)
            ax.axvline(step.offset_s, color="grey", alpha=0.4)
            extra = f", {step.server.preemptions:.0f} preempted" if step.server.preemptions else ""
            ax.annotate(f"c={step.concurrency}{extra}", (step.offset_s, 1.0), xycoords=("data", "axes fraction"),
                        fontsize="x-small", va="top", ha="left")  # fmt: skip
        if v.plan.predicted_running:
            ax.axhline(v.plan.predicted_running, color="black", linestyle="--", alpha=0.6,
                       label=f"predicted capacity {v.plan.predicted_running}")  # fmt: skip
        ax.set_ylabel("requests")
        ax.set_title(f"{v.plan.name}: {heads(v.plan.kv_heads)}, {v.plan.num_blocks} usable blocks", fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", loc="center left")
    axes[-1][0].set_xlabel("seconds since the variant's first step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_kv_attention(result: KvHeadsResult, path: Path) -> Path:
    vs = result.variants
    names = [f"{v.plan.name}\n{heads(v.plan.kv_heads)}" for v in vs]
    colors = [_color(i) for i in range(len(vs))]

    def values(name: str, scale: float) -> list[float]:
        out = []
        for v in vs:
            m = pooled_mean(v, name)
            out.append(float("nan") if m is None else m / scale)
        return out

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (
        (axes[0], values("kv_used_bytes", 2**20), "KV held per request (MiB)"),
        (axes[2], values("kv_read_bytes", 2**20), "decode KV bytes read per request (MiB)"),
    )
    for ax, ys, title in panels:
        ax.bar(names, ys, color=colors)
        ax.set_title(title)
        for x, y in enumerate(ys):
            if y == y:
                ax.annotate(f"{y:.2f}", (x, y), ha="center", va="bottom", fontsize="small")
    prefill = values("attention_flops_prefill", 1e9)
    decode = values("attention_flops_decode", 1e9)
    axes[1].bar(names, prefill, color=colors, alpha=0.5, label="prefill")
    axes[1].bar(names, decode, bottom=prefill, color=colors, label="decode")
    for x, (a, b) in enumerate(zip(prefill, decode, strict=True)):
        if a == a and b == b:
            axes[1].annotate(f"{a + b:.3f}", (x, a + b), ha="center", va="bottom", fontsize="small")
    axes[1].set_title("attention GFLOP per request (prefill light, decode dark)")
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Attention FLOPs are the same for every variant; KV bytes held and read scale with KV heads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

