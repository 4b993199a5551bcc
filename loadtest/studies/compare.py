"""Side-by-side benchmark: our gateway against vLLM's own OpenAI server (and the gateway
with per-request telemetry off), same model, engine arguments and KV budget, driven by
the same client and workload. Servers are started in turn and the order alternates
between repeats (ABC, CBA, ...) so the machine's drift cancels; each figure is the median
over repeats, and ratios are taken of those medians.

    python -m loadtest compare --servers gateway,vllm,gateway-notelemetry \\
        --concurrency 1,16,64 --modes stream,nonstream --repeats 2 --output-dir DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.core.config import load_config
from loadtest.core.results import RunResult
from loadtest.core.runner import prompts_needed
from loadtest.server.observed import ObservedRunner
from loadtest.local.servers import ENGINE_DEFAULTS, Server
from loadtest.core.workload import build_workload, load_tokenizer

# name -> (server kind, extra environment, engine settings that differ from ENGINE_DEFAULTS)
SERVERS = {
    "gateway": ("gateway", {}, {}),
    # vLLM's plugin allowlist without ours: no per-request accounting, no engine-state gauges
    "gateway-notelemetry": ("gateway", {"VLLM_PLUGINS": "no-plugin"}, {}),
    "vllm": ("vllm", {}, {}),
    # The CPU default before 2026-11-25 (bf16, eager), and each of its two changes alone.
    "gateway-bf16-eager": ("gateway", {}, {"dtype": "bfloat16", "enforce_eager": True}),
    "gateway-bf16-compiled": ("gateway", {}, {"dtype": "bfloat16", "enforce_eager": False}),
    "gateway-fp32-eager": ("gateway", {}, {"dtype": "float32", "enforce_eager": True}),
    "vllm-eager": ("vllm", {}, {"enforce_eager": True}),
}
# (measured, reference): gateway vs vLLM, and the cost of per-request telemetry
COMPARISONS = (("gateway", "vllm"), ("gateway", "gateway-notelemetry"),
               # the CPU default against the old one, then dtype and torch.compile alone
               ("gateway", "gateway-bf16-eager"), ("gateway-fp32-eager", "gateway-bf16-eager"),
               ("gateway", "gateway-fp32-eager"), ("gateway-bf16-compiled", "gateway-bf16-eager"),
               ("vllm", "vllm-eager"))
FIGURES = ("output_throughput", "request_throughput", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "e2e_p50",
           "frontend_cpu_ms_per_request")


@dataclass(frozen=True)
class Cell:
    server: str
    mode: str
    concurrency: int


def figures(result: RunResult) -> dict[str, float | None]:
    s = result.steps[0].summary
    return {"output_throughput": s.output_throughput, "request_throughput": s.request_throughput,
            "ttft_p50": s.ttft_s.p50, "ttft_p99": s.ttft_s.p99, "tpot_p50": s.tpot_s.p50,
            "tpot_p99": s.tpot_s.p99, "e2e_p50": s.e2e_s.p50, "failed": s.failed}


def run_step(base_url: str, model: str, tokenizer: Any, tokenizer_dir: Path, mode: str, concurrency: int,
             requests: int, input_tokens: int, output_tokens: int, seed: int) -> RunResult:
    config = load_config(None, {
        # no per-request lookups after the run: they would add to the gateway's API-process CPU only
        "target": {"base_url": base_url, "model": model, "stream": mode == "stream", "scrape": False,
                   "request_metrics": False},
        "workload": {"tokenizer": tokenizer_dir, "input_tokens": input_tokens, "output_tokens": output_tokens},
        "load": {"concurrency": [concurrency], "rate": [], "num_requests": requests,
                 "warmup_requests": min(concurrency, 4), "seed": seed},
        "output": {"progress": False, "plots": False},
    })
    rng = np.random.default_rng([seed, concurrency])
    prompts = build_workload(config.workload, config.target.endpoint, prompts_needed(config.load), rng, tokenizer)
    return asyncio.run(ObservedRunner(config, tokenizer=tokenizer, argv=[]).run(prompts))


def frontend_cpu_seconds(server: Server) -> float:
    """user + system CPU of the server's own process (its engine runs in child processes)."""
    import psutil

    t = psutil.Process(server.process.pid).cpu_times()
    return t.user + t.system


def requests_for(concurrency: int, per_slot: int, minimum: int) -> int:
    return max(minimum, concurrency * per_slot)


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(Path(args.model_dir))
    names = args.servers.split(",")
    samples: dict[str, list[dict]] = {}
    starts: dict[str, list[float]] = {}
    t_begin = time.time()
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else list(reversed(names))
        for name in order:
            kind, env, engine = SERVERS[name]
            server = Server(kind, args.model_dir, args.served_name, env=env, engine={**ENGINE_DEFAULTS, **engine},
                            log_path=out / "logs" / f"{name}-{rep}.log")
            server.start()
            starts.setdefault(name, []).append(server.start_seconds)
            try:
                for mode in args.modes.split(","):
                    for c in args.concurrency:
                        n = requests_for(c, args.requests_per_slot, args.min_requests)
                        cpu0 = frontend_cpu_seconds(server)
                        res = run_step(server.base_url, args.served_name, tokenizer, Path(args.model_dir), mode, c, n,
                                       args.input_tokens, args.output_tokens, seed=1000 * rep + c)
                        key = f"{name}|{mode}|{c}"
                        fig = figures(res)
                        # CPU the API process (not the engine core) spent per request, warm-ups included
                        fig["frontend_cpu_ms_per_request"] = 1000 * (frontend_cpu_seconds(server) - cpu0) / (
                            n + min(c, 4))
                        samples.setdefault(key, []).append(fig)
                        print(f"[{rep}] {name:20s} {mode:9s} c={c:<3d} n={n:<4d} "
                              f"{samples[key][-1]['output_throughput']:.1f} tok/s", flush=True)
            finally:
                server.stop()
    data = {"schema_version": 1, "args": {k: v for k, v in vars(args).items() if k != "func"},
            "wall_seconds": time.time() - t_begin, "start_seconds": starts, "samples": samples}
    (out / "compare.json").write_text(json.dumps(data, indent=1))
    return data


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def render(data: dict[str, Any], out: Path) -> Path:
    args, samples = data["args"], data["samples"]
    names = args["servers"].split(",")
    cells: dict[tuple[str, str, int], dict[str, float | None]] = {}
    for key, runs in samples.items():
        name, mode, c = key.split("|")
        cells[(name, mode, int(c))] = {f: median([r.get(f) for r in runs]) for f in FIGURES}
    modes, concs = args["modes"].split(","), args["concurrency"]
    lines = ["# Performance on the CPU: " + ", ".join(names), "",
             f"Model `{args['served_name']}` ({args['model_dir']}), random {args['input_tokens']} in / "
             f"{args['output_tokens']} out, ignore_eos, {args['repeats']} repeats (servers in alternating "
             f"order), median of repeats. Wall time {data['wall_seconds'] / 60:.1f} min.", "",
             "Command:", "", "```", "python -m loadtest compare " + " ".join(
                 f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
                 for k, v in args.items() if k not in ("output_dir", "command", "report_only")) + f" --output-dir {args['output_dir']}", "```", ""]
    pairs = [(a, b) for a, b in COMPARISONS if a in names and b in names]
    for other, ref in pairs:
        lines += [f"## {other} / {ref}", "",
                  "| mode | concurrency | out tok/s ratio | req/s ratio | TTFT p50 ratio | TTFT p99 ratio "
                  "| TPOT p50 ratio | TPOT p99 ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for mode in modes:
            for c in concs:
                a, b = cells.get((other, mode, c)), cells.get((ref, mode, c))
                if not a or not b:
                    continue
                r = [ratio(a[f], b[f]) for f in ("output_throughput", "request_throughput", "ttft_p50", "ttft_p99",
                                                  "tpot_p50", "tpot_p99")]
                lines.append(f"| {mode} | {c} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in r) + " |")
        lines.append("")
    lines += ["## Start times (seconds to ready, in run order; a compiled server's first start compiles, "
              "later starts load vLLM's compile cache)", "", "| server | starts |", "|---|---|"]
    lines += [f"| {name} | {', '.join(f'{s:.0f}' for s in data.get('start_seconds', {}).get(name, []))} |"
              for name in names]
    lines += ["", "## Absolute figures (median of repeats)", "",
              "| server | mode | concurrency | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms "
              "| API-process CPU ms/request |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, mode, c), f in sorted(cells.items()):
        ms = lambda v: "-" if v is None else f"{1000 * v:.1f}"  # noqa: E731
        lines.append(f"| {name} | {mode} | {c} | {f['output_throughput']:.1f} | {f['request_throughput']:.2f} | "
                     f"{ms(f['ttft_p50'])} | {ms(f['ttft_p99'])} | {ms(f['tpot_p50'])} | {ms(f['tpot_p99'])} | "
                     + ("-" if f["frontend_cpu_ms_per_request"] is None else f"{f['frontend_cpu_ms_per_request']:.1f}")
                     + " |")
    lines += ["", "Non-streaming requests have no first-token time: their TTFT is the whole response time and "
              "TPOT is not defined (shown as 0 or -).", ""]
    path = out / "compare.md"
    path.write_text("\n".join(lines))
    _plot(cells, names, modes, concs, out)
    return path


def _plot(cells: dict, names: list[str], modes: list[str], concs: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for name in names:
            ys = [(cells.get((name, mode, c)) or {}).get("output_throughput") for c in concs]
            ax.plot(concs, ys, marker="o", label=name)
        ax.set(title=f"output tokens/s ({mode})", xlabel="concurrency", ylabel="tokens/s", xscale="log")
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="gateway vs vLLM's own server, same engine and workload")
    p.add_argument("--servers", default="gateway,vllm,gateway-notelemetry")
    p.add_argument("--model-dir", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--served-name", default="SmolLM2-135M-Instruct")
    p.add_argument("--concurrency", type=lambda t: [int(v) for v in t.split(",")], default=[1, 16, 64])
    p.add_argument("--modes", default="stream,nonstream")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--input-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--requests-per-slot", type=int, default=2, help="requests per step = concurrency x this")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--output-dir", default="docs/results/performance-cpu")
    p.add_argument("--report-only", help="re-render from a compare.json")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        print(render(data, Path(args.report_only).parent).read_text())
        return 0
    data = run_compare(args)
    print(render(data, Path(args.output_dir)).read_text())
    return 0
