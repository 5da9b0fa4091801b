"""RoPE frequency figures: layer x chunk heatmaps of the `rope_frequency` / `positional_heads` curves.

Owns `rope_spectrum(scan, curve=...)`, a pure `Scan -> go.Figure` renderer of docs/probes/rope_frequency.md and
positional_heads.md as in Barbero et al. 2024 (Fig. 2: q/k norm per frequency and layer): rows are layers, columns are
rotary chunks (k = 0 fastest; the non-rotated band of a partial-rotary model is the last column), values are averaged
over the layer's heads (or one head / one KV-head series). Hover shows each chunk's frequency from the scan's
`rope_frequency.chunks` table when present.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from posprobe.errors import UnknownNameError

SPECTRUM_CURVES = ("rope_usage_spectrum", "rope_q_norm", "rope_k_norm", "rope_layer_spectrum", "long_contrib_by_chunk")


def rope_spectrum(scan: Any, curve: str = "rope_usage_spectrum", head: int | None = None, normalize: bool = True,
                  colorscale: str | None = None) -> go.Figure:
    """Heatmap layer x chunk of a per-chunk curve, averaged over heads (or for one `head`).

    normalize: divide each layer's row by its sum, so rows show where the layer's mass sits (a share per chunk);
    signed curves (`long_contrib_by_chunk`) are never normalised.
    """
    if curve not in SPECTRUM_CURVES:
        raise UnknownNameError("RoPE spectrum curve", curve, SPECTRUM_CURVES)
    df = scan.curves[scan.curves["curve"] == curve]
    if df.empty:
        return go.Figure(layout={"title": f"This scan has no {curve} curve (run the rope_frequency / "
                                          f"positional_heads probes on a RoPE model)"})
    if head is not None:
        df = df[df["head"] == head]
    table = df.groupby(["layer", "x"])["y"].mean().unstack("x").sort_index()
    z = table.to_numpy(dtype=float)
    signed = curve == "long_contrib_by_chunk"
    if normalize and not signed:
        with np.errstate(invalid="ignore", divide="ignore"):
            z = z / np.nansum(z, axis=1, keepdims=True)
    layers = table.index.to_numpy()
    chunks = table.columns.to_numpy()
    freq = np.full(z.shape, np.nan)
    chunk_table = getattr(scan, "tables", {}).get("rope_frequency.chunks")
    if chunk_table is not None and len(chunk_table):
        lookup = {(int(r.layer), int(r.chunk)): float(r.frequency) for r in chunk_table.itertuples()}
        for a, layer in enumerate(layers):
            for b, chunk in enumerate(chunks):
                freq[a, b] = lookup.get((int(layer), int(chunk)), np.nan)
    scale = colorscale or ("RdBu_r" if signed else "Viridis")
    label = "share of layer" if normalize and not signed else curve
    fig = go.Figure(go.Heatmap(
        z=z, x=chunks, y=layers, customdata=freq, colorscale=scale, zmid=0 if signed else None,
        colorbar={"title": label},
        hovertemplate=("layer %{y}, chunk %{x}<br>frequency %{customdata:.3g} rad/token<br>value %{z:.4g}"
                       "<extra></extra>")))
    who = f"head {head}" if head is not None else "mean over heads"
    fig.update_layout(title=f"{curve.replace('_', ' ')} by layer and RoPE chunk ({who}) — {scan.meta.get('model')}",
                      xaxis_title="chunk k (0 = fastest)", yaxis_title="layer", yaxis={"autorange": "reversed"},
                      margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return fig
