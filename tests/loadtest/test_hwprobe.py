"""The STREAM kernels in numpy: STREAM's byte counts, its validation, and the JSON the roofline
reads. No rate is asserted (benchmarks are not tests)."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.studies import hwprobe
from service.kv.roofline import hardware_from_dict


def test_kernels_compute_streams_values_chunk_by_chunk() -> None:
    n = hwprobe.CHUNK * 2 + 5  # a partial last chunk
    a, b, c = np.full(n, 1.0), np.full(n, 2.0), np.zeros(n)
    for name in hwprobe.KERNELS:
        hwprobe._kernel(name, a, b, c, 3.0, 0, n)
    # STREAM: c = a (1); b = 3c (3); c = a + b (4); a = b + 3c (15)
    assert (a == 15).all() and (b == 3).all() and (c == 4).all()
    hwprobe._check(a, b, c, 3.0, trials=1)
    a[-1] = 0.0
    a[0] = 0.0
    with pytest.raises(RuntimeError, match="validation failed"):
        hwprobe._check(a, b, c, 3.0, trials=1)


def test_stream_counts_bytes_as_stream_does() -> None:
    assert hwprobe.KERNELS == {"copy": 2, "scale": 2, "add": 3, "triad": 3}
    out = hwprobe.stream(n=hwprobe.CHUNK * 4, trials=2, threads=2)
    assert set(out) == set(hwprobe.KERNELS)
    assert all(len(v["trials"]) == 2 and v["best"] == v["trials"][1] for v in out.values())  # first discarded
    with pytest.raises(ValueError):
        hwprobe.stream(n=10, trials=2)


def test_probe_json_feeds_the_roofline() -> None:
    result = hwprobe.probe(n=hwprobe.CHUNK * 4, trials=2, threads=1, matmul_size=64)
    hw = hardware_from_dict(result["hardware"])
    assert hw.bandwidth == result["stream"]["kernels"]["triad"]["best"] and hw.peak_flops == result["matmul"]["best"]
    assert "STREAM triad" in hw.source
    assert "| triad |" in hwprobe.render(result)
