"""The vLLM 0.32 seams the plugin stands on. If vLLM moves one, a test here fails first.

- stat-logger plugins: entry-point group ``vllm.stat_logger_plugins``, loaded by every
  AsyncLLM, filtered by the ``VLLM_PLUGINS`` allowlist, constructed as (vllm_config, index)
- ``OutputProcessor.abort_requests`` drops a request without finished-request stats; our
  wrapper reads ``RequestState.prompt_len``, ``external_req_id``, ``num_cached_tokens`` and
  ``stats`` (RequestStateStats) before delegating
"""

from __future__ import annotations

import inspect
import time
from dataclasses import fields
from importlib.metadata import entry_points

import pytest
import vllm
from prometheus_client import CollectorRegistry
from vllm import SamplingParams
from vllm.v1.engine import EngineCoreEvent, EngineCoreEventType, EngineCoreOutput, EngineCoreRequest
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.output_processor import OutputProcessor
from vllm.v1.metrics.loggers import StatLoggerBase, load_stat_logger_plugin_factories
from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, PrefillStats, RequestStateStats

from service.telemetry import aborts
from service.telemetry.ledger import EngineState, Ledger
from service.telemetry.metrics import EngineMetrics
from service.telemetry.plugin import ENTRY_POINT, KVAccountingLogger
from tests.unit.fake_vllm import fake_vllm_config


def test_vllm_is_0_32():
    assert vllm.__version__.startswith("0.32."), vllm.__version__


def test_plugin_is_an_installed_stat_logger_entry_point():
    eps = {ep.name: ep for ep in entry_points(group="vllm.stat_logger_plugins")}
    assert ENTRY_POINT in eps, "reinstall the package (pip install -e .) to register the entry point"
    assert eps[ENTRY_POINT].load() is KVAccountingLogger
    assert issubclass(KVAccountingLogger, StatLoggerBase)


def test_vllm_loads_it_into_every_async_llm_subject_to_the_allowlist(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    assert KVAccountingLogger in load_stat_logger_plugin_factories()
    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    assert KVAccountingLogger not in load_stat_logger_plugin_factories()
    monkeypatch.setenv("VLLM_PLUGINS", f"some_other_plugin,{ENTRY_POINT}")
    assert KVAccountingLogger in load_stat_logger_plugin_factories()
    # AsyncLLM adds the plugin factories to whatever stat_loggers= it was given
    assert "load_stat_logger_plugin_factories()" in inspect.getsource(AsyncLLM.__init__)


def test_finished_request_stats_fields():
    names = {f.name for f in fields(FinishedRequestStats)}
    assert names >= {"request_id", "finish_reason", "num_prompt_tokens", "num_generation_tokens",
                     "num_cached_tokens", "num_preemptions", "queued_time", "prefill_time",
                     "decode_time", "e2e_latency"}
    names = {f.name for f in fields(RequestStateStats)}
    assert names >= {"num_generation_tokens", "num_preemptions", "arrival_time", "queued_ts",
                     "scheduled_ts", "first_token_ts", "last_token_ts", "first_token_latency"}


def _request(internal: str, external: str, prompt_len: int, arrival: float) -> EngineCoreRequest:
    return EngineCoreRequest(request_id=internal, prompt_token_ids=list(range(1, prompt_len + 1)),
                             mm_features=None, sampling_params=SamplingParams(max_tokens=100, detokenize=False),
                             pooling_params=None, arrival_time=arrival, lora_request=None, cache_salt=None,
                             data_parallel_rank=None, external_req_id=external)


def test_an_abort_on_a_real_output_processor_is_accounted_with_what_it_held():
    reg = CollectorRegistry()
    plugin = KVAccountingLogger(fake_vllm_config(), 0, metrics=EngineMetrics(reg), state=EngineState(),
                                ledger=Ledger())
    assert aborts.install() is False  # idempotent: the plugin already wrapped it
    op = OutputProcessor(None, log_stats=True)
    arrival, t0 = time.time() - 3.0, 100.0
    op.add_request(_request("int-a", "chatcmpl-abc", 40, arrival), None)
    first = EngineCoreOutput(
        request_id="int-a", new_token_ids=[7],
        events=[EngineCoreEvent(EngineCoreEventType.QUEUED, t0), EngineCoreEvent(EngineCoreEventType.SCHEDULED, t0 + 0.5)],
        prefill_stats=PrefillStats(num_prompt_tokens=40, num_computed_tokens=8, num_cached_tokens=32,
                                   num_local_cached_tokens=32))
    op.process_outputs([first], engine_core_timestamp=t0 + 1.0, iteration_stats=IterationStats())
    for i in range(4):  # four more tokens, one per step
        op.process_outputs([EngineCoreOutput(request_id="int-a", new_token_ids=[8 + i])],
                           engine_core_timestamp=t0 + 1.5 + i * 0.5, iteration_stats=IterationStats())
    assert op.abort_requests(["chatcmpl-abc"], internal=False) == ["int-a"]
    (rec,) = plugin.ledger.get("chatcmpl-abc")
    assert rec["finish_reason"] == "abort"
    assert (rec["prompt_tokens"], rec["generation_tokens"], rec["cached_tokens"]) == (40, 5, 32)
    assert rec["kv_used_bytes"] == (40 + 5 - 1) * 23_040  # what it held, not 0
    assert rec["queue_seconds"] == 0.5 and rec["prefill_seconds"] == 0.5 and rec["decode_seconds"] == 2.0
    assert rec["e2e_seconds"] >= 3.0
    assert reg.get_sample_value("gateway_requests_total", {"model": "SmolLM2-135M-Instruct", "kv_heads": "3", "tenant": "default",
                                                           "finish_reason": "abort"}) == 1
    # an abort of a request that already finished, or an unknown id, accounts nothing
    assert op.abort_requests(["chatcmpl-abc", "nope"], internal=False) == []
    assert len(plugin.ledger.get("chatcmpl-abc")) == 1


def test_abort_reaches_the_children_of_a_parent_request_once_each():
    from vllm.v1.engine.parallel_sampling import ParentRequest

    plugin = KVAccountingLogger(fake_vllm_config(), 0, metrics=EngineMetrics(CollectorRegistry()),
                                state=EngineState(), ledger=Ledger())
    op = OutputProcessor(None, log_stats=True)
    parent_req = _request("parent", "chatcmpl-n2", 30, time.time())
    parent_req.sampling_params = SamplingParams(n=2, max_tokens=50, detokenize=False)
    parent = ParentRequest(parent_req)
    for idx in range(2):
        child_id, params = parent.get_child_info(idx)
        child = _request(child_id, "chatcmpl-n2", 30, time.time())
        child.sampling_params = params
        op.add_request(child, None, parent, idx)
    aborted = op.abort_requests(["parent"], internal=True)  # what AsyncLLM.generate does on cancel
    assert sorted(aborted) == sorted(parent.child_requests) or len(aborted) == 2
    assert len(plugin.ledger.get("chatcmpl-n2")) == 2


@pytest.mark.parametrize("attr", ["request_states", "external_req_ids", "parent_requests"])
def test_output_processor_keeps_its_maps(attr):
    assert hasattr(OutputProcessor(None, log_stats=True), attr)
