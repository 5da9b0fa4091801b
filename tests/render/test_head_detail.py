"""posprobe.render.head_detail: a head's curves (with the layer mean of the other heads) and its metric ranks."""

from __future__ import annotations

import numpy as np
import pytest

from posprobe.errors import UnknownNameError
from posprobe.render.head_detail import head_curve, head_curve_names, head_curves, head_metrics, layer_curve_names
from tests.app.synthetic import synthetic_scan


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(3, 4)


def test_curve_names_per_head_and_layer(scan):
    assert head_curve_names(scan, 1, 2) == ["attention_vs_distance", "entropy_by_position"]
    assert layer_curve_names(scan, 1) == ["variance_by_position"]
    assert head_curve_names(scan, 7, 0) == [] and layer_curve_names(scan, 7) == []
    names = [name for name, _ in head_curves(scan, 1, 2)]
    assert names == ["attention_vs_distance", "entropy_by_position", "variance_by_position"]


def test_head_curve_own_values_and_layer_context(scan):
    fig = head_curve(scan, "attention_vs_distance", 1, 2)
    own, context = fig.data
    assert own.name == "L1 H2" and context.name == "layer mean of other heads" and context.line.dash == "dash"
    x = np.array([0.0, 1, 2, 4, 8, 16, 32, 64, 128, 256])
    np.testing.assert_allclose(own.y, np.exp(-x / 3) + 0.01)  # planted: exp(-x / (1 + head)) + 0.01 * layer
    others = np.mean([np.exp(-x / (1 + h)) for h in (0, 1, 3)], axis=0) + 0.01
    np.testing.assert_allclose(context.y, others)
    assert len(head_curve(scan, "attention_vs_distance", 1, 2, context=False).data) == 1
    assert fig.layout.xaxis.type == "log" and "L1 H2 · head_basics" in fig.layout.title.text


def test_layer_level_and_missing(scan):
    fig = head_curve(scan, "variance_by_position", 2, -1)
    assert [t.name for t in fig.data] == ["L2"]
    np.testing.assert_allclose(fig.data[0].y, [1.0 / (p + 3) for p in range(8)])
    assert head_curve(scan, "attention_vs_distance", 9, 9).layout.annotations[0].text == "no values for this head"
    with pytest.raises(UnknownNameError, match="Unknown curve"):
        head_curve(scan, "nope", 0, 0)


def test_head_metrics_rank_and_percentile(scan):
    table = head_metrics(scan, 1, 2).set_index("metric")
    assert list(table.index) == ["planted", "signed", "metric_2", "metric_3"]
    assert table.loc["planted", "value"] == 1002
    assert table.loc["planted", "rank"] == 6  # below 2003, 2002, 2001, 2000, 1003
    assert table.loc["planted", "percentile"] == pytest.approx(100 * 7 / 12)
    top = head_metrics(scan, 2, 3).set_index("metric")
    assert top.loc["planted", "rank"] == 1 and top.loc["planted", "percentile"] == 100
    with pytest.raises(UnknownNameError, match="Unknown head 'L5H0'"):
        head_metrics(scan, 5, 0)


def test_head_metrics_text_and_nan():
    scan = synthetic_scan(2, 2)
    scan.heads["note"] = ["a", "b", "c", "d"]
    scan.heads.loc[0, "signed"] = np.nan
    table = head_metrics(scan, 0, 0).set_index("metric")
    assert table.loc["note", "value"] == "a" and table.loc["note", "rank"] is pd_na()
    assert np.isnan(table.loc["signed", "value"]) and table.loc["signed", "rank"] is pd_na()
    assert head_metrics(scan, 0, 1).set_index("metric").loc["signed", "of"] == 3  # NaN heads are not ranked


def pd_na():
    import pandas as pd

    return pd.NA


def test_missing_series_is_drawn_as_no_series():
    """A probe may leave `series` empty (None / NaN after Parquet): its rows must still be drawn, not dropped."""
    scan = synthetic_scan(2, 2)
    scan.curves["series"] = scan.curves["series"].astype(object)
    scan.curves.loc[scan.curves["curve"].isin(["attention_vs_distance", "variance_by_position"]), "series"] = None
    assert [t.name for t in head_curve(scan, "attention_vs_distance", 1, 1).data] == ["L1 H1",
                                                                                     "layer mean of other heads"]
    assert len(head_curve(scan, "variance_by_position", 1, -1).data[0].y) == 8
