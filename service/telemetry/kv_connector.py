"""A scheduler-side vLLM KV connector that moves no KV: it reads the engine's block tables
every step and ships fair-share figures to the stat loggers.

vLLM 0.32 gives a KV connector, in the engine-core process, the ``KVCacheManager``
(``bind_kv_cache_manager``), a call when each request finishes (``request_finished``,
before its blocks are freed) and one after every step (``get_kv_connector_stats``, right
before the scheduler reads ``kv_cache_usage`` for the same ``SchedulerStats``). Whatever
it returns reaches every stat logger in the API-server process as
``SchedulerStats.kv_connector_stats``, next to the finished requests of the same step.
That makes holder counts exact: no other seam sees which request holds which block
(KV cache events carry block hashes, not request ids; the front end sees neither
chunked-prefill progress nor preemption).

Enable it (the gateway does by default; in a plain ``vllm serve``, pass it yourself)::

    --kv-transfer-config '{"kv_connector": "KVGatewayAccounting", "kv_role": "kv_producer",
                           "kv_connector_module_path": "service.telemetry.kv_connector"}'

beside a real connector, through vLLM's ``MultiConnector`` (``connectors`` list). The
worker side does nothing. Cost on the scheduler's hot path: O(running requests) per step
plus O(blocks allocated or freed), measured and exported as ``cost_seconds``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from service.kv.attribution import FairShareLedger

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

NAME = "KVGatewayAccounting"
MODULE = __name__
MARK = "kv_gateway"  # key that marks our payload inside kv_connector_stats
VERSION = 1
VERIFY_ENV = "KV_GATEWAY_ATTRIBUTION_VERIFY"


def register() -> None:
    """Name our class in vLLM's connector registry (idempotent). Needed in the API-server
    process: under MultiConnector, vLLM's logging stat logger rebuilds each child's stats
    through ``KVConnectorFactory.get_connector_class_by_name``, which knows only
    registered names."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(NAME, MODULE, NAME)
    except ValueError:  # "already registered"
        pass


def transfer_config(other: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``--kv-transfer-config`` that enables the accounting; with ``other`` (a real
    connector's config), both run under vLLM's MultiConnector."""
    ours = {"kv_connector": NAME, "kv_role": "kv_producer", "kv_connector_module_path": MODULE}
    if not other:
        return ours
    return {"kv_connector": "MultiConnector", "kv_role": other.get("kv_role", "kv_producer"),
            "kv_connector_extra_config": {"connectors": [ours, other]}}


class _NoMetadata(KVConnectorMetadata):
    pass


_EMPTY = _NoMetadata()


@dataclass
class AccountingStats(KVConnectorStats):
    """Our payload as vLLM's stats object: one step's figures, or several aggregated by
    vLLM's logging stat logger (block-seconds and finished requests add up)."""

    data: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if not self.data:
            self.data = dict(other.data)
            return self
        merged = dict(other.data)
        for k in ("attributed_block_seconds", "unattributed_block_seconds", "interval", "cost_seconds"):
            merged[k] = self.data.get(k, 0.0) + other.data.get(k, 0.0)
        merged["finished"] = {**self.data.get("finished", {}), **other.data.get("finished", {})}
        self.data = merged
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        return {"attributed_blocks": d.get("attributed_blocks", 0), "used_blocks": d.get("used_blocks", 0),
                "holders": d.get("holders", 0)}

    def is_empty(self) -> bool:
        return not self.data


class _ExportedByThePlugin(KVConnectorPromMetrics):
    """vLLM's Prometheus logger, under MultiConnector, insists that every child that
    reports stats has Prometheus metrics of its own; ours are exported by the stat-logger
    plugin (service/telemetry/attribution.py), so this one observes nothing."""

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        return None


class KVGatewayAccounting(KVConnectorBase_V1):
    """Scheduler side: fair-share bookkeeping (service.kv.attribution). Worker side: no-ops."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._ledger = FairShareLedger()
        self._blocks: Any = None  # req_to_blocks of the single KV cache group
        self._pool: Any = None
        self._disabled: str | None = None
        self._unattributed = 0  # blocks in use but held by no request, as of the last step
        # tests and debugging: recompute every step's fair shares from vLLM's own reference
        # counts (O(blocks held) per step) and report whether they match ours
        self._verify = os.environ.get(VERIFY_ENV, "") not in ("", "0")

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # nothing is handed off

    # ---- scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager: "KVCacheManager") -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        managers = kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1:
            self._disabled = f"{len(managers)} KV cache groups (hybrid model): not accounted"
            log.warning("kv-gateway accounting connector: %s", self._disabled)
            return
        self._blocks = managers[0].req_to_blocks
        self._pool = kv_cache_manager.block_pool

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: "Request", blocks: Any, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return _EMPTY

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._ledger.finish(request.request_id)
        return False, None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._role != KVConnectorRole.SCHEDULER or self._blocks is None:
            return None
        t0 = time.perf_counter()
        pool = self._pool
        used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # vLLM's usage x (blocks - 1)
        unattributed_before = self._unattributed
        s = self._ledger.step(time.monotonic(), self._blocks)
        self._unattributed = used - s.attributed_blocks
        finished = {rid: [t.fair_block_seconds, t.referenced_block_seconds, t.peak_blocks]
                    for rid, t in s.finished.items()}
        extra = {"verify": self._check(s.attributed_blocks)} if self._verify else {}
        return AccountingStats({**extra,
            MARK: VERSION, "interval": s.interval, "used_blocks": used,
            "attributed_blocks": s.attributed_blocks, "referenced_blocks": s.referenced_blocks,
            "holders": s.holders,
            "attributed_block_seconds": s.attributed_block_seconds,
            "unattributed_block_seconds": unattributed_before * s.interval,
            "finished": finished, "cost_seconds": time.perf_counter() - t0,
        })

    def _check(self, attributed: int) -> bool:
        """Our fair shares against vLLM's own ``ref_cnt``: per request, and their sum
        against the distinct blocks we count as held."""
        total = 0.0
        for rid, blocks in self._blocks.items():
            theirs = sum(1.0 / b.ref_cnt for b in blocks)
            if abs(theirs - self._ledger.fair_share_now(rid)) > 1e-6:
                log.warning("kv-gateway attribution check: %s has %.6f blocks by vLLM's ref_cnt, %.6f by ours",
                            rid, theirs, self._ledger.fair_share_now(rid))
                return False
            total += theirs
        return abs(total - attributed) < 1e-6

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return AccountingStats(dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: Any,
                           per_engine_labelvalues: Any) -> KVConnectorPromMetrics:
        return _ExportedByThePlugin(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # ---- worker side: nothing to load or save
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None


def payload(kv_connector_stats: Any) -> dict[str, Any] | None:
    """Our figures inside ``SchedulerStats.kv_connector_stats``: at the top level (ours is
    the only connector) or under our class name (vLLM's MultiConnector)."""
    if not isinstance(kv_connector_stats, dict):
        return None
    if MARK in kv_connector_stats:
        return kv_connector_stats
    inner = kv_connector_stats.get(NAME)
    return inner if isinstance(inner, dict) and MARK in inner else None


def with_accounting(config: Any) -> Any:
    """``config`` (vLLM's ``KVTransferConfig`` or None) with our connector added: ours alone,
    or ours beside the configured one under vLLM's MultiConnector."""
    import dataclasses

    from vllm.config import KVTransferConfig

    if config is None or config.kv_connector is None:
        return KVTransferConfig(**transfer_config())
    ours = transfer_config()
    if config.kv_connector == NAME:
        return config
    if config.kv_connector == "MultiConnector":
        connectors = list(config.kv_connector_extra_config.get("connectors", []))
        if any(c.get("kv_connector") == NAME for c in connectors):
            return config
        extra = {**config.kv_connector_extra_config, "connectors": [ours, *connectors]}
        return dataclasses.replace(config, kv_connector_extra_config=extra)
    other = {k: getattr(config, k) for k in ("kv_connector", "kv_role", "kv_connector_extra_config",
                                             "kv_connector_module_path", "kv_buffer_device")
             if getattr(config, k, None) is not None}
    return dataclasses.replace(config, kv_connector="MultiConnector", kv_connector_module_path=None,
                               kv_connector_extra_config={"connectors": [ours, other]})


register()
