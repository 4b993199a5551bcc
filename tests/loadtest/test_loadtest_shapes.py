"""Load shapes: arrival statistics with a seed (pure, no sleeping)."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.core.shapes import arrival_offsets, interarrival_gaps, ramp_time, worker_start_offsets


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_constant_rate_is_exact() -> None:
    offsets = arrival_offsets(rng(), 4.0, arrival="constant", num_requests=9)
    assert offsets == pytest.approx([i / 4.0 for i in range(9)])


def test_poisson_mean_interarrival_and_cv() -> None:
    gaps = np.diff(arrival_offsets(rng(1), 5.0, arrival="poisson", num_requests=20_001))
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_the_mean_and_sets_cv(burstiness: float) -> None:
    gaps = interarrival_gaps(rng(2), 40_000, 2.0, "poisson", burstiness)
    assert gaps.mean() == pytest.approx(0.5, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)


def test_same_seed_same_arrivals_other_seed_differs() -> None:
    a = arrival_offsets(rng(7), 3.0, num_requests=50)
    b = arrival_offsets(rng(7), 3.0, num_requests=50)
    c = arrival_offsets(rng(8), 3.0, num_requests=50)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_duration_bound_alone_and_with_count() -> None:
    offsets = arrival_offsets(rng(3), 10.0, arrival="constant", duration_s=2.0)
    assert len(offsets) == 20 and offsets.max() < 2.0
    poisson = arrival_offsets(rng(3), 50.0, duration_s=20.0)
    assert poisson.max() < 20.0
    assert len(poisson) == pytest.approx(1000, rel=0.1)
    assert len(arrival_offsets(rng(3), 10.0, arrival="constant", num_requests=5, duration_s=2.0)) == 5
    assert len(arrival_offsets(rng(3), 10.0, arrival="constant", num_requests=50, duration_s=2.0)) == 20


def test_ramp_time_is_continuous_monotone_and_linear_in_rate() -> None:
    ramp = 10.0
    u = np.linspace(0, 30, 3001)
    t = ramp_time(u, ramp)
    assert t[0] == 0 and np.all(np.diff(t) > 0)
    assert ramp_time(np.array([ramp / 2]), ramp)[0] == pytest.approx(ramp)  # ramp ends at t = R
    assert ramp_time(np.array([20.0]), ramp)[0] == pytest.approx(25.0)  # then shifted by R/2
    # instantaneous rate du/dt = t/R during the ramp
    mid = (u > 0.5) & (u < 4.5)
    rate = np.gradient(u, t)[mid]
    assert rate == pytest.approx(t[mid] / ramp, rel=0.02)


def test_ramped_constant_arrivals_count_matches_intensity() -> None:
    # lambda(t) = 10 min(1, t/4): arrivals in [0, 4) = 10 * 4/2 = 20, in [4, 7.95) = 40
    offsets = arrival_offsets(rng(), 10.0, arrival="constant", ramp_up_s=4.0, duration_s=7.95)
    assert len(offsets) == 60
    assert np.sum(offsets < 4.0) == 20


def test_worker_start_offsets() -> None:
    assert worker_start_offsets(4) == [0, 0, 0, 0]
    assert worker_start_offsets(4, 2.0) == pytest.approx([0, 0.5, 1.0, 1.5])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        arrival_offsets(rng(), 1.0)
    with pytest.raises(ValueError):
        interarrival_gaps(rng(), 3, 0.0, "poisson")
    with pytest.raises(ValueError):
        worker_start_offsets(0)
