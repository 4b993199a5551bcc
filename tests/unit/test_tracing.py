"""The accounting spans (service/telemetry/tracing.py) on the OpenTelemetry SDK with its
in-memory exporter: children of vLLM's request span, roots for aborted sequences, the
plugin's hook, and the vLLM 0.32 names and order they rely on."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from vllm.v1.engine import FinishReason
from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats

from service.telemetry import tracing
from service.telemetry.accounting import SequenceStats
from service.telemetry.ledger import EngineState, Ledger
from service.telemetry.metrics import EngineMetrics
from service.telemetry.plugin import KVAccountingLogger
from tests.unit.fake_vllm import fake_vllm_config


@pytest.fixture
def sdk():
    """An SDK provider exporting to memory, with the accounting tracer attached."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return SimpleNamespace(provider=provider, exporter=exporter, tracer=tracing.attach(provider),
                           vllm=provider.get_tracer("vllm.tracing.otel"))


def vllm_span(sdk, request_id: str, start: int = 1_000, end: int = 5_000, **attrs):
    """What vLLM's do_tracing emits: a span started and ended at once."""
    span = sdk.vllm.start_span("llm_request", start_time=start, kind=trace.SpanKind.SERVER,
                               attributes={"gen_ai.request.id": request_id, **attrs})
    span.end(end_time=end)
    return span


def spans(sdk, name: str = tracing.SPAN_NAME):
    return [s for s in sdk.exporter.get_finished_spans() if s.name == name]


RECORD = {"request_id": "chatcmpl-a", "model": "m", "kv_heads": 3, "finish_reason": "length",
          "prompt_tokens": 10, "kv_used_bytes": 414_720, "kv_byte_seconds": 1.5, "ttft_seconds": None,
          "tenant": "team-a", "e2e_seconds": 2.0}


def test_child_of_vllm_span_carries_every_scalar_field(sdk):
    parent = vllm_span(sdk, "chatcmpl-a")
    sdk.tracer.emit(RECORD)
    (child,) = spans(sdk)
    assert child.parent is not None and child.parent.span_id == parent.context.span_id
    assert child.context.trace_id == parent.context.trace_id
    assert (child.start_time, child.end_time) == (1_000, 5_000)  # the parent's interval
    assert dict(child.attributes) == {"kv_gateway." + k: v for k, v in RECORD.items() if v is not None}
    assert child.instrumentation_scope.name == "kv_gateway"
    assert len(sdk.tracer.index) == 0


def test_children_of_n2_take_vllm_spans_in_the_order_they_ended(sdk):
    first, second = vllm_span(sdk, "cmpl-x-0"), vllm_span(sdk, "cmpl-x-0")
    sdk.tracer.emit({**RECORD, "request_id": "cmpl-x-0", "generation_tokens": 1})
    sdk.tracer.emit({**RECORD, "request_id": "cmpl-x-0", "generation_tokens": 2})
    parents = {s.attributes["kv_gateway.generation_tokens"]: s.parent.span_id for s in spans(sdk)}
    assert parents == {1: first.context.span_id, 2: second.context.span_id}


def test_aborted_sequence_gets_a_root_span_even_when_a_vllm_span_waits(sdk):
    vllm_span(sdk, "chatcmpl-a")  # a finished sibling's, not yet accounted
    sdk.tracer.emit({**RECORD, "finish_reason": "abort", "e2e_seconds": 1.5}, now_ns=10_000_000_000)
    (root,) = spans(sdk)
    assert root.parent is None
    assert (root.start_time, root.end_time) == (8_500_000_000, 10_000_000_000)
    assert root.attributes["kv_gateway.finish_reason"] == "abort"
    assert len(sdk.tracer.index) == 1  # the sibling's span is still there for its own record


def held_abort(sdk, monkeypatch):
    monkeypatch.setattr(tracing, "_active", sdk.tracer)
    ledger = Ledger()
    record = {**RECORD, "finish_reason": "abort", "kv_fair_share_block_seconds": None}
    ledger.add("chatcmpl-a", record)
    tracing.emit(record, ledger, late=True)
    return ledger.get("chatcmpl-a")[0]


def test_aborted_span_waits_for_the_late_fair_share_figures_of_its_ledger_record(sdk, monkeypatch):
    kept = held_abort(sdk, monkeypatch)
    tracing.flush()
    assert spans(sdk) == [] and sdk.tracer.held == 1  # not in yet
    kept.update(kv_fair_share_block_seconds=0.5, kv_peak_blocks_held=1)  # what flush_late does
    tracing.flush()
    (root,) = spans(sdk)
    assert root.parent is None and sdk.tracer.held == 0
    assert root.attributes["kv_gateway.kv_fair_share_block_seconds"] == 0.5
    assert root.attributes["kv_gateway.kv_peak_blocks_held"] == 1


def test_aborted_span_leaves_without_them_after_the_hold(sdk, monkeypatch):
    held_abort(sdk, monkeypatch)
    import time

    sdk.tracer.flush(now=time.monotonic() + tracing.HOLD_SECONDS)
    (root,) = spans(sdk)
    assert "kv_gateway.kv_fair_share_block_seconds" not in root.attributes


def test_aborted_span_leaves_at_once_without_the_connector(sdk, monkeypatch):
    monkeypatch.setattr(tracing, "_active", sdk.tracer)
    tracing.emit({**RECORD, "finish_reason": "abort"}, Ledger(), late=False)
    assert len(spans(sdk)) == 1 and sdk.tracer.held == 0


def test_sequence_without_vllm_span_is_a_root_and_ignores_the_current_span(sdk):
    with sdk.provider.get_tracer("other").start_as_current_span("unrelated"):
        sdk.tracer.emit({**RECORD, "request_id": "never-traced"})
    (root,) = spans(sdk)
    assert root.parent is None


def test_attributes_are_scalars_only():
    attrs = tracing.span_attributes({"a": 1, "b": 2.5, "c": "x", "d": True, "e": None, "f": [1, 2],
                                     "g": {"h": 1}, "big": 2 ** 70})
    assert attrs == {"kv_gateway.a": 1, "kv_gateway.b": 2.5, "kv_gateway.c": "x", "kv_gateway.d": True,
                     "kv_gateway.big": float(2 ** 70)}


def test_index_is_bounded_and_ignores_other_spans(sdk):
    index = tracing.RequestSpanIndex(maxlen=3)
    sdk.provider.add_span_processor(index)
    sdk.vllm.start_span("Worker init").end()
    sdk.vllm.start_span("llm_request").end()  # no request id
    for i in range(5):
        vllm_span(sdk, f"r{i}")
    assert len(index) == 3
    assert index.take("r0") is None and index.take("r1") is None
    assert index.take("r4") is not None and index.take("r4") is None


def test_attach_adds_one_index_per_provider(sdk):
    again = tracing.attach(sdk.provider)
    assert again.index is sdk.tracer.index


# ---- install / the plugin's hook

def config(endpoint):
    return SimpleNamespace(observability_config=SimpleNamespace(otlp_traces_endpoint=endpoint))


def test_without_an_endpoint_nothing_is_installed(monkeypatch):
    called = []
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: called.append(1))
    assert tracing.install(config(None)) is False and tracing.install(SimpleNamespace()) is False
    assert called == [] and tracing.active() is None
    tracing.emit(RECORD)  # a no-op


def test_endpoint_without_sdk_provider_installs_nothing(monkeypatch):
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.ProxyTracerProvider())
    assert tracing.install(config("http://127.0.0.1:1/v1/traces")) is False
    assert tracing.active() is None


def test_emit_never_raises(monkeypatch, sdk):
    monkeypatch.setattr(tracing, "_active", sdk.tracer)
    monkeypatch.setattr(sdk.tracer, "tracer", None)  # start_span on None raises
    tracing.emit(RECORD)


def finished(rid, g, e2e, reason=FinishReason.LENGTH):
    return FinishedRequestStats(finish_reason=reason, request_id=rid, e2e_latency=e2e, num_prompt_tokens=20,
                                num_generation_tokens=g, num_cached_tokens=0, queued_time=0.1,
                                prefill_time=0.2, decode_time=0.5, inference_time=0.7,
                                mean_time_per_output_token=0.1)


def test_plugin_puts_its_ledger_record_on_children_and_on_aborted_roots(monkeypatch, sdk):
    """vLLM's order: the request span ends, then record() accounts the same sequence."""
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: sdk.provider)
    monkeypatch.setattr(tracing, "_active", None)
    cfg = fake_vllm_config()
    cfg.observability_config = SimpleNamespace(otlp_traces_endpoint="http://127.0.0.1:1/v1/traces")
    ledger = Ledger()
    p = KVAccountingLogger(cfg, 0, metrics=EngineMetrics(CollectorRegistry()), state=EngineState(), ledger=ledger)
    assert tracing.active() is not None and tracing.active().index is sdk.tracer.index
    parents = [vllm_span(sdk, "chatcmpl-n2"), vllm_span(sdk, "chatcmpl-n2")]
    it = IterationStats()
    it.finished_requests.extend([finished("chatcmpl-n2", 3, 1.25), finished("chatcmpl-n2", 7, 2.5)])
    p.record(None, it)
    p.account_aborted([SequenceStats("chatcmpl-gone", "abort", 20, 4, e2e_seconds=0.75)])

    children = spans(sdk)
    assert len(children) == 3
    by_parent = {s.parent.span_id if s.parent else None: s for s in children}
    for parent, record in zip(parents, ledger.get("chatcmpl-n2")):
        child = by_parent[parent.context.span_id]
        assert dict(child.attributes) == {"kv_gateway." + k: v for k, v in record.items() if v is not None}
    (aborted,) = ledger.get("chatcmpl-gone")
    root = by_parent[None]
    assert dict(root.attributes) == {"kv_gateway." + k: v for k, v in aborted.items() if v is not None}
    assert root.attributes["kv_gateway.finish_reason"] == "abort"
    monkeypatch.setattr(tracing, "_active", None)


# ---- the vLLM 0.32 seams this relies on

def test_vllm_request_span_names_and_order():
    from vllm.tracing import SpanAttributes
    from vllm.v1.engine.output_processor import OutputProcessor

    assert SpanAttributes.GEN_AI_REQUEST_ID == tracing.VLLM_REQUEST_ID
    assert f'span_name="{tracing.VLLM_SPAN_NAME}"' in inspect.getsource(OutputProcessor.do_tracing)
    assert "GEN_AI_REQUEST_ID: req_state.external_req_id" in inspect.getsource(OutputProcessor.do_tracing)
    src = inspect.getsource(OutputProcessor.process_outputs)
    # each finished sequence's stats are appended, then its span is ended, in the same loop
    assert src.index("self._update_stats_from_finished(") < src.index("self.do_tracing(")


def test_held_span_leaves_on_its_own_timer_when_no_step_follows(sdk, monkeypatch):
    import asyncio

    async def main():
        held_abort(sdk, monkeypatch)
        assert spans(sdk) == []
        await asyncio.sleep(tracing.HOLD_SECONDS + 0.3)

    asyncio.run(main())
    assert len(spans(sdk)) == 1 and sdk.tracer.held == 0
