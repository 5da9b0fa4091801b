"""The head detail view: every curve the scan holds for one head, its metrics, its attention pattern on the scan's
stored examples, and the sortable head ranking.

Owns the head tab's layout and pure helpers: `curve_cards` (one graph per per-head / layer-level curve, found by
name in `scan.curves` so new probes appear without edits), `metrics_table`, the pattern viewer's `example_options`,
`query_options`, `clicked_query` and `query_outline`, `ranking` (the AG Grid ranking as a compact column-list
payload plus its column definitions), `row_ids_of` and `ranking_csv` (full-precision CSV in the grid's current
filter and sort order). Figures come from `posprobe.render.head_detail` and `posprobe.render.pattern_view`.
Implements no metric (docs/explorer.md; it shows all of them).
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd
from dash import dcc, html

from posprobe.app import ids
from posprobe.app.pages.common import control_row, data_grid, format_value, grid_column, message
from posprobe.render.head_detail import head_curves, head_metrics
from posprobe.render.heads import numeric_metrics
from posprobe.render.pattern_view import (
    example_names,
    example_tokens,
    examples_table,
    parse_label,
    query_shape,
    token_labels,
)

SIGNIFICANT = 5  # digits sent to the ranking grid: one more than shown, so sorting rarely ties (the CSV keeps all)
PAGE_SIZE = 15  # ranking rows per page: the head curves above stay in view
INTEGER_COLUMNS = ("rank", "layer", "head", "kv_head")
# rows are identified by "layer:head" (never sent: computed in the browser from the row itself)
ROW_ID = "params.data.layer + ':' + params.data.head"
# the grid's rows, rebuilt in the browser from the compact {columns, rows} payload of `ranking`
EXPAND_ROWS_JS = """
function(table) {
    if (!table || !table.columns || !table.rows) { return []; }
    const columns = table.columns;
    return table.rows.map(function(values) {
        const row = {};
        columns.forEach(function(column, i) { row[column] = values[i]; });
        return row;
    });
}
"""
# on "Download CSV": the heads in the grid's current filter and order (the server writes the full-precision CSV)
EXPORT_ROWS_JS = """
function(n_clicks, rows) {
    if (!n_clicks) { return window.dash_clientside.no_update; }
    const ids = rows ? rows.map(function(r) { return r.layer + ':' + r.head; }) : null;
    return {clicks: n_clicks, row_ids: ids};
}
"""


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
        html.H3("Attention pattern on stored examples", className="pp-section"),
        control_row(("example", dcc.Dropdown(id=ids.HEAD_EXAMPLE, clearable=False, className="pp-dropdown")),
                    ("query", dcc.Dropdown(id=ids.HEAD_QUERY, clearable=False, className="pp-dropdown")),
                    hint="hover a cell for the query and key tokens, the weight and the distance (query - key); "
                         "click a cell, or pick a query, for that query's top keys"),
        html.Div(id=ids.HEAD_PATTERN_MESSAGE),
        html.Div(id=ids.HEAD_PATTERN_SECTION, className="pp-row", children=[
            html.Div(className="pp-main pp-card", children=[
                dcc.Graph(id=ids.HEAD_PATTERN_GRAPH, config={"displaylogo": False})]),
            html.Div(className="pp-side pp-wide", children=[
                dcc.Graph(id=ids.HEAD_TOPKEYS_GRAPH, config={"displaylogo": False})]),
        ]),
        dcc.Store(id=ids.HEAD_QUERY_SHAPES),
        html.H3("Head ranking", className="pp-section"),
        html.Div(className="pp-controls", children=[
            html.Label("rank by", htmlFor=ids.RANKING_METRIC),
            dcc.Dropdown(id=ids.RANKING_METRIC, clearable=False, className="pp-dropdown"),
            html.Button("Download CSV", id=ids.RANKING_DOWNLOAD_BUTTON, className="pp-button"),
            html.Span("sort by clicking a column header; filter in the row under it (a metric keeps heads >= the "
                      "number typed, other operators in the column's filter menu); click a row to open that head; "
                      "the CSV keeps the current filter and order, at full precision", className="pp-hint"),
        ]),
        data_grid(ids.RANKING_TABLE, PAGE_SIZE, row_id=ROW_ID, localeText={
            "noRowsToShow": "No heads to show: the filters exclude every head, or the scan has no head metrics"},
            rowSelection={"mode": "singleRow", "checkboxes": False, "enableClickSelection": True}),
        dcc.Store(id=ids.RANKING_ROWS),
        dcc.Store(id=ids.RANKING_EXPORT),
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


def ranking(scan: Any, metric: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ranking by `metric` for the grid: ({"columns": names, "rows": [[value, ...], ...]}, column definitions).

    Values are rounded to SIGNIFICANT digits and NaN / inf become null; rows go as lists (the browser rebuilds the
    records with EXPAND_ROWS_JS), so a 1,536-head scan does not repeat every column name 1,536 times. Every column
    sorts and filters; metrics show 4 significant digits; the sort is reset to the ranking order.
    """
    ranked = ranking_frame(scan, metric)
    numeric = set(numeric_metrics(scan))
    rows = [[_round(v.item() if hasattr(v, "item") else v) for v in values]
            for values in ranked.itertuples(index=False, name=None)]
    columns = []
    for column in ranked.columns:
        kind = "int" if column in INTEGER_COLUMNS else "float" if column in numeric else "text"
        spec = {**grid_column(str(column), kind), "sort": None}
        if column == metric:  # the ranked-by column stands out (keeping the numeric column's right alignment)
            spec["cellClass"] = ["ag-right-aligned-cell", "pp-ranked"]
            spec["headerClass"] = ["ag-right-aligned-header", "pp-ranked"]
        columns.append(spec)
    return {"columns": [str(c) for c in ranked.columns], "rows": rows}, columns


def row_ids_of(export: Any) -> list[Any] | None:
    """The row ids `"layer:head"` of an export request from EXPORT_ROWS_JS; None (all heads) when it has none."""
    if isinstance(export, dict) and isinstance(export.get("row_ids"), list):
        return export["row_ids"]
    return None


def ranking_csv(scan: Any, metric: str, row_ids: list[Any] | None, scan_name: str) -> tuple[str, str]:
    """(filename, CSV text) of the ranking, in the order and filter of `row_ids` (the grid's filtered, sorted rows;
    None for every head in ranking order)."""
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


def example_options(scan: Any) -> list[dict[str, Any]]:
    """The example picker's options: one per stored example (label: its name and length)."""
    table = examples_table(scan)
    return [{"label": f"{r.name} ({r.n_tokens} tokens)", "value": str(r.name)} for r in table.itertuples()]


def query_options(scan: Any, example: str) -> list[dict[str, Any]]:
    """The query picker's options for one example: every position, labelled "position:token"."""
    return [{"label": label, "value": pos} for pos, label in enumerate(token_labels(example_tokens(scan, example)))]


def valid_example(scan: Any, example: Any) -> str | None:
    """`example` if the scan stores it, else its first stored example (None when it stores none)."""
    names = example_names(scan)
    return example if example in names else (names[0] if names else None)


def clicked_query(click_data: Any) -> int | None:
    """The query position of a click on the pattern heatmap (its y label "position:token"), None if malformed."""
    if isinstance(click_data, dict) and click_data.get("points"):
        point = click_data["points"][0]
        if isinstance(point, dict):
            return parse_label(point.get("y"))
    return None


def query_outline(query: Any) -> list[dict[str, Any]]:
    """The heatmap `layout.shapes` outlining one query row (merged into the figure in the browser)."""
    if not isinstance(query, int) or isinstance(query, bool) or query < 0:
        return []
    return [query_shape(query)]


def head_options(scan: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Dropdown options for the layers and heads present in the scan."""
    layers = sorted(int(v) for v in scan.heads["layer"].unique())
    heads = sorted(int(v) for v in scan.heads["head"].unique())
    return ([{"label": f"L{v}", "value": v} for v in layers], [{"label": f"H{v}", "value": v} for v in heads])


__all__ = ["clicked_query", "curve_cards", "example_options", "head_options", "layout", "metrics_table",
           "parse_row_id", "query_options", "query_outline", "ranking", "ranking_csv", "row_id", "row_ids_of",
           "valid_example"]
