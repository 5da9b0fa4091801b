"""The head atlas view: layers x heads heatmap coloured by any head metric, hover with every metric, click to select.

Owns the atlas tab's layout and pure helpers (`figure`, `marker_patch_shapes`, `head_panel`) over
`posprobe.render.heads`. Implements no metric (docs/explorer.md; it shows all of them).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from dash import dcc, html

from posprobe.app import ids
from posprobe.app.pages.common import format_value, message
from posprobe.render.head_detail import head_metrics
from posprobe.render.heads import atlas, head_marker


def layout() -> html.Div:
    return html.Div(className="pp-view", children=[
        html.Div(className="pp-controls", children=[
            html.Label("colour by metric", htmlFor=ids.ATLAS_METRIC),
            dcc.Dropdown(id=ids.ATLAS_METRIC, clearable=False, className="pp-dropdown"),
            html.Span("click a cell to select a head", className="pp-hint"),
        ]),
        html.Div(className="pp-row", children=[
            html.Div(className="pp-main", children=[
                dcc.Graph(id=ids.ATLAS_GRAPH, config={"displaylogo": False}, clear_on_unhover=True),
                dcc.Store(id=ids.ATLAS_SHAPES),
            ]),
            html.Div(className="pp-side", children=[
                html.Div(id=ids.ATLAS_PANEL),
                html.Button("Head detail →", id=ids.OPEN_HEAD, className="pp-button", disabled=True),
            ]),
        ]),
    ])


def figure(scan: Any, metric: str | None, selected: tuple[int, int] | None) -> go.Figure:
    """The atlas figure, sized to the number of layers."""
    fig = atlas(scan, metric, selected=selected)
    n_layers = int(scan.heads["layer"].max()) + 1 if len(scan.heads) else 1
    fig.update_layout(height=min(900, max(380, 16 * n_layers + 140)), clickmode="event")
    return fig


def marker_shapes(selected: tuple[int, int] | None) -> list[dict[str, Any]]:
    """The atlas `layout.shapes` outlining the selected head."""
    return [head_marker(*selected)] if selected is not None else []


def head_panel(scan: Any, selected: tuple[int, int] | None) -> list[Any]:
    """The side panel: the selected head's identity and every metric with its rank among heads."""
    if selected is None:
        return [message("No head selected yet: click a cell of the atlas.")]
    layer, head = selected
    row = scan.heads[(scan.heads["layer"] == layer) & (scan.heads["head"] == head)]
    if row.empty:
        return [message(f"L{layer} H{head} is not in this scan.", "warning")]
    first = row.iloc[0]
    table = head_metrics(scan, layer, head)
    body = []
    for record in table.itertuples(index=False):
        value = format_value(record.value)
        rank = f"#{record.rank} of {record.of}" if pd.notna(record.rank) else ""
        body.append(html.Tr([html.Td(record.metric), html.Td(value, className="pp-num"),
                             html.Td(rank, className="pp-rank")]))
    return [
        html.H3(f"L{layer} H{head}", className="pp-head-name"),
        html.Div(f"kv head {first['kv_head']} · {first['layer_type']}", className="pp-sub"),
        html.Table(className="pp-table", children=[html.Tbody(body)]),
    ]
