"""Load shapes: when each request is sent. Pure functions of a seeded generator.

Closed loop (fixed concurrency C): C workers; each sends its next request as soon as
its previous one ends. With a ramp-up of R seconds, worker k (0-based) starts at
k * R / C, so the concurrency grows linearly to C over R.

Open loop (rate lambda, requests/s): request i is sent at t_i, t_0 = 0 and
t_(i+1) - t_i = g_i with

- constant arrivals: g_i = 1 / lambda exactly;
- Poisson/gamma arrivals (vLLM's ``--burstiness`` k): g_i ~ Gamma(shape=k, scale=1/(lambda k)),
  so E[g] = 1/lambda and the coefficient of variation is 1/sqrt(k); k = 1 is a Poisson
  process, k < 1 burstier, k > 1 smoother.

Linear ramp-up over R seconds: the intended rate is lambda(t) = lambda min(1, t/R).
The arrivals above are generated in "operational time" u and mapped to wall time by
inverting the cumulative intensity Lambda(t) = integral of lambda(s)/lambda ds:
t = sqrt(2 R u) for u <= R/2, t = u + R/2 after. The same gaps thus yield a
time-varying process with exactly that rate profile (Poisson stays Poisson).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Arrival = Literal["poisson", "constant"]


def interarrival_gaps(
    rng: np.random.Generator, count: int, rate: float, arrival: Arrival, burstiness: float = 1.0
) -> np.ndarray:
    """``count`` gaps g_i (seconds) with mean 1/rate."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    if arrival == "constant":
        return np.full(count, 1.0 / rate)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)


def ramp_time(u: np.ndarray, ramp_up_s: float) -> np.ndarray:
    """Map operational time u to wall time for a linear ramp from 0 to full rate over R."""
    u = np.asarray(u, dtype=float)
    if ramp_up_s <= 0:
        return u
    half = ramp_up_s / 2.0
    return np.where(u <= half, np.sqrt(2.0 * ramp_up_s * np.minimum(u, half)), u + half)


def arrival_offsets(
    rng: np.random.Generator,
    rate: float,
    *,
    arrival: Arrival = "poisson",
    burstiness: float = 1.0,
    ramp_up_s: float = 0.0,
    num_requests: int | None = None,
    duration_s: float | None = None,
) -> np.ndarray:
    """Send offsets t_i (seconds from the step start), bounded by a count and/or duration.

    Only offsets strictly below ``duration_s`` are kept.
    """
    if num_requests is None and duration_s is None:
        raise ValueError("bound the arrivals by num_requests and/or duration_s")
    if num_requests is not None:
        gaps = interarrival_gaps(rng, max(num_requests - 1, 0), rate, arrival, burstiness)
        offsets = ramp_time(np.concatenate(([0.0], np.cumsum(gaps))), ramp_up_s)[:num_requests]
    else:
        assert duration_s is not None
        u = np.zeros(1)
        block = max(int(rate * duration_s * 1.2) + 16, 16)
        while ramp_time(u[-1:], ramp_up_s)[0] < duration_s:
            gaps = interarrival_gaps(rng, block, rate, arrival, burstiness)
            u = np.concatenate((u, u[-1] + np.cumsum(gaps)))
        offsets = ramp_time(u, ramp_up_s)
    if duration_s is not None:
        offsets = offsets[offsets < duration_s]
    return offsets


def worker_start_offsets(concurrency: int, ramp_up_s: float = 0.0) -> list[float]:
    """Closed-loop worker start times: k * R / C for k = 0..C-1."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    return [k * ramp_up_s / concurrency for k in range(concurrency)]
