"""Every dashboard query and every rule, evaluated by a real Prometheus that scraped the
real gateway while it served a mix of real requests (Grafana cannot run here: this is
what it would send)."""

from __future__ import annotations

import importlib.util
import math
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.helpers import (
    DASHBOARD_FILES, GRAFANA_DIR, JOB, PanelQuery, expand, finite_values, load_dashboard,
    load_rule_groups, metric_names, panel_queries, recording_rule_names, rules,
)

pytestmark = pytest.mark.prometheus

QUERIES = panel_queries()


def test_traffic_mix_has_successes_client_errors_and_an_abort(observed):
    t = observed.traffic
    assert t.count("2xx") >= 30 and t.count("4xx") == 6 and t.count("5xx") == 0, t.statuses
    r = observed.prometheus.query('sum by (finish_reason) (gateway_requests_total)', observed.at)["result"]
    reasons = {s["metric"]["finish_reason"]: float(s["value"][1]) for s in r}
    assert reasons.get("abort", 0) >= 2 and reasons.get("length", 0) >= 28, reasons


@pytest.mark.parametrize("pq", QUERIES, ids=[q.id for q in QUERIES])
def test_panel_query_returns_data(observed, pq: PanelQuery):
    expr = expand(pq.expr, model=observed.model, instance=observed.instance)
    resp = observed.prometheus.query_raw(expr, observed.at)
    body = resp.json()
    assert body["status"] == "success", f"{pq.id} does not evaluate: {body.get('error')}\n{expr}"
    data = body["data"]
    assert data["result"], f"{pq.id} returned no series\n{expr}"
    assert finite_values(data), f"{pq.id} returned only NaN/Inf: {data['result']}\n{expr}"


def test_template_variable_queries_find_the_gateway(observed):
    """label_values(gateway_model_info, model) and the instance variable, as Grafana runs them."""
    for path in DASHBOARD_FILES:
        for var in load_dashboard(path)["templating"]["list"]:
            if var["type"] != "query":
                continue
            q = var["query"]["query"]
            inner, label = q.removeprefix("label_values(").removesuffix(")").rsplit(",", 1)
            match = expand(inner.strip(), model=observed.model, instance=observed.instance)
            values = observed.prometheus.api(f"label/{label.strip()}/values", **{"match[]": match})
            expected = observed.model if var["name"] == "model" else observed.instance
            assert expected in values, (path.name, var["name"], values)


def test_dashboards_and_rules_read_only_exposed_metrics(gateway, observed):
    """Every metric a panel or rule reads is on /metrics (or is one of our recording rules)."""
    text = httpx.get(gateway.base_url + "/metrics", timeout=10).text
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    records = recording_rule_names()
    exprs = [(q.id, q.expr) for q in QUERIES] + [(r.get("record") or r["alert"], r["expr"]) for r in rules("record") + rules("alert")]
    unknown = {(where, name) for where, e in exprs for name in metric_names(e) if name not in exposed | records}
    assert not unknown, sorted(unknown)
    # and Prometheus stored each of them under the same name
    for name in sorted({n for _, e in exprs for n in metric_names(e)} - records):
        assert observed.prometheus.query(f"count({name})", observed.at)["result"], name


def test_rule_groups_loaded_and_healthy(observed):
    groups = observed.prometheus.api("rules")["groups"]
    loaded = {g["name"]: g for g in groups}
    ours = load_rule_groups()
    assert set(loaded) == {g["name"] for g in ours}
    for g in ours:
        got = loaded[g["name"]]["rules"]
        assert [r.get("record") or r.get("alert") for r in g["rules"]] == [r["name"] for r in got]
        for r in got:
            assert r["health"] == "ok", (r["name"], r.get("lastError"))
            assert r["lastEvaluation"] and not r["lastEvaluation"].startswith("0001"), r["name"]


def test_every_rule_expression_evaluates(observed):
    for r in rules("alert"):
        observed.prometheus.query(r["expr"], observed.at)  # raises on a parse or evaluation error
    for r in rules("record"):
        direct = observed.prometheus.query(r["expr"], observed.at)["result"]
        recorded = observed.prometheus.query(r["record"], observed.at)["result"]
        assert direct and recorded, f"{r['record']} has no data after the traffic"


def test_no_alert_fires_on_a_healthy_gateway(observed):
    alerts = observed.prometheus.api("alerts")["alerts"]
    assert not [a for a in alerts if a["state"] == "firing"], alerts
    assert observed.prometheus.query(f'up{{job="{JOB}"}}', observed.at)["result"][0]["value"][1] == "1"


def test_query_results_match_the_model_shape(observed):
    """The KV panels' arithmetic on real data: SmolLM2 has 9 query heads and 3 KV heads."""
    def one(expr: str) -> float:
        res = observed.prometheus.query(expand(expr, model=observed.model, instance=observed.instance), observed.at)
        vals = finite_values(res)
        assert len(vals) == 1, (expr, res)
        return vals[0]
    by_title = {(q.panel, q.ref): q.expr for q in QUERIES}
    assert one(by_title[("Memory saved by GQA", "A")]) == pytest.approx(2 / 3)
    # 2 x group size / KV dtype bytes: 2 x 3 / 4 in float32
    assert one(by_title[("Arithmetic intensity of decode attention", "A")]) == pytest.approx(2 * 3 / 4)
    assert one(by_title[("Group size (query heads per KV head)", "A")]) == 3
    assert one(by_title[("KV bytes per token: actual vs MHA", "A")]) == 46_080  # float32
    assert one(by_title[("KV bytes per token: actual vs MHA", "B")]) == 138_240
    assert one("model:gateway_kv_gqa_memory_saved:ratio_rate5m") == pytest.approx(2 / 3)
    assert one('instance:gateway_http_5xx:ratio_rate5m{instance=~"$instance"}') == 0
    assert one(by_title[("API error ratio", "A")]) > 0  # the 4xx requests
    ttft = [one(f"model:gateway_request_ttft_seconds:{p}_5m") for p in ("p50", "p90", "p99")]
    assert 0 < ttft[0] <= ttft[1] <= ttft[2] and all(math.isfinite(v) for v in ttft)


def test_exemplars_carry_request_ids(observed):
    data = observed.prometheus.api("query_exemplars", query="gateway_request_kv_used_bytes_bucket",
                                   start=f"{observed.at - 600:.3f}", end=f"{observed.at:.3f}")
    ids = {e["labels"].get("request_id") for s in data for e in s["exemplars"]}
    assert ids - {None}, data


def test_render_panels_draws_every_dashboard(observed, tmp_path):
    spec = importlib.util.spec_from_file_location("render_panels", GRAFANA_DIR / "render_panels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    rc = mod.main(["--prometheus", observed.prometheus.url, "--since", "2m", "--end", f"{observed.at:.3f}",
                   "--step", "2", "--scrape-interval", "1", "--out", str(tmp_path)])
    assert rc == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted(f"dashboard-{load_dashboard(p)['uid'].removeprefix('kv-gateway-')}.png" for p in DASHBOARD_FILES)
    assert all((tmp_path / p).stat().st_size > 50_000 for p in pngs)
