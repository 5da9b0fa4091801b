"""Head-level figures: the layer x head atlas of any metric, per-head curves and a metric ranking bar chart.

Owns pure functions from a Scan (heads / curves tables) to plotly figures; no model access, no state. Renders the
head tables of every probe; computes nothing new.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from posprobe.errors import UnknownNameError


def numeric_metrics(scan: Any) -> list[str]:
    """The head-metric columns that can be coloured (numeric or boolean), in table order."""
    return [m for m in scan.metrics if pd.api.types.is_numeric_dtype(scan.heads[m])]


def head_marker(layer: int, head: int, color: str = "#e4572e") -> dict[str, Any]:
    """A rectangle shape outlining one (layer, head) cell of an atlas heatmap."""
    return {"type": "rect", "xref": "x", "yref": "y", "x0": head - 0.5, "x1": head + 0.5, "y0": layer - 0.5,
            "y1": layer + 0.5, "line": {"color": color, "width": 3}, "fillcolor": "rgba(0,0,0,0)"}


def atlas(scan: Any, metric: str | None = None, colorscale: str | None = None,
          selected: tuple[int, int] | None = None) -> go.Figure:
    """Heatmap of `metric` with layers on the y axis and heads on the x axis; hover shows every metric.

    Every numeric metric travels as one float32 `customdata` array read by a single `hovertemplate`, so the figure
    stays small (about 100 KB for 1,500 heads x 12 metrics) instead of one formatted string per cell. A metric
    with both signs gets a diverging colour scale centred on 0 unless `colorscale` is given. `selected` outlines
    one (layer, head) cell.
    """
    metrics = numeric_metrics(scan)
    if not metrics:
        return go.Figure(layout={"title": "This scan has no head metrics"})
    metric = metric or metrics[0]
    if metric not in metrics:
        raise UnknownNameError("metric", metric, metrics)
    heads = scan.heads
    n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
    rows, cols = heads["layer"].to_numpy(), heads["head"].to_numpy()
    z = np.full((n_layers, n_heads), np.nan)
    z[rows, cols] = heads[metric].to_numpy(dtype=float)
    custom: np.ndarray = np.full((n_layers, n_heads, len(metrics) + 1), np.nan, dtype=np.float32)
    custom[rows, cols, 0] = heads["kv_head"].to_numpy(dtype=float)
    for index, name in enumerate(metrics, start=1):
        custom[rows, cols, index] = heads[name].to_numpy(dtype=float)
    layer_types = heads.drop_duplicates("layer").set_index("layer")["layer_type"].astype(str)
    mixed_types = layer_types.nunique() > 1
    text = None
    if mixed_types:
        labels = np.array([layer_types.get(layer, "") for layer in range(n_layers)], dtype=object)
        text = np.repeat(labels[:, None], n_heads, axis=1).tolist()
    header = "L%{y} H%{x} (kv %{customdata[0]:.0f}" + (", %{text}" if mixed_types else "") + ")"
    lines = [f"{name}: %{{customdata[{index}]:.4g}}" for index, name in enumerate(metrics, start=1)]
    finite = z[np.isfinite(z)]
    diverging = finite.size > 0 and finite.min() < 0 < finite.max()
    scale = colorscale or ("RdBu_r" if diverging else "Viridis")
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(n_heads), y=np.arange(n_layers), customdata=custom, text=text,
                               hovertemplate="<br>".join([header, *lines]) + "<extra></extra>", colorscale=scale,
                               zmid=0 if diverging and colorscale is None else None, colorbar={"title": metric}))
    single_type = "" if mixed_types or layer_types.empty else f", {layer_types.iloc[0]}"
    fig.update_layout(title=f"{metric} by layer and head — {scan.meta.get('model')}{single_type}",
                      xaxis={"title": "head", "dtick": 1 if n_heads <= 32 else None},
                      yaxis={"title": "layer", "autorange": "reversed", "dtick": 1 if n_layers <= 32 else None},
                      margin={"l": 50, "r": 20, "t": 50, "b": 40})
    if selected is not None:
        fig.add_shape(**head_marker(*selected))
    return fig


def curve(scan: Any, name: str, layer: int | None = None, head: int | None = None,
          log_x: bool | None = None) -> go.Figure:
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
    for (series, lyr, hd), group in df.groupby(["series", "layer", "head"], sort=True, dropna=False):
        series = "" if pd.isna(series) else series
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
