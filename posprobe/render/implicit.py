"""Figures of the implicit-position probe (docs/probes/implicit_position.md): probe scores by layer, variance vs
position, similarity vs offset, for one scan or side by side for several (model vs RoPE-disabled vs random-init
baselines).

Owns pure functions from Scans (curves written by `posprobe.probes.implicit_position`) to plotly figures. Shuffled-
label controls are drawn dashed and grey so a leaking probe is visible at a glance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from posprobe.errors import UnknownNameError

_METRIC_TITLES = {"r2": "R^2 on held-out sequences", "spearman": "Spearman (prediction vs position)",
                  "mad": "mean absolute deviation (positions)"}
_LAYOUT = {"margin": {"l": 60, "r": 20, "t": 60, "b": 50}, "legend": {"font": {"size": 10}}}


def _curve(scan: Any, name: str) -> Any:
    df = scan.curves[scan.curves["curve"] == name]
    if df.empty:
        raise UnknownNameError("curve", name, sorted(scan.curves["curve"].unique()) if len(scan.curves) else [],
                               hint="Run the implicit_position probe: "
                                    "posprobe.scan(model, probes=['implicit_position']).")
    return df


def _series_filter(series: str, regressor: str | None, features: str | None, target: str | None) -> bool:
    parts = series.split("/")
    wanted = (regressor, features, target)
    return all(w is None or p == w for p, w in zip(parts[:3], wanted))


def implicit_probe(scan: Any, metric: str = "r2", regressor: str | None = None, features: str | None = None,
                   target: str | None = None, control: bool = True) -> go.Figure:
    """Probe `metric` ("r2", "spearman", "mad") by layer, one line per regressor/features/target; controls dashed."""
    if metric not in _METRIC_TITLES:
        raise UnknownNameError("metric", metric, _METRIC_TITLES)
    df = _curve(scan, f"implicit_{metric}_by_layer")
    fig = go.Figure()
    colors = qualitative.Plotly
    base = sorted({s.removesuffix("/shuffled") for s in df["series"].unique()
                   if _series_filter(s, regressor, features, target)})
    for i, series in enumerate(base):
        color = colors[i % len(colors)]
        for suffix, dash in (("", "solid"), ("/shuffled", "dash")):
            if suffix and not control:
                continue
            group = df[df["series"] == series + suffix].sort_values("x")
            if group.empty:
                continue
            fig.add_trace(go.Scatter(x=group["x"], y=group["y"], mode="lines+markers", name=series + suffix,
                                     line={"color": "#999999" if suffix else color, "dash": dash},
                                     marker={"size": 4}, legendgroup=series))
    fig.update_layout(title=f"implicit position: {_METRIC_TITLES[metric]} — {scan.meta.get('model')}",
                      xaxis_title="layer", yaxis_title=metric, **_LAYOUT)
    return fig


def implicit_variance(scan: Any, series: str = "attn_out", layers: Sequence[int] | None = None) -> go.Figure:
    """Mean Var_d of `series` ("attn_out" or "resid_post") vs 1-based position, log-log, one line per layer."""
    df = _curve(scan, "variance_by_position")
    df = df[df["series"] == series]
    slopes = scan.curves[(scan.curves["curve"] == "variance_slope_by_layer") & (scan.curves["series"] == series)]
    slope_of = dict(zip(slopes["x"].astype(int), slopes["y"]))
    chosen = sorted(df["layer"].unique()) if layers is None else list(layers)
    fig = go.Figure()
    for layer in chosen:
        group = df[df["layer"] == layer].sort_values("x")
        fig.add_trace(go.Scatter(x=group["x"], y=group["y"], mode="lines",
                                 name=f"L{layer} (slope {slope_of.get(int(layer), float('nan')):.2f})"))
    fig.update_layout(title=f"Var_d({series}) vs position (log-log) — {scan.meta.get('model')}",
                      xaxis={"type": "log", "title": "position + 1 (tokens visible)"},
                      yaxis={"type": "log", "title": f"mean Var_d({series})"}, **_LAYOUT)
    return fig


def implicit_similarity(scan: Any, layers: Sequence[int] | None = None) -> go.Figure:
    """Mean cosine similarity of residual vectors at offset delta vs delta, one line per layer."""
    df = _curve(scan, "similarity_by_offset")
    chosen = sorted(df["layer"].unique()) if layers is None else list(layers)
    fig = go.Figure()
    for layer in chosen:
        group = df[df["layer"] == layer].sort_values("x")
        fig.add_trace(go.Scatter(x=group["x"], y=group["y"], mode="lines+markers", name=f"L{layer}",
                                 marker={"size": 4}))
    fig.update_layout(title=f"cosine similarity of hidden states vs offset — {scan.meta.get('model')}",
                      xaxis={"type": "log", "title": "offset delta"}, yaxis_title="mean cos(h_i, h_i+delta)",
                      **_LAYOUT)
    return fig


def implicit_comparison(scans: Mapping[str, Any], metric: str = "r2", regressor: str = "ridge",
                        features: str = "hidden", target: str = "position", control: bool = True) -> go.Figure:
    """One probe series (`regressor/features/target`) by layer for several labelled scans; controls dashed."""
    if metric not in _METRIC_TITLES:
        raise UnknownNameError("metric", metric, _METRIC_TITLES)
    series = f"{regressor}/{features}/{target}"
    fig = go.Figure()
    colors = qualitative.Plotly
    for i, (label, scan) in enumerate(scans.items()):
        df = _curve(scan, f"implicit_{metric}_by_layer")
        color = colors[i % len(colors)]
        for suffix, dash in (("", "solid"), ("/shuffled", "dash")):
            if suffix and not control:
                continue
            group = df[df["series"] == series + suffix].sort_values("x")
            if group.empty:
                continue
            fig.add_trace(go.Scatter(x=group["x"], y=group["y"], mode="lines+markers",
                                     name=label + (" (shuffled labels)" if suffix else ""),
                                     line={"color": color, "dash": dash, "width": 1 if suffix else 2},
                                     marker={"size": 4}, legendgroup=label))
    fig.update_layout(title=f"{series}: {_METRIC_TITLES[metric]}", xaxis_title="layer", yaxis_title=metric, **_LAYOUT)
    return fig


def variance_slope_comparison(scans: Mapping[str, Any], series: str = "attn_out") -> go.Figure:
    """The log-log slope of Var_d(series) vs position, by layer, for several labelled scans (-1: Chi et al.'s law)."""
    fig = go.Figure()
    n_layers = 1
    for label, scan in scans.items():
        df = _curve(scan, "variance_slope_by_layer")
        df = df[df["series"] == series].sort_values("x")
        n_layers = max(n_layers, len(df))
        fig.add_trace(go.Scatter(x=df["x"], y=df["y"], mode="lines+markers", name=label, marker={"size": 5}))
    fig.add_trace(go.Scatter(x=np.array([0, n_layers - 1]), y=np.array([-1.0, -1.0]), mode="lines",
                             name="slope -1 (uniform attention over i.i.d. values)",
                             line={"color": "#999999", "dash": "dot"}))
    fig.update_layout(title=f"log-log slope of Var_d({series}) vs position, by layer", xaxis_title="layer",
                      yaxis_title="slope", **_LAYOUT)
    return fig


__all__ = ["implicit_comparison", "implicit_probe", "implicit_similarity", "implicit_variance",
           "variance_slope_comparison"]
