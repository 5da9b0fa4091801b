"""Figures and tables for one head: every curve a scan holds for it, and where it ranks on every metric.

Owns pure functions from a Scan and a (layer, head) to plotly figures / DataFrames, used by the explorer's head
view and by notebooks. Curves are found generically in the long `scan.curves` table by name, so a new probe's
per-head curves appear without edits here. Renders the per-head curves of every probe (attention vs
distance, RoPE usage spectrum, long-range contribution by chunk, entropy by position, retrieval score by
depth/length, position-bias curve, ...); computes nothing new beyond means over the other heads of a layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from posprobe.errors import UnknownNameError
from posprobe.render.heads import numeric_metrics

CONTEXT_COLOR = "rgba(120,120,120,0.8)"


def curve_table(scan: Any) -> pd.DataFrame:
    """`scan.curves` with a missing series (None / NaN, e.g. after a Parquet round trip) read as "" (no series)."""
    curves = scan.curves
    if len(curves) and curves["series"].isna().any():
        curves = curves.assign(series=curves["series"].fillna(""))
    return curves


def ordered_curve_names(df: pd.DataFrame) -> list[str]:
    """Curve names grouped by probe, in the order they appear in the scan."""
    if df.empty:
        return []
    pairs = df[["probe", "curve"]].drop_duplicates()
    probe_order = {probe: i for i, probe in enumerate(pairs["probe"].drop_duplicates())}
    pairs = pairs.assign(_order=pairs["probe"].map(probe_order)).sort_values("_order", kind="stable")
    return list(dict.fromkeys(pairs["curve"]))


def head_curve_names(scan: Any, layer: int, head: int) -> list[str]:
    """Names of the curves the scan holds for this head (rows with exactly this layer and head)."""
    curves = curve_table(scan)
    return ordered_curve_names(curves[(curves["layer"] == layer) & (curves["head"] == head)])


def layer_curve_names(scan: Any, layer: int) -> list[str]:
    """Names of the layer-level curves (head == -1) the scan holds for this layer."""
    curves = curve_table(scan)
    return ordered_curve_names(curves[(curves["layer"] == layer) & (curves["head"] == -1)])


def log_x_axis(x: pd.Series) -> bool:
    """Use a log x axis when the positive x values span more than a factor 50 (distances, positions, lengths)."""
    positive = x[x > 0]
    return bool(len(positive) > 0 and positive.max() / max(positive.min(), 1e-12) > 50)


def head_curve(scan: Any, name: str, layer: int, head: int, context: bool = True) -> go.Figure:
    """One curve for one head, one trace per series; with `context`, the mean of the layer's other heads dashed.

    For a layer-level curve (head == -1) pass head=-1: the layer's own rows are drawn.
    """
    curves = curve_table(scan)
    df = curves[curves["curve"] == name]
    if df.empty:
        available = sorted(curves["curve"].unique()) if len(curves) else []
        raise UnknownNameError("curve", name, available)
    own = df[(df["layer"] == layer) & (df["head"] == head)]
    fig = go.Figure()
    many_series = own["series"].nunique() > 1
    for series, group in own.groupby("series", sort=False):
        group = group.sort_values("x")
        label = series if series else (f"L{layer} H{head}" if head >= 0 else f"L{layer}")
        fig.add_trace(go.Scatter(x=group["x"], y=group["y"], mode="lines+markers", name=label,
                                 legendgroup=str(series)))
    others = df[(df["layer"] == layer) & (df["head"] >= 0) & (df["head"] != head)] if head >= 0 else df.iloc[:0]
    if context and not others.empty:
        mean = others.groupby(["series", "x"], sort=True)["y"].mean().reset_index()
        context_dashes = ("dash", "dot", "dashdot", "longdash", "longdashdot")  # one per series: tell them apart
        for i, (series, group) in enumerate(mean.groupby("series", sort=False)):
            label = f"layer mean of other heads{f' ({series})' if series and many_series else ''}"
            fig.add_trace(go.Scatter(x=group["x"], y=group["y"], mode="lines", name=label, legendgroup=str(series),
                                     line={"dash": context_dashes[i % len(context_dashes)], "color": CONTEXT_COLOR,
                                           "width": 1.5}))
    probe = df["probe"].iloc[0]
    where = f"L{layer} H{head}" if head >= 0 else f"layer {layer}"
    x_all = pd.concat([own["x"], others["x"]]) if context else own["x"]
    fig.update_layout(title={"text": f"{name.replace('_', ' ')}<br><sup>{where} · {probe}</sup>", "font": {"size": 15}},
                      xaxis_type="log" if log_x_axis(x_all) else "linear", height=360,
                      margin={"l": 50, "r": 15, "t": 60, "b": 30},
                      legend={"font": {"size": 10}, "orientation": "h", "y": -0.15, "x": 0})
    if own.empty:
        fig.add_annotation(text="no values for this head", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def head_curves(scan: Any, layer: int, head: int, context: bool = True) -> list[tuple[str, go.Figure]]:
    """Every per-head curve of this head, then every layer-level curve of its layer, as (name, figure) pairs."""
    out = [(name, head_curve(scan, name, layer, head, context)) for name in head_curve_names(scan, layer, head)]
    out += [(name, head_curve(scan, name, layer, -1, context=False)) for name in layer_curve_names(scan, layer)]
    return out


def head_metrics(scan: Any, layer: int, head: int) -> pd.DataFrame:
    """One row per metric for this head: value, rank among all heads (1 = highest) and percentile (100 = top).

    Non-numeric metric columns are listed with their value and no rank. Raises UnknownNameError for a head that is
    not in the scan.
    """
    heads = scan.heads
    match = heads[(heads["layer"] == layer) & (heads["head"] == head)]
    if match.empty:
        valid = [f"L{r.layer}H{r.head}" for r in heads[["layer", "head"]].itertuples()]
        raise UnknownNameError("head", f"L{layer}H{head}", valid[:20] + (["..."] if len(valid) > 20 else []))
    row = match.iloc[0]
    numeric = set(numeric_metrics(scan))
    records = []
    for metric in scan.metrics:
        value = row[metric]
        if metric in numeric and pd.notna(value):
            column = heads[metric].astype(float)
            valid = column.dropna()
            rank = int((valid > float(value)).sum()) + 1
            percentile = 100.0 * float((valid <= float(value)).mean())
            records.append({"metric": metric, "value": float(value), "rank": rank, "of": int(len(valid)),
                            "percentile": percentile})
        else:
            records.append({"metric": metric, "value": value if metric not in numeric else np.nan, "rank": None,
                            "of": None, "percentile": np.nan})
    table = pd.DataFrame(records, columns=["metric", "value", "rank", "of", "percentile"])
    return table.astype({"rank": "Int64", "of": "Int64", "percentile": "float64"})
