"""Report of the KV-heads experiment: Markdown + PNGs, rebuilt from the JSON alone.

``write_report(result, DIR)`` writes ``DIR/*.png`` and ``DIR.md`` beside the folder
(e.g. ``docs/results/kv-heads-cpu/`` and ``docs/results/kv-heads-cpu.md``). The prose is
in ``templates/report.md``; this module computes the figures and tables that fill it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loadtest.kvheads import explain
from loadtest.kvheads import conversations_report, latency_report
from loadtest.kvheads.conversations_run import load_conversations
from loadtest.kvheads import plots as charts
from loadtest.kvheads.latency_run import load_latency
from loadtest.kvheads.measure import Measured, measure, ratios, step_sustained, waiting_fraction, within
from loadtest.kvheads.prose import fill, mib, num, table
from loadtest.kvheads.plots import heads, pooled_mean
from loadtest.kvheads.result import KvHeadsResult, VariantRun

Runs = list[tuple[VariantRun, Measured | None]]


def markdown_path(out_dir: Path) -> Path:
    """``DIR.md`` beside the asset folder ``DIR``."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.md"


def _runs(result: KvHeadsResult) -> Runs:
    fraction = result.spec.criteria.saturation_fraction
    return [(v, measure(v.run, fraction) if v.run is not None else None) for v in result.variants]


def _setup(result: KvHeadsResult) -> str:
    s = result.spec
    w, e, load = s.workload, s.engine, s.load
    rows = []
    for v in result.variants:
        p = v.plan
        rows.append([
            p.name, p.kind or "-", f"`{p.model}`", num(p.kv_heads, 0) if p.kv_heads else "-",
            num(p.kv_bytes_per_token, 0), num(p.kv_bytes_per_block, 0),
            f"{p.num_blocks} + {p.reserved_blocks}" if p.num_blocks is not None else "-",
            num(p.budget_bytes, 0), num(v.engine_check.get("kv_blocks"), 0),
        ])  # fmt: skip
    header = ("variant", "kind", "model", "KV heads", "KV B/token", "KV B/block", "blocks (usable + null)",
              "usable KV bytes", "engine blocks (/metrics)")
    lines = [fill(
        "setup", table=table(header, rows), input_tokens=w.input_tokens, output_tokens=w.output_tokens,
        endpoint=w.endpoint, seed=load.seed,
        steps=", ".join(f"{c} ({load.requests_for(c)} req)" for c in load.concurrency),
        max_step_seconds=num(load.max_step_seconds, 0), warmup=load.warmup_requests,
        scrape_interval=f"{load.scrape_interval_s:g}", block_size=e.block_size, max_model_len=e.max_model_len,
        max_num_seqs=e.max_num_seqs, prefix_caching="on" if e.enable_prefix_caching else "off",
        eager="eager" if e.enforce_eager else "compiled", dtype=e.dtype,
        batched_tokens=f", max_num_batched_tokens {e.max_num_batched_tokens}" if e.max_num_batched_tokens else "",
    )]  # fmt: skip
    if result.mode == "managed" and result.variants:
        p = result.variants[0].plan
        growth = fill("setup_sequence_grows" if p.grows_after_admission else "setup_sequence_fixed")
        lines.append(fill("setup_sequence", tokens=p.kv_tokens_per_seq, blocks=p.blocks_per_seq,
                          block_size=p.block_size, admission=p.admission_blocks_per_seq, growth=growth))
        lines.append(fill("setup_budget", budget=num(result.budget_bytes, 0),
                          blocks_of_largest=result.spec.budget.blocks_of_largest or "-", reserved=p.reserved_blocks))
    lines += [fill("warning", warning=warning) for warning in result.warnings]
    return "\n".join(lines)


def _capacity(result: KvHeadsResult, runs: Runs) -> str:
    tol = result.spec.criteria.tolerance
    rows = []
    for v, m in runs:
        p = v.plan
        sus = m.sustained if m else None
        ok = within(sus.median if sus else None, p.predicted_running, tol)
        rows.append([
            p.name, num(p.predicted_max_seqs, 1), num(p.predicted_running, 0),
            num(sus.median if sus else None, 1), num(sus.mode if sus else None, 0),
            num(m.running_peak if m else None, 0), str(sus.samples if sus else 0),
            ", ".join(map(str, m.saturated_concurrencies)) if m and m.saturated_concurrencies else "none",
            num(m.preemptions if m else None, 0),
            "-" if ok is None else ("yes" if ok else "**no**"),
        ])  # fmt: skip
    header = ("variant", "planner max seqs", "predicted running", "measured median", "mode", "peak", "samples",
              "saturated at concurrency", "preemptions", f"within {tol:.0%}")

    def fmt(values: list[float | None]) -> str:
        return " : ".join("-" if r is None else f"{r:.2f}" for r in ratios(values))

    text = fill(
        "capacity", fraction=f"{result.spec.criteria.saturation_fraction:.0%}", table=table(header, rows),
        names=":".join(v.plan.name for v, _ in runs), predicted=fmt([v.plan.predicted_running for v, _ in runs]),
        measured=fmt([m.sustained.median if m else None for _, m in runs]),
    )
    note = _gateway_gauge_note(runs)
    return text + ("\n\n" + note if note else "")


def _gateway_gauge_note(runs: Runs) -> str:
    """What the gateway's own capacity gauge said, beside the experiment's prediction."""
    read = []
    for v, _ in runs:
        last = v.run.steps[-1].server if v.run and v.run.steps else None
        value = last.predicted_max_concurrency_mean_request if last else None
        if value is not None:
            read.append((v.plan, value))
    if not read:
        return ""
    off = [p for p, value in read if p.engine_blocks is not None and p.num_blocks is not None
           and p.engine_blocks != p.num_blocks and value == p.engine_blocks / p.blocks_per_seq]  # fmt: skip
    return fill("gauge_note", figures=", ".join(f"{p.name} {value:g}" for p, value in read),
                off=fill("gauge_note_off") if off else ".")


def _onsets(runs: Runs) -> str:
    rows = []
    for v, m in runs:
        if v.run is None or m is None:
            continue
        steps = sorted(v.run.steps, key=lambda s: s.x)
        service = steps[0].summary.e2e_s.p50 if steps else None
        jump = next(
            (int(s.x) for s in steps if service and s.summary.ttft_s.p99 and s.summary.ttft_s.p99 > service), None
        )
        rows.append([v.plan.name, num(v.plan.predicted_running, 0), str(m.queueing_from or "never"),
                     str(jump or "never"), str(m.preemptions_from or "never")])  # fmt: skip
    header = ("variant", "predicted capacity", "sustained queue from", "TTFT p99 > one request's E2E from",
              "preemptions from")
    return fill("onsets", table=table(header, rows))


def _kv_and_attention(runs: Runs) -> str:
    rows = []
    reads = []
    for v, _ in runs:
        prefill = pooled_mean(v, "attention_flops_prefill")
        decode = pooled_mean(v, "attention_flops_decode")
        read = pooled_mean(v, "kv_read_bytes")
        reads.append(read)
        intensity = (decode / read) if decode and read else None
        rows.append([
            v.plan.name, num(v.plan.kv_heads, 0) if v.plan.kv_heads else "-", mib(pooled_mean(v, "kv_used_bytes")),
            mib(pooled_mean(v, "kv_allocated_bytes")), mib(pooled_mean(v, "kv_mha_equivalent_bytes")),
            num(None if prefill is None else prefill / 1e9, 3), num(None if decode is None else decode / 1e9, 3),
            mib(read), num(intensity, 2),
        ])  # fmt: skip
    header = ("variant", "KV heads", "KV used MiB/req", "KV allocated MiB/req", "MHA-equivalent MiB/req",
              "prefill attn GFLOP/req", "decode attn GFLOP/req", "decode KV read MiB/req",
              "decode FLOP per KV byte read")
    relative = " : ".join("-" if r is None else f"{r:.3f}" for r in ratios(reads))
    return fill("kv_attention", table=table(header, rows), relative=relative)


def _steps(result: KvHeadsResult, runs: Runs) -> str:
    fraction = result.spec.criteria.saturation_fraction
    rows = []
    for v, _ in runs:
        if v.run is None:
            continue
        for step in v.run.steps:
            s, srv = step.summary, step.server
            rows.append([
                v.plan.name, str(step.concurrency), f"{s.completed}/{s.completed + s.failed}", num(s.duration_s),
                num(s.request_throughput, 2), num(s.output_throughput),
                num(s.ttft_s.p50, 0, 1000), num(s.ttft_s.p99, 0, 1000), num(s.tpot_s.p50, 1, 1000),
                num(srv.running_mean if srv else None), num(step_sustained(step, fraction).median),
                num(srv.running_peak if srv else None, 0), num(srv.waiting_peak if srv else None, 0),
                f"{waiting_fraction(step):.0%}", num(srv.preemptions if srv else None, 0),
                num(100 * srv.kv_usage_peak if srv and srv.kv_usage_peak is not None else None, 0),
            ])  # fmt: skip
    header = ("variant", "concurrency", "ok/sent", "duration s", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms",
              "TPOT p50 ms", "running mean", "running median while waiting", "running peak", "waiting peak",
              "scrapes with queue", "preemptions", "KV peak %")
    return fill("steps", table=table(header, rows))


_KEY_LOG = re.compile(
    r"engine ready in|Overriding num_gpu_blocks|KV cache size|Maximum concurrency|Reducing Torch threads|"
    r"\bERROR\b|Traceback|Error:|force killing"
)


def _logs(result: KvHeadsResult) -> str:
    lines = [fill("logs"), ""]
    for v in result.variants:
        facts = []
        if v.engine_start_s is not None:
            facts.append(fill("log_ready", seconds=f"{v.engine_start_s:.1f}"))
        if v.wall_s is not None:
            facts.append(fill("log_wall", seconds=f"{v.wall_s:.0f}"))
        if v.engine_check.get("kv_blocks") is not None:
            facts.append(fill("log_metrics", blocks=f"{v.engine_check['kv_blocks']:.0f}",
                              bytes_per_token=num(v.engine_check.get("kv_bytes_per_token"), 0)))
        if v.waited_for_idle_s and v.waited_for_idle_s >= 1:
            facts.append(fill("log_waited", seconds=f"{v.waited_for_idle_s:.0f}"))
        if v.other_engines_seen:
            kept = [k for k in v.other_engines_seen if "kept" in k]
            facts.append(fill(
                "log_others", seen=", ".join(f"{k}: pids {p}" for k, p in v.other_engines_seen.items()),
                kept=fill("log_kept", steps=", ".join(kept)) if kept else "",
            ))
        elif result.mode == "managed":
            facts.append(fill("log_alone"))
        if v.error:
            facts.append(fill("log_error", error=v.error))
        key = [line for line in v.log_summary if _KEY_LOG.search(line)]
        if others := len(v.log_summary) - len(key):
            facts.append(fill("log_generic", count=others))
        lines.append(f"- **{v.plan.name}**: " + "; ".join(facts or [fill("log_none")]))
        lines += [f"  - `{line}`" for line in key]
    return "\n".join(lines)


def markdown(result: KvHeadsResult, image_dir: str | None = None, result_path: str = "RESULT.json",
             latency: str = "", conversations: str = "") -> str:
    """The report; ``image_dir`` is the PNG folder relative to the Markdown file (None: no images);
    ``latency``: the latency sweep's section (``latency_report.section``), if there is one."""
    runs = _runs(result)
    env = result.environment
    waited = sum(v.waited_for_idle_s or 0 for v in result.variants)
    wall = result.wall_s or 0
    return fill(
        "document", names=" vs ".join(v.plan.name for v in result.variants), command=result.command,
        created_at=result.created_at, finished_at=result.finished_at or "?", hostname=env.hostname,
        cpu_count=env.cpu_count, platform=env.platform, wall_min=num(wall / 60, 1),
        waited=fill("waited", waited_min=f"{waited / 60:.1f}", ran_min=f"{(wall - waited) / 60:.1f}")
        if waited >= 1 else "",
        python=env.python, versions=", ".join(f"{k} {v}" for k, v in env.packages.items() if v),
        result_path=result_path, setup=_setup(result), capacity=_capacity(result, runs),
        capacity_images=fill("capacity_images", dir=image_dir) + "\n\n" if image_dir else "",
        onsets=_onsets(runs), kv_attention=_kv_and_attention(runs),
        kv_attention_image=fill("kv_attention_image", dir=image_dir) + "\n\n" if image_dir else "",
        steps=_steps(result, runs), explain=explain.explain(result, runs, heads), logs=_logs(result),
        latency=latency + "\n\n" if latency else "",
        conversations=conversations + "\n\n" if conversations else "",
    ) + "\n"


def write_report(result: KvHeadsResult, out_dir: Path, plots: bool = True) -> list[Path]:
    """PNGs into ``out_dir`` and the Markdown as ``out_dir``.md beside it; returns the files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_path(out_dir)
    written: list[Path] = []
    if plots:
        written += [
            charts.plot_capacity(result, out_dir / "capacity.png"),
            charts.plot_sweep(result, out_dir / "sweep.png"),
            charts.plot_timeline(result, out_dir / "timeline.png"),
            charts.plot_kv_attention(result, out_dir / "kv_attention.png"),
        ]
    image_dir = os.path.relpath(out_dir, md.parent) if plots else None
    latency = ""
    if (out_dir / "latency.json").is_file():  # the latency sweep's result, written beside
        sweep = load_latency(out_dir / "latency.json")
        written += latency_report.write_latency_report(sweep, out_dir, plots)
        latency = latency_report.section(sweep, f"{image_dir}/latency.png" if plots else None)
    conversations = ""
    if (out_dir / "conversations" / "result.json").is_file():  # the conversation experiment's, below
        conv = load_conversations(out_dir / "conversations" / "result.json")
        conversations, more = conversations_report.write(conv, out_dir / "conversations", plots)
        written += more
    md.write_text(markdown(result, image_dir, str(out_dir / "result.json"), latency, conversations))
    return [md, *written]

