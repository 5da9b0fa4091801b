"""Pure renderers: `Scan -> plotly.graph_objects.Figure`, shared by notebooks, the CLI and the Dash app.

Owns the figure registry `FIGURES` and `figure(scan, kind, **kwargs)`. Renderers read only the scan's tables and
meta; they never touch a model. A new figure is one function in a module here plus one line in `FIGURES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posprobe.errors import UnknownNameError
from posprobe.render.bias import document_bias, position_bias
from posprobe.render.compare import compare_agreement, compare_atlas, compare_curve, compare_top_heads
from posprobe.render.head_detail import head_curve
from posprobe.render.heads import atlas, curve, ranking
from posprobe.render.implicit import implicit_probe, implicit_similarity, implicit_variance
from posprobe.render.model_view import layer_mean_curve, metric_by_layer, model_curve, position_curve
from posprobe.render.pattern_view import pattern, pattern_top_keys
from posprobe.render.rope import rope_spectrum

FIGURES: dict[str, Callable[..., Any]] = {
    "atlas": atlas,
    "compare": compare_atlas,
    "compare_agreement": compare_agreement,
    "compare_curve": compare_curve,
    "compare_top_heads": compare_top_heads,
    "curve": curve,
    "head_curve": head_curve,
    "layer_mean_curve": layer_mean_curve,
    "metric_by_layer": metric_by_layer,
    "model_curve": model_curve,
    "pattern": pattern,
    "pattern_top_keys": pattern_top_keys,
    "position_curve": position_curve,
    "document_bias": document_bias,
    "implicit_probe": implicit_probe,
    "implicit_similarity": implicit_similarity,
    "implicit_variance": implicit_variance,
    "position_bias": position_bias,
    "ranking": ranking,
    "rope_spectrum": rope_spectrum,
}


def figure(scan: Any, kind: str = "atlas", **kwargs: Any) -> Any:
    if kind not in FIGURES:
        raise UnknownNameError("figure", kind, FIGURES)
    return FIGURES[kind](scan, **kwargs)


__all__ = ["FIGURES", "atlas", "curve", "figure", "ranking"]
