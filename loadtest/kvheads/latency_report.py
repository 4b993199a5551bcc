"""Report of the latency sweep: one row per measured point (roofline prediction beside the
measured TPOT and ITL, residuals), the per-variant fits, a PNG, and the Markdown section
that ``report.markdown`` puts into the KV-heads report (prose in templates/report.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.kvheads.latency import linear_fit, predict_point, residual, worst  # noqa: E402
from loadtest.kvheads.latency_run import LatencyResult  # noqa: E402
from loadtest.kvheads.prose import fill, num, table  # noqa: E402
from service.kv.roofline import hardware_from_dict  # noqa: E402

_COLORS = {"MHA": "tab:red", "GQA-3": "tab:blue", "MQA": "tab:green"}


def rows(result: LatencyResult) -> list[dict[str, Any]]:
    """One dict per measured point, in run order (JSON-ready)."""
    hw = hardware_from_dict(result.hardware)
    models = {m.name: m for m in result.models}
    out = []
    for run in result.points:
        p, step = run.point, run.step
        model = models[p.variant]
        pred = predict_point(model, p.batch, p.prompt_tokens, result.spec.output_tokens, hw)
        s = step.summary if step else None
        ttfts = [r.ttft_s for r in step.requests if r.ttft_s is not None] if step else []
        tpot = s.tpot_s.p50 if s else None
        itl = s.itl_s.p50 if s else None
        out.append({
            "order": run.order, "variant": p.variant, "kv_heads": model.kv_heads, "batch": p.batch,
            "prompt_tokens": p.prompt_tokens, "fills_cache": p.fills_cache,
            "mean_context": pred.mean_context, "kv_bytes_per_step": pred.kv_bytes,
            "weight_bytes": pred.weight_bytes, "kv_over_weights": pred.kv_over_weights,
            "predicted_tpot_s": pred.tpot_s, "predicted_memory_s": pred.memory_s,
            "predicted_compute_s": pred.compute_s, "bound": pred.bound,
            "crossover_context": model.crossover_context(p.batch),
            "completed": s.completed if s else 0, "failed": s.failed if s else 0,
            "tpot_p50_s": tpot, "tpot_mean_s": s.tpot_s.mean if s else None,
            "itl_p50_s": itl, "itl_mean_s": s.itl_s.mean if s else None,
            "ttft_min_s": min(ttfts) if ttfts else None, "ttft_max_s": max(ttfts) if ttfts else None,
            "tpot_residual": residual(tpot, pred.tpot_s), "itl_residual": residual(itl, pred.tpot_s),
            "tpot_minus_predicted_s": None if tpot is None else tpot - pred.tpot_s,
            "preemptions": step.server.preemptions if step and step.server else None,
            "kv_usage_peak": step.server.kv_usage_peak if step and step.server else None,
            "other_engines": run.other_engines, "error": run.error,
        })  # fmt: skip
    return out


def fits(table_rows: Sequence[dict[str, Any]], key: str = "itl_p50_s") -> list[dict[str, Any]]:
    """Per variant and batch: measured step time (ITL p50) against KV bytes read per step,
    a straight line. Its slope, read as seconds per KV byte, gives the bandwidth at which the
    engine actually reads KV (the roofline assumes the STREAM triad figure); its intercept is
    the step time with no KV (weights, compute and per-step overheads)."""
    out = []
    for (variant, batch) in sorted({(r["variant"], r["batch"]) for r in table_rows}, key=lambda k: (k[1], k[0])):
        pts = [r for r in table_rows if r["variant"] == variant and r["batch"] == batch and r[key] is not None]
        fit = linear_fit([r["kv_bytes_per_step"] for r in pts], [r[key] for r in pts])
        if fit is None:
            continue
        intercept, slope = fit
        out.append({"variant": variant, "batch": batch, "points": len(pts), "intercept_s": intercept,
                    "slope_s_per_gb": slope * 1e9, "kv_bandwidth_gb_s": (1 / slope / 1e9) if slope > 0 else None})
    return out


def plot(result: LatencyResult, table_rows: Sequence[dict[str, Any]], path: Path) -> Path:
    batches = sorted({r["batch"] for r in table_rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(5 * len(batches), 7.5), sharex="col",
                             gridspec_kw={"height_ratios": [3, 1.4]}, squeeze=False)  # fmt: skip
    for col, b in enumerate(batches):
        top, bottom = axes[0][col], axes[1][col]
        for m in result.models:
            pts = sorted((r for r in table_rows if r["variant"] == m.name and r["batch"] == b),
                         key=lambda r: r["prompt_tokens"])  # fmt: skip
            if not pts:
                continue
            color = _COLORS.get(m.name, "black")
            x = [r["mean_context"] for r in pts]
            top.plot(x, [1000 * r["predicted_tpot_s"] for r in pts], "--", color=color, label=f"{m.name} roofline")
            top.plot(x, [1000 * (r["tpot_p50_s"] or float("nan")) for r in pts], "o-", color=color,
                     label=f"{m.name} TPOT p50")  # fmt: skip
            top.plot(x, [1000 * (r["itl_p50_s"] or float("nan")) for r in pts], "x:", color=color, alpha=0.7,
                     label=f"{m.name} ITL p50")  # fmt: skip
            cross = m.crossover_context(b)
            if cross <= max(x) * 1.05:
                top.axvline(cross, color=color, lw=0.8, alpha=0.5)
            bottom.plot(x, [100 * (r["tpot_residual"] if r["tpot_residual"] is not None else float("nan"))
                            for r in pts], "o-", color=color)  # fmt: skip
        top.set_title(f"batch {b}")
        top.set_ylabel("ms per output token")
        top.set_ylim(bottom=0)
        top.grid(alpha=0.3)
        bottom.axhline(0, color="black", lw=0.8)
        bottom.set_ylabel("TPOT residual %\n(measured / predicted - 1)")
        bottom.set_xlabel("mean context per sequence (tokens)")
        bottom.grid(alpha=0.3)
        if col == 0:
            top.legend(fontsize=7)
    fig.suptitle("Decode TPOT: measured (client, vLLM definitions) vs roofline on this machine's STREAM triad "
                 "and matmul; verticals: KV read = weight read", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def explain_figures(table_rows: Sequence[dict[str, Any]], models: Sequence[Any]) -> dict[str, str]:
    """Figures the explanation quotes (templates/report.md's latency_explain): residuals by
    batch; the measured step time against the batch at the shortest prompt (time added per
    sequence, and the matmul rate that implies); the measured and predicted TPOT spread between
    the variants at each batch's longest shared prompt."""
    batches = sorted({r["batch"] for r in table_rows})
    by_batch = []
    for b in batches:
        res = [r["tpot_residual"] for r in table_rows if r["batch"] == b and r["tpot_residual"] is not None]
        if res:
            by_batch.append(f"batch {b}: {_pct(min(res))} to {_pct(max(res))}")
    per_seq = []
    for m in models:
        pts = [r for r in table_rows if r["variant"] == m.name and r["tpot_p50_s"] is not None]
        shortest = min((r["prompt_tokens"] for r in pts), default=None)
        pts = [r for r in pts if r["prompt_tokens"] == shortest]
        fit = linear_fit([r["batch"] for r in pts], [r["tpot_p50_s"] for r in pts])
        if fit and fit[1] > 0:
            per_seq.append(f"{m.name} {_ms(fit[0])} ms + {_ms(fit[1])} ms per sequence "
                           f"(= {2 * m.matmul_parameters / fit[1] / 1e9:.1f} GFLOP/s of matmuls)")
    spread = []
    for b in batches:
        rows_b = [r for r in table_rows if r["batch"] == b]
        common = set.intersection(*({r["prompt_tokens"] for r in rows_b if r["variant"] == m.name} for m in models))
        if not common:
            continue
        p = max(common)
        at = {r["variant"]: r for r in rows_b if r["prompt_tokens"] == p}
        if len(at) < 2 or any(r["tpot_p50_s"] is None for r in at.values()):
            continue
        meas = [r["tpot_p50_s"] for r in at.values()]
        pred = [r["predicted_tpot_s"] for r in at.values()]
        spread.append(f"batch {b}, prompt {p}: " + ", ".join(f"{n} {_ms(r['tpot_p50_s'])}" for n, r in at.items())
                      + f" ms measured (max/min {max(meas) / min(meas):.2f}), predicted max/min "
                      f"{max(pred) / min(pred):.2f}")
    kv_w = max((r["kv_over_weights"] for r in table_rows), default=0.0)
    return {"by_batch": "; ".join(by_batch) or "-", "per_sequence": "; ".join(per_seq) or "-",
            "spread": "; ".join(spread) or "-", "max_kv_over_w": f"{kv_w:.2f}"}


def _ms(value: float | None, digits: int = 1) -> str:
    return num(value, digits, 1000)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.0f}%"


def section(result: LatencyResult, image: str | None) -> str:
    """The "Latency" section of the KV-heads report."""
    table_rows = rows(result)
    spec, e = result.spec, result.spec.engine
    hw = result.hardware
    point_rows = [[
        r["variant"], str(r["batch"]), f"{r['prompt_tokens']:,}" + (" (full)" if r["fills_cache"] else ""),
        f"{r['kv_over_weights']:.2f}", r["bound"], _ms(r["predicted_tpot_s"]), _ms(r["tpot_p50_s"]),
        _pct(r["tpot_residual"]), _ms(r["itl_p50_s"]), _pct(r["itl_residual"]), _ms(r["tpot_mean_s"]),
        num(r["ttft_min_s"], 2) + " - " + num(r["ttft_max_s"], 2),
        "yes" if r["other_engines"] else "", r["error"] or "",
    ] for r in sorted(table_rows, key=lambda r: (r["batch"], r["prompt_tokens"], r["kv_heads"]))]  # fmt: skip
    header = ("variant", "batch", "prompt", "KV/W read", "roofline bound", "predicted TPOT ms", "TPOT p50 ms",
              "TPOT residual", "ITL p50 ms", "ITL residual", "TPOT mean ms", "TTFT min - max s",
              "other load", "error")
    cross = [[m.name, str(m.kv_heads), f"{m.weight_bytes / 1e6:,.1f}", f"{m.kv_bytes_per_token:,}",
              *(f"{m.crossover_context(b):,.0f}" for b in spec.load.batches),
              *(f"{max((r['prompt_tokens'] for r in table_rows if r['variant'] == m.name and r['batch'] == b), default=0):,}"
                for b in spec.load.batches)]
             for m in result.models]  # fmt: skip
    cross_header = ("variant", "KV heads", "weights MB", "KV B/token",
                    *(f"KV = W at context, batch {b}" for b in spec.load.batches),
                    *(f"longest prompt run, batch {b}" for b in spec.load.batches))
    fit_rows = [[f["variant"], str(f["batch"]), str(f["points"]), _ms(f["intercept_s"]),
                 num(f["slope_s_per_gb"] * 1000, 1), num(f["kv_bandwidth_gb_s"], 2)] for f in fits(table_rows)]
    fit_header = ("variant", "batch", "points", "ITL p50 at 0 KV ms", "ms per GB of KV read", "KV read GB/s")
    w = worst(table_rows)
    w_itl = worst(table_rows, "itl_residual")
    waited = [r for r in table_rows if r["other_engines"]]
    return fill(
        "latency", command=result.command, created_at=result.created_at, finished_at=result.finished_at or "?",
        wall_min=num((result.wall_s or 0) / 60, 1), budget=num(result.budget_bytes, 0),
        blocks=", ".join(f"{m.name} {m.usable_blocks}" for m in result.models), block_size=e.block_size,
        dtype=e.dtype, max_model_len=e.max_model_len, batched=e.max_num_batched_tokens or "default",
        max_num_seqs=e.max_num_seqs, eager="eager" if e.enforce_eager else "compiled",
        output_tokens=spec.output_tokens, batches=", ".join(map(str, spec.load.batches)), order=spec.load.order,
        bandwidth=f"{hw['bandwidth'] / 1e9:.2f}", peak=f"{(hw.get('peak_flops') or 0) / 1e9:.1f}",
        hw_source=hw.get("source", ""), hw_file=hw.get("file", ""),
        table=table(header, point_rows), crossover=table(cross_header, cross),
        fits=table(fit_header, fit_rows),
        worst=fill("latency_worst", variant=w["variant"], batch=w["batch"], prompt=f"{w['prompt_tokens']:,}",
                   measured=_ms(w["tpot_p50_s"]), predicted=_ms(w["predicted_tpot_s"]),
                   residual=_pct(w["tpot_residual"]), itl=_ms(w["itl_p50_s"]),
                   itl_residual=_pct(w["itl_residual"]),
                   worst_itl=f"{w_itl['variant']} batch {w_itl['batch']} prompt {w_itl['prompt_tokens']:,}: "
                             f"{_pct(w_itl['itl_residual'])}" if w_itl else "-") if w else "",
        noisy=fill("latency_noisy", count=len(waited), total=len(table_rows)),
        image=f"![latency]({image})\n\n" if image else "",
        explain=fill("latency_explain", peak=f"{(hw.get('peak_flops') or 0) / 1e9:.1f}", dtype=e.dtype,
                     **explain_figures(table_rows, result.models)),
        notes="".join(f"\n\n{n}" for n in result.notes),
    )


def write_latency_report(result: LatencyResult, out_dir: Path, plots: bool = True) -> list[Path]:
    """``latency.png`` (and the rows as ``latency-rows.json``) into ``out_dir``."""
    import json

    table_rows = rows(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "latency-rows.json"]
    written[0].write_text(json.dumps({"rows": table_rows, "fits": fits(table_rows)}, indent=1) + "\n")
    if plots and table_rows:
        written.append(plot(result, table_rows, out_dir / "latency.png"))
    return written
