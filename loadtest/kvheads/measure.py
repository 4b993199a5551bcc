"""The measurement (pure): a variant's sustained running batch, peaks, where queueing and
preemption start. The sustained batch itself is ``loadtest.server.saturation.sustained_running``."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from loadtest.kvheads.spec import _Strict
from loadtest.core.results import RunResult, ServerSample, StepResult
from loadtest.server.saturation import SATURATION_FRACTION, Sustained, sustained_running
from loadtest.server.saturation import is_saturated as _saturated
from loadtest.server.saturation import waiting_fraction as _fraction


def during_samples(step: StepResult) -> list[ServerSample]:
    """Samples taken while the step ran (its before/after scrapes excluded)."""
    samples = step.server.samples if step.server else []
    return samples[1:-1] if len(samples) > 2 else list(samples)


def waiting_fraction(step: StepResult) -> float:
    """Share of the step's scrapes (during the step) that saw waiting requests."""
    return _fraction(during_samples(step))


def is_saturated(step: StepResult, fraction: float = SATURATION_FRACTION) -> bool:
    return _saturated(during_samples(step), fraction)


def step_sustained(step: StepResult, fraction: float = SATURATION_FRACTION) -> Sustained:
    """The sustained running batch of one step (None figures when it was not saturated)."""
    return sustained_running([during_samples(step)], fraction)


class Measured(_Strict):
    """A variant's measured capacity and where its queue and its preemptions started."""

    sustained: Sustained = Field(default_factory=Sustained)
    running_peak: float | None = None
    saturated_concurrencies: list[int] = Field(default_factory=list)
    queueing_from: int | None = None  # first swept concurrency that saturated
    preemptions: float = 0
    preemptions_from: int | None = None  # first swept concurrency with a preemption


def measure(run: RunResult, fraction: float = SATURATION_FRACTION) -> Measured:
    """Pool the saturated steps of one variant's run (loadtest.server.saturation)."""
    steps = sorted(run.steps, key=lambda s: s.x)
    saturated = [s for s in steps if is_saturated(s, fraction)]
    peaks = [s.server.running_peak for s in steps if s.server and s.server.running_peak is not None]
    preempted = [s for s in steps if s.server and (s.server.preemptions or 0) > 0]
    return Measured(
        sustained=sustained_running([during_samples(s) for s in steps], fraction),
        running_peak=max(peaks) if peaks else None,
        saturated_concurrencies=[int(s.x) for s in saturated],
        queueing_from=int(saturated[0].x) if saturated else None,
        preemptions=sum(s.server.preemptions or 0 for s in steps if s.server),
        preemptions_from=int(preempted[0].x) if preempted else None,
    )


def within(measured: float | None, predicted: float | None, tolerance: float) -> bool | None:
    """|measured - predicted| <= tolerance x predicted; None when either is missing."""
    if measured is None or predicted is None or predicted <= 0:
        return None
    return abs(measured - predicted) <= tolerance * predicted


def ratios(values: Sequence[float | None]) -> list[float | None]:
    """Values relative to the first (e.g. MHA:GQA:MQA capacities as 1:x:y)."""
    first = values[0] if values else None
    if not first:
        return [None for _ in values]
    return [None if v is None else v / first for v in values]

