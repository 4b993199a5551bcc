"""The gateway's state for one server: what the middleware and our routes read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.settings import Settings
from service.telemetry.ledger import ENGINE_STATE, EngineState


@dataclass
class Runtime:
    settings: Settings
    metrics: Any = None  # service.telemetry.metrics.GatewayMetrics
    engine: Any = None  # vLLM's AsyncLLM (EngineClient) once started
    info: Any = None  # service.engine.EngineInfo
    vocab_size: int | None = None
    engine_state: EngineState = field(default_factory=lambda: ENGINE_STATE)  # written every engine step by the stat logger
    draining: bool = False
    in_flight: int = 0  # admitted generation requests not yet answered (middleware counts)
    gate: Any = None  # service.admission.gate.Gate when admission on KV demand is on

    @property
    def engine_dead(self) -> bool:
        return self.engine is not None and bool(self.engine.errored)
