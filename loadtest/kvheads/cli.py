"""``python -m loadtest kv-heads``: flags over the spec, run, save, report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from loadtest.kvheads.procs import log
from loadtest.kvheads.report import markdown_path, write_report
from loadtest.kvheads.result import load_result, strip_itl
from loadtest.core.results import save
from loadtest.kvheads.run import run_managed, run_targets
from loadtest.kvheads.spec import DEFAULT_CONFIG, BudgetSpec, KvHeadsSpec, load_spec, parse_targets, select_variants


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kv-heads",
        help="the KV-heads experiment: MHA/GQA/MQA under one KV byte budget (docs/results/kv-heads-cpu.md)",
    )
    p.add_argument("--config", type=Path, default=None, help="spec YAML (default configs/loadtest/kv-heads-cpu.yaml)")
    p.add_argument("--variants", help="run only these variant names, e.g. MHA,MQA")
    p.add_argument("--targets", help="already running servers instead: name=url[#model],... (no engine is started)")
    p.add_argument("--tokenizer", type=Path, help="local HF tokenizer folder (default: the first variant's)")
    p.add_argument("--concurrency", help="sweep, e.g. 1,4,8,16,32,48")
    p.add_argument("--input-tokens", type=int)
    p.add_argument("--output-tokens", type=int)
    p.add_argument("--budget-blocks", type=int, help="budget = N blocks of the largest-KV variant")
    p.add_argument("--budget-bytes", type=int)
    p.add_argument("--waves", type=float, help="requests per step = waves x concurrency (>= min_requests)")
    p.add_argument("--max-step-seconds", type=float, help="no new request after this many seconds of a step")
    p.add_argument("--output-dir", type=Path, help="JSON + PNGs; the Markdown goes beside it as DIR.md")
    p.add_argument("--log-dir", type=Path, help="raw gateway logs (default: <output-dir>/logs)")
    p.add_argument("--keep-itl", action="store_true", help="keep per-request inter-token gaps in the JSON")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the gateway commands, start nothing")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each engine start, wait up to SECONDS while another vLLM engine runs here")
    p.add_argument("--report-only", type=Path, metavar="RESULT.json", help="rebuild the report from a result file")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--latency", action="store_true",
                   help="the latency sweep per variant instead (configs/loadtest/kv-heads-latency-cpu.yaml): "
                        "TPOT/ITL against the decode roofline; --report-only then takes its latency.json")
    p.add_argument("--conversations", action="store_true",
                   help="the conversation experiment instead (configs/loadtest/kv-heads-conversations-cpu.yaml): "
                        "multi-turn sessions with prefix caching; --report-only then takes its result.json")
    p.set_defaults(handler=main)


def spec_from_args(args: argparse.Namespace) -> KvHeadsSpec:
    spec = load_spec(args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() and not args.targets else None))
    if args.targets:
        spec.targets = parse_targets(args.targets)
        spec.variants = []
    if args.variants:
        spec.variants = select_variants(spec.variants, args.variants)
    if args.tokenizer:
        spec.workload.tokenizer = args.tokenizer
    if args.concurrency:
        spec.load.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    for flag, section, field in (
        ("input_tokens", spec.workload, "input_tokens"), ("output_tokens", spec.workload, "output_tokens"),
        ("waves", spec.load, "waves"), ("max_step_seconds", spec.load, "max_step_seconds"),
    ):  # fmt: skip
        if getattr(args, flag) is not None:
            setattr(section, field, getattr(args, flag))
    if args.budget_blocks is not None or args.budget_bytes is not None:
        spec.budget = BudgetSpec(blocks_of_largest=args.budget_blocks, bytes=args.budget_bytes)
    if args.output_dir:
        spec.output.dir = args.output_dir
    if args.log_dir:
        spec.output.log_dir = args.log_dir
    if args.keep_itl:
        spec.output.keep_itl = True
    spec = KvHeadsSpec.model_validate(spec.model_dump())  # re-validate the overrides
    if not spec.variants and not spec.targets:
        raise ValueError("nothing to run: the spec has no variants and no --targets were given")
    return spec


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.latency:
        from loadtest.kvheads import latency_cli

        return latency_cli.main(args, argv)
    if args.conversations:
        from loadtest.kvheads import conversations_cli

        return conversations_cli.main(args, argv)
    if args.report_only:
        result = load_result(args.report_only)
        out_dir = args.output_dir or args.report_only.parent
        written = write_report(result, out_dir, plots=not args.no_plots)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    spec = spec_from_args(args)
    out_dir = spec.output.dir
    log_dir = spec.output.log_dir or out_dir / "logs"
    if spec.mode == "managed":
        result = run_managed(spec, argv, log_dir, dry_run=args.dry_run, wait_idle_s=args.wait_idle)
        if args.dry_run:
            return 0
    else:
        result = run_targets(spec, argv)
    if not spec.output.keep_itl:
        for v in result.variants:
            if v.run is not None:
                v.run = strip_itl(v.run)
    written = [save(result, out_dir / "result.json")]
    written += write_report(result, out_dir, plots=not args.no_plots)
    log(f"done in {result.wall_s or 0:.0f} s; wrote " + ", ".join(str(p) for p in written))
    log(f"report: {markdown_path(out_dir)}")
    failed = [v.plan.name for v in result.variants if v.error or v.run is None]
    return 1 if failed else 0
