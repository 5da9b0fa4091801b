"""Model-level figures: curves over layers and whole-model curves, head metrics by layer, position sweeps.

Owns pure functions from a Scan to plotly figures for the explorer's model view and for notebooks: every model-level
(layer = head = -1) and layer-level (head = -1) curve by name (implicit-position R^2 by layer, attention-level and
document-level U-curves, variance shrinkage, ... one trace per series, so "with / without intervention" series sit on
one figure), the mean over heads of any head-level curve per layer, the distribution of a head metric per layer, and
behavioural position sweeps from any extra table shaped like `evaluate_positions` output (`gold_position`, `accuracy`,
optional `ci_low` / `ci_high` / `n`). Found generically by name, so a new probe's curves and tables appear without edits
here. Renders the model-level curves of docs/probes/*.md and docs/tasks.md; computes nothing new beyond means.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from posprobe.errors import UnknownNameError
from posprobe.render.head_detail import curve_table, log_x_axis, ordered_curve_names
from posprobe.render.heads import numeric_metrics

POSITION_COLUMNS = ("gold_position", "accuracy")  # a table with these columns is a behavioural position sweep
POSITION_VALUE_COLUMNS = {"gold_position", "accuracy", "ci_low", "ci_high", "n"}
MAX_GROUPS = 12  # a column with more distinct values than this is not a grouping of a position sweep
SIZE_SUFFIXES = ("length", "len", "n_docs", "n_items", "size")  # integer columns that split a sweep into curves
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
MARGIN = {"l": 55, "r": 20, "t": 60, "b": 40}
LEGEND = {"font": {"size": 10}, "orientation": "h", "y": -0.18, "x": 0}


def _names(df: pd.DataFrame) -> list[str]:
    return ordered_curve_names(df)


def model_curve_names(scan: Any) -> list[str]:
    """Curves with model-level (layer = head = -1) or layer-level (head = -1) rows, grouped by probe (scan order)."""
    curves = curve_table(scan)
    return _names(curves[curves["head"] == -1])


def head_level_curve_names(scan: Any) -> list[str]:
    """Curves with per-head rows (head >= 0), grouped by probe (scan order)."""
    curves = curve_table(scan)
    return _names(curves[curves["head"] >= 0])


def curve_probe(scan: Any, name: str) -> str:
    """The probe that reported curve `name`."""
    rows = scan.curves[scan.curves["curve"] == name]
    if rows.empty:
        raise UnknownNameError("curve", name, sorted(scan.curves["curve"].unique()) if len(scan.curves) else [])
    return str(rows["probe"].iloc[0])


def _add_layer_traces(fig: go.Figure, frame: pd.DataFrame) -> None:
    """One line per (layer, series) coloured by layer on a Viridis colour bar, series told apart by dash style.

    The legend lists only the series (a 48-layer legend is unreadable); hover names the layer.
    """
    layers = sorted(int(v) for v in frame["layer"].unique())
    if not layers:
        return
    low, high = layers[0], layers[-1]
    colors = dict(zip(layers, sample_colorscale("Viridis", [(v - low) / max(high - low, 1) for v in layers])))
    series_list = list(frame["series"].drop_duplicates())
    dashes = {series: DASHES[i % len(DASHES)] for i, series in enumerate(series_list)}
    for (layer, series), group in frame.groupby(["layer", "series"], sort=True):
        group = group.sort_values("x")
        label = f"L{layer}{f' {series}' if series else ''}"
        fig.add_trace(go.Scatter(x=group["x"], y=group["y"], mode="lines", name=label, showlegend=False,
                                 line={"color": colors[int(layer)], "dash": dashes[series]},
                                 hovertemplate=f"{label}<br>x=%{{x}}<br>y=%{{y:.4g}}<extra></extra>"))
    if series_list != [""]:
        for series in series_list:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=series or "(default)",
                                     line={"color": "#555", "dash": dashes[series]}))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                             marker={"colorscale": "Viridis", "cmin": low, "cmax": high, "color": [low],
                                     "showscale": True, "colorbar": {"title": "layer", "thickness": 12,
                                                                     **_integer_ticks(high - low)}}))


def _integer_ticks(span: int) -> dict[str, Any]:
    """Whole-number ticks for a layer axis / colour bar (plotly picks 0.5 steps when there are few layers)."""
    return {"tick0": 0, "dtick": max(1, -(-span // 10))}


def model_curve(scan: Any, name: str) -> go.Figure:
    """A model-level and/or layer-level curve: one trace per series (model level) or per layer x series."""
    curves = curve_table(scan)
    df = curves[(curves["curve"] == name) & (curves["head"] == -1)]
    if df.empty:
        raise UnknownNameError("model-level curve", name, model_curve_names(scan))
    fig = go.Figure()
    model = df[df["layer"] == -1]
    with_layers = bool((df["layer"] >= 0).any())
    for series, group in model.groupby("series", sort=False):
        group = group.sort_values("x")
        style = {"width": 3.5, "color": "black"} if with_layers and model["series"].nunique() == 1 else None
        fig.add_trace(go.Scatter(x=group["x"], y=group["y"], mode="lines+markers", name=series or "model", line=style))
    _add_layer_traces(fig, df[df["layer"] >= 0])
    level = "model" if (df["layer"] == -1).all() else ("by layer" if (df["layer"] >= 0).all() else "model and layers")
    fig.update_layout(title={"text": f"{name.replace('_', ' ')}<br><sup>{level} · {df['probe'].iloc[0]}</sup>",
                             "font": {"size": 15}},
                      xaxis_type="log" if log_x_axis(df["x"]) else "linear", margin=MARGIN, height=380,
                      legend=LEGEND)
    return fig


def layer_mean_curve(scan: Any, name: str) -> go.Figure:
    """A head-level curve averaged over the heads of each layer: one trace per layer (x series)."""
    curves = curve_table(scan)
    df = curves[(curves["curve"] == name) & (curves["head"] >= 0)]
    if df.empty:
        raise UnknownNameError("head-level curve", name, head_level_curve_names(scan))
    mean = df.groupby(["layer", "series", "x"], sort=True)["y"].mean().reset_index()
    fig = go.Figure()
    _add_layer_traces(fig, mean)
    fig.update_layout(title={"text": f"{name.replace('_', ' ')}<br><sup>mean over the heads of each layer · "
                                     f"{df['probe'].iloc[0]}</sup>", "font": {"size": 15}},
                      margin=MARGIN, height=380, xaxis_type="log" if log_x_axis(mean["x"]) else "linear", legend=LEGEND)
    return fig


def metric_by_layer(scan: Any, metric: str) -> go.Figure:
    """Distribution of a head metric per layer: every head as a point, the layer mean as a line, min-max shaded."""
    metrics = numeric_metrics(scan)
    if metric not in metrics:
        raise UnknownNameError("metric", metric, metrics)
    heads = scan.heads[["layer", "head", metric]].dropna()
    stats = heads.groupby("layer")[metric].agg(["mean", "min", "max"]).reset_index()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=stats["layer"], y=stats["max"], mode="lines", line={"width": 0}, showlegend=False,
                             hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=stats["layer"], y=stats["min"], mode="lines", line={"width": 0}, fill="tonexty",
                             fillcolor="rgba(99,110,250,0.15)", name="min-max over heads", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=heads["layer"], y=heads[metric], mode="markers", name="heads",
                             marker={"size": 5, "color": "rgba(80,80,80,0.45)"}, customdata=heads["head"],
                             hovertemplate="L%{x} H%{customdata}: %{y:.4g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=stats["layer"], y=stats["mean"], mode="lines+markers", name="layer mean",
                             line={"color": "#636efa", "width": 2.5}))
    fig.update_layout(title=f"{metric} by layer", xaxis_title="layer", yaxis_title=metric, margin=MARGIN, height=360)
    fig.update_xaxes(**_integer_ticks(int(stats["layer"].max() - stats["layer"].min()) if len(stats) else 0))
    return fig


def position_tables(scan: Any) -> list[str]:
    """Names of extra tables shaped like a position sweep (`gold_position` and `accuracy` columns)."""
    return [name for name, table in scan.tables.items() if all(c in table.columns for c in POSITION_COLUMNS)]


def _group_columns(table: pd.DataFrame) -> list[str]:
    keep = []
    for column in table.columns:
        if column in POSITION_VALUE_COLUMNS:
            continue
        values = table[column]
        categorical = not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
        length_like = pd.api.types.is_integer_dtype(values) and column.endswith(SIZE_SUFFIXES)
        if (categorical or length_like) and values.nunique(dropna=False) <= MAX_GROUPS:
            keep.append(column)
    return keep


def position_curve(scan: Any, table: str) -> go.Figure:
    """Accuracy by gold position from a position-sweep table (a behavioural U-curve), with its CI band if present.

    One trace per combination of the table's categorical columns (e.g. task, intervention), so results with and
    without an intervention share the figure.
    """
    if table not in scan.tables:
        raise UnknownNameError("table", table, scan.tables)
    df = scan.tables[table]
    if not all(c in df.columns for c in POSITION_COLUMNS):
        raise UnknownNameError("position-sweep table", table, position_tables(scan))
    groups = _group_columns(df)
    fig = go.Figure()
    grouped = df.groupby(groups, sort=False, dropna=False) if groups else [((), df)]
    palette = sample_colorscale("Plotly3", list(np.linspace(0.1, 0.85, max(len(grouped), 1))))
    for index, (key, group) in enumerate(grouped):
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{k}={v}" for k, v in zip(groups, key)) or table
        group = group.sort_values("gold_position")
        color = palette[index % len(palette)]
        if "ci_low" in group and "ci_high" in group:
            x = np.concatenate([group["gold_position"].to_numpy(), group["gold_position"].to_numpy()[::-1]])
            y = np.concatenate([group["ci_high"].to_numpy(dtype=float), group["ci_low"].to_numpy(dtype=float)[::-1]])
            fig.add_trace(go.Scatter(x=x, y=y, fill="toself", mode="lines", line={"width": 0}, fillcolor=color,
                                     opacity=0.18, hoverinfo="skip", showlegend=False, legendgroup=label))
        hover = "gold position %{x}: accuracy %{y:.3f}" + (" (n=%{customdata})" if "n" in group else "")
        fig.add_trace(go.Scatter(x=group["gold_position"], y=group["accuracy"], mode="lines+markers", name=label,
                                 line={"color": color}, legendgroup=label,
                                 customdata=group["n"] if "n" in group else None,
                                 hovertemplate=hover + "<extra></extra>"))
    fig.update_layout(title={"text": f"accuracy by gold position<br><sup>{table}</sup>", "font": {"size": 15}},
                      xaxis_title="gold position", yaxis_title="accuracy", yaxis={"range": [-0.02, 1.02]},
                      margin=MARGIN, height=380, legend=LEGEND)
    return fig
