#!/usr/bin/env python3
"""Draw the Grafana dashboards' panels from a live Prometheus, with matplotlib.

Grafana is not needed: every panel of deploy/grafana/dashboards/*.json is laid out at its
gridPos, its queries are sent to Prometheus' HTTP API with the template variables
expanded as Grafana would, and the result is drawn as a time series, heatmap, bar
(stat, gauge, bar gauge) or table. One PNG per dashboard, so a reader sees what an
operator sees:

    python deploy/grafana/render_panels.py --prometheus http://localhost:9090 \\
        --since 10m --out docs/img

Writes docs/img/dashboard-overview.png and docs/img/dashboard-attention.png.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

HERE = Path(__file__).resolve().parent
DASHBOARDS = HERE / "dashboards"

# Grafana's dark theme, roughly
BG, PANEL_BG, GRID, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e9e"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0",
           "#37872d", "#fade2a", "#c4162a", "#1f60c4", "#8f3bb8", "#ff9830", "#96d98d", "#ffb357"]


# ---------------------------------------------------------------- Prometheus
@dataclass
class Series:
    labels: dict[str, str]
    t: np.ndarray  # unix seconds
    v: np.ndarray


class Prometheus:
    def __init__(self, url: str, timeout: float = 30):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict) -> dict:
        q = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=self.timeout) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"{path}: {body.get('error')}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        data = self._get("query_range", {"query": expr, "start": start, "end": end, "step": step})
        out = []
        for s in data["result"]:
            vals = np.array([[float(t), float(v)] for t, v in s["values"]])
            out.append(Series(s["metric"], vals[:, 0], vals[:, 1]))
        return out

    def query(self, expr: str, at: float) -> list[Series]:
        data = self._get("query", {"query": expr, "time": at})
        if data["resultType"] == "scalar":
            return [Series({}, np.array([at]), np.array([float(data["result"][1])]))]
        return [Series(s["metric"], np.array([at]), np.array([float(s["value"][1])])) for s in data["result"]]

    def label_values(self, label: str, match: str) -> list[str]:
        return sorted(self._get(f"label/{label}/values", {"match[]": match}))


# ---------------------------------------------------------------- Grafana's text rules
def regex_value(values: list[str]) -> str:
    esc = [re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\\\1", v) for v in values]
    return esc[0] if len(esc) == 1 else "(" + "|".join(esc) + ")"


def expand(expr: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], expr)


def legend(fmt: str | None, labels: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return labels.get("__name__", "") + ("{" + inner + "}" if inner else "") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def _si(v: float, unit: str, base: float = 1000.0, prefixes=("", "k", "M", "G", "T", "P", "E")) -> str:
    if v == 0 or not math.isfinite(v):
        return f"0 {unit}".strip() if v == 0 else str(v)
    i = 0
    while abs(v) >= base and i < len(prefixes) - 1:
        v /= base
        i += 1
    return f"{v:.3g} {prefixes[i]}{unit}".strip()


def fmt_value(v: float, unit: str | None) -> str:
    unit = unit or "short"
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else str(v)
    if unit == "s":
        if v == 0:
            return "0 s"
        if abs(v) < 1e-3:
            return f"{v * 1e6:.3g} µs"
        if abs(v) < 1:
            return f"{v * 1e3:.3g} ms"
        return f"{v:.3g} s"
    if unit == "percentunit":
        return f"{v * 100:.3g}%"
    if unit == "bytes":
        return _si(v, "B", 1024.0, ("", "Ki", "Mi", "Gi", "Ti", "Pi"))
    if unit == "Bps":
        return _si(v, "B/s", 1024.0, ("", "Ki", "Mi", "Gi", "Ti", "Pi"))
    if unit == "flops":
        return _si(v, "FLOP/s")
    if unit == "reqps":
        return f"{v:.3g} req/s"
    if unit == "ops":
        return f"{v:.3g} ops/s"
    if unit.startswith("suffix:"):
        return f"{_si(v, '')} {unit[7:]}".replace("  ", " ")
    return _si(v, "")


# ---------------------------------------------------------------- drawing
def _style(ax, title: str) -> None:
    ax.set_facecolor(PANEL_BG)
    for s in ax.spines.values():
        s.set_color(GRID)
    ax.tick_params(colors=MUTED, labelsize=7)
    ax.set_title(title, color=TEXT, fontsize=9, loc="left", pad=4, fontweight="bold")


def _unit(panel: dict) -> str:
    return panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")


def draw_timeseries(ax, panel: dict, data: list[tuple[dict, Series]], time_format: str = "%H:%M") -> None:
    unit = _unit(panel)
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    n = 0
    for target, s in data:
        if not np.isfinite(s.v).any():
            continue
        ax.plot([datetime.fromtimestamp(t) for t in s.t], s.v, lw=1.2, color=PALETTE[n % len(PALETTE)],
                label=legend(target.get("legendFormat"), s.labels))
        n += 1
    # thresholds drawn on the graph (thresholdsStyle not "off"): a dashed line at each step
    if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off") != "off":
        for step in defaults.get("thresholds", {}).get("steps", []):
            if step.get("value") is not None:
                ax.axhline(step["value"], color="#f2495c", lw=0.8, ls="--", alpha=0.8)
    if n and defaults.get("min") is not None:
        ax.set_ylim(bottom=defaults["min"])
    if n and defaults.get("max") is not None:
        ax.set_ylim(top=defaults["max"])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_value(v, unit)))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(mdates.DateFormatter(time_format))
    ax.grid(color=GRID, lw=0.5)
    if n == 0:
        ax.text(0.5, 0.5, "No data", color=MUTED, ha="center", va="center", transform=ax.transAxes)
    elif n <= 8:
        leg = ax.legend(fontsize=6, loc="upper left", frameon=False, labelcolor=TEXT, ncol=1 if n <= 4 else 2)
        leg.set_zorder(5)


def draw_heatmap(ax, panel: dict, data: list[tuple[dict, Series]], time_format: str = "%H:%M") -> None:
    rows = sorted(((float(s.labels.get("le", "inf")), s) for _, s in data), key=lambda x: x[0])
    if not rows:
        ax.text(0.5, 0.5, "No data", color=MUTED, ha="center", va="center", transform=ax.transAxes)
        return
    t = rows[0][1].t
    # cumulative buckets -> per-bucket counts
    cum = np.array([np.nan_to_num(s.v) for _, s in rows])
    counts = np.diff(np.vstack([np.zeros_like(cum[0]), cum]), axis=0).clip(min=0)
    keep = counts.sum(axis=1) > 0
    keep |= np.roll(keep, 1) | np.roll(keep, -1)  # a bucket of context on each side
    les = [le for (le, _), k in zip(rows, keep) if k]
    counts = counts[keep]
    unit = _unit(panel)
    cmap = LinearSegmentedColormap.from_list("heat", ["#4a2a10", "#ff780a", "#ffe0b2"]).with_extremes(bad=PANEL_BG)
    ax.imshow(np.ma.masked_equal(np.log1p(counts), 0), aspect="auto", origin="lower", cmap=cmap, interpolation="nearest",
              extent=(mdates.date2num(datetime.fromtimestamp(t[0])), mdates.date2num(datetime.fromtimestamp(t[-1])), 0, len(les)))
    ax.set_yticks(np.arange(len(les)) + 0.5)
    ax.set_yticklabels(["+Inf" if math.isinf(le) else "≤ " + fmt_value(le, unit) for le in les], fontsize=6)
    ax.xaxis_date()
    ax.xaxis.set_major_formatter(mdates.DateFormatter(time_format))


def draw_bars(ax, panel: dict, data: list[tuple[dict, Series]]) -> None:
    unit = _unit(panel)
    items = []
    for target, s in data:
        finite = s.v[np.isfinite(s.v)]
        if finite.size:
            items.append((legend(target.get("legendFormat"), s.labels), float(finite[-1])))
    if not items:
        ax.text(0.5, 0.5, "No data", color=MUTED, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([]), ax.set_yticks([])
        return
    y = np.arange(len(items))
    vals = [v for _, v in items]
    top = max(abs(v) for v in vals) or 1
    ax.barh(y, vals, color=[PALETTE[i % len(PALETTE)] for i in range(len(items))], height=0.6)
    for i, (name, v) in enumerate(items):
        ax.text(0.01 * top, i, f"{name}: {fmt_value(v, unit)}", va="center", color="white", fontsize=7, fontweight="bold")
    ax.set_xlim(0, top * 1.05)
    ax.set_yticks([]), ax.set_xticks([])
    ax.invert_yaxis()


def draw_table(ax, panel: dict, data: list[tuple[dict, Series]]) -> None:
    ax.set_xticks([]), ax.set_yticks([])
    if not data:
        ax.text(0.5, 0.5, "No data", color=MUTED, ha="center", va="center", transform=ax.transAxes)
        return
    order = panel.get("transformations", [{}])[0].get("options", {}).get("indexByName", {})
    cols = sorted({k for _, s in data for k in s.labels if k != "__name__"}, key=lambda k: (order.get(k, 99), k))
    rows = [[s.labels.get(c, "") for c in cols] for _, s in data]
    tab = ax.table(cellText=rows, colLabels=cols, loc="center", cellLoc="left")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    for (r, _), cell in tab.get_celld().items():
        cell.set_facecolor(PANEL_BG if r else GRID)
        cell.set_edgecolor(GRID)
        cell.get_text().set_color(TEXT)


# ---------------------------------------------------------------- a dashboard
def expand_repeats(panels: list[dict], prom: Prometheus, variables: dict[str, str]) -> list[dict]:
    """Panels with `repeat: model` become one panel per model, side by side (as in Grafana)."""
    out = []
    for p in panels:
        var = p.get("repeat")
        if not var:
            out.append(p)
            continue
        values = prom.label_values(var, "gateway_model_info") or [""]
        per_row = max(1, min(len(values), p.get("maxPerRow", 4)))
        w = 24 // per_row
        for i, v in enumerate(values):
            q = json.loads(json.dumps(p))
            q["gridPos"] = {**p["gridPos"], "x": (i % per_row) * w, "w": w, "y": p["gridPos"]["y"] + (i // per_row) * p["gridPos"]["h"]}
            q["title"] = p["title"].replace(f"${var}", v)
            q["_vars"] = {var: regex_value([v])}
            out.append(q)
    return out


def render(dashboard_path: Path, prom: Prometheus, start: float, end: float, step: float,
           out: Path, model: str = ".*", instance: str = ".*", scrape_interval: float = 15,
           rate_interval: str | None = None) -> Path:
    dash = json.loads(dashboard_path.read_text())
    # Grafana: $__rate_interval = max($__interval + scrape interval, 4 x scrape interval)
    rate_interval = rate_interval or f"{int(max(step + scrape_interval, 4 * scrape_interval))}s"
    base_vars = {"datasource": "prometheus", "model": model, "instance": instance,
                 "__rate_interval": rate_interval, "__interval": f"{int(step)}s", "__range": f"{int(end - start)}s"}
    panels = [p for p in dash["panels"] if p.get("type") != "row"]
    panels = expand_repeats(panels, prom, base_vars)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width_in = 22.0
    unit_w = width_in / 24
    unit_h = unit_w * 0.42
    height_in = rows * unit_h + 0.9
    fig = plt.figure(figsize=(width_in, height_in), facecolor=BG)
    fig.text(0.01, 1 - 0.35 / height_in, dash["title"], color=TEXT, fontsize=14, fontweight="bold", va="center")
    span = f"{datetime.fromtimestamp(start):%Y-%m-%d %H:%M} to {datetime.fromtimestamp(end):%H:%M}, step {int(step)} s"
    fig.text(0.99, 1 - 0.35 / height_in, f"{span} · model={model} · instance={instance}", color=MUTED, fontsize=8,
             ha="right", va="center")
    time_format = "%H:%M:%S" if end - start <= 900 else "%H:%M"
    top = 0.7 / height_in
    for p in panels:
        gp = p["gridPos"]
        # inside the grid cell: room on the left for tick labels, on top for the title
        axis = p["type"] in ("timeseries", "heatmap")
        left_in, right_in, top_in, bottom_in = (0.75 if axis else 0.1), 0.12, 0.32, (0.3 if axis else 0.1)
        cell_left, cell_w = gp["x"] * unit_w, gp["w"] * unit_w
        cell_top = top * height_in + gp["y"] * unit_h
        cell_h = gp["h"] * unit_h
        ax = fig.add_axes(((cell_left + left_in) / width_in, 1 - (cell_top + cell_h - bottom_in) / height_in,
                           (cell_w - left_in - right_in) / width_in, (cell_h - top_in - bottom_in) / height_in))
        _style(ax, p["title"])
        variables = {**base_vars, **p.get("_vars", {})}
        data = []
        for t in p.get("targets", []):
            expr = expand(t["expr"], variables)
            instant = t.get("instant") and not t.get("range")
            try:
                series = prom.query(expr, end) if instant else prom.query_range(expr, start, end, step)
            except Exception as e:  # one broken panel must not hide the others
                print(f"  {p['title']} {t['refId']}: {e}", file=sys.stderr)
                series = []
            data += [(t, s) for s in series]
        kind = p["type"]
        if kind == "timeseries":
            draw_timeseries(ax, p, data, time_format)
        elif kind == "heatmap":
            draw_heatmap(ax, p, data, time_format)
        elif kind in ("stat", "gauge", "bargauge"):
            draw_bars(ax, p, data)
        elif kind == "table":
            draw_table(ax, p, data)
    name = dash["uid"].removeprefix("kv-gateway-")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dashboard-{name}.png"
    fig.savefig(path, dpi=80, facecolor=BG)
    plt.close(fig)
    return path


def parse_duration(s: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh])", s)
    if not m:
        raise argparse.ArgumentTypeError(f"duration like 90s, 10m or 1h, not {s!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://localhost:9090", help="Prometheus base URL")
    ap.add_argument("--dashboard", action="append", type=Path,
                    help="dashboard JSON (repeatable; default: every file in deploy/grafana/dashboards)")
    ap.add_argument("--since", type=parse_duration, default=parse_duration("15m"), help="time range ending at --end")
    ap.add_argument("--end", type=float, default=None, help="unix time of the range's end (default: now)")
    ap.add_argument("--step", type=float, default=None, help="seconds between points (default: range / 120)")
    ap.add_argument("--scrape-interval", type=float, default=15, help="Prometheus scrape interval in seconds ($__rate_interval)")
    ap.add_argument("--rate-interval", default=None, help="override $__rate_interval, e.g. 30s")
    ap.add_argument("--model", default=".*", help="regex for $model (default: all)")
    ap.add_argument("--instance", default=".*", help="regex for $instance (default: all)")
    ap.add_argument("--out", type=Path, default=HERE.parent.parent / "docs" / "img")
    args = ap.parse_args(argv)
    end = args.end or time.time()
    start = end - args.since
    step = args.step or max(1.0, round(args.since / 120))
    prom = Prometheus(args.prometheus)
    for d in args.dashboard or sorted(DASHBOARDS.glob("*.json")):
        path = render(d, prom, start, end, step, args.out, args.model, args.instance,
                      args.scrape_interval, args.rate_interval)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
