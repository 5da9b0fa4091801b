"""posprobe.render.compare: per-head differences, the three-panel atlas, curve overlays, different shapes."""

from __future__ import annotations

import numpy as np
import pytest

from posprobe.errors import UnknownNameError
from posprobe.render import figure
from posprobe.render.compare import common_curves, common_metrics, compare_atlas, compare_curve, head_differences
from tests.app.synthetic import synthetic_scan


@pytest.fixture(scope="module")
def pair():
    return synthetic_scan(3, 4, seed=0), synthetic_scan(3, 4, seed=1)


def test_head_differences(pair):
    a, b = pair
    diff = head_differences(a, b, "signed")
    assert len(diff) == 12 and list(diff.columns) == ["layer", "head", "a", "b", "diff"]
    merged = a.heads.merge(b.heads, on=["layer", "head"])
    expected = (merged["signed_y"] - merged["signed_x"]).abs().sort_values(ascending=False).to_numpy()
    np.testing.assert_allclose(diff["diff"].abs(), expected)
    np.testing.assert_allclose(diff["diff"], diff["b"] - diff["a"])
    assert (head_differences(a, a, "signed")["diff"] == 0).all()
    with pytest.raises(UnknownNameError, match="metric present in both scans"):
        head_differences(a, b, "nope")


def test_different_shapes_compare_common_heads():
    a, b = synthetic_scan(2, 4), synthetic_scan(3, 2)
    diff = head_differences(a, b, "planted")
    assert sorted(zip(diff["layer"], diff["head"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    fig = compare_atlas(a, b, "planted")
    z_diff = np.asarray(fig.data[2].z, dtype=float)
    assert z_diff.shape == (3, 4) and np.isnan(z_diff[2, 0]) and np.isnan(z_diff[0, 3]) and z_diff[1, 1] == 0


def test_compare_atlas_panels(pair):
    a, b = pair
    fig = compare_atlas(a, b, "signed", labels=("seed 0", "seed 1"))
    assert [t.type for t in fig.data] == ["heatmap"] * 3
    za, zb, zd = (np.asarray(t.z, dtype=float) for t in fig.data)
    np.testing.assert_allclose(zd, zb - za)
    assert fig.data[0].coloraxis == fig.data[1].coloraxis == "coloraxis" and fig.data[2].coloraxis == "coloraxis2"
    assert fig.layout.coloraxis.cmin == pytest.approx(min(za.min(), zb.min()))
    assert fig.layout.coloraxis2.cmid == 0 and fig.layout.coloraxis2.cmax == pytest.approx(np.abs(zd).max())
    assert [a.text for a in fig.layout.annotations] == ["seed 0", "seed 1", "seed 1 − seed 0"]
    assert figure(a, "compare", other=b, metric="signed").data[2].coloraxis == "coloraxis2"


def test_common_metrics_and_no_overlap(pair):
    a, b = pair
    assert common_metrics(a, b) == ["planted", "signed", "metric_2", "metric_3"]
    other = synthetic_scan(2, 2, n_metrics=2, head_curves=False, model_curves=False)
    other.heads = other.heads.rename(columns={"planted": "x", "signed": "y"})
    assert common_metrics(a, other) == [] and common_curves(a, other) == []
    assert compare_atlas(a, other).layout.title.text == "The two scans share no head metric"


def test_compare_curve(pair):
    a, b = pair
    assert "u_curve_attention" in common_curves(a, b)
    fig = compare_curve(a, b, "attention_vs_distance", layer=1, head=2)
    assert [t.name for t in fig.data] == ["A L1 H2", "B L1 H2"] and fig.data[1].line.dash == "dash"
    fig = compare_curve(a, b, "u_curve_attention")
    assert [t.name for t in fig.data] == ["A baseline", "A found_in_the_middle", "B baseline", "B found_in_the_middle"]
    # a per-head curve with no head given: the mean over every head
    fig = compare_curve(a, b, "attention_vs_distance", labels=("x", "y"))
    assert [t.name for t in fig.data] == ["x", "y"]
    x = np.array([0.0, 1, 2, 4, 8, 16, 32, 64, 128, 256])
    expected = np.mean([np.exp(-x / (1 + h)) + 0.01 * l for l in range(3) for h in range(4)], axis=0)
    np.testing.assert_allclose(fig.data[0].y, expected)
    with pytest.raises(UnknownNameError, match="curve present in both scans"):
        compare_curve(a, b, "nope")
