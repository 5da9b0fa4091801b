"""posprobe.render.heads: the atlas carries every metric at the right (layer, head); curves and ranking figures."""

from __future__ import annotations

import numpy as np
import pytest
from plotly.io.json import to_json_plotly

from posprobe.errors import UnknownNameError
from posprobe.render import figure
from posprobe.render.heads import atlas, curve, head_marker, numeric_metrics, ranking
from tests.app.synthetic import synthetic_scan


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(3, 4, n_metrics=4)


def test_numeric_metrics_skip_text_columns(scan):
    other = synthetic_scan(2, 2)
    other.heads["label"] = "x"
    other.heads["flag"] = other.heads["head"] == 0
    assert numeric_metrics(other) == ["planted", "signed", "metric_2", "metric_3", "flag"]
    assert numeric_metrics(scan) == ["planted", "signed", "metric_2", "metric_3"]


def test_atlas_cells_hover_and_colours(scan):
    fig = atlas(scan, "planted")
    heatmap = fig.data[0]
    z = np.asarray(heatmap.z, dtype=float)
    layers, heads = np.meshgrid(range(3), range(4), indexing="ij")
    np.testing.assert_array_equal(z, layers * 1000 + heads)  # planted = layer * 1000 + head, cell by cell
    custom = np.asarray(heatmap.customdata, dtype=float)
    assert custom.shape == (3, 4, 5) and custom.dtype == np.float64
    np.testing.assert_array_equal(custom[..., 0], scan.heads["kv_head"].to_numpy().reshape(3, 4))
    for index, metric in enumerate(numeric_metrics(scan), start=1):
        np.testing.assert_allclose(custom[..., index], scan.heads[metric].to_numpy().reshape(3, 4), rtol=1e-6)
        assert f"{metric}: %{{customdata[{index}]:.4g}}" in heatmap.hovertemplate
    assert "%{text}" in heatmap.hovertemplate and heatmap.text[1][0] == "full_attention"  # layer types differ
    assert heatmap.colorscale[0][1] == "#440154" and heatmap.zmid is None  # Viridis for a one-signed metric
    signed = atlas(scan, "signed").data[0]
    assert signed.zmid == 0 and signed.colorscale[0][1] != "#440154"  # diverging, centred on 0
    assert atlas(scan, "signed", colorscale="Viridis").data[0].zmid is None
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.title.text.startswith("planted by layer and head")


def test_atlas_defaults_selection_and_errors(scan):
    assert atlas(scan).layout.title.text.startswith("planted")
    fig = atlas(scan, "signed", selected=(2, 1))
    (shape,) = fig.layout.shapes
    assert (shape.x0, shape.x1, shape.y0, shape.y1) == (0.5, 1.5, 1.5, 2.5)
    assert head_marker(0, 0)["type"] == "rect"
    with pytest.raises(UnknownNameError, match="Did you mean 'signed'"):
        atlas(scan, "signd")
    bare = synthetic_scan(2, 2)
    bare.heads = bare.heads[["layer", "head", "kv_head", "layer_type"]]
    assert atlas(bare).layout.title.text == "This scan has no head metrics"


def test_atlas_missing_heads_are_blank():
    scan = synthetic_scan(2, 3)
    scan.heads = scan.heads[~((scan.heads["layer"] == 1) & (scan.heads["head"] == 2))]
    z = np.asarray(atlas(scan, "planted").data[0].z, dtype=float)
    assert np.isnan(z[1, 2]) and z[1, 1] == 1001


def test_atlas_payload_is_compact_for_1536_heads():
    scan = synthetic_scan(48, 32, 12, head_curves=False, model_curves=False, tables=False)
    size = len(to_json_plotly(atlas(scan, "signed")))
    assert size < 250_000, size  # one string per cell with 12 metrics was about 630 kB


def test_curve_traces_and_axis(scan):
    fig = curve(scan, "attention_vs_distance", layer=1, head=2)
    assert [t.name for t in fig.data] == ["L1 H2"]
    rows = scan.curve("attention_vs_distance", 1, 2).sort_values("x")
    np.testing.assert_array_equal(fig.data[0].y, rows["y"])
    assert fig.layout.xaxis.type == "log"  # x spans 1..256
    assert len(curve(scan, "attention_vs_distance", layer=0).data) == 4
    assert [t.name for t in curve(scan, "u_curve_attention").data] == ["model baseline", "model found_in_the_middle"]
    assert curve(scan, "u_curve_attention").layout.xaxis.type == "linear"
    with pytest.raises(UnknownNameError, match="Unknown curve"):
        curve(scan, "nope")


def test_ranking_bars(scan):
    fig = ranking(scan, "planted", top=5)
    assert list(fig.data[0].y) == ["L2H3", "L2H2", "L2H1", "L2H0", "L1H3"]
    assert list(fig.data[0].x) == [2003, 2002, 2001, 2000, 1003]
    assert list(ranking(scan, "planted", top=2, ascending=True).data[0].y) == ["L0H0", "L0H1"]


def test_registry_dispatch(scan):
    assert figure(scan, "atlas", metric="signed").data[0].zmid == 0
    with pytest.raises(UnknownNameError, match="Unknown figure"):
        figure(scan, "nope")


def test_curve_with_missing_series():
    scan = synthetic_scan(2, 2)
    scan.curves["series"] = scan.curves["series"].astype(object)
    scan.curves.loc[scan.curves["curve"] == "variance_by_position", "series"] = None
    assert [t.name for t in curve(scan, "variance_by_position").data] == ["L0", "L1"]
