"""posprobe.render.model_view: model- and layer-level curves, layer means, metric by layer, position sweeps."""

from __future__ import annotations

import numpy as np
import pytest

from posprobe.errors import UnknownNameError
from posprobe.render.model_view import (
    curve_probe,
    head_level_curve_names,
    layer_mean_curve,
    metric_by_layer,
    model_curve,
    model_curve_names,
    position_curve,
    position_tables,
)
from tests.app.synthetic import synthetic_scan


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(3, 4)


def test_curve_names_by_level(scan):
    assert model_curve_names(scan) == ["u_curve_attention", "implicit_position_r2", "variance_by_position"]
    assert head_level_curve_names(scan) == ["attention_vs_distance", "entropy_by_position"]
    assert curve_probe(scan, "implicit_position_r2") == "implicit_position"
    with pytest.raises(UnknownNameError):
        curve_probe(scan, "nope")


def test_model_level_curve_one_trace_per_series(scan):
    fig = model_curve(scan, "u_curve_attention")
    assert [t.name for t in fig.data] == ["baseline", "found_in_the_middle"]
    np.testing.assert_allclose(np.asarray(fig.data[1].y), np.asarray(fig.data[0].y) * 0.5)
    assert "model · position_bias" in fig.layout.title.text


def test_layer_level_curve_one_line_per_layer_and_a_colour_bar(scan):
    fig = model_curve(scan, "variance_by_position")
    lines = [t for t in fig.data if t.x is not None and t.x[0] is not None]
    assert [t.name for t in lines] == ["L0", "L1", "L2"] and not any(t.showlegend for t in lines)
    assert lines[0].line.color != lines[2].line.color
    (bar,) = [t for t in fig.data if t.marker is not None and t.marker.showscale]
    assert (bar.marker.cmin, bar.marker.cmax, bar.marker.colorbar.title.text) == (0, 2, "layer")
    assert bar.marker.colorbar.dtick == 1  # whole layers, not plotly's 0.5 steps on a 3-layer model
    with pytest.raises(UnknownNameError, match="model-level curve"):
        model_curve(scan, "attention_vs_distance")  # per-head only


def test_layer_mean_curve_is_the_mean_over_heads(scan):
    fig = layer_mean_curve(scan, "attention_vs_distance")
    lines = {t.name: t for t in fig.data if t.x is not None and t.x[0] is not None}
    assert list(lines) == ["L0", "L1", "L2"]
    x = np.array([0.0, 1, 2, 4, 8, 16, 32, 64, 128, 256])
    expected = np.mean([np.exp(-x / (1 + h)) for h in range(4)], axis=0) + 0.02
    np.testing.assert_allclose(lines["L2"].y, expected)
    with pytest.raises(UnknownNameError, match="head-level curve"):
        layer_mean_curve(scan, "u_curve_attention")


def test_metric_by_layer(scan):
    fig = metric_by_layer(scan, "planted")
    traces = {t.name: t for t in fig.data}
    np.testing.assert_allclose(traces["layer mean"].y, [1.5, 1001.5, 2001.5])
    assert len(traces["heads"].y) == 12
    assert fig.layout.xaxis.dtick == 1
    with pytest.raises(UnknownNameError):
        metric_by_layer(scan, "layer_type")


def test_position_sweeps(scan):
    assert position_tables(scan) == ["position_bias.kv_words"]
    fig = position_curve(scan, "position_bias.kv_words")
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert [t.name for t in lines] == ["task=kv_words, intervention=none",
                                       "task=kv_words, intervention=found_in_the_middle"]
    assert len(bands) == 2
    table = scan.tables["position_bias.kv_words"]
    np.testing.assert_allclose(lines[0].y, table[table["intervention"] == "none"]["accuracy"])
    with pytest.raises(UnknownNameError, match="position-sweep table"):
        position_curve(scan, "retrieval.trials")
    with pytest.raises(UnknownNameError, match="Unknown table"):
        position_curve(scan, "nope")


def test_position_sweep_without_groups_or_ci():
    scan = synthetic_scan(2, 2)
    scan.tables = {"sweep": scan.tables["position_bias.kv_words"][["gold_position", "accuracy"]].head(10)}
    fig = position_curve(scan, "sweep")
    assert [t.name for t in fig.data] == ["sweep"]


def test_missing_series_is_drawn_as_no_series():
    scan = synthetic_scan(2, 2)
    scan.curves["series"] = scan.curves["series"].astype(object)
    scan.curves.loc[scan.curves["curve"] == "variance_by_position", "series"] = np.nan
    lines = [t for t in model_curve(scan, "variance_by_position").data if t.x is not None and t.x[0] is not None]
    assert [t.name for t in lines] == ["L0", "L1"]
    scan.curves.loc[scan.curves["curve"] == "attention_vs_distance", "series"] = None
    assert len([t for t in layer_mean_curve(scan, "attention_vs_distance").data if t.name == "L1"]) == 1


def test_position_sweep_splits_list_sizes():
    """evaluate_positions output: one curve per (task, n_items), not one zig-zag over both list sizes."""
    import pandas as pd

    rows = [{"task": "kv_words", "n_items": size, "gold_position": g, "relative_position": g / (size - 1), "n": 8,
             "n_correct": 4, "accuracy": 0.5, "ci_low": 0.2, "ci_high": 0.8} for size in (10, 20) for g in range(size)]
    scan = synthetic_scan(2, 2)
    scan.tables = {"kv_words.positions": pd.DataFrame(rows)}
    lines = [t for t in position_curve(scan, "kv_words.positions").data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["task=kv_words, n_items=10", "task=kv_words, n_items=20"]
    assert [len(t.x) for t in lines] == [10, 20]
