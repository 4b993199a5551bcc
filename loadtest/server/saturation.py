"""The sustained running batch under saturation: the one definition the load tester uses.

A closed loop below capacity queues only for an instant (between one request's end and
its successor's admission), and the scheduler can over-admit for a moment above it, so
neither a single scrape nor the peak says what batch the engine sustains. The rule
(applied in docs/results/kv-heads-cpu.md):

- a step is *saturated* when at least ``fraction`` (default 0.5) of the scrapes taken
  while it ran saw waiting requests (``waiting > 0``);
- the *sustained running batch* is the median (and the mode, ties towards the larger
  batch, and the mean) of ``running`` over the scrapes with ``waiting > 0``, pooled over
  the saturated steps.

``loadtest.server.scrape.summarize_server`` applies it to one step (``running_*_while_waiting``
in every result) and the KV-heads experiment to the pooled saturated steps of a variant.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from loadtest.core.results import ServerSample

SATURATION_FRACTION = 0.5


class Sustained(BaseModel):
    """Running requests over the scrapes that saw a queue, in the saturated steps."""

    model_config = ConfigDict(extra="forbid")

    samples: int = 0
    median: float | None = None
    mode: float | None = None
    mean: float | None = None


def waiting_fraction(samples: Sequence[ServerSample]) -> float:
    """Share of the scrapes (that read the queue) which saw waiting requests."""
    rows = [s for s in samples if s.waiting is not None]
    return sum(1 for s in rows if s.waiting > 0) / len(rows) if rows else 0.0


def is_saturated(samples: Sequence[ServerSample], fraction: float = SATURATION_FRACTION) -> bool:
    return bool(samples) and waiting_fraction(samples) >= fraction


def sustained_running(steps: Iterable[Sequence[ServerSample]], fraction: float = SATURATION_FRACTION) -> Sustained:
    """The rule of the module docstring over the scrapes taken during each step."""
    rows = [
        s.running
        for samples in steps
        if is_saturated(samples, fraction)
        for s in samples
        if s.running is not None and s.waiting is not None and s.waiting > 0
    ]
    if not rows:
        return Sustained()
    counts = Counter(rows)
    top = max(counts.values())
    return Sustained(
        samples=len(rows),
        median=float(np.median(rows)),
        mode=float(max(v for v, c in counts.items() if c == top)),
        mean=float(np.mean(rows)),
    )
