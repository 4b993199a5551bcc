"""This machine's memory bandwidth (STREAM's kernels in numpy) and matmul throughput, for the
roofline (``python -m service kv-plan --roofline --hardware RESULT.json``): the long study,
with a report. The kernels, STREAM's rules and the matmul are service/kv/hwprobe.py's (the
service runs a short probe with them at start).

    python -m loadtest hwprobe --output-dir docs/results/hwprobe-cpu

Defaults: 20 M elements = 160 MB per array (STREAM: at least 4x the last-level cache, a
32 MiB L3 on the reference machine), 10 trials, 1 thread (the CPU engine's torch threads on
a 2-core machine). Another job running beside it lowers the figures (by 3x on a busy 2-core
machine): the result records the 1-minute load average before and after, so a loaded probe shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from loadtest.core.results import now_iso
from service.kv.hwprobe import CHUNK, KERNELS, _check, _kernel, hardware_entry, matmul_flops, stream  # noqa: F401


def probe(n: int, trials: int, threads: int, matmul_size: int) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    bw = stream(n, trials, threads)
    mm = matmul_flops(matmul_size, threads=threads)
    triad = bw["triad"]["best"]
    return {
        "kind": "hwprobe", "created_at": now_iso(), "machine": platform.node(), "processor": platform.processor() or platform.machine(),
        "stream": {"n": n, "bytes_per_array": 8 * n, "trials": trials, "threads": threads, "kernels": bw},
        "matmul": mm,
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "hardware": hardware_entry(f"this CPU ({threads} thread{'s' if threads > 1 else ''})", triad, mm, trials),
    }


def render(result: dict[str, Any]) -> str:
    s = result["stream"]
    load = result.get("load_average_1m") or {"before": "?", "after": "?"}
    rows = "\n".join(f"| {k} | {v['best'] / 1e9:.2f} | {v['median'] / 1e9:.2f} |" for k, v in s["kernels"].items())
    return (f"# Memory bandwidth and matmul throughput of this machine\n\nProduced by `python -m loadtest hwprobe "
            f"--threads {s['threads']} --elements {s['n']} --trials {s['trials']}` at {result['created_at']} on {result['machine']} ({result['processor']}).\n\n"
            f"STREAM's kernels in numpy ({s['n']:,} float64 elements = {s['bytes_per_array'] / 1e6:.0f} MB per "
            f"array, {s['threads']} thread(s), best and median of {s['trials'] - 1} trials; GB = 1e9 bytes):\n\n"
            f"| kernel | best GB/s | median GB/s |\n|---|---:|---:|\n{rows}\n\n"
            f"Matmul: {result['matmul']['best'] / 1e9:.1f} GFLOP/s ({result['matmul']['how']}, "
            f"{result['matmul']['size']}^2).\n\nThe roofline takes the triad figure as this machine's bandwidth "
            "(`python -m service kv-plan --roofline --hardware hwprobe.json`). 1-minute load average before / "
            f"after: {load['before']} / {load['after']} on {os.cpu_count()} CPUs; work running beside the probe "
            "lowers both figures.\n")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hwprobe", help="this machine's memory bandwidth (STREAM kernels) and matmul FLOP/s")
    p.add_argument("--elements", type=int, default=20_000_000, help="per array (>= 4x the last-level cache)")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="1 matches the CPU engine's one torch thread")
    p.add_argument("--matmul-size", type=int, default=1024)
    p.add_argument("--output-dir", type=Path, default=Path("hwprobe-results"))
    p.set_defaults(handler=main)


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    result = probe(args.elements, args.trials, args.threads, args.matmul_size)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "hwprobe.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.output_dir / "hwprobe.md").write_text(render(result))
    print(render(result))
    print(f"wrote {args.output_dir / 'hwprobe.json'}, {args.output_dir / 'hwprobe.md'}")
    return 0
