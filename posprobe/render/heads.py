"""Head-level figures: the layer x head atlas of any metric, per-head curves and a metric ranking bar chart.

Owns pure functions from a Scan (heads / curves tables) to plotly figures; no model access, no state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from posprobe.errors import UnknownNameError


def atlas(scan: Any, metric: str | None = None, colorscale: str = "Viridis") -> go.Figure:
    """Heatmap of `metric` with layers on the y axis and heads on the x axis; hover shows every metric."""
    metrics = scan.metrics
    if not metrics:
        return go.Figure(layout={"title": "This scan has no head metrics"})
    metric = metric or metrics[0]
    if metric not in metrics:
        raise UnknownNameError("metric", metric, metrics)
    heads = scan.heads
    n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
    z = np.full((n_layers, n_heads), np.nan)
    z[heads["layer"].to_numpy(), heads["head"].to_numpy()] = heads[metric].to_numpy(dtype=float)
    hover = np.empty((n_layers, n_heads), dtype=object)
    for row in heads.itertuples(index=False):
        parts = [f"L{row.layer} H{row.head} (kv {row.kv_head}, {row.layer_type})"]
        parts += [f"{m}: {getattr(row, m):.4g}" if isinstance(getattr(row, m), (float, int, np.floating))
                  else f"{m}: {getattr(row, m)}" for m in metrics]
        hover[row.layer, row.head] = "<br>".join(parts)
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n_heads)), y=list(range(n_layers)), colorscale=colorscale,
                               text=hover, hoverinfo="text", colorbar={"title": metric}))
    fig.update_layout(title=f"{metric} by layer and head — {scan.meta.get('model')}", xaxis_title="head",
                      yaxis_title="layer", yaxis={"autorange": "reversed"}, margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return fig


def curve(scan: Any, name: str, layer: int | None = None, head: int | None = None, log_x: bool | None = None) -> go.Figure:
    """One curve (by name) for a head, a layer (all its heads) or the whole model; one trace per (series, head)."""
    df = scan.curves[scan.curves["curve"] == name]
    if df.empty:
        available = sorted(scan.curves["curve"].unique()) if len(scan.curves) else []
        raise UnknownNameError("curve", name, available)
    if layer is not None:
        df = df[df["layer"] == layer]
    if head is not None:
        df = df[df["head"] == head]
    fig = go.Figure()
    for (series, lyr, hd), group in df.groupby(["series", "layer", "head"], sort=True):
        label = " ".join(x for x in (f"L{lyr}" if lyr >= 0 else "model", f"H{hd}" if hd >= 0 else "", series) if x)
        group = group.sort_values("x")
        fig.add_trace(go.Scatter(x=group["x"], y=group["y"], mode="lines+markers", name=label))
    if log_x is None:
        positive = df["x"][df["x"] > 0]
        log_x = len(positive) > 0 and positive.max() / max(positive.min(), 1e-12) > 50
    fig.update_layout(title=name.replace("_", " "), xaxis_type="log" if log_x else "linear",
                      margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return fig


def ranking(scan: Any, metric: str, top: int = 20, ascending: bool = False) -> go.Figure:
    """Horizontal bar chart of the top heads by `metric`."""
    ranked = scan.rank(metric, top=top, ascending=ascending)
    labels = [f"L{r.layer}H{r.head}" for r in ranked.itertuples()]
    fig = go.Figure(go.Bar(x=ranked[metric], y=labels, orientation="h"))
    fig.update_layout(title=f"top {len(ranked)} heads by {metric}", yaxis={"autorange": "reversed"},
                      margin={"l": 70, "r": 20, "t": 50, "b": 40})
    return fig
