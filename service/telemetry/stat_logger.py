"""Engine state every engine step, through vLLM's stat-logger interface (not a poll)."""

from __future__ import annotations

from collections import deque
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from service.kv.geometry import max_concurrent_sequences
from service.telemetry.metrics import GatewayMetrics


class EngineStateLogger(StatLoggerBase):
    """Sets the gateway's engine-state gauges from each step's SchedulerStats."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, *,
                 metrics: GatewayMetrics, model: str, state: Any = None, window: int = 100):
        from service.engine import geometry_from_vllm, usable_blocks

        self.metrics = metrics
        self.state = state  # service.api.serving.EngineState, read by admission control
        self.geometry = geometry_from_vllm(vllm_config)
        self.num_blocks = usable_blocks(vllm_config)  # usage ratio is used / usable too
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.labels = (model, str(self.geometry.kv_heads))
        self._lengths: deque[int] = deque(maxlen=window)

    @classmethod
    def factory(cls, metrics: GatewayMetrics, model: str, state: Any = None):
        def make(vllm_config: Any, engine_index: int = 0) -> "EngineStateLogger":
            return cls(vllm_config, engine_index, metrics=metrics, model=model, state=state)
        return make

    def log_engine_initialized(self) -> None:
        m, lv, g = self.metrics, self.labels, self.geometry
        m.kv_blocks.labels(*lv).set(self.num_blocks)
        m.kv_capacity_tokens.labels(*lv).set(self.num_blocks * g.block_size)
        m.kv_capacity_bytes.labels(*lv).set(self.num_blocks * g.kv_bytes_per_block)
        m.kv_blocks_used.labels(*lv).set(0)
        m.kv_usage.labels(*lv).set(0)
        m.running.labels(*lv).set(0)
        m.waiting.labels(*lv).set(0)
        m.preemptions.labels(*lv)
        self._set_prediction("max_model_len", self.max_model_len)

    def _set_prediction(self, basis: str, tokens: float) -> None:
        seqs = max_concurrent_sequences(self.num_blocks, self.geometry.block_size, max(1, round(tokens)))
        self.metrics.predicted_concurrency.labels(*self.labels, basis).set(seqs)

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        m, lv = self.metrics, self.labels
        if scheduler_stats is not None:
            usage = float(scheduler_stats.kv_cache_usage)
            running = scheduler_stats.num_running_reqs
            waiting = scheduler_stats.num_waiting_reqs + getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            m.kv_usage.labels(*lv).set(usage)
            m.kv_blocks_used.labels(*lv).set(round(usage * self.num_blocks))
            m.running.labels(*lv).set(running)
            m.waiting.labels(*lv).set(waiting)
            if self.state is not None:
                self.state.running, self.state.waiting, self.state.kv_usage = running, waiting, usage
        if iteration_stats is not None:
            if iteration_stats.num_preempted_reqs:
                m.preemptions.labels(*lv).inc(iteration_stats.num_preempted_reqs)
            finished = iteration_stats.finished_requests
            for fr in finished:
                self._lengths.append(fr.num_prompt_tokens + fr.num_generation_tokens)
            if finished and self._lengths:
                self._set_prediction("mean_request", sum(self._lengths) / len(self._lengths))
