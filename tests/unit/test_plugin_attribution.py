"""The plugin's side of the KV attribution (service/telemetry/attribution.py), fed with
vLLM's own stats objects carrying the accounting connector's payload (no engine)."""

from __future__ import annotations

import pytest
from vllm.v1.metrics.stats import IterationStats, SchedulerStats

from service.telemetry import kv_connector
from service.telemetry.attribution import external_ids
from service.telemetry.tenants import TENANTS
from tests.unit.test_plugin import KVB, finished, plugin, sample

USABLE = 364  # fake_vllm_config: 365 blocks, less vLLM's null block
BLOCK_BYTES = KVB * 128


def stats(used, attributed=None, finished_totals=None, att_bs=0.0, unatt_bs=0.0, multi=False):
    s = SchedulerStats(kv_cache_usage=used / USABLE)
    if attributed is not None:
        p = {kv_connector.MARK: 1, "interval": 0.1, "used_blocks": used, "attributed_blocks": attributed,
             "holders": 1, "attributed_block_seconds": att_bs, "unattributed_block_seconds": unatt_bs,
             "finished": finished_totals or {}, "cost_seconds": 0.001}
        s.kv_connector_stats = {kv_connector.NAME: p, "OtherConnector": {"x": 1}} if multi else p
    return s


def test_external_ids_of_engine_ids():
    assert external_ids("chatcmpl-abc-1a2B3c4D") == ("chatcmpl-abc",)
    assert external_ids("1_chatcmpl-abc-1a2B3c4D") == ("1_chatcmpl-abc", "chatcmpl-abc")
    assert external_ids("plain") == ("plain",)


def test_engine_block_seconds_integrate_used_blocks_on_the_plugin_clock():
    p, reg = plugin()
    for t, used in ((0.0, 0), (1.0, 10), (3.0, 20), (4.0, 0)):
        p.attribution.on_step(stats(used), now=t)
    # held 0 for 1 s, 10 for 2 s, 20 for 1 s
    assert sample(reg, "gateway_kv_engine_block_seconds_total") == pytest.approx(40.0)
    assert sample(reg, "gateway_kv_attributed_block_seconds_total") == 0  # no connector: nothing claimed


@pytest.mark.parametrize("multi", [False, True])
def test_finished_totals_pair_with_the_same_steps_finished_request(multi):
    TENANTS.clear()
    TENANTS.bind("t1", "alice")
    p, reg = plugin()
    p.record(stats(8, 8, multi=multi), None)
    it = IterationStats()
    it.finished_requests.append(finished("chatcmpl-t1", 300, 20, 0, 0.2, 1.0, 1.5))
    p.record(stats(4, 4, {"chatcmpl-t1-abcd1234": [12.5, 20.0, 3]}, att_bs=1.2, multi=multi), it)
    rec = p.ledger.get("t1")[0]
    assert rec["tenant"] == "alice"
    assert rec["kv_fair_share_block_seconds"] == 12.5 and rec["kv_referenced_block_seconds"] == 20.0
    assert rec["kv_peak_blocks_held"] == 3
    assert rec["kv_fair_share_byte_seconds"] == 12.5 * BLOCK_BYTES
    assert sample(reg, "gateway_kv_fair_share_byte_seconds_total", tenant="alice") == 12.5 * BLOCK_BYTES
    assert sample(reg, "gateway_kv_referenced_byte_seconds_total", tenant="alice") == 20.0 * BLOCK_BYTES
    assert sample(reg, "gateway_kv_attributed_block_seconds_total") == pytest.approx(1.2)
    assert sample(reg, "gateway_kv_attribution_steps_total", result="exact") == 2


def test_totals_after_an_abort_update_the_ledger_record_and_counters():
    TENANTS.clear()
    p, reg = plugin()
    it = IterationStats()
    it.finished_requests.append(finished("chatcmpl-ab", 100, 5, 0, 0.1, 0.2, 0.4))
    p.record(stats(2, 2), it)  # the front end accounted it (e.g. aborted); blocks not freed yet
    rec = p.ledger.get("ab")[0]
    assert rec["kv_fair_share_block_seconds"] is None
    p.record(stats(0, 0, {"chatcmpl-ab-zzzzzzzz": [3.0, 4.0, 2]}), IterationStats())
    assert rec["kv_fair_share_block_seconds"] == 3.0
    assert sample(reg, "gateway_kv_fair_share_byte_seconds_total", tenant="default") == 3.0 * BLOCK_BYTES


def test_a_step_whose_counts_disagree_with_the_engine_is_counted_as_mismatch():
    p, reg = plugin()
    p.record(stats(10, 9), None)  # held 9 + unattributed 1 = 10 used: remainder
    assert sample(reg, "gateway_kv_attribution_steps_total", result="remainder") == 1
    assert sample(reg, "gateway_kv_unattributed_blocks") == 1
    s = stats(10, 9)
    s.kv_cache_usage = 11 / USABLE  # the engine says 11
    p.record(s, None)
    assert sample(reg, "gateway_kv_attribution_steps_total", result="mismatch") == 1


def test_the_connector_joins_a_configured_one_under_multiconnector():
    from vllm.config import KVTransferConfig

    alone = kv_connector.with_accounting(None)
    assert (alone.kv_connector, alone.kv_role, alone.kv_connector_module_path) == (
        kv_connector.NAME, "kv_producer", kv_connector.MODULE)
    other = KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                             kv_connector_extra_config={"cpu_bytes_to_use": 1})
    both = kv_connector.with_accounting(other)
    assert both.kv_connector == "MultiConnector" and both.kv_role == "kv_both"
    names = [c["kv_connector"] for c in both.kv_connector_extra_config["connectors"]]
    assert names == [kv_connector.NAME, "OffloadingConnector"]
    assert both.kv_connector_extra_config["connectors"][1]["kv_connector_extra_config"] == {"cpu_bytes_to_use": 1}
    assert kv_connector.with_accounting(both) is both  # already there: unchanged
