"""This machine's memory bandwidth (STREAM's kernels in numpy) and matmul throughput, for the
roofline (``python -m service kv-plan --roofline --hardware RESULT.json``).

    python -m loadtest hwprobe --output-dir docs/results/hwprobe-cpu

STREAM (McCalpin) is the standard memory-bandwidth benchmark. It is not packaged for
Debian or on PyPI (Debian has likwid's ``likwid-bench`` and ``mbw``, other programs), so
this is STREAM's four kernels written in numpy, with STREAM's rules:

- arrays of 8-byte floats, each at least 4x the last-level cache (default 20 M elements =
  160 MB per array against a 32 MiB L3 here);
- bytes counted as STREAM counts them: copy ``c = a`` and scale ``b = s*c`` move 2 arrays,
  add ``c = a + b`` and triad ``a = b + s*c`` move 3 (writes counted once, no write-allocate);
- each kernel repeated ``--trials`` times, the first discarded; the best rate is the figure
  (STREAM reports the best), the median beside it.

numpy evaluates ``b + s*c`` as two passes, so every kernel works through the arrays in
cache-sized chunks: the intermediate ``s*c`` of a chunk stays in L2 and each element of the
big arrays crosses memory once, as in STREAM's C loop. ``--threads N`` splits the arrays
over N threads (numpy releases the GIL in its loops). The roofline uses the triad figure.

Peak compute: the best of a few square float32 matmuls, through torch when it is installed
(with ``--threads`` threads; CPU engines run with one torch thread here) else numpy. Not
bf16: a plain bf16 ``torch.matmul`` on this CPU takes a slow fallback (0.4 GFLOP/s against
76 for float32, one thread), which is not what the engine's oneDNN kernels run. It is a
measured matmul throughput, not a datasheet peak.
Another job running beside it lowers the figures (by 3x on a busy 2-core machine): the
result records the 1-minute load average before and after, so a loaded probe shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.core.results import now_iso

CHUNK = 32 * 1024  # elements: 256 KiB of float64 per chunk, L2-resident
KERNELS = {"copy": 2, "scale": 2, "add": 3, "triad": 3}  # arrays moved per element (STREAM's count)


def _kernel(name: str, a: np.ndarray, b: np.ndarray, c: np.ndarray, s: float, lo: int, hi: int) -> None:
    tmp = np.empty(min(CHUNK, hi - lo))
    for i in range(lo, hi, CHUNK):
        j = min(i + CHUNK, hi)
        t = tmp[: j - i]
        if name == "copy":
            np.copyto(c[i:j], a[i:j])
        elif name == "scale":
            np.multiply(c[i:j], s, out=b[i:j])
        elif name == "add":
            np.add(a[i:j], b[i:j], out=c[i:j])
        else:  # triad
            np.multiply(c[i:j], s, out=t)
            np.add(b[i:j], t, out=a[i:j])


def stream(n: int = 20_000_000, trials: int = 10, threads: int = 1) -> dict[str, Any]:
    """Best and median bytes/s of each STREAM kernel over ``trials`` (the first discarded)."""
    if n < CHUNK or trials < 2 or threads < 1:
        raise ValueError("need n >= one chunk, trials >= 2 and threads >= 1")
    a, b, c = np.full(n, 1.0), np.full(n, 2.0), np.zeros(n)
    s = 3.0
    bounds = [(k * n // threads, (k + 1) * n // threads) for k in range(threads)]
    rates: dict[str, list[float]] = {k: [] for k in KERNELS}
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(trials):
            for name, arrays in KERNELS.items():
                t0 = time.perf_counter()
                list(pool.map(lambda r, name=name: _kernel(name, a, b, c, s, *r), bounds))
                rates[name].append(arrays * 8 * n / (time.perf_counter() - t0))
    _check(a, b, c, s, trials)
    return {k: {"best": max(v[1:]), "median": statistics.median(v[1:]), "trials": v} for k, v in rates.items()}


def _check(a: np.ndarray, b: np.ndarray, c: np.ndarray, s: float, trials: int) -> None:
    """STREAM's validation: replay the kernels on scalars and compare."""
    ea, eb, ec = 1.0, 2.0, 0.0
    for _ in range(trials):
        ec = ea
        eb = s * ec
        ec = ea + eb
        ea = eb + s * ec
    for arr, want in ((a, ea), (b, eb), (c, ec)):
        if not np.allclose(arr[:: max(len(arr) // 1000, 1)], want, rtol=1e-12):
            raise RuntimeError("STREAM validation failed: the kernels computed wrong values")


def matmul_flops(size: int = 1024, repeats: int = 5, threads: int = 1) -> dict[str, Any]:
    """Best FLOP/s of a size x size float32 matmul: through torch if installed, else numpy."""
    try:
        import torch

        torch.set_num_threads(threads)
        x = torch.ones(size, size, dtype=torch.float32)
        run, how = (lambda: torch.matmul(x, x)), f"torch {torch.__version__} float32, {threads} thread(s)"
    except ImportError:
        y = np.ones((size, size), dtype=np.float32)
        run, how = (lambda: y @ y), "numpy float32 (BLAS threads as configured)"
    run()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return {"best": best, "size": size, "how": how}


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
        "hardware": {"name": f"this CPU ({threads} thread{'s' if threads > 1 else ''})", "bandwidth": triad,
                     "peak_flops": mm["best"], "memory_bytes": None,
                     "source": f"measured: STREAM triad in numpy (best of {trials - 1}), {mm['how']} matmul"},
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
