"""Legacy: kept importable for service/app.py until the gateway runs on vLLM's own server.

The engine-state gauges and the per-request accounting moved to the stat-logger plugin
(service/telemetry/plugin.py), which vLLM loads into every AsyncLLM from its entry point;
the plugin also writes ``service.telemetry.ledger.ENGINE_STATE``. This logger, still passed
by the old app in ``stat_loggers=``, only copies each step's queue and KV usage into the
state object that app's admission control reads. Delete it with that app.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


class EngineStateLogger(StatLoggerBase):
    def __init__(self, vllm_config: Any, engine_index: int = 0, *, state: Any = None, **_: Any):
        self.state = state

    @classmethod
    def factory(cls, metrics: Any = None, model: str = "", state: Any = None):
        def make(vllm_config: Any, engine_index: int = 0) -> "EngineStateLogger":
            return cls(vllm_config, engine_index, state=state)
        return make

    def log_engine_initialized(self) -> None:
        pass

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None and self.state is not None:
            self.state.running = scheduler_stats.num_running_reqs
            self.state.waiting = scheduler_stats.num_waiting_reqs + getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            self.state.kv_usage = float(scheduler_stats.kv_cache_usage)
