"""The model view: head metrics by layer, every model-/layer-level curve, layer means of head curves, extra tables.

Owns the model tab's layout and pure helpers over `posprobe.render.model_view`. Curves are grouped by the probe that
reported them and found by name, so a new probe's curves (implicit-position R^2 by layer, attention-, document- and
behavioural U-curves with and without interventions, ...) appear without edits; a scan without them shows what it
has and says what is missing. Implements no metric (docs/explorer.md; it shows docs/probes/*.md and docs/tasks.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from dash import dcc, html

from posprobe.app import ids
from posprobe.app.pages.common import data_grid, grid_column, message
from posprobe.render.model_view import curve_probe, model_curve, model_curve_names, position_curve, position_tables

PREVIEW_ROWS = 200  # rows of an extra table sent to the browser (the CLI `posprobe export` gives the whole table)


def layout() -> html.Div:
    return html.Div(className="pp-view", children=[
        html.H3("Head metrics by layer", className="pp-section"),
        html.Div(className="pp-controls", children=[
            html.Label("metric", htmlFor=ids.MODEL_METRIC),
            dcc.Dropdown(id=ids.MODEL_METRIC, clearable=False, className="pp-dropdown"),
        ]),
        dcc.Graph(id=ids.MODEL_METRIC_GRAPH, config={"displaylogo": False}),
        html.Div(id=ids.MODEL_CURVES),
        html.Div(id=ids.MODEL_HEADCURVE_SECTION, children=[
            html.H3("Head-level curves, mean over the heads of each layer", className="pp-section"),
            html.Div(className="pp-controls", children=[
                html.Label("curve", htmlFor=ids.MODEL_HEADCURVE),
                dcc.Dropdown(id=ids.MODEL_HEADCURVE, clearable=False, className="pp-dropdown"),
            ]),
            dcc.Graph(id=ids.MODEL_HEADCURVE_GRAPH, config={"displaylogo": False}),
        ]),
        html.Div(id=ids.MODEL_TABLE_SECTION, children=[
            html.H3("Extra tables", className="pp-section"),
            html.Div(className="pp-controls", children=[
                html.Label("table", htmlFor=ids.MODEL_TABLE),
                dcc.Dropdown(id=ids.MODEL_TABLE, clearable=False, className="pp-dropdown"),
                html.Span(f"first {PREVIEW_ROWS} rows; `posprobe export SCAN --table NAME` writes all of them",
                          className="pp-hint"),
            ]),
            data_grid(ids.MODEL_TABLE_VIEW, 12),
        ]),
    ])


def curve_sections(scan: Any) -> list[Any]:
    """Model- and layer-level curves grouped by probe, then position sweeps from extra tables."""
    by_probe: dict[str, list[str]] = {}
    for name in model_curve_names(scan):
        by_probe.setdefault(curve_probe(scan, name), []).append(name)
    children: list[Any] = [html.H3("Model- and layer-level curves", className="pp-section")]
    if not by_probe:
        probes = ", ".join(sorted((scan.meta.get("probes") or {}).keys())) or "none"
        children.append(message(f"This scan has no model- or layer-level curves (probes run: {probes}). "
                                "Probes such as implicit_position and position_bias add them."))
    for probe, names in by_probe.items():
        cards = [html.Div(className="pp-card model-curve", **{"data-curve": name},
                          children=[dcc.Graph(figure=model_curve(scan, name), config={"displaylogo": False})])
                 for name in names]
        children += [html.H4(probe, className="pp-probe"), html.Div(className="pp-grid", children=cards)]
    sweeps = position_tables(scan)
    if sweeps:
        children.append(html.H3("Accuracy by gold position (behavioural U-curves)", className="pp-section"))
        children.append(html.Div(className="pp-grid", children=[
            html.Div(className="pp-card position-curve", **{"data-table": name},
                     children=[dcc.Graph(figure=position_curve(scan, name), config={"displaylogo": False})])
            for name in sweeps]))
    return children


def table_preview(table: pd.DataFrame) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Grid (rowData, columnDefs) of the first PREVIEW_ROWS rows, values made JSON-safe (NaN / inf -> null, other
    objects -> text); integer columns shown as they are, float columns to 4 significant digits."""
    head = table.head(PREVIEW_ROWS)
    finite = head.replace([np.inf, -np.inf], np.nan)
    safe = finite.astype(object).where(finite.notna(), None)
    columns = []
    for column in safe.columns:
        if not all(isinstance(v, (str, int, float, bool, type(None))) for v in safe[column]):
            safe[column] = safe[column].map(lambda v: v if v is None else str(v))
        dtype = head[column].dtype
        kind = ("int" if pd.api.types.is_integer_dtype(dtype) else "float" if pd.api.types.is_float_dtype(dtype)
                else "text")
        columns.append(grid_column(str(column), kind))
    return safe.rename(columns=str).to_dict("records"), columns
