"""This machine's memory bandwidth (STREAM's kernels in numpy) and matmul throughput: the
measuring core of the CPU roofline's hardware. The service probes with it at start
(``quick_probe``, about a second; service/kv/hardware.py caches the result) and
``python -m loadtest hwprobe`` runs the long study with the same kernels.

STREAM (McCalpin) is the standard memory-bandwidth benchmark. It is not packaged for
Debian or on PyPI, so this is STREAM's four kernels written in numpy, with STREAM's rules:

- arrays of 8-byte floats, each at least 4x the last-level cache;
- bytes counted as STREAM counts them: copy ``c = a`` and scale ``b = s*c`` move 2 arrays,
  add ``c = a + b`` and triad ``a = b + s*c`` move 3 (writes counted once, no write-allocate);
- each kernel repeated ``trials`` times, the first discarded; the best rate is the figure
  (STREAM reports the best), the median beside it.

numpy evaluates ``b + s*c`` as two passes, so every kernel works through the arrays in
cache-sized chunks: the intermediate ``s*c`` of a chunk stays in L2 and each element of the
big arrays crosses memory once, as in STREAM's C loop. ``threads`` splits the arrays over
that many threads (numpy releases the GIL in its loops). The roofline uses the triad figure.

Peak compute: the best of a few square float32 matmuls, through torch when it is installed
(with ``threads`` threads, restored afterwards) else numpy. Not bf16: a plain bf16
``torch.matmul`` on a CPU may take a slow fallback (0.4 GFLOP/s against 76 for float32, one
thread, on the project's reference machine), which is not what the engine's oneDNN kernels
run. It is a measured matmul throughput, not a datasheet peak. Work running beside the
probe lowers both figures. No vLLM import here.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 32 * 1024  # elements: 256 KiB of float64 per chunk, L2-resident
KERNELS = {"copy": 2, "scale": 2, "add": 3, "triad": 3}  # arrays moved per element (STREAM's count)
MAX_QUICK_ELEMENTS = 20_000_000  # 160 MB per array: the start probe's memory stays bounded
MIN_QUICK_ELEMENTS = 4_000_000


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
    """Best FLOP/s of a size x size float32 matmul: through torch if installed, else numpy.
    Torch's thread count is restored afterwards (the probe runs inside the server)."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        y = np.ones((size, size), dtype=np.float32)
        return _best_matmul(lambda: y @ y, size, repeats, "numpy float32 (BLAS threads as configured)")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(size, size, dtype=torch.float32)
        return _best_matmul(lambda: torch.matmul(x, x), size, repeats,
                            f"torch {torch.__version__} float32, {threads} thread(s)")
    finally:
        torch.set_num_threads(before)


def _best_matmul(run: Any, size: int, repeats: int, how: str) -> dict[str, Any]:
    run()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return {"best": best, "size": size, "how": how}


def last_level_cache_bytes() -> int | None:
    """Size of CPU 0's largest cache (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def quick_elements() -> int:
    """Elements per array for the start probe: STREAM's 4x the last-level cache, bounded."""
    llc = last_level_cache_bytes() or 32 * 2**20
    return int(min(max(4 * llc // 8, MIN_QUICK_ELEMENTS), MAX_QUICK_ELEMENTS))


def hardware_entry(name: str, triad_best: float, matmul: dict[str, Any], trials: int) -> dict[str, Any]:
    """The ``hardware`` part of a probe result (what service.kv.roofline.hardware_from_dict reads)."""
    return {"name": name, "bandwidth": triad_best, "peak_flops": matmul["best"], "memory_bytes": None,
            "source": f"measured: STREAM triad in numpy (best of {trials - 1}), {matmul['how']} matmul"}


def quick_probe(threads: int = 1, n: int | None = None, trials: int = 4, matmul_size: int = 1024,
                name: str | None = None) -> dict[str, Any]:
    """A short probe (about a second on the reference machine): the four STREAM kernels and a
    few matmuls. Returns what the roofline needs under ``hardware`` and the measurement beside it."""
    n = n or quick_elements()
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    bw = stream(n, trials, threads)
    mm = matmul_flops(matmul_size, repeats=3, threads=threads)
    name = name or f"this CPU ({threads} thread{'s' if threads > 1 else ''})"
    return {
        "kind": "hwprobe", "stream": {"n": n, "bytes_per_array": 8 * n, "trials": trials, "threads": threads,
                                      "kernels": {k: {"best": v["best"], "median": v["median"]} for k, v in bw.items()}},
        "matmul": mm, "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "probe_seconds": time.perf_counter() - t0,
        "hardware": hardware_entry(name, bw["triad"]["best"], mm, trials),
    }
