"""Scans side by side: two scans' per-head differences and shared curves, and N scans' top heads and rank agreement.

Owns pure functions over two Scans (e.g. two models, two seeds, a model with and without an intervention):
`head_differences` (a table of B - A per common (layer, head)), `compare_atlas` (A | B on one colour scale, and
B - A on a diverging scale) and `compare_curve` (the same curve of both scans on one figure). Scans of different
shapes are compared on the (layer, head) pairs they share. Over N scans: `top_heads_table` / `compare_top_heads`
(scan x metric: each scan's top heads on each metric shared by all, coloured by the top value relative to the
other scans) and `rank_agreement` / `agreement_table` / `compare_agreement` (Spearman's rho of a metric's head
ranking between every pair of scans, over their common (layer, head) pairs; scipy). Scans are labelled by model
and the intervention / what-if of their provenance (`scan_labels`, `scan_condition`), the scan name added where
that is not enough. Renders any head metric; computes only differences and rank correlations (docs/explorer.md,
"Compare").
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import combinations
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


# --- N scans ---------------------------------------------------------------------------------------------------
TOP_HEADS = 3  # heads listed per scan and metric (the cell shows the first, the hover all of them)
MIN_PAIRS = 3  # common heads with values needed for a rank correlation


def _spec_text(record: Any) -> str:
    """An intervention record of a scan's provenance (`Intervention.describe()`: name, settings, resolved values;
    a stack's parts; or text) in its `name:key=value` text form, the settings at their defaults left out."""
    if isinstance(record, str):
        return record.strip()
    if not isinstance(record, dict) or not record.get("name"):
        return ""
    name = str(record["name"])
    if name == "stack":
        return " + ".join(t for t in (_spec_text(part) for part in record.get("parts") or []) if t)
    settings = {k: v for k, v in record.items() if k not in ("name", "resolved", "calibrations")}
    from posprobe.errors import PosprobeError
    from posprobe.interventions.spec import get_class

    try:
        return str(get_class(name).from_dict(settings))
    except (PosprobeError, TypeError, ValueError):  # a spec this posprobe does not know (any more): as recorded
        shown = ",".join(f"{k}={v}" for k, v in settings.items() if v is not None)
        return f"{name}:{shown}" if shown else name


def scan_condition(scan: Any) -> str:
    """The intervention / what-if a scan was made under, as text ("yarn:factor=4", "yarn:factor=4 +
    disable_rope"); "" for a plain scan. Read from `meta["intervention"]` (`scan(intervention=...)`, `posprobe scan
    --what-if`), else from the sweep cell's `intervention` and `what_if` (`posprobe sweep`)."""
    recorded = _spec_text(scan.meta.get("intervention"))
    if recorded:
        return recorded
    cell = (scan.meta.get("sweep") or {}).get("cell") or {}
    return " + ".join(str(cell[axis]) for axis in ("intervention", "what_if") if cell.get(axis))


def scan_labels(scans: Sequence[Any], labels: Sequence[str] | None = None,
                names: Sequence[str] | None = None) -> list[str]:
    """One label per scan: the given `labels`, else the model name and the intervention / what-if the scan was made
    under ("gemma-3-270m · yarn:factor=4"; `scan_condition`), so a what-if scan and its baseline differ. Labels that
    still collide (two seeds of one model) get the scan's name from `names` (e.g. its directory) in parentheses,
    and a number when even that repeats."""
    if labels is not None:
        if len(labels) != len(scans):
            raise ValueError(f"{len(labels)} labels for {len(scans)} scans; give one label per scan.")
        return [str(label) for label in labels]
    if names is not None and len(names) != len(scans):
        raise ValueError(f"{len(names)} names for {len(scans)} scans; give one name per scan.")
    bases = []
    for scan in scans:
        model, condition = str(scan.meta.get("model") or "scan"), scan_condition(scan)
        bases.append(f"{model} · {condition}" if condition else model)
    out: list[str] = []
    for i, base in enumerate(bases):
        named = f"{base} ({names[i]})" if names is not None and bases.count(base) > 1 else base
        label, index = named, 2
        while label in out:
            label, index = f"{named} ({index})", index + 1
        out.append(label)
    return out


def shared_metrics(scans: Sequence[Any]) -> list[str]:
    """Numeric head metrics present in every scan, in the first scan's order."""
    if not scans:
        return []
    common = set.intersection(*(set(numeric_metrics(s)) for s in scans))
    return [m for m in numeric_metrics(scans[0]) if m in common]


def top_heads_table(scans: Sequence[Any], labels: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                    top: int = TOP_HEADS) -> pd.DataFrame:
    """Long table `scan, metric, rank, layer, head, value`: each scan's `top` heads on each metric (highest first;
    NaN heads never rank). metrics: default every metric shared by all scans."""
    names = scan_labels(scans, labels)
    shared = shared_metrics(scans)
    metrics = list(shared if metrics is None else metrics)
    unknown = [m for m in metrics if m not in shared]
    if unknown:
        raise UnknownNameError("metric present in every scan", unknown[0], shared)
    rows = []
    for name, scan in zip(names, scans):
        for metric in metrics:
            ranked = scan.heads[["layer", "head", metric]].dropna(subset=[metric])
            ranked = ranked.sort_values(metric, ascending=False, kind="stable").head(top)
            rows += [{"scan": name, "metric": metric, "rank": rank, "layer": int(r.layer), "head": int(r.head),
                      "value": float(getattr(r, metric))} for rank, r in enumerate(ranked.itertuples(), start=1)]
    return pd.DataFrame(rows, columns=["scan", "metric", "rank", "layer", "head", "value"])


def compare_top_heads(scan: Any, others: Sequence[Any] = (), labels: Sequence[str] | None = None,
                      metrics: Sequence[str] | None = None, top: int = TOP_HEADS) -> go.Figure:
    """Heatmap scan (rows) x metric (columns): each cell names the scan's top head on the metric and its value; the
    colour is that value relative to the other scans (0 = the lowest top value of the column, 1 = the highest), so
    metrics of different scales share one colour bar. Hover lists the `top` heads."""
    scans = [scan, *others]
    names = scan_labels(scans, labels)
    table = top_heads_table(scans, names, metrics, top)
    columns = list(dict.fromkeys(table["metric"])) if metrics is None else list(metrics)
    if not columns:
        return go.Figure(layout={"title": "The scans share no head metric"})
    z = np.full((len(names), len(columns)), np.nan)
    text: np.ndarray = np.full(z.shape, "", dtype=object)
    hover: np.ndarray = np.full(z.shape, "no value", dtype=object)
    for (name, metric), group in table.groupby(["scan", "metric"], sort=False):
        i, j = names.index(name), columns.index(metric)
        best = group.iloc[0]
        z[i, j] = best["value"]
        text[i, j] = f"L{best['layer']}H{best['head']}<br>{best['value']:.3g}"
        hover[i, j] = "<br>".join(f"#{r.rank} L{r.layer} H{r.head}: {r.value:.4g}" for r in group.itertuples())
    low, high = np.nanmin(z, axis=0, initial=np.inf), np.nanmax(z, axis=0, initial=-np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(high > low, (z - low) / (high - low), 1.0)
    relative[np.isnan(z)] = np.nan
    fig = go.Figure(go.Heatmap(
        z=relative, x=columns, y=names, text=text, texttemplate="%{text}", textfont={"size": 10},
        customdata=hover, colorscale="Viridis", zmin=0, zmax=1, hoverongaps=False, name="top heads",
        colorbar={"title": "top value,<br>relative", "thickness": 12},
        hovertemplate="%{y} · %{x}<br>%{customdata}<extra></extra>"))
    fig.update_layout(title=f"Top heads per scan and metric ({len(names)} scans)", plot_bgcolor="white",
                      height=max(300, 120 + 46 * len(names)), margin={"l": 140, "r": 20, "t": 60, "b": 120},
                      xaxis={"title": "metric", "tickangle": -35}, yaxis={"title": "", "autorange": "reversed"})
    return fig


def _spearman(a: pd.Series, b: pd.Series) -> tuple[float, int]:
    """(Spearman's rho, number of heads) over the heads where both have values; NaN below MIN_PAIRS or when a side
    is constant."""
    from scipy.stats import spearmanr

    both = pd.concat([a, b], axis=1, join="inner").dropna()
    if len(both) < MIN_PAIRS or both.iloc[:, 0].nunique() < 2 or both.iloc[:, 1].nunique() < 2:
        return float("nan"), len(both)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr(both.iloc[:, 0], both.iloc[:, 1]).statistic
    return float(rho), len(both)


def _by_head(scan: Any, metric: str) -> pd.Series:
    return scan.heads.set_index(["layer", "head"])[metric].astype(float)


def rank_agreement(scans: Sequence[Any], metric: str, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """N x N Spearman's rho of `metric` between the scans' head rankings, over common (layer, head) pairs (index
    and columns: the scan labels; 1 on the diagonal)."""
    names = scan_labels(scans, labels)
    shared = shared_metrics(scans)
    if metric not in shared:
        raise UnknownNameError("metric present in every scan", metric, shared)
    values = [_by_head(s, metric) for s in scans]
    out = pd.DataFrame(np.eye(len(scans)), index=names, columns=names)
    for i, j in combinations(range(len(scans)), 2):
        out.iloc[i, j] = out.iloc[j, i] = _spearman(values[i], values[j])[0]
    return out


def agreement_table(scans: Sequence[Any], labels: Sequence[str] | None = None,
                    metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Long table `metric, a, b, spearman, n_heads`: rank agreement of every shared metric for every scan pair."""
    names = scan_labels(scans, labels)
    metrics = shared_metrics(scans) if metrics is None else list(metrics)
    rows = []
    for metric in metrics:
        values = [_by_head(s, metric) for s in scans]
        for i, j in combinations(range(len(scans)), 2):
            rho, n = _spearman(values[i], values[j])
            rows.append({"metric": metric, "a": names[i], "b": names[j], "spearman": rho, "n_heads": n})
    return pd.DataFrame(rows, columns=["metric", "a", "b", "spearman", "n_heads"])


def compare_agreement(scan: Any, others: Sequence[Any] = (), metric: str | None = None,
                      labels: Sequence[str] | None = None) -> go.Figure:
    """Rank agreement between scans: left, Spearman's rho of every shared metric (rows) for every scan pair
    (columns); right, the N x N matrix of `metric` (default: the first shared metric). One diverging scale, -1..1."""
    scans = [scan, *others]
    names = scan_labels(scans, labels)
    metrics = shared_metrics(scans)
    if len(scans) < 2 or not metrics:
        return go.Figure(layout={"title": "Rank agreement needs two scans sharing a head metric"})
    metric = metric or metrics[0]
    matrix = rank_agreement(scans, metric, names)
    table = agreement_table(scans, names, metrics)
    pairs = [f"{a} ~ {b}" for a, b in combinations(names, 2)]
    z = table["spearman"].to_numpy(dtype=float).reshape(len(metrics), len(pairs))
    n = table["n_heads"].to_numpy().reshape(len(metrics), len(pairs))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.22,
                        subplot_titles=("Spearman's rho per metric and scan pair", f"{metric}: every pair"))
    fig.add_trace(go.Heatmap(z=z, x=pairs, y=metrics, customdata=n, coloraxis="coloraxis", hoverongaps=False,
                             name="per metric", texttemplate="%{z:.2f}", textfont={"size": 10},
                             hovertemplate="%{y}: %{x}<br>rho %{z:.3f} over %{customdata} heads<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Heatmap(z=matrix.to_numpy(), x=names, y=names, coloraxis="coloraxis", name=metric,
                             texttemplate="%{z:.2f}", textfont={"size": 10},
                             hovertemplate="%{y} ~ %{x}<br>rho %{z:.3f}<extra></extra>"), row=1, col=2)
    fig.update_layout(title=f"Rank agreement of head metrics ({len(names)} scans)", plot_bgcolor="white",
                      coloraxis={"colorscale": "RdBu_r", "cmin": -1, "cmax": 1, "cmid": 0,
                                 "colorbar": {"title": "rho", "thickness": 12}},
                      height=max(340, 140 + 22 * len(metrics)), margin={"l": 150, "r": 20, "t": 70, "b": 120})
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(tickangle=-35)
    return fig
