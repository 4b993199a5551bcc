"""``python -m loadtest kv-heads --latency``: run the latency sweep (or re-render it), save
``latency.json`` and rebuild the KV-heads report with its latency section."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from loadtest.kvheads.latency import LatencySpec, load_latency_spec
from loadtest.kvheads.latency_run import load_latency, run_latency
from loadtest.core.results import save
from loadtest.kvheads.spec import select_variants
from loadtest.kvheads.plan import resolve
from loadtest.kvheads.procs import log
from loadtest.kvheads.report import write_report
from loadtest.kvheads.result import load_result


def spec_from_args(args: argparse.Namespace) -> LatencySpec:
    spec = load_latency_spec(args.config)
    if args.variants:
        spec.variants = select_variants(spec.variants, args.variants)
    if args.output_tokens is not None:
        spec.output_tokens = args.output_tokens
    if args.output_dir:
        spec.output.dir = args.output_dir
    if args.log_dir:
        spec.output.log_dir = args.log_dir
    return LatencySpec.model_validate(spec.model_dump())


def rebuild_report(out_dir: Path, report: Path | None, plots: bool) -> list[Path]:
    """The KV-heads report (capacity + latency) beside ``out_dir``, from its result.json."""
    source = resolve(report) if report else out_dir / "result.json"
    if not Path(source).is_file():
        log(f"no kv-heads result at {source}: the latency section waits for one")
        return []
    return write_report(load_result(Path(source)), out_dir, plots=plots)


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.report_only:
        result = load_latency(args.report_only)
        out_dir = args.output_dir or args.report_only.parent
        written = rebuild_report(out_dir, result.spec.output.report, not args.no_plots)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    spec = spec_from_args(args)
    out_dir = spec.output.dir
    result = run_latency(spec, argv, spec.output.log_dir or out_dir / "logs", dry_run=args.dry_run)
    if args.dry_run:
        return 0
    written = [save(result, out_dir / "latency.json")]
    written += rebuild_report(out_dir, spec.output.report, not args.no_plots)
    log(f"done in {result.wall_s or 0:.0f} s; wrote " + ", ".join(str(p) for p in written))
    failed = [p for p in result.points if p.error or p.step is None]
    return 1 if failed else 0
