"""The head detail view: every curve the scan holds for one head, its metrics, and the sortable head ranking.

Owns the head tab's layout and pure helpers: `curve_cards` (one graph per per-head / layer-level curve, found by
name in `scan.curves` so new probes appear without edits), `metrics_table`, `ranking` (DataTable rows and columns)
and `ranking_csv` (full-precision CSV in the table's current filter and sort order). Figures come from
`posprobe.render.head_detail`. Implements no METRICS.md section (it shows all of them).
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd
from dash import dash_table, dcc, html
from dash.dash_table.Format import Format, Scheme

from app import ids
from app.pages.common import format_value, message
from posprobe.render.head_detail import head_curves, head_metrics
from posprobe.render.heads import numeric_metrics

SIGNIFICANT = 5  # digits shown in the ranking table (the CSV download keeps full precision)


def layout() -> html.Div:
    return html.Div(className="pp-view", children=[
        html.Div(className="pp-controls", children=[
            html.Label("layer", htmlFor=ids.HEAD_LAYER),
            dcc.Dropdown(id=ids.HEAD_LAYER, clearable=False, className="pp-dropdown pp-small"),
            html.Label("head", htmlFor=ids.HEAD_HEAD),
            dcc.Dropdown(id=ids.HEAD_HEAD, clearable=False, className="pp-dropdown pp-small"),
        ]),
        html.H2(id=ids.HEAD_TITLE, className="pp-title"),
        html.Div(className="pp-row", children=[
            html.Div(id=ids.HEAD_METRICS, className="pp-side pp-left"),
            html.Div(id=ids.HEAD_CURVES, className="pp-main pp-grid"),
        ]),
        html.H3("Head ranking", className="pp-section"),
        html.Div(className="pp-controls", children=[
            html.Label("rank by", htmlFor=ids.RANKING_METRIC),
            dcc.Dropdown(id=ids.RANKING_METRIC, clearable=False, className="pp-dropdown"),
            html.Button("Download CSV", id=ids.RANKING_DOWNLOAD_BUTTON, className="pp-button"),
            html.Span("sort by clicking a column header, filter in the row under it (e.g. > 0.5); "
                      "click a row to open that head; the CSV keeps the current filter and order", className="pp-hint"),
        ]),
        dash_table.DataTable(
            id=ids.RANKING_TABLE, sort_action="native", sort_mode="single", filter_action="native",
            page_action="native", page_size=15, style_table={"overflowX": "auto"},
            style_cell={"fontFamily": "inherit", "fontSize": "13px", "padding": "3px 8px"},
            style_header={"fontWeight": "600", "backgroundColor": "#f3f4f8"},
            style_data_conditional=[{"if": {"state": "active"}, "backgroundColor": "#fde8e1",
                                     "border": "1px solid #e4572e"}],
        ),
        dcc.Download(id=ids.RANKING_DOWNLOAD),
    ])


def _round(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return round(value, SIGNIFICANT - 1 - int(math.floor(math.log10(abs(value)))))
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def row_id(layer: int, head: int) -> str:
    return f"{layer}:{head}"


def parse_row_id(value: Any) -> tuple[int, int] | None:
    """(layer, head) from a ranking row id `"layer:head"`; None for anything else (never trusted further)."""
    match = re.fullmatch(r"(\d+):(\d+)", str(value)) if value is not None else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def ranking_frame(scan: Any, metric: str) -> pd.DataFrame:
    """All heads ranked by `metric` (highest first, NaN last), full precision."""
    return scan.rank(metric, top=None)


def ranking(scan: Any, metric: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """DataTable (data, columns) for the ranking by `metric`: numbers rounded for display, row id "layer:head"."""
    ranked = ranking_frame(scan, metric)
    numeric = set(numeric_metrics(scan))
    records = []
    for row in ranked.to_dict("records"):
        record = {k: _round(v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        record["id"] = row_id(int(row["layer"]), int(row["head"]))
        records.append(record)
    columns = []
    for column in ranked.columns:
        spec: dict[str, Any] = {"name": column, "id": column}
        if column in numeric or column in ("rank", "layer", "head", "kv_head"):
            spec["type"] = "numeric"
        if column in numeric:
            spec["format"] = Format(precision=4, scheme=Scheme.decimal_or_exponent)
        columns.append(spec)
    return records, columns


def ranking_csv(scan: Any, metric: str, row_ids: list[Any] | None, scan_name: str) -> tuple[str, str]:
    """(filename, CSV text) of the ranking, in the order and filter of `row_ids` (the table's derived view)."""
    ranked = ranking_frame(scan, metric)
    if row_ids is not None:
        keys = [key for key in (parse_row_id(r) for r in row_ids) if key is not None]
        index = pd.MultiIndex.from_frame(ranked[["layer", "head"]])
        positions = [index.get_loc(key) for key in keys if key in index]
        ranked = ranked.iloc[positions]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{scan_name}_ranking_{metric}").strip("_")
    return f"{safe}.csv", ranked.to_csv(index=False)


def metrics_table(scan: Any, layer: int, head: int) -> list[Any]:
    """Every metric of the head with its value, rank and percentile among the scan's heads."""
    table = head_metrics(scan, layer, head)
    if table.empty:
        return [message("This scan has no head metrics.")]
    rows = []
    for record in table.itertuples(index=False):
        value = format_value(record.value)
        rank = f"#{record.rank} / {record.of}" if pd.notna(record.rank) else ""
        pct = f"{record.percentile:.0f}%" if pd.notna(record.percentile) else ""
        rows.append(html.Tr([html.Td(record.metric), html.Td(value, className="pp-num"),
                             html.Td(rank, className="pp-rank"), html.Td(pct, className="pp-rank")]))
    header = html.Thead(html.Tr([html.Th("metric"), html.Th("value"), html.Th("rank"), html.Th("pct")]))
    return [html.Table(className="pp-table", children=[header, html.Tbody(rows)])]


def curve_cards(scan: Any, layer: int, head: int) -> list[Any]:
    """One graph per curve the scan holds for this head (and per layer-level curve of its layer)."""
    cards = []
    for name, fig in head_curves(scan, layer, head):
        cards.append(html.Div(className="pp-card head-curve", **{"data-curve": name},
                              children=[dcc.Graph(figure=fig, config={"displaylogo": False})]))
    if not cards:
        probes = ", ".join(sorted((scan.meta.get("probes") or {}).keys())) or "none"
        cards.append(message(f"This scan holds no per-head curves for L{layer} H{head} (probes run: {probes}).",
                             "info"))
    return cards


def head_options(scan: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Dropdown options for the layers and heads present in the scan."""
    layers = sorted(int(v) for v in scan.heads["layer"].unique())
    heads = sorted(int(v) for v in scan.heads["head"].unique())
    return ([{"label": f"L{v}", "value": v} for v in layers], [{"label": f"H{v}", "value": v} for v in heads])


__all__ = ["curve_cards", "head_options", "layout", "metrics_table", "parse_row_id", "ranking",
           "ranking_csv", "row_id"]
