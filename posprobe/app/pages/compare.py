"""The compare view: two scans side by side, their per-head difference on a metric, and a shared curve overlaid.

Owns the compare tab's layout and pure helpers over `posprobe.render.compare`. Scans of different shapes are
compared on the heads they share (the view says so). Implements no metric (docs/explorer.md).
"""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from posprobe.app import ids
from posprobe.app.pages.common import data_grid, grid_column
from posprobe.render.compare import head_differences

TOP_DIFFERENCES = 200  # rows of the difference table sent to the browser


def layout() -> html.Div:
    return html.Div(className="pp-view", children=[
        html.Div(className="pp-controls", children=[
            html.Label("A", htmlFor=ids.COMPARE_A),
            dcc.Dropdown(id=ids.COMPARE_A, clearable=False, className="pp-dropdown"),
            html.Label("B", htmlFor=ids.COMPARE_B),
            dcc.Dropdown(id=ids.COMPARE_B, clearable=False, className="pp-dropdown"),
            html.Label("metric", htmlFor=ids.COMPARE_METRIC),
            dcc.Dropdown(id=ids.COMPARE_METRIC, clearable=False, className="pp-dropdown"),
        ]),
        html.Div(id=ids.COMPARE_MESSAGE),
        dcc.Graph(id=ids.COMPARE_GRAPH, config={"displaylogo": False}),
        html.Div(className="pp-row", children=[
            html.Div(className="pp-side pp-left pp-wide", children=[
                html.H3("Largest differences (B − A)", className="pp-section"),
                data_grid(ids.COMPARE_TABLE, 12, floating_filters=False),
            ]),
            html.Div(className="pp-main", children=[
                html.H3("A shared curve (the selected head's, for per-head curves)", className="pp-section"),
                dcc.Dropdown(id=ids.COMPARE_CURVE, clearable=False, className="pp-dropdown"),
                dcc.Graph(id=ids.COMPARE_CURVE_GRAPH, config={"displaylogo": False}),
            ]),
        ]),
    ])


def difference_rows(scan: Any, other: Any, metric: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Grid (rowData, columnDefs): the heads with the largest |B - A| on `metric`."""
    diff = head_differences(scan, other, metric).head(TOP_DIFFERENCES)
    data = [{"layer": int(r.layer), "head": int(r.head),
             "A": None if r.a != r.a else round(float(r.a), 5), "B": None if r.b != r.b else round(float(r.b), 5),
             "B − A": None if r.diff != r.diff else round(float(r.diff), 5)} for r in diff.itertuples(index=False)]
    # narrow columns: the grid sits in a side panel, all five must fit without scrolling
    columns = [{**grid_column("layer", "int"), "minWidth": 60}, {**grid_column("head", "int"), "minWidth": 60},
               *({**grid_column(c, "float"), "minWidth": 80} for c in ("A", "B", "B − A"))]
    return data, columns


def shape_note(scan: Any, other: Any, names: tuple[str, str]) -> str | None:
    """A sentence when the two scans differ in shape, model or are the same scan; None otherwise."""
    notes = []
    if names[0] == names[1]:
        notes.append("A and B are the same scan (differences are 0); pick another B")
    shape_a = (int(scan.heads["layer"].max()) + 1, int(scan.heads["head"].max()) + 1)
    shape_b = (int(other.heads["layer"].max()) + 1, int(other.heads["head"].max()) + 1)
    if shape_a != shape_b:
        notes.append(f"the scans have different shapes ({shape_a[0]}x{shape_a[1]} vs {shape_b[0]}x{shape_b[1]} "
                     f"layers x heads): differences are over the heads both have")
    if scan.meta.get("model") != other.meta.get("model"):
        notes.append(f"different models: {scan.meta.get('model')} vs {other.meta.get('model')}")
    return "; ".join(notes) + "." if notes else None
