"""``python -m loadtest <command>``: the one command line of the load tester.

Every command is an argparse subcommand whose parser sets its ``handler``
(``handler(args, argv) -> exit status``): ``run``, ``report`` and ``selftest`` here, the
others in their own modules (``add_parser`` + ``main``). ``vllm-bench`` alone hands its
arguments to vLLM's own benchmark parser untouched.

Every ``run`` flag overrides the matching field of the ``--config`` YAML spec, which
overrides the built-in defaults (``loadtest.core.config``). Traffic goes only to
``--base-url`` (and its ``/metrics``, or ``--metrics-url``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import types
import typing
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from loadtest.kvheads import cli as kvheads
from loadtest.kvheads import gemmprobe
from loadtest.local import fakeserver
from loadtest.studies import attribution_bench, compare, fleet, fleet_bench, guidellm_check, hwprobe, soak, vllm_bench
from loadtest.core import results as results_io
from loadtest.core.config import CONVERSATION_SOURCES, Load, Output, Sessions, Target, TokenRange, Workload, load_config, parse_slo
from loadtest.core import samples
from loadtest.core.datasets import build_conversations
from loadtest.output.plots import slug
from loadtest.output.report import markdown, write_report
from loadtest.core.runner import prompts_needed
from loadtest.server.observed import ObservedRunner
from loadtest.studies.selftest import run_selftest
from loadtest.core.workload import build_workload, load_tokenizer

# Config sections whose scalar fields become `run` flags, in help order; a field's flag is its
# name with a trailing `_s` dropped and `_` as `-` (or the name below), its help its description.
_SECTIONS: list[tuple[tuple[str, ...], type[BaseModel], str]] = [
    (("target",), Target, "target"),
    (("workload",), Workload, "workload"),
    (("workload", "sessions"), Sessions, "conversations, datasets and traces (docs/loadtest.md)"),
    (("load",), Load, "load (one shape; a comma list is a sweep)"),
    (("output",), Output, "SLOs and output"),
]
_FLAG_NAMES = {"warmup_requests": "warmup", "dir": "output-dir", "think_time": "think-time-dist"}


def _flag_type(annotation: Any) -> dict[str, Any] | None:
    """argparse keywords for a field's type; None for a field without a flag of its own
    (booleans, lists, mappings, nested sections)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if annotation in (int, float, Path):
        return {"type": annotation}
    if annotation in (str, TokenRange):
        return {}
    return None


def config_flags() -> dict[str, tuple[tuple[str, ...], str, str, str, dict[str, Any]]]:
    """argparse dest -> (config section path, field, flag, help, argparse keywords), generated
    from the config model (the one table of which flag sets which field)."""
    out = {}
    for path, model, _ in _SECTIONS:
        for name, info in model.model_fields.items():
            kwargs = _flag_type(info.annotation)
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if kwargs is None or extra.get("flag") is False:
                continue
            flag = _FLAG_NAMES.get(name, name.removesuffix("_s").replace("_", "-"))
            default = info.get_default(call_default_factory=True)
            help_text = (info.description or name) + ("" if default is None else f" ({default})")
            out[flag.replace("-", "_")] = (path, name, f"--{flag}", help_text, kwargs)
    return out


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a load test against an OpenAI-compatible server", argument_default=argparse.SUPPRESS
    )
    p.add_argument("--config", type=Path, help="YAML spec (e.g. configs/loadtest/default.yaml)")
    groups = {path: p.add_argument_group(title) for path, _, title in _SECTIONS}
    for dest, (path, _, flag, help_text, kwargs) in config_flags().items():
        groups[path].add_argument(flag, dest=dest, help=help_text, **kwargs)
    t = groups[("target",)]
    t.add_argument("--api-key", help="bearer token (default: $OPENAI_API_KEY); never written to results")
    t.add_argument("--no-scrape", action="store_true", help="do not read /metrics")
    t.add_argument(
        "--no-request-metrics",
        action="store_true",
        help="after the run, do not read each request's server figures (GET /v1/requests/{id}/metrics)",
    )
    t.add_argument("--no-stream", action="store_true", help="non-streaming requests (TTFT = E2E)")
    w = groups[("workload",)]
    w.add_argument("--prompts-jsonl", type=Path, help="JSONL prompts instead of random ones")
    w.add_argument("--no-ignore-eos", action="store_true", help="do not send vLLM's ignore_eos")
    w.add_argument("--extra-body", help="JSON merged into every request body, e.g. '{\"min_tokens\": 8}'")
    c = groups[("workload", "sessions")]
    source = c.add_mutually_exclusive_group()
    source.add_argument("--sessions", action="store_true", help="synthetic multi-turn sessions (chat endpoint)")
    source.add_argument("--sharegpt", type=Path, help="ShareGPT JSON conversations, replayed turn by turn (chat)")
    source.add_argument("--azure-trace", type=Path, help="Azure LLM inference trace CSV, replayed on its own times")
    source.add_argument("--mooncake-trace", type=Path, help="Mooncake JSONL trace, replayed on its own times")
    c.add_argument("--no-dataset-lengths", action="store_true",
                   help="ShareGPT: answer lengths from --output-tokens, not from the dataset's answers")
    shape = groups[("load",)].add_mutually_exclusive_group()
    shape.add_argument("--concurrency", type=_int_list, help="closed loop, e.g. 1,4,16 (sessions for conversations)")
    shape.add_argument("--rate", type=_float_list, help="open loop requests (sessions)/s, e.g. 0.5,1,2")
    shape.add_argument("--speedup", type=_float_list, help="trace replay: arrival times divided by this, e.g. 1,4")
    o = groups[("output",)]
    o.add_argument("--slo", action="append", help="goodput SLO, repeatable: ttft=500ms tpot=50ms e2el=2s")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_run)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields set on the command line, as a nested dict."""
    given = vars(args)
    out: dict[str, dict[str, Any]] = {"target": {}, "workload": {}, "load": {}, "slo": {}, "output": {}}
    for dest, (path, field, *_) in config_flags().items():
        if dest in given:
            section = out[path[0]]
            for key in path[1:]:
                section = section.setdefault(key, {})
            section[field] = given[dest]
    if "duration" in given and "num_requests" not in given:
        out["load"]["num_requests"] = None
    if "concurrency" in given:
        out["load"].update(concurrency=given["concurrency"], rate=[], speedup=[])
    if "rate" in given:
        out["load"].update(rate=given["rate"], concurrency=[], speedup=[])
    if given.get("no_scrape"):
        out["target"]["scrape"] = False
    if given.get("no_request_metrics"):
        out["target"]["request_metrics"] = False
    if given.get("no_stream"):
        out["target"]["stream"] = False
    if given.get("no_ignore_eos"):
        out["workload"]["ignore_eos"] = False
    if "prompts_jsonl" in given:
        out["workload"].update(source="jsonl", jsonl=given["prompts_jsonl"])
    for flag, name in (("sharegpt", "sharegpt"), ("azure_trace", "azure"), ("mooncake_trace", "mooncake")):
        if flag in given:
            out["workload"].update(source=name, dataset=given[flag])
    if given.get("sessions"):
        out["workload"]["source"] = "sessions"
    if given.get("no_dataset_lengths"):
        out["workload"]["dataset_output_tokens"] = False
    if "speedup" in given:
        out["load"].update(speedup=given["speedup"], concurrency=[], rate=[])
    if "extra_body" in given:
        out["workload"]["extra_body"] = json.loads(given["extra_body"])
    for text in given.get("slo", []):
        key, value = parse_slo(text)
        out["slo"][key] = value
    if given.get("no_plots"):
        out["output"]["plots"] = False
    if given.get("no_progress"):
        out["output"]["progress"] = False
    return {section: fields for section, fields in out.items() if fields}


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    config = load_config(getattr(args, "config", None), overrides_from_args(args))
    api_key = getattr(args, "api_key", None) or os.environ.get("OPENAI_API_KEY")
    tokenizer = load_tokenizer(config.workload.tokenizer) if config.workload.tokenizer else None
    rng = np.random.default_rng([config.load.seed, 0])
    runner = ObservedRunner(config, api_key=api_key, tokenizer=tokenizer, argv=argv)
    if config.workload.source in CONVERSATION_SOURCES:
        conversations = build_conversations(config.workload, prompts_needed(config.load), rng, tokenizer, config.load.seed)
        result = asyncio.run(runner.run_conversations(conversations))
    else:
        prompts = build_workload(config.workload, config.target.endpoint, prompts_needed(config.load), rng, tokenizer)
        result = asyncio.run(runner.run(prompts))
    out_dir = config.output.dir or Path("loadtest-results") / f"{datetime.now():%Y%m%d-%H%M%S}-{slug(result.label)}"
    written = [results_io.save(result, out_dir / "result.json")]
    written += write_report([result], out_dir, plots=config.output.plots)
    print(markdown([result], plots=config.output.plots))
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if any(step.summary.completed == 0 for step in result.steps) else 0


def cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    loaded = [results_io.load(path) for path in args.results]
    written = write_report(loaded, args.output_dir, plots=not args.no_plots)
    print(markdown(loaded, plots=not args.no_plots))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_selftest(args: argparse.Namespace, argv: list[str]) -> int:
    figures = run_selftest(
        concurrency=args.concurrency,
        num_requests=args.num_requests,
        tokens=args.tokens,
        endpoint=args.endpoint,
        pin=not args.no_pin,
    )
    print(figures.render())
    return 0 if figures.meets_goal else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest", description="Load tests for OpenAI-compatible servers (docs/loadtest.md)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    compare.add_parser(sub)
    soak.add_parser(sub)
    rp = sub.add_parser("report", help="re-render and compare saved results")
    rp.add_argument("results", nargs="+", type=Path, help="result.json files")
    rp.add_argument("--output-dir", type=Path, default=Path("loadtest-report"))
    rp.add_argument("--no-plots", action="store_true")
    rp.set_defaults(handler=cmd_report)
    st = sub.add_parser("selftest", help="measure the client against a local instant server")
    st.add_argument("--concurrency", type=int, default=32)
    st.add_argument("--num-requests", type=int, default=2000)
    st.add_argument("--tokens", type=int, default=64, help="chunks streamed per request")
    st.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    st.add_argument("--no-pin", action="store_true", help="do not pin client and server to separate cores")
    st.set_defaults(handler=cmd_selftest)
    for module in (samples, kvheads, gemmprobe, hwprobe, fleet, fleet_bench, attribution_bench, guidellm_check,
                   fakeserver):
        module.add_parser(sub)
    sub.add_parser(vllm_bench.COMMAND, help=vllm_bench.HELP, add_help=False)  # its arguments are vLLM's
    return parser


def redact(argv: list[str]) -> list[str]:
    """argv with the value of ``--api-key`` hidden, fit to be stored in a result."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
        elif arg == "--api-key":
            out.append(arg)
            hide_next = True
        elif arg.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1: a step completed nothing, 2: an error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [vllm_bench.COMMAND]:
        return vllm_bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args, redact(argv)) or 0)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
