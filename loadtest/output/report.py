"""Markdown summary of one or several runs, and the report files (Markdown + plots).

``python -m loadtest report A.json B.json`` puts every step of every run in one
client-side table and one server-side table, and draws the runs in one set of plots.
Runs whose server offered per-request figures (joined by request id) get one more table
and a link to their per-request KV plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loadtest.output.plots import request_kv_plot_name, write_plots
from loadtest.output.text import num, table_lines
from loadtest.output.turns import plot_turns, turns_markdown
from loadtest.core.results import Distribution, RequestMetricsJoin, RunResult, StepResult


def unique_labels(results: Sequence[RunResult]) -> list[RunResult]:
    """Copies whose labels are distinct (``label #2`` for a repeated one)."""
    seen: dict[str, int] = {}
    unique = []
    for run in results:
        seen[run.label] = seen.get(run.label, 0) + 1
        label = run.label if seen[run.label] == 1 else f"{run.label} #{seen[run.label]}"
        unique.append(run.model_copy(update={"label": label}))
    return unique


def _num(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return num(value, digits, scale, grouping=False)


def _ms(dist: Distribution, field: str) -> str:
    return _num(getattr(dist, field), 1, 1000.0)


def _client_row(run: RunResult, step: StepResult) -> list[str]:
    s = step.summary
    return [
        run.label,
        step.label,
        f"{s.completed}/{s.completed + s.failed}",
        _num(s.duration_s),
        _num(s.request_throughput, 2),
        _num(s.output_throughput, 1),
        _num(s.goodput, 2),
        _ms(s.ttft_s, "mean"),
        _ms(s.ttft_s, "p50"),
        _ms(s.ttft_s, "p99"),
        _ms(s.tpot_s, "mean"),
        _ms(s.tpot_s, "p99"),
        _ms(s.itl_s, "p50"),
        _ms(s.itl_s, "p99"),
        _ms(s.e2e_s, "p50"),
        _ms(s.e2e_s, "p99"),
        str(s.peak_client_concurrency),
    ]


_CLIENT_HEADER = (
    "run", "step", "ok/sent", "duration s", "req/s", "out tok/s", "goodput req/s",
    "TTFT mean ms", "TTFT p50", "TTFT p99", "TPOT mean ms", "TPOT p99", "ITL p50 ms", "ITL p99",
    "E2E p50 ms", "E2E p99", "peak in flight",
)  # fmt: skip

_SERVER_HEADER = (
    "run", "step", "source", "KV peak %", "KV mean %", "running peak", "waiting peak",
    "running median / mode while waiting", "preemptions", "KV used bytes/req", "KV alloc bytes/req",
    "predicted max conc. (mean req / max len)",
)  # fmt: skip


_JOINED_HEADER = (
    "run", "step", "joined/sent", "KV held p50 bytes", "KV held p99", "KV held max", "KV allocated p50",
    "KV byte-s mean", "queue p99 ms",
)  # fmt: skip


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _joined_row(run: RunResult, step: StepResult) -> list[str]:
    j = step.request_metrics
    assert j is not None
    return [
        run.label,
        step.label,
        f"{j.joined}/{j.requests}",
        _bytes(j.kv_used_bytes.p50),
        _bytes(j.kv_used_bytes.p99),
        _bytes(j.kv_used_bytes.max),
        _bytes(j.kv_allocated_bytes.p50),
        _num(j.kv_byte_seconds.mean, 1),
        _ms(j.queue_seconds, "p99"),
    ]


def _join_line(run: RunResult, join: RequestMetricsJoin) -> str:
    if join.status == "off":
        return f"- {run.label}: not looked up (`--no-request-metrics`)"
    if join.status == "joined":
        sent = sum(len(step.requests) for step in run.steps)
        text = f"joined {join.joined} of {sent} requests by request id"
        text += f" ({join.lookups} lookups, {join.duration_s:.1f} s)"
    else:
        text = "no per-request figures"
    return f"- {run.label}: {text}" + (f"; {join.note}" if join.note else "")


def _request_metrics(results: Sequence[RunResult], plots: bool) -> list[str]:
    """The per-request server figures section, empty when no run looked them up."""
    runs = [(r, r.request_metrics) for r in results if r.request_metrics is not None]
    if not runs:
        return []
    lines = ["", "## Server figures per request (`GET /v1/requests/{id}/metrics`)", ""]
    lines += [_join_line(run, join) for run, join in runs]
    rows = [_joined_row(r, s) for r, _ in runs for s in r.steps if s.request_metrics is not None]
    if rows:
        lines += ["", "KV held: the server's `kv_used_bytes` of each request; byte-s: its `kv_byte_seconds`.", ""]
        lines += table_lines(_JOINED_HEADER, rows)
    names = [(run.label, request_kv_plot_name(run)) for run, _ in runs] if plots else []
    links = [f"![{label}: KV bytes held against TTFT and TPOT]({name})" for label, name in names if name]
    return lines + ["", *links] if links else lines


def _per_request(step: StepResult, name: str) -> str:
    assert step.server is not None
    value = step.server.per_request.get(name)
    return "-" if value is None or value.mean is None else f"{value.mean:,.0f}"


def _server_row(run: RunResult, step: StepResult) -> list[str]:
    v = step.server
    assert v is not None
    return [
        run.label,
        step.label,
        v.source or "-",
        _num(v.kv_usage_peak, 1, 100.0),
        _num(v.kv_usage_mean, 1, 100.0),
        _num(v.running_peak, 0),
        _num(v.waiting_peak, 0),
        f"{_num(v.running_median_while_waiting, 1)} / {_num(v.running_mode_while_waiting, 0)}",
        _num(v.preemptions, 0),
        _per_request(step, "kv_used_bytes"),
        _per_request(step, "kv_allocated_bytes"),
        f"{_num(v.predicted_max_concurrency_mean_request, 1)} / {_num(v.predicted_max_concurrency_max_model_len, 1)}",
    ]


def _run_line(run: RunResult) -> str:
    c = run.config
    w = c.workload
    source = {"jsonl": f"JSONL {w.jsonl}", "random": f"random {w.input_tokens} in"}.get(
        w.source, f"{w.source} {w.dataset or ''}".strip()
    )
    load = c.load
    shape = {
        "concurrency": f"concurrency {load.concurrency}",
        "speedup": f"trace replay x{load.speedup}",
    }.get(load.shape, f"rate {load.rate}/s {load.arrival} (burstiness {load.burstiness:g})")
    bounds = " and ".join(
        b for b in (
            f"{load.num_requests} requests" if load.num_requests else "",
            f"{load.duration_s:g} s" if load.duration_s else "",
        ) if b
    )  # fmt: skip
    return (
        f"- **{run.label}**: `{c.target.model}` at {c.target.base_url} ({c.target.endpoint}), {source} / "
        f"{w.output_tokens} out, ignore_eos={w.ignore_eos}, {shape}, {bounds} per step, "
        f"{run.warmup.requests} warm-up, seed {load.seed}; {run.created_at} on {run.environment.hostname}"
    )


def _notes(run: RunResult, step: StepResult) -> list[str]:
    s = step.summary
    notes = []
    if s.failures:
        notes.append("failures " + ", ".join(f"{k}: {n}" for k, n in s.failures.items()))
    checks = s.token_checks
    for name, count in checks.model_dump().items():
        if count:
            notes.append(f"{name.replace('_', ' ')}: {count}")
    return [f"- {run.label}, {step.label}: " + "; ".join(notes)] if notes else []


def markdown(results: Sequence[RunResult], plots: bool = True) -> str:
    """The summary: run descriptions, client table, server table, per-request server figures
    (with a link to their plot when ``plots``), failures and checks."""
    lines = ["# Load test summary", ""]
    lines += [_run_line(run) for run in results]
    lines += ["", "## Client side", "", "Definitions: docs/loadtest.md. Latencies in ms.", ""]
    lines += table_lines(_CLIENT_HEADER, [_client_row(r, s) for r in results for s in r.steps])
    with_server = [(r, s) for r in results for s in r.steps if s.server is not None and s.server.scrapes]
    if with_server:
        lines += ["", "## Server side (/metrics)", ""]
        lines += table_lines(_SERVER_HEADER, [_server_row(r, s) for r, s in with_server])
    lines += _request_metrics(results, plots)
    lines += turns_markdown(results)
    if plots and any(s.requests and s.requests[0].turn is not None for r in results for s in r.steps):
        lines += ["", "![by turn](turns.png)"]
    notes = [line for r in results for s in r.steps for line in _notes(r, s)]
    if notes:
        lines += ["", "## Failures and token-count checks", "", *notes]
    return "\n".join(lines) + "\n"


def write_report(results: Sequence[RunResult], out_dir: Path, plots: bool = True) -> list[Path]:
    """``summary.md`` and (optionally) the plots into ``out_dir``; returns the files."""
    results = unique_labels(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "summary.md"
    summary.write_text(markdown(results, plots))
    written = [summary, *(write_plots(results, out_dir) if plots else [])]
    turns = plot_turns(results, out_dir / "turns.png") if plots else None
    return written + ([turns] if turns is not None else [])
