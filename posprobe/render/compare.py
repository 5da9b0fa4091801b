"""Two scans side by side: per-head differences of a metric and overlays of a shared curve.

Owns pure functions over two Scans (e.g. two models, two seeds, a model with and without an intervention):
`head_differences` (a table of B - A per common (layer, head)), `compare_atlas` (A | B on one colour scale, and
B - A on a diverging scale) and `compare_curve` (the same curve of both scans on one figure). Scans of different
shapes are compared on the (layer, head) pairs they share. Renders any head metric; computes only
differences.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from posprobe.errors import UnknownNameError
from posprobe.render.head_detail import curve_table, log_x_axis
from posprobe.render.heads import numeric_metrics

LABELS = ("A", "B")


def common_metrics(scan: Any, other: Any) -> list[str]:
    """Numeric head metrics present in both scans, in the first scan's order."""
    theirs = set(numeric_metrics(other))
    return [m for m in numeric_metrics(scan) if m in theirs]


def common_curves(scan: Any, other: Any) -> list[str]:
    """Curve names present in both scans."""
    if scan.curves.empty or other.curves.empty:
        return []
    theirs = set(other.curves["curve"].unique())
    return [c for c in dict.fromkeys(scan.curves["curve"]) if c in theirs]


def head_differences(scan: Any, other: Any, metric: str) -> pd.DataFrame:
    """Per (layer, head) in both scans: `a`, `b`, `diff` = b - a; sorted by |diff| (largest first, NaN last)."""
    metrics = common_metrics(scan, other)
    if metric not in metrics:
        raise UnknownNameError("metric present in both scans", metric, metrics)
    a = scan.heads[["layer", "head", metric]].rename(columns={metric: "a"})
    b = other.heads[["layer", "head", metric]].rename(columns={metric: "b"})
    merged = a.merge(b, on=["layer", "head"], how="inner")
    merged["a"] = merged["a"].astype(float)
    merged["b"] = merged["b"].astype(float)
    merged["diff"] = merged["b"] - merged["a"]
    merged["abs_diff"] = merged["diff"].abs()
    merged = merged.sort_values("abs_diff", ascending=False, na_position="last", kind="stable")
    return merged.drop(columns="abs_diff").reset_index(drop=True)


def _grid(heads: pd.DataFrame, column: str, shape: tuple[int, int]) -> np.ndarray:
    z = np.full(shape, np.nan)
    z[heads["layer"].to_numpy(), heads["head"].to_numpy()] = heads[column].to_numpy(dtype=float)
    return z


def compare_atlas(scan: Any, other: Any, metric: str | None = None,
                  labels: tuple[str, str] = LABELS) -> go.Figure:
    """Three heatmaps: `metric` of scan A and of scan B on one colour scale, and B - A on a diverging scale."""
    metrics = common_metrics(scan, other)
    if not metrics:
        return go.Figure(layout={"title": "The two scans share no head metric"})
    metric = metric or metrics[0]
    if metric not in metrics:
        raise UnknownNameError("metric present in both scans", metric, metrics)
    shape = (int(max(scan.heads["layer"].max(), other.heads["layer"].max())) + 1,
             int(max(scan.heads["head"].max(), other.heads["head"].max())) + 1)
    za, zb = _grid(scan.heads, metric, shape), _grid(other.heads, metric, shape)
    diff = _grid(head_differences(scan, other, metric), "diff", shape)
    both = np.concatenate([za[np.isfinite(za)], zb[np.isfinite(zb)]])
    low, high = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    spread = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.1,
                        subplot_titles=(labels[0], labels[1], f"{labels[1]} − {labels[0]}"))
    hover = "L%{y} H%{x}: %{z:.4g}<extra>%{fullData.name}</extra>"
    fig.add_trace(go.Heatmap(z=za, coloraxis="coloraxis", name=labels[0], hovertemplate=hover), row=1, col=1)
    fig.add_trace(go.Heatmap(z=zb, coloraxis="coloraxis", name=labels[1], hovertemplate=hover), row=1, col=2)
    fig.add_trace(go.Heatmap(z=diff, coloraxis="coloraxis2", name="difference", hovertemplate=hover), row=1, col=3)
    fig.update_layout(
        title=f"{metric}: {labels[0]} vs {labels[1]}",
        coloraxis={"colorscale": "Viridis", "cmin": low, "cmax": high,
                   "colorbar": {"title": metric, "x": 0.645, "xanchor": "left", "len": 0.9, "thickness": 12}},
        coloraxis2={"colorscale": "RdBu_r", "cmid": 0, "cmin": -spread, "cmax": spread,
                    "colorbar": {"title": "B − A", "x": 1.01, "xanchor": "left", "len": 0.9, "thickness": 12}},
        margin={"l": 50, "r": 20, "t": 70, "b": 40}, height=max(320, 40 + 18 * shape[0]),
    )
    fig.update_yaxes(autorange="reversed", title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="head")
    return fig


def compare_curve(scan: Any, other: Any, name: str, layer: int | None = None, head: int | None = None,
                  labels: tuple[str, str] = LABELS) -> go.Figure:
    """Curve `name` of both scans on one figure (A solid, B dashed), one trace per series (and layer).

    layer / head select rows as in `Scan.curve`; with neither given, the model- and layer-level rows (head == -1)
    are drawn when the curve has any, else the mean over heads.
    """
    shared = common_curves(scan, other)
    if name not in shared:
        raise UnknownNameError("curve present in both scans", name, shared)
    fig = go.Figure()
    for source, label, dash in ((scan, labels[0], "solid"), (other, labels[1], "dash")):
        curves = curve_table(source)
        df = curves[curves["curve"] == name]
        if layer is not None:
            df = df[df["layer"] == layer]
        if head is not None:
            df = df[df["head"] == head]
        if layer is None and head is None:
            level = df[df["head"] == -1]
            df = level if not level.empty else df.assign(head=-1, layer=-1)
        df = df.groupby(["series", "layer", "head", "x"], sort=True)["y"].mean().reset_index()
        for (series, lyr, hd), group in df.groupby(["series", "layer", "head"], sort=True):
            where = " ".join(x for x in (f"L{lyr}" if lyr >= 0 else "", f"H{hd}" if hd >= 0 else "", series) if x)
            fig.add_trace(go.Scatter(x=group["x"], y=group["y"], mode="lines+markers", line={"dash": dash},
                                     name=f"{label}{(' ' + where) if where else ''}"))
    xs = np.concatenate([np.asarray(t.x, dtype=float) for t in fig.data]) if fig.data else np.zeros(0)
    fig.update_layout(title=f"{name.replace('_', ' ')}: {labels[0]} vs {labels[1]}", height=360,
                      xaxis_type="log" if log_x_axis(pd.Series(xs)) else "linear",
                      margin={"l": 55, "r": 20, "t": 50, "b": 40}, legend={"font": {"size": 10}})
    return fig
