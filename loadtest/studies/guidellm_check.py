"""Cross-check of this load client against GuideLLM (docs/loadtest.md, "Cross-check against
GuideLLM"): our figures recomputed with GuideLLM's definitions from our per-request records,
GuideLLM's own figures read from its JSON output (``guidellm run --output kind=json``), one
table. GuideLLM is a measuring tool here, not a dependency: this module only reads its file.

Definitions (request i: send s_i, first content chunk f_i, last token chunk l_i, n_i output
tokens; all means over successful requests):

- TTFT                       = mean(f_i - s_i)                    (both tools)
- vLLM TPOT = GuideLLM "ITL" = mean((l_i - f_i) / (n_i - 1))      (GuideLLM ``inter_token_latency_ms``)
- GuideLLM "TPOT"            = mean((l_i - s_i) / n_i)            (``time_per_output_token_ms``, first token included)
- our ITL                    = mean of every gap between content chunks, pooled (GuideLLM has none)
- output throughput (ours)   = sum n_i / (last end - first send)
- GuideLLM output tok/s      = the mean of its ``output_tokens_per_second`` rate distribution
  (tokens per unit time around each token event, over its measurement window); beside it,
  sum n_i / (last request end - first request start) from its per-request records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.core.metrics import output_token_count
from loadtest.core.results import StepResult, load

FIGURES = (
    ("ttft_ms", "mean TTFT ms"),
    ("tpot_ms", "mean TPOT ms (vLLM) = GuideLLM ITL"),
    ("guidellm_tpot_ms", "mean GuideLLM TPOT ms (incl. 1st token)"),
    ("itl_ms", "mean ITL ms (pooled chunk gaps)"),
    ("e2e_ms", "mean E2E ms"),
    ("output_tok_s", "output tok/s (sum n / span)"),
    ("output_tok_s_guidellm", "GuideLLM output_tokens_per_second mean"),
)


def ours(step: StepResult) -> dict[str, float | None]:
    """Our figures, and GuideLLM's TPOT recomputed from our per-request records."""
    ok = [r for r in step.requests if r.success and r.ttft_s is not None and r.e2e_s is not None]
    n = [output_token_count(r) for r in ok]
    tpots = [(r.e2e_s - r.ttft_s) / (k - 1) for r, k in zip(ok, n, strict=True) if k > 1]  # type: ignore[operator]
    s = step.summary
    return {
        "requests": len(ok),
        "ttft_ms": 1000 * statistics.fmean(r.ttft_s for r in ok) if ok else None,  # type: ignore[misc]
        "tpot_ms": 1000 * statistics.fmean(tpots) if tpots else None,
        "guidellm_tpot_ms": 1000 * statistics.fmean(r.e2e_s / k for r, k in zip(ok, n, strict=True) if k)  # type: ignore[operator]
        if ok else None,
        "itl_ms": None if s.itl_s.mean is None else 1000 * s.itl_s.mean,
        "e2e_ms": 1000 * statistics.fmean(r.e2e_s for r in ok) if ok else None,  # type: ignore[misc]
        "output_tok_s": s.output_throughput,
        "output_tok_s_guidellm": None,
        "output_tokens": sum(n),
        "duration_s": s.duration_s,
    }


def _mean(metrics: dict[str, Any], name: str) -> float | None:
    try:
        return float(metrics[name]["successful"]["mean"])
    except (KeyError, TypeError, ValueError):
        return None


def guidellm(doc: dict[str, Any]) -> dict[str, float | None]:
    """GuideLLM's figures from its JSON (the first benchmark), under the same keys."""
    bench = doc["benchmarks"][0]
    m = bench["metrics"]
    reqs = bench.get("requests", {}).get("successful", []) or []
    timings = [r.get("info", {}).get("timings", {}) for r in reqs]
    starts = [t["request_start"] for t in timings if t.get("request_start") is not None]
    ends = [t.get("request_end") or t.get("resolve_end") for t in timings]
    ends = [e for e in ends if e is not None]
    out_tokens = sum(int(r.get("output_tokens") or 0) for r in reqs)
    span = (max(ends) - min(starts)) if starts and ends else None
    latency = _mean(m, "request_latency")
    return {
        "requests": len(reqs),
        "ttft_ms": _mean(m, "time_to_first_token_ms"),
        "tpot_ms": _mean(m, "inter_token_latency_ms"),
        "guidellm_tpot_ms": _mean(m, "time_per_output_token_ms"),
        "itl_ms": None,
        "e2e_ms": None if latency is None else 1000 * latency,
        "output_tok_s": out_tokens / span if span else None,
        "output_tok_s_guidellm": _mean(m, "output_tokens_per_second"),
        "output_tokens": out_tokens,
        "duration_s": bench.get("duration"),
    }


def markdown(runs: Sequence[tuple[str, dict[str, float | None]]]) -> str:
    """One row per run; the last columns compare each run with the mean of our runs."""
    head = ["run", "requests", "output tokens", *(label for _, label in FIGURES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    base = {k: [f[k] for name, f in runs if name.startswith("ours") and f.get(k) is not None] for k, _ in FIGURES}
    for name, f in runs:
        cells = [name, str(f.get("requests")), str(f.get("output_tokens"))]
        for key, _ in FIGURES:
            value = f.get(key)
            ref = statistics.fmean(base[key]) if base[key] else None  # type: ignore[arg-type]
            diff = f" ({100 * (value / ref - 1):+.1f}%)" if value is not None and ref and not name.startswith("ours") else ""
            cells.append("-" if value is None else f"{value:,.1f}{diff}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("guidellm-check", help=(__doc__ or "").split("\n")[0])
    p.add_argument("--ours", nargs="+", type=Path, default=[], help="result.json of `python -m loadtest run`")
    p.add_argument("--guidellm", nargs="+", type=Path, default=[], help="GuideLLM's --output kind=json files")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    runs: list[tuple[str, dict[str, float | None]]] = []
    for i, path in enumerate(args.ours, 1):
        runs.append((f"ours {i}", ours(load(path).steps[0])))
    for i, path in enumerate(args.guidellm, 1):
        runs.append((f"GuideLLM {i}", guidellm(json.loads(path.read_text()))))
    if args.json:
        args.json.write_text(json.dumps(dict(runs), indent=1) + "\n")
    sys.stdout.write(markdown(runs) + "\n")
    return 0

