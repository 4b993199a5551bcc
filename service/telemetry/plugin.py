"""The vLLM stat-logger plugin: per-sequence KV/attention accounting and engine state.

Registered in pyproject.toml under the entry-point group ``vllm.stat_logger_plugins``.
vLLM 0.32 (``vllm/v1/engine/async_llm.py``) loads that group in every ``AsyncLLM`` it
builds, in the API-server process (``vllm serve``, or our gateway), unless
``VLLM_PLUGINS`` is set and does not name ``kv_gateway``. It constructs the class once per
engine as ``KVAccountingLogger(vllm_config, engine_index)`` after the engine core has
allocated the KV cache, calls ``log_engine_initialized()`` once, then ``record()`` after
every engine step on the server's event loop. Do not also pass it in ``stat_loggers=``:
it would be loaded twice.

Every step: engine-state gauges and ``ENGINE_STATE`` (admission control reads it). Every
finished sequence (``iteration_stats.finished_requests``, one per choice of an n>1
request) and every sequence aborted by the front end (service/telemetry/aborts.py): its
figures into Prometheus (default registry), the ledger and one JSON log line.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections import deque
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from service.admission.book import ADMISSIONS
from service.kv.geometry import dtype_bytes, max_concurrent_sequences, used_blocks
from service.telemetry import aborts, hardware, live, tracing
from service.telemetry.attribution import Attribution
from service.telemetry.accounting import SequenceStats, account_sequence, observe, request_log
from service.telemetry.engine_geometry import EngineGeometry, geometry_from_vllm_config
from service.telemetry.ledger import ENGINE_STATE, LEDGER, EngineState, Ledger
from service.telemetry.metrics import EngineMetrics, engine_metrics
from service.telemetry.tenants import TENANTS

log = logging.getLogger(__name__)

ENTRY_POINT = "kv_gateway"  # the name VLLM_PLUGINS must list when it is set


class KVAccountingLogger(StatLoggerBase):
    """Per-engine stat logger: built by vLLM with (vllm_config, engine_index)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, *, metrics: EngineMetrics | None = None,
                 state: EngineState = ENGINE_STATE, ledger: Ledger = LEDGER, window: int = 100):
        self.engine = geometry_from_vllm_config(vllm_config)  # refuses shapes it cannot account
        self.engine_index = engine_index
        self.metrics = metrics or engine_metrics()
        self.state = state
        self.ledger = ledger
        self.labels = (self.engine.model, str(self.engine.geometry.kv_heads))
        self._lengths: deque[int] = deque(maxlen=window)
        aborts.install()
        live.install()
        mc = vllm_config.model_config
        self.hardware = hardware.detect(vllm_config)  # the CPU probe runs here, once, before serving
        self.step_model = live.step_model(
            self.engine.geometry, str(mc.model), dtype_bytes(str(mc.dtype).removeprefix("torch.")),
            self.engine.tensor_parallel_size, self.hardware.hardware)
        self.attribution = Attribution(self.metrics, self.labels, self.engine.num_blocks,
                                       self.engine.geometry.kv_bytes_per_block, ledger)
        aborts.set_sink(self.account_aborted)
        tracing.install(vllm_config)  # only with --otlp-traces-endpoint
        _ensure_request_log()

    # ---- start
    def log_engine_initialized(self) -> None:
        e: EngineGeometry = self.engine
        m, lv, g = self.metrics, self.labels, e.geometry
        m.model_info.info({
            "model": e.model, "kv_heads": str(g.kv_heads), "query_heads": str(g.query_heads),
            "layers": str(g.layers), "head_size": str(g.head_size), "group_size": str(g.group_size),
            "block_size": str(g.block_size), "kv_bytes_per_token": str(g.kv_bytes_per_token),
            "dtype": g.dtype, "max_model_len": str(e.max_model_len),
        })
        m.kv_bytes_per_token.labels(*lv).set(g.kv_bytes_per_token)
        m.kv_mha_bytes_per_token.labels(*lv).set(g.mha_kv_bytes_per_token)
        m.kv_group_size.labels(*lv).set(g.group_size)
        m.kv_blocks.labels(*lv).set(e.num_blocks)
        m.kv_capacity_tokens.labels(*lv).set(e.capacity_tokens)
        m.kv_capacity_bytes.labels(*lv).set(e.capacity_bytes)
        m.kv_blocks_used.labels(*lv).set(0)
        m.kv_usage.labels(*lv).set(0)
        m.running.labels(*lv).set(0)
        m.waiting.labels(*lv).set(0)
        m.preemptions.labels(*lv)
        m.kv_demand_bytes.labels(*lv).set(0)
        m.kv_demand_ratio.labels(*lv).set(0)
        if self.step_model is not None:  # decode-step series exist only with a hardware to predict on
            hardware.export(m.roofline_hardware.labels(*lv), self.hardware)
            for c in (m.decode_steps, m.decode_step_seconds, m.decode_step_predicted_seconds,
                      m.decode_step_memory_seconds):
                c.labels(*lv)
        self._set_prediction("max_model_len", e.max_model_len)
        log.info("kv-gateway accounting for %s: %d KV B/token (whole model, TP=%d, PP=%d), %d blocks x %d",
                 e.model, g.kv_bytes_per_token, e.tensor_parallel_size, e.pipeline_parallel_size,
                 e.num_blocks, g.block_size)

    def _set_prediction(self, basis: str, tokens: float) -> None:
        e = self.engine
        seqs = max_concurrent_sequences(e.num_blocks, e.geometry.block_size, max(1, round(tokens)))
        self.metrics.predicted_concurrency.labels(*self.labels, basis).set(seqs)

    # ---- every step
    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        m, lv = self.metrics, self.labels
        if scheduler_stats is not None:
            usage = float(scheduler_stats.kv_cache_usage)
            running = int(scheduler_stats.num_running_reqs)
            waiting = int(scheduler_stats.num_waiting_reqs) + int(getattr(scheduler_stats, "num_skipped_waiting_reqs", 0))
            m.kv_usage.labels(*lv).set(usage)
            m.kv_blocks_used.labels(*lv).set(used_blocks(usage, self.engine.num_blocks))
            m.running.labels(*lv).set(running)
            m.waiting.labels(*lv).set(waiting)
            self.state.running, self.state.waiting, self.state.kv_usage = running, waiting, usage
            try:
                self.attribution.on_step(scheduler_stats)
            except Exception:
                log.exception("kv-gateway: could not read the KV attribution of this step")
        self._record_live(iteration_stats)
        if iteration_stats is not None:
            if iteration_stats.num_preempted_reqs:
                m.preemptions.labels(*lv).inc(iteration_stats.num_preempted_reqs)
            finished = iteration_stats.finished_requests
            for fr in finished:
                self.account(SequenceStats.from_finished(fr), self.attribution.take(str(fr.request_id)))
            if finished:
                self._set_prediction("mean_request", sum(self._lengths) / len(self._lengths))
        try:
            self.attribution.flush_late()
        except Exception:
            log.exception("kv-gateway: could not account late KV attribution")
        tracing.flush()  # aborted sequences' spans, once their late figures are in (never raises)

    def _record_live(self, iteration_stats: Any) -> None:
        """KV demand of the unfinished sequences; the roofline of this step's decode batch
        next to its measured time. Never raises (see ``account``)."""
        m, lv, e = self.metrics, self.labels, self.engine
        try:
            states = live.live_states()
            d = live.demand(states, e.geometry, e.num_blocks, e.max_model_len)
            m.kv_demand_bytes.labels(*lv).set(d.bytes)
            m.kv_demand_ratio.labels(*lv).set(d.ratio)
            itls = iteration_stats.inter_token_latencies_iter if iteration_stats is not None else None
            if self.step_model is None or not itls:
                return
            contexts = live.decoding_contexts(states)
            if not contexts:
                return
            cost = self.step_model.step(contexts)
            measured = sum(itls) / len(itls)
            m.decode_steps.labels(*lv).inc()
            m.decode_step_seconds.labels(*lv).inc(measured)
            m.decode_step_predicted_seconds.labels(*lv).inc(cost.tpot_s)
            m.decode_step_memory_seconds.labels(*lv).inc(cost.memory_s)
            if measured > 0:
                m.decode_bandwidth_efficiency.labels(*lv).set(cost.memory_s / measured)
        except Exception:
            log.exception("kv-gateway: could not compute the live KV demand / decode roofline")

    # ---- per sequence
    def account(self, seq: SequenceStats, measured: dict[str, Any] | None = None) -> None:
        """Never raises: vLLM calls record() from its output loop, which must not die of us.
        ``measured``: the sequence's fair-share figures from the engine's block tables."""
        try:
            self._lengths.append(seq.prompt_tokens + seq.generation_tokens)
            figures = account_sequence(self.engine.geometry, self.engine.model, seq,
                                       TENANTS.tenant_of(seq.request_id))
            if measured:
                figures = dataclasses.replace(figures, **measured)
            figures.extra.update(ADMISSIONS.extra_of(seq.request_id))  # the gateway's queue wait
            observe(self.metrics, figures, self.ledger)
            tracing.emit(figures, self.ledger, late=self.attribution.connected)  # never raises
        except Exception:
            log.exception("kv-gateway: could not account sequence %s", seq.request_id)

    def account_aborted(self, seqs: list[SequenceStats]) -> None:
        for s in seqs:
            self.account(s)


def _ensure_request_log() -> None:
    """The per-request JSON lines get a stdout handler of their own, once, and do not
    depend on the root logger: a plain ``vllm serve`` configures only ``vllm``, and in our
    gateway the root handlers did not survive vLLM's server setup (lines stopped after it)."""
    if request_log.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False
