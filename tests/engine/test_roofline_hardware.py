"""The live roofline works on a default start: the session gateway runs without
KV_GATEWAY_HARDWARE (tests/conftest.py), so it probes this CPU at start (or reads the
session's probe cache), says so in one log line and in gateway_roofline_hardware_info, and
exports the decode-step series after some generation. No figure is asserted."""

from __future__ import annotations

import os

import httpx

from tests.engine import prom


def test_default_start_detects_the_cpu_and_exports_decode_steps(gateway):
    assert "KV_GATEWAY_HARDWARE" not in os.environ
    before = prom.scrape(gateway.base_url)
    httpx.post(gateway.api_url + "/completions", timeout=60, json={
        "model": gateway.model, "prompt": "Count: one two three", "max_tokens": 6, "ignore_eos": True,
    }).raise_for_status()
    prom.wait_idle(gateway.base_url)
    after = prom.scrape(gateway.base_url)
    assert prom.delta(before, after, "gateway_decode_steps_total") > 0
    assert prom.delta(before, after, "gateway_decode_step_predicted_seconds_total") > 0

    (labels,) = [dict(l) for (name, l) in after if name == "gateway_roofline_hardware_info"]
    assert labels["name"].startswith("this CPU") and labels["origin"] in ("probe", "probe-cache")
    assert labels["source"].startswith("measured: STREAM triad")
    assert float(labels["bandwidth_bytes_per_second"]) > 0 and float(labels["flops"]) > 0

    lines = [l for l in gateway.log_text().splitlines() if "kv-gateway roofline hardware:" in l]
    assert len(lines) == 1 and "GB/s" in lines[0] and "GFLOP/s" in lines[0], lines
