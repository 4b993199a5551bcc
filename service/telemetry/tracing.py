"""OpenTelemetry spans of the per-sequence figures, next to vLLM's own request span.

vLLM 0.32 traces only when started with ``--otlp-traces-endpoint``: ``AsyncLLM.__init__``
then builds an SDK ``TracerProvider`` with a batch OTLP exporter (gRPC, or HTTP/protobuf
with ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf``) and makes it the global one,
before it builds the stat loggers. ``OutputProcessor.process_outputs`` calls ``do_tracing``
for each sequence that finishes: one span ``llm_request`` (timings and token counts,
``gen_ai.request.id`` = the external request id, one span per child of an n>1 request)
that it starts and ends in the same call, so nothing can be added to it afterwards.
The same loop then appends the sequence's ``FinishedRequestStats``, and after the loop
``record()`` hands them to the stat loggers: for every sequence, vLLM's span has ended
before the plugin accounts it, in the same engine step and in the same order.

So this module, installed by the plugin only when tracing is on:
- adds a span processor to vLLM's provider that remembers the context of each
  ``llm_request`` span by request id (bounded, first in first out per id);
- emits, for every accounted sequence, a span ``kv_gateway.accounting`` whose parent is
  vLLM's span of that sequence, through a tracer of the same provider (same exporter,
  same endpoint), spanning the same interval, with every scalar field of the per-sequence
  record as attribute ``kv_gateway.<field>`` (fields added to the record later appear
  without a change here; ``None`` fields are left out);
- gives a sequence that has no vLLM span (aborted by the front end, which vLLM drops
  without tracing it) a root span of the same name and attributes, ending when it is
  accounted and starting ``e2e_seconds`` before. When the accounting KV connector runs,
  an aborted sequence's fair-share figures reach its ledger record a step after it was
  accounted (service/telemetry/attribution.py, ``flush_late``): its span then waits for
  them, holding the ledger record itself, and leaves at the plugin's ``flush`` once they
  are in, or after ``HOLD_SECONDS`` without them.

Without ``--otlp-traces-endpoint`` nothing is installed and ``emit`` returns at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Mapping

try:  # vLLM's tracing imports the SDK too; without it there is nothing to attach to
    from opentelemetry.sdk.trace import SpanProcessor as _SpanProcessor
except ImportError:  # pragma: no cover
    _SpanProcessor = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

SPAN_NAME = "kv_gateway.accounting"
ATTRIBUTE_PREFIX = "kv_gateway."
VLLM_SPAN_NAME = "llm_request"  # vllm/v1/engine/output_processor.py do_tracing
VLLM_REQUEST_ID = "gen_ai.request.id"  # vllm.tracing.SpanAttributes.GEN_AI_REQUEST_ID
DEFAULT_MAX_SPANS = 10_000
HOLD_SECONDS = 2.0  # longest an aborted sequence's span waits for its late fair-share figures
LATE_FIELD = "kv_fair_share_block_seconds"  # filled last, by the attribution's flush_late
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


@dataclass(frozen=True)
class ParentSpan:
    """What a child needs of vLLM's ended request span."""

    context: Any  # opentelemetry.trace.SpanContext
    start_ns: int
    end_ns: int


class RequestSpanIndex(_SpanProcessor):
    """A span processor: the contexts of vLLM's ended ``llm_request`` spans by request id.

    One entry per span; the children of an n>1 request share the id and are taken in the
    order they ended, which is the order vLLM reports them finished. At most ``maxlen``
    spans are kept (the oldest request ids go first), so spans that are never taken (a
    sequence the plugin did not account) cannot grow it."""

    def __init__(self, maxlen: int = DEFAULT_MAX_SPANS):
        self.maxlen = maxlen
        self._spans: OrderedDict[str, deque[ParentSpan]] = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()  # on_end may run on any thread that ends a span

    # ---- SpanProcessor (on_start, shutdown and force_flush: the base class's no-ops)
    def on_end(self, span: Any) -> None:
        if span.name != VLLM_SPAN_NAME:
            return
        rid = (span.attributes or {}).get(VLLM_REQUEST_ID)
        if rid is None or span.context is None:
            return
        entry = ParentSpan(span.context, int(span.start_time or 0), int(span.end_time or 0))
        with self._lock:
            self._spans.setdefault(str(rid), deque()).append(entry)
            self._spans.move_to_end(str(rid))
            self._count += 1
            while self._count > self.maxlen:
                _, dropped = self._spans.popitem(last=False)
                self._count -= len(dropped)

    # ---- for the accounting
    def take(self, request_id: str) -> ParentSpan | None:
        with self._lock:
            q = self._spans.get(request_id)
            if not q:
                return None
            entry = q.popleft()
            self._count -= 1
            if not q:
                del self._spans[request_id]
            return entry

    def __len__(self) -> int:
        return self._count


def span_attributes(record: Mapping[str, Any]) -> dict[str, Any]:
    """``kv_gateway.<field>`` for every scalar field of a per-sequence record. ``None`` and
    non-scalar values are left out; an int past OTLP's int64 becomes a float."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, bool) or isinstance(value, (str, float)):
            out[ATTRIBUTE_PREFIX + key] = value
        elif isinstance(value, int):
            out[ATTRIBUTE_PREFIX + key] = value if _INT64[0] <= value <= _INT64[1] else float(value)
    return out


class AccountingTracer:
    """Emits the accounting spans through one tracer provider (vLLM's, in service)."""

    def __init__(self, provider: Any, index: RequestSpanIndex, max_held: int = DEFAULT_MAX_SPANS):
        self.index = index
        self.tracer = provider.get_tracer("kv_gateway")
        self.max_held = max_held
        self._held: deque[tuple[Mapping[str, Any], int, float]] = deque()  # record, end (ns), since

    def hold(self, record: Mapping[str, Any], now: float | None = None) -> None:
        """Emit an aborted sequence's span later, from ``record`` as it is then (a ledger
        record, which the attribution completes in place)."""
        self._held.append((record, time.time_ns(), time.monotonic() if now is None else now))
        while len(self._held) > self.max_held:
            rec, end, _ = self._held.popleft()
            self.emit(rec, now_ns=end)
        try:  # also when no engine step follows to flush it
            asyncio.get_running_loop().call_later(HOLD_SECONDS + 0.1, flush)  # the loop may fire early
        except RuntimeError:
            pass

    def flush(self, now: float | None = None) -> None:
        """Emit the held spans whose figures are complete or that waited long enough."""
        now = time.monotonic() if now is None else now
        keep: deque[tuple[Mapping[str, Any], int, float]] = deque()
        while self._held:
            rec, end, since = self._held.popleft()
            if rec.get(LATE_FIELD) is not None or now - since >= HOLD_SECONDS:
                self.emit(rec, now_ns=end)
            else:
                keep.append((rec, end, since))
        self._held = keep

    @property
    def held(self) -> int:
        return len(self._held)

    def emit(self, record: Mapping[str, Any], now_ns: int | None = None) -> None:
        """One span for one accounted sequence: a child of vLLM's span of that sequence,
        or a root span when there is none (aborted by the front end, or no longer kept)."""
        from opentelemetry import trace

        attributes = span_attributes(record)
        parent = None
        if record.get("finish_reason") != "abort":  # vLLM traces only sequences that finished
            parent = self.index.take(str(record.get("request_id")))
        if parent is not None:
            ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent.context))
            start, end = parent.start_ns, parent.end_ns
        else:
            ctx = trace.set_span_in_context(trace.INVALID_SPAN)  # a root, whatever is current
            end = time.time_ns() if now_ns is None else now_ns
            start = end - int(max(float(record.get("e2e_seconds") or 0.0), 0.0) * 1e9)
        span = self.tracer.start_span(SPAN_NAME, context=ctx, kind=trace.SpanKind.INTERNAL,
                                      attributes=attributes, start_time=start)
        span.end(end_time=max(end, start))


_active: AccountingTracer | None = None
_PROCESSOR_MARK = "_kv_gateway_span_index"


def install(vllm_config: Any) -> bool:
    """Attach to vLLM's tracer provider when ``--otlp-traces-endpoint`` is set (idempotent
    per provider). False, and nothing installed, when tracing is off or unusable."""
    global _active
    endpoint = getattr(getattr(vllm_config, "observability_config", None), "otlp_traces_endpoint", None)
    if not endpoint:
        _active = None
        return False
    try:
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        if not hasattr(provider, "add_span_processor"):  # vLLM did not set up the SDK's provider
            log.warning("kv-gateway: --otlp-traces-endpoint is set but no SDK tracer provider is; "
                        "no accounting spans")
            _active = None
            return False
        _active = attach(provider)
    except Exception:
        log.exception("kv-gateway: could not attach the accounting spans to vLLM's tracer")
        _active = None
        return False
    log.info("kv-gateway: accounting spans %r as children of vLLM's %r spans", SPAN_NAME, VLLM_SPAN_NAME)
    return True


def attach(provider: Any, maxlen: int = DEFAULT_MAX_SPANS) -> AccountingTracer:
    """The accounting tracer of an SDK ``TracerProvider``; its span index is added to the
    provider once."""
    index = getattr(provider, _PROCESSOR_MARK, None)
    if index is None:
        index = RequestSpanIndex(maxlen)
        provider.add_span_processor(index)
        setattr(provider, _PROCESSOR_MARK, index)
    return AccountingTracer(provider, index)


def emit(figures: Any, ledger: Any = None, late: bool = False) -> None:
    """The plugin's per-sequence hook, with the sequence's ``RequestFigures`` (or its
    record) once it is in ``ledger``. ``late``: fair-share figures of aborted sequences
    arrive later (the accounting KV connector runs). Never raises; free when tracing is off."""
    tracer = _active
    if tracer is None:
        return
    try:
        record = figures.as_dict() if hasattr(figures, "as_dict") else figures
        if late and ledger is not None and record.get("finish_reason") == "abort" and record.get(LATE_FIELD) is None:
            kept = ledger.get(record["request_id"])  # observe() just appended this sequence's record
            tracer.hold(kept[-1] if kept else record)
        else:
            tracer.emit(record)
    except Exception:
        log.exception("kv-gateway: could not emit the accounting span of %s",
                      getattr(figures, "request_id", None))


def flush() -> None:
    """The plugin's per-step hook, after the late attribution: held spans that are ready."""
    tracer = _active
    if tracer is None:
        return
    try:
        tracer.flush()
    except Exception:
        log.exception("kv-gateway: could not emit held accounting spans")


def active() -> AccountingTracer | None:
    return _active
