"""Positional-bias figures (docs/probes/position_bias.md): attention U-curve, document-level curve, behavioural U-curve.

Owns pure functions to plotly figures: `position_bias(scan)` (attention by relative key position from the
`position_bias` probe's curves), `document_bias(scan)` (Attn(doc_k) of a document moved through the slots, and the
slot bias), `accuracy_curve(table)` (the behavioural U-curve from an `evaluate_positions` table, Wilson intervals as
error bars) and `lost_in_the_middle(table, scan)` (the three side by side). No model access, no state.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from posprobe.errors import UnknownNameError

_MODEL_STYLE = {"width": 4, "color": "black"}


def _curve(scan: Any, name: str) -> pd.DataFrame:
    df = scan.curves[scan.curves["curve"] == name] if len(scan.curves) else scan.curves
    if df.empty:
        available = sorted(scan.curves["curve"].unique()) if len(scan.curves) else []
        raise UnknownNameError("curve", name, available,
                               hint="Run the position_bias probe: posprobe.scan(model, probes=['position_bias']).")
    return df


def _layer_traces(df: pd.DataFrame, layer: int | None, model_label: str) -> list[go.Scatter]:
    """Thin per-layer means (or one layer's heads) and the bold model mean."""
    traces = []
    if layer is None:
        groups = df[(df["layer"] >= 0) & (df["head"] == -1)].groupby("layer")
        label = "L{}"
    else:
        groups = df[(df["layer"] == layer) & (df["head"] >= 0)].groupby("head")
        label = f"L{layer} " + "H{}"
    for key, group in groups:
        group = group.sort_values("x")
        traces.append(go.Scatter(x=group["x"], y=group["y"], mode="lines", name=label.format(key),
                                 line={"width": 1}, opacity=0.6))
    model = df[(df["layer"] == (-1 if layer is None else layer)) & (df["head"] == -1)].sort_values("x")
    traces.append(go.Scatter(x=model["x"], y=model["y"], mode="lines+markers", line=_MODEL_STYLE,
                             name=model_label if layer is None else f"L{layer} mean"))
    return traces


def _u_note(scan: Any, key: str) -> str:
    summary = scan.meta.get("summaries", {}).get("position_bias", {})
    value = summary.get(key)
    return f"u_score {value:.2f}" if isinstance(value, (int, float)) else ""


def position_bias(scan: Any, layer: int | None = None) -> go.Figure:
    """Attention per key (relative to uniform) by relative key position j/i: layer means + model mean, or one
    layer's heads. The sink column is excluded (it is the `u_sink` head column)."""
    df = _curve(scan, "attention_by_relative_position")
    fig = go.Figure(_layer_traces(df, layer, "model mean"))
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "grey"})
    note = _u_note(scan, "u_score") if layer is None else ""
    fig.update_layout(title=f"Attention by relative key position — {scan.meta.get('model')} {note}".strip(),
                      xaxis_title="relative key position j / i (bin centre)",
                      yaxis_title="attention per key / uniform", margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def document_bias(scan: Any, layer: int | None = None) -> go.Figure:
    """Attn(doc_k): mean attention per token from the answer-predicting query to a fixed document moved through
    slot k (per layer + model mean), and the slot bias over all documents (dashed)."""
    df = _curve(scan, "document_attention")
    fig = go.Figure(_layer_traces(df, layer, "gold document, model mean"))
    slots = scan.curves[(scan.curves["curve"] == "slot_attention") & (scan.curves["layer"] == (-1 if layer is None
                                                                                              else layer))
                        & (scan.curves["head"] == -1)].sort_values("x")
    if len(slots):
        fig.add_trace(go.Scatter(x=slots["x"], y=slots["y"], mode="lines", name="any document at slot k",
                                 line={"dash": "dash", "color": "grey", "width": 2}))
    note = _u_note(scan, "doc_u_score") if layer is None else ""
    task = scan.meta.get("summaries", {}).get("position_bias", {}).get("doc_task", "")
    fig.update_layout(title=f"Document-level attention by slot ({task}) — {scan.meta.get('model')} {note}".strip(),
                      xaxis_title="document slot k (0 = first)", yaxis_title="mean attention per token",
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def _accuracy_traces(table: pd.DataFrame, x: str) -> list[go.Scatter]:
    traces = []
    for (task, size), group in table.groupby(["task", "n_items"], sort=True):
        group = group.sort_values("gold_position")
        traces.append(go.Scatter(
            x=group[x], y=group["accuracy"], mode="lines+markers", name=f"{task}, {size} items",
            error_y={"type": "data", "symmetric": False, "array": group["ci_high"] - group["accuracy"],
                     "arrayminus": group["accuracy"] - group["ci_low"]},
            customdata=group[["n", "n_errors"]], hovertemplate="position %{x}<br>accuracy %{y:.2f}<br>"
                                                                "n %{customdata[0]}, errors %{customdata[1]}"))
    return traces


def accuracy_curve(table: pd.DataFrame, x: str | None = None) -> go.Figure:
    """The behavioural U-curve: accuracy per gold position with Wilson 95% intervals, one line per (task, n_items).

    x: "gold_position" or "relative_position" (default: relative when several list sizes are drawn together).
    """
    if x is None:
        x = "relative_position" if table["n_items"].nunique() > 1 else "gold_position"
    if x not in ("gold_position", "relative_position"):
        raise UnknownNameError("x axis", x, ["gold_position", "relative_position"])
    fig = go.Figure(_accuracy_traces(table, x))
    model = table.attrs.get("model", "")
    fig.update_layout(title=f"Accuracy by gold position — {model}".strip(" —"), xaxis_title=x.replace("_", " "),
                      yaxis_title="exact-match accuracy", yaxis_range=[-0.05, 1.05],
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def lost_in_the_middle(table: pd.DataFrame, scan: Any) -> go.Figure:
    """Behavioural U-curve, attention-level curve and document-level curve side by side (model means)."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("accuracy by gold position", "attention by relative key "
                                                        "position", "attention to the gold document by slot"))
    for trace in _accuracy_traces(table, "relative_position"):
        fig.add_trace(trace, row=1, col=1)
    for col, name, label in ((2, "attention_by_relative_position", "attention, model mean"),
                             (3, "document_attention", "document attention, model mean")):
        df = _curve(scan, name)
        model = df[(df["layer"] == -1) & (df["head"] == -1)].sort_values("x")
        fig.add_trace(go.Scatter(x=model["x"], y=model["y"], mode="lines+markers", name=label, line=_MODEL_STYLE),
                      row=1, col=col)
    fig.update_xaxes(title_text="relative gold position", row=1, col=1)
    fig.update_xaxes(title_text="j / i", row=1, col=2)
    fig.update_xaxes(title_text="slot", row=1, col=3)
    fig.update_yaxes(title_text="accuracy", range=[-0.05, 1.05], row=1, col=1)
    fig.update_layout(title=f"Lost in the middle — {scan.meta.get('model')}", height=420, width=1300,
                      margin={"l": 60, "r": 20, "t": 70, "b": 50})
    return fig


__all__ = ["accuracy_curve", "document_bias", "lost_in_the_middle", "position_bias"]
