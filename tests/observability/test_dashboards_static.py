"""Offline checks of the dashboards and their provisioning: Grafana conventions that a
running Grafana would not complain about but an operator would."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.observability.helpers import (
    DASHBOARD_FILES, DATASOURCE_UID, GRAFANA_DIR, iter_panels, load_dashboard, metric_names,
    panel_queries, recording_rule_names,
)

DASHBOARDS = {p.stem: load_dashboard(p) for p in DASHBOARD_FILES}
# metrics without the model/kv_heads labels (HTTP layer, admission queue)
NO_MODEL_LABEL = re.compile(r"^gateway_(http|admission)_")


def test_two_dashboards_with_stable_uids():
    assert {d["uid"] for d in DASHBOARDS.values()} == {"kv-gateway-overview", "kv-gateway-attention"}
    for name, d in DASHBOARDS.items():
        assert name == d["uid"], "file name = uid, so links and the home dashboard path stay valid"
        assert d["id"] is None and d["schemaVersion"] == 39 and d["title"] and "kv-gateway" in d["tags"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_panel_has_a_unit_a_description_and_the_datasource_variable(name):
    d = DASHBOARDS[name]
    panels = list(iter_panels(d))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    for p in panels:
        assert p.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{p['title']}: no unit"
        assert p.get("description"), f"{p['title']}: no description"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
            assert t["expr"].strip() and t.get("legendFormat"), p["title"]
        gp = p["gridPos"]
        assert 0 <= gp["x"] and gp["x"] + gp["w"] <= 24 and gp["h"] > 0, p["title"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_panels_do_not_overlap(name):
    cells = {}
    for p in iter_panels(DASHBOARDS[name]):
        gp = p["gridPos"]
        for x in range(gp["x"], gp["x"] + gp["w"]):
            for y in range(gp["y"], gp["y"] + gp["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_template_variables_datasource_model_instance(name):
    variables = {v["name"]: v for v in DASHBOARDS[name]["templating"]["list"]}
    assert list(variables) == ["datasource", "model", "instance"]
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus" and ds["current"]["value"] == DATASOURCE_UID
    for v in ("model", "instance"):
        var = variables[v]
        assert var["type"] == "query" and var["multi"] and var["includeAll"], v
        assert var["query"]["query"].startswith("label_values(gateway_model_info") and var["definition"] == var["query"]["query"]
        assert var["datasource"]["uid"] == "${datasource}"


def test_rate_windows_are_the_rate_interval():
    for q in panel_queries():
        windows = re.findall(r"\[([^\]]+)\]", q.expr)
        assert all(w == "$__rate_interval" for w in windows), (q.id, windows)
        if re.search(r"\b(rate|irate|increase)\(", q.expr):
            assert windows, q.id


def test_every_selector_filters_by_model_and_instance():
    """So one dashboard compares the selected models (and instances) side by side."""
    records = recording_rule_names()
    for q in panel_queries():
        code = q.expr
        for name in metric_names(code):
            for m in re.finditer(r"(?<![\w:])" + re.escape(name) + r"(?![\w:])(\{[^}]*\})?", code):
                sel = m.group(1) or ""
                assert 'instance=~"$instance"' in sel, (q.id, name, sel)
                if not NO_MODEL_LABEL.match(name) or name in records:
                    assert 'model=~"$model"' in sel, (q.id, name, sel)


def test_readme_lists_every_panel_and_its_metrics():
    readme = (GRAFANA_DIR / "README.md").read_text()
    for q in panel_queries():
        assert q.panel.replace("$model", "<model>") in readme, f"README misses panel {q.panel!r}"
        for name in metric_names(q.expr):
            assert name in readme, f"README misses metric {name} of {q.panel!r}"


def test_provisioning_points_at_the_dashboards_and_a_fixed_datasource_uid():
    ds_files = list((GRAFANA_DIR / "provisioning" / "datasources").glob("*.yaml"))
    db_files = list((GRAFANA_DIR / "provisioning" / "dashboards").glob("*.yaml"))
    assert len(ds_files) == 1 and len(db_files) == 1
    ds = yaml.safe_load(ds_files[0].read_text())
    (prom,) = ds["datasources"]
    assert prom["uid"] == DATASOURCE_UID and prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090"
    assert prom["isDefault"] is True
    # Grafana's $__rate_interval needs the scrape interval of the Prometheus it reads
    prom_cfg = yaml.safe_load((GRAFANA_DIR.parent / "prometheus" / "prometheus.yml").read_text())
    assert prom["jsonData"]["timeInterval"] == prom_cfg["global"]["scrape_interval"]
    (provider,) = yaml.safe_load(db_files[0].read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/etc/grafana/dashboards"
