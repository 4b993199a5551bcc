"""``python -m loadtest kv-heads --conversations``: run the conversation experiment (or
re-render it), save ``conversations/result.json`` and rebuild the KV-heads report with its
conversation section."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from loadtest.core.results import save
from loadtest.kvheads.conversations import ConversationSpec, load_conversation_spec
from loadtest.kvheads.conversations_report import write
from loadtest.kvheads.conversations_run import ConversationsResult, load_conversations, run_conversations
from loadtest.kvheads.plan import ROOT
from loadtest.kvheads.procs import log
from loadtest.kvheads.report import write_report
from loadtest.kvheads.result import load_result
from loadtest.kvheads.spec import select_variants
from service.resources import config_file

DEFAULT_CONFIG = config_file("loadtest", "kv-heads-conversations-cpu.yaml")


def spec_from_args(args: argparse.Namespace) -> ConversationSpec:
    spec = load_conversation_spec(args.config or DEFAULT_CONFIG)
    if args.variants:
        spec.variants = select_variants(spec.variants, args.variants)
    if args.concurrency:
        spec.load.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.output_dir:
        spec.output.dir = args.output_dir
    if args.log_dir:
        spec.output.log_dir = args.log_dir
    return ConversationSpec.model_validate(spec.model_dump())


def portable(result: ConversationsResult) -> ConversationsResult:
    """The result with the project's own folder left out of every path and log line (paths
    relative to it), so no machine path lands in a committed result."""
    text = result.model_dump_json().replace(f"{ROOT}/", "").replace(str(ROOT), ".")
    return ConversationsResult.model_validate_json(text)


def rebuild(out_dir: Path, plots: bool) -> list[Path]:
    """The section's own files in ``out_dir``, and the KV-heads report of the folder above it
    (when that folder holds a kv-heads result.json), which includes the section."""
    result = load_conversations(out_dir / "result.json")
    _, written = write(result, out_dir, plots)
    parent = out_dir.parent / "result.json"
    if parent.is_file():
        written += write_report(load_result(parent), out_dir.parent, plots=plots)
    else:
        log(f"no kv-heads result at {parent}: only {out_dir / 'summary.md'} was written")
    return written


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.report_only:
        written = rebuild(Path(args.report_only).parent, not args.no_plots)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    spec = spec_from_args(args)
    out_dir = spec.output.dir
    result = run_conversations(spec, argv, spec.output.log_dir or out_dir / "logs", dry_run=args.dry_run)
    if args.dry_run:
        return 0
    save(portable(result), out_dir / "result.json")
    written = [out_dir / "result.json", *rebuild(out_dir, not args.no_plots)]
    log(f"done in {result.wall_s or 0:.0f} s; wrote " + ", ".join(str(p) for p in written))
    return 1 if any(v.error or v.run is None for v in result.variants) else 0
