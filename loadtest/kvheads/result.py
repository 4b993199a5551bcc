"""The experiment's result: one JSON document with one ``loadtest`` RunResult per variant."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field

from loadtest.kvheads.plan import VariantPlan
from loadtest.kvheads.spec import KvHeadsSpec, _Strict
from loadtest.core.results import Environment, RunResult, load_versioned

SCHEMA_VERSION: Final = 1


class VariantRun(_Strict):
    plan: VariantPlan
    base_url: str | None = None
    served_model: str | None = None
    engine_start_s: float | None = None
    engine_check: dict[str, Any] = Field(default_factory=dict)  # what /metrics said at start
    log_summary: list[str] = Field(default_factory=list)
    log_file: str | None = None
    started_at: str | None = None
    wall_s: float | None = None
    error: str | None = None
    waited_for_idle_s: float | None = None
    other_engines_seen: dict[str, list[int]] = Field(
        default_factory=dict, description="checkpoint -> pids of other vLLM engines running then"
    )
    run: RunResult | None = None


class ExperimentRun(_Strict):
    """What every KV-heads result document (capacity, latency, conversations) starts with."""

    schema_version: Literal[1] = SCHEMA_VERSION
    command: str
    created_at: str
    finished_at: str | None = None
    wall_s: float | None = None


class KvHeadsResult(ExperimentRun):
    kind: Literal["kv-heads"] = "kv-heads"
    mode: Literal["managed", "targets"]
    spec: KvHeadsSpec
    budget_bytes: int | None = None
    warnings: list[str] = Field(default_factory=list)
    environment: Environment
    variants: list[VariantRun]


def load_result(path: Path) -> KvHeadsResult:
    return load_versioned(path, KvHeadsResult, SCHEMA_VERSION, "kv-heads",
                          "kv-heads result (python -m loadtest kv-heads writes one)")


def strip_itl(run: RunResult) -> RunResult:
    """The run without per-request inter-token gaps (their distribution stays in each summary)."""
    steps = [
        s.model_copy(update={"requests": [r.model_copy(update={"itl_s": []}) for r in s.requests]})
        for s in run.steps
    ]
    return run.model_copy(update={"steps": steps})

