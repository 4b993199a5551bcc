"""Each generation request's admission figures by request id, for its ledger record and log
line: the accounting plugin adds them to the figures of the engine sequences it accounts
(``extra_of``); a refused request never reaches the engine, so its record is written here."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any

from service.telemetry.ledger import DEFAULT_LEDGER_SIZE, LEDGER, Ledger, ledger_keys


class AdmissionBook:
    """Bounded map: request id (``X-Request-Id``) -> admission figures."""

    def __init__(self, maxlen: int = DEFAULT_LEDGER_SIZE):
        self.maxlen = maxlen
        self._by_id: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def bind(self, request_id: str, figures: dict[str, Any]) -> None:
        self._by_id[request_id] = figures
        self._by_id.move_to_end(request_id)
        while len(self._by_id) > self.maxlen:
            self._by_id.popitem(last=False)

    def extra_of(self, engine_request_id: str) -> dict[str, Any]:
        """The figures of an engine request id (``chatcmpl-<id>``, ``cmpl-<id>-<i>``, ...), or {}."""
        for key in ledger_keys(engine_request_id):
            found = self._by_id.get(key)
            if found is not None:
                return found
        return {}

    def clear(self) -> None:
        self._by_id.clear()


ADMISSIONS = AdmissionBook()


def figures(outcome: str, reason: str, wait_seconds: float, blocks: int, hit_blocks: int) -> dict[str, Any]:
    """The admission figures of one request; ``admission_decided_at``: unix time of the decision."""
    return {"admission_outcome": outcome, "admission_reason": reason, "admission_decided_at": round(time.time(), 6),
            "admission_wait_seconds": round(wait_seconds, 6), "admission_demand_blocks": blocks,
            "admission_prefix_hit_blocks": hit_blocks}


def record_refused(request_id: str, tenant: str, figs: dict[str, Any], log: Any,
                   ledger: Ledger = LEDGER) -> None:
    """A refused (429) or abandoned request: its own ledger record and log line."""
    record = {"request_id": request_id, "tenant": tenant, "finish_reason": figs["admission_outcome"], **figs}
    ledger.add(request_id, record)
    log.info(json.dumps(record, separators=(",", ":")))
