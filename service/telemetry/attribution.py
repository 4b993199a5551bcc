"""Engine truth next to our attribution, in the API-server process (the stat logger's side).

Every step the plugin hands this the engine's ``SchedulerStats``:
- the engine's used blocks from vLLM's own ``kv_cache_usage`` (1 - free / usable blocks,
  so ``usage x usable`` is an exact integer), integrated over the front end's clock into
  ``gateway_kv_engine_block_seconds_total``: the truth, needing nothing of ours;
- when the accounting KV connector runs in the engine (service/telemetry/kv_connector.py),
  its step figures: blocks held by requests (each counted once, i.e. the sum of the fair
  shares), blocks in use but held by none (deferred frees, copy-on-write), their
  block-seconds, the connector's own cost, and the totals of the requests that released
  their blocks this step.

Per-request totals are paired with vLLM's ``FinishedRequestStats`` of the same step by
request id (the engine's internal id is the external one plus ``-<8 chars>``, with an
``<index>_`` prefix for the children of an n>1 request). Totals that arrive after their
request was accounted (aborted by the front end, or stopped there on a stop string: the
engine frees the blocks one step later) are added to the counters and to the ledger record.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from service.kv.geometry import used_blocks
from service.telemetry import kv_connector
from service.telemetry.accounting import observe_attribution
from service.telemetry.ledger import Ledger
from service.telemetry.metrics import EngineMetrics
from service.telemetry.tenants import TENANTS

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"^(.*)-[0-9A-Za-z]{8}$")
_CHILD = re.compile(r"^\d+_(.+)$")

#: ledger / log / span fields this module fills
FIELDS = ("kv_fair_share_block_seconds", "kv_referenced_block_seconds", "kv_peak_blocks_held",
          "kv_fair_share_byte_seconds", "kv_referenced_byte_seconds")


def external_ids(internal_id: str) -> tuple[str, ...]:
    """The ids vLLM's front end may report for an engine-internal request id."""
    m = _SUFFIX.match(internal_id)
    base = m.group(1) if m else internal_id
    child = _CHILD.match(base)
    return (base, child.group(1)) if child else (base,)


@dataclass
class _Totals:
    ids: tuple[str, ...]
    fair_block_seconds: float
    referenced_block_seconds: float
    peak_blocks: int


class Attribution:
    """One engine's attribution and engine-truth counters (built by the plugin)."""

    def __init__(self, metrics: EngineMetrics, labels: tuple[str, str], num_blocks: int,
                 block_bytes: int, ledger: Ledger):
        self.m, self.labels, self.num_blocks, self.block_bytes, self.ledger = (
            metrics, labels, num_blocks, block_bytes, ledger)
        self._last_t: float | None = None
        self._last_used = 0
        self._pending: list[_Totals] = []
        self.connected = False  # the engine runs our connector (seen in a step)

    # ---- every step
    def on_step(self, scheduler_stats: Any, now: float | None = None) -> None:
        m, lv = self.m, self.labels
        now = time.monotonic() if now is None else now
        used = used_blocks(float(scheduler_stats.kv_cache_usage), self.num_blocks)
        if self._last_t is not None:
            m.kv_engine_block_seconds.labels(*lv).inc(self._last_used * max(now - self._last_t, 0.0))
        self._last_t, self._last_used = now, used
        p = kv_connector.payload(getattr(scheduler_stats, "kv_connector_stats", None))
        if p is None:
            return
        self.connected = True
        attributed, unattributed = int(p["attributed_blocks"]), int(p["used_blocks"]) - int(p["attributed_blocks"])
        m.kv_attributed_blocks.labels(*lv).set(attributed)
        m.kv_unattributed_blocks.labels(*lv).set(unattributed)
        m.kv_attribution_holders.labels(*lv).set(int(p["holders"]))
        m.kv_referenced_blocks.labels(*lv).set(int(p.get("referenced_blocks", 0)))
        m.kv_attributed_block_seconds.labels(*lv).inc(float(p["attributed_block_seconds"]))
        m.kv_unattributed_block_seconds.labels(*lv).inc(float(p["unattributed_block_seconds"]))
        m.kv_attribution_cost_seconds.labels(*lv).inc(float(p["cost_seconds"]))
        # the engine's own count of used blocks, read independently in this process
        result = "mismatch" if attributed + unattributed != used else ("remainder" if unattributed else "exact")
        m.kv_attribution_steps.labels(*lv, result).inc()
        if result == "mismatch":
            log.warning("kv-gateway: engine uses %d blocks, the connector saw %d held + %d unattributed",
                        used, attributed, unattributed)
        verify = p.get("verify")
        if verify is not None:
            m.kv_attribution_verify_steps.labels(*lv, "ok" if verify else "mismatch").inc()
        for rid, (fair, ref, peak) in p.get("finished", {}).items():
            self._pending.append(_Totals(external_ids(rid), float(fair), float(ref), int(peak)))

    # ---- per finished sequence
    def take(self, request_id: str) -> dict[str, Any] | None:
        """The totals of a sequence vLLM reports finished under ``request_id`` (external)."""
        for i, t in enumerate(self._pending):
            if request_id in t.ids:
                del self._pending[i]
                return self._fields(t)
        return None

    def _fields(self, t: _Totals) -> dict[str, Any]:
        return {"kv_fair_share_block_seconds": t.fair_block_seconds,
                "kv_referenced_block_seconds": t.referenced_block_seconds,
                "kv_peak_blocks_held": t.peak_blocks,
                "kv_fair_share_byte_seconds": t.fair_block_seconds * self.block_bytes,
                "kv_referenced_byte_seconds": t.referenced_block_seconds * self.block_bytes}

    def flush_late(self) -> None:
        """Totals no finished sequence of this step took: their request was accounted
        before (front-end abort or stop string). Counters by tenant, and the ledger record."""
        pending, self._pending = self._pending, []
        for t in pending:
            fields = self._fields(t)
            rid = t.ids[-1]
            observe_attribution(self.m, self.labels + (TENANTS.tenant_of(rid),), fields, {"request_id": rid[:100]})
            for rec in self.ledger.get(rid) or []:
                if rec.get("kv_fair_share_block_seconds") is None:
                    rec.update(fields)
                    break

