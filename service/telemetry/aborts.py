"""Requests aborted by the front end, which vLLM drops without finished-request stats.

vLLM 0.32: a client disconnect (stream dropped, or a non-streaming request whose client
gave up) cancels ``AsyncLLM.generate``, which calls ``AsyncLLM.abort(..., internal=True)``
-> ``OutputProcessor.abort_requests``. That pops each ``RequestState`` without calling
``IterationStats.update_from_finished_request``, so no stat logger ever hears of it. We wrap
``OutputProcessor.abort_requests`` once per process: before delegating, read each state
that is about to go (prompt length, generated tokens, prefix-cache hits, timestamps) and,
after, hand those the call really removed to the sink (the stat-logger plugin).

Pinned to vLLM 0.32 by tests/unit/test_vllm_seams.py; the names read here are
``OutputProcessor.request_states`` / ``external_req_ids`` and ``RequestState.prompt_len``,
``external_req_id``, ``num_cached_tokens``, ``stats`` (a ``RequestStateStats``:
``num_generation_tokens``, ``num_preemptions``, ``arrival_time`` (wall clock),
``queued_ts``, ``scheduled_ts``, ``first_token_ts``, ``last_token_ts`` (engine clock),
``first_token_latency``).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Iterable

from service.telemetry.accounting import SequenceStats

log = logging.getLogger(__name__)

_MARK = "__kv_gateway_abort_hook__"
Sink = Callable[[list[SequenceStats]], None]
_sink: Sink | None = None


def set_sink(sink: Sink | None) -> None:
    """Where captured aborts go (the most recently built plugin instance)."""
    global _sink
    _sink = sink


def sequence_from_state(state: Any, now: float | None = None) -> SequenceStats | None:
    """What an aborted request held, as the front end saw it (None without stats)."""
    st = getattr(state, "stats", None)
    if st is None:  # log_stats off: nothing to account from (never the case with the plugin loaded)
        return None
    now = time.time() if now is None else now
    q, s, f, last = st.queued_ts, st.scheduled_ts, st.first_token_ts, st.last_token_ts
    g = int(st.num_generation_tokens)
    scheduled = s > 0
    return SequenceStats(
        request_id=str(state.external_req_id), finish_reason="abort",
        prompt_tokens=int(state.prompt_len or 0), generation_tokens=g,
        cached_tokens=int(state.num_cached_tokens or 0),
        queue_seconds=max(s - q, 0.0) if scheduled and q else 0.0,
        prefill_seconds=max(f - s, 0.0) if scheduled and f else 0.0,
        decode_seconds=max(last - f, 0.0) if f and last else 0.0,
        ttft_seconds=max(float(st.first_token_latency), 0.0) if f else None,
        e2e_seconds=max(now - st.arrival_time, 0.0) if st.arrival_time else 0.0,
        preemptions=int(st.num_preemptions),
        scheduled=scheduled,
    )


def _about_to_abort(processor: Any, request_ids: list[str], internal: bool) -> dict[str, Any]:
    """Request states the call may remove: internal ids directly, external ids through
    ``external_req_ids``. A parent id of an n>1 request has no state of its own: vLLM aborts
    its children with a nested call, which this wrapper sees too."""
    states = processor.request_states
    out: dict[str, Any] = {}
    for rid in request_ids:
        candidates = [rid] if internal else list(processor.external_req_ids.get(rid, ()))
        for c in candidates:
            if (st := states.get(c)) is not None:
                out[c] = st
    return out


def install() -> bool:
    """Wrap OutputProcessor.abort_requests (idempotent). True if this call wrapped it."""
    from vllm.v1.engine.output_processor import OutputProcessor

    original = OutputProcessor.abort_requests
    if getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def abort_requests(self: Any, request_ids: Iterable[str], internal: bool) -> list[str]:
        ids = list(request_ids)
        try:
            pending = _about_to_abort(self, ids, internal)
        except Exception:  # never break an abort over accounting
            log.exception("kv-gateway: could not read aborted request states")
            pending = {}
        result = original(self, ids, internal)
        if pending and _sink is not None:
            try:
                now = time.time()
                seqs = [sequence_from_state(st, now) for rid, st in pending.items()
                        if rid not in self.request_states]
                _sink([s for s in seqs if s is not None])
            except Exception:
                log.exception("kv-gateway: could not account aborted requests")
        return result

    setattr(abort_requests, _MARK, True)
    OutputProcessor.abort_requests = abort_requests
    return True
