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


# --- N scans ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trio():
    return [synthetic_scan(3, 4, seed=s) for s in range(3)]


def test_top_heads_table_ranks_each_scan_on_each_shared_metric(trio):
    from posprobe.render.compare import top_heads_table

    table = top_heads_table(trio, ["a", "b", "c"], top=3)
    planted = table[(table["metric"] == "planted") & (table["scan"] == "b")]
    assert planted[["rank", "layer", "head", "value"]].values.tolist() == [[1, 2, 3, 2003.0], [2, 2, 2, 2002.0],
                                                                           [3, 2, 1, 2001.0]]
    for (scan, metric), group in table.groupby(["scan", "metric"]):
        heads = trio["abc".index(scan)].heads
        assert group["value"].tolist() == sorted(heads[metric].dropna(), reverse=True)[:3]
    nan_top = synthetic_scan(3, 4, seed=0)
    nan_top.heads.loc[nan_top.heads["planted"] == 2003.0, "planted"] = np.nan  # a NaN head never ranks
    assert top_heads_table([nan_top], metrics=["planted"])["value"].iloc[0] == 2002.0
    with pytest.raises(UnknownNameError, match="every scan"):
        top_heads_table(trio, metrics=["nope"])


def test_compare_top_heads_heatmap_scan_by_metric(trio):
    from posprobe.render.compare import compare_top_heads, shared_metrics

    fig = figure(trio[0], "compare_top_heads", others=trio[1:], labels=["a", "b", "c"])
    trace = fig.data[0]
    assert list(trace.y) == ["a", "b", "c"] and list(trace.x) == shared_metrics(trio)
    z = np.asarray(trace.z, dtype=float)
    col = list(trace.x).index("planted")
    assert (z[:, col] == 1.0).all(), "equal top values: every scan is the best"
    assert np.nanmin(z) >= 0 and np.nanmax(z) <= 1
    random_col = list(trace.x).index("metric_2")
    assert sorted(z[:, random_col])[0] == 0.0 and sorted(z[:, random_col])[-1] == 1.0
    assert trace.text[0][col] == "L2H3<br>2e+03" and trace.customdata[0][col].count("#") == 3
    assert compare_top_heads(trio[0], trio[1:], metrics=["signed"]).data[0].x == ("signed",)


def test_rank_agreement_is_spearman_over_common_heads(trio):
    from scipy.stats import spearmanr

    from posprobe.render.compare import agreement_table, compare_agreement, rank_agreement

    matrix = rank_agreement(trio, "metric_2", ["a", "b", "c"])
    merged = trio[0].heads.merge(trio[2].heads, on=["layer", "head"])
    assert matrix.loc["a", "c"] == pytest.approx(spearmanr(merged["metric_2_x"], merged["metric_2_y"]).statistic)
    assert matrix.loc["c", "a"] == matrix.loc["a", "c"] and (np.diag(matrix) == 1).all()
    assert (rank_agreement(trio, "planted").to_numpy() == 1).all()
    # different shapes: only the common (layer, head) pairs count
    small, other = synthetic_scan(2, 4, seed=3), synthetic_scan(3, 2, seed=4)
    table = agreement_table([small, other], ["s", "o"])
    assert set(table["n_heads"]) == {4} and list(table.columns) == ["metric", "a", "b", "spearman", "n_heads"]
    constant = synthetic_scan(3, 4, seed=5)
    constant.heads["metric_2"] = 0.5
    assert np.isnan(rank_agreement([trio[0], constant], "metric_2").iloc[0, 1])
    fig = compare_agreement(trio[0], trio[1:], metric="signed", labels=["a", "b", "c"])
    per_metric, pairwise = fig.data
    assert np.asarray(per_metric.z).shape == (len(per_metric.y), 3) and list(per_metric.x)[0] == "a ~ b"
    np.testing.assert_allclose(np.asarray(pairwise.z, dtype=float),
                               rank_agreement(trio, "signed", ["a", "b", "c"]).to_numpy())
    assert fig.layout.coloraxis.cmin == -1 and fig.layout.coloraxis.cmax == 1
    assert "need" in compare_agreement(trio[0]).layout.title.text


# --- labels: model + what-if / intervention -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def what_if_pair():
    """A real tiny-model scan under a what-if (YaRN x8, its provenance as `scan` records it) and a baseline of the
    same model (the same tables, the record removed)."""
    import copy

    import posprobe

    yarn = posprobe.scan("tiny-rope", probes=["head_basics"], budget="quick", intervention="yarn:factor=8",
                         progress=False)
    base = copy.deepcopy(yarn)
    del base.meta["intervention"]
    return base, yarn


def test_a_what_if_scan_and_its_baseline_get_distinct_labels(what_if_pair):
    from posprobe.render.compare import (
        agreement_table,
        compare_agreement,
        compare_top_heads,
        rank_agreement,
        scan_condition,
        scan_labels,
        top_heads_table,
    )

    base, yarn = what_if_pair
    assert base.meta["model"] == yarn.meta["model"] == "tiny-rope" and yarn.meta["intervention"]["name"] == "yarn"
    assert scan_condition(base) == "" and scan_condition(yarn) == "yarn:factor=8"
    labels = ["tiny-rope", "tiny-rope · yarn:factor=8"]
    assert scan_labels([base, yarn]) == labels
    assert sorted(set(top_heads_table([base, yarn])["scan"])) == labels
    assert list(rank_agreement([base, yarn], "sink_mass").index) == labels
    assert agreement_table([base, yarn])[["a", "b"]].drop_duplicates().values.tolist() == [labels]
    assert list(compare_top_heads(base, [yarn]).data[0].y) == labels
    pairwise = compare_agreement(base, [yarn], metric="sink_mass").data[1]
    assert list(pairwise.x) == labels and list(pairwise.y) == labels


def test_labels_read_stacks_and_sweep_cells_and_fall_back_to_scan_names():
    from posprobe.interventions import parse
    from posprobe.render.compare import scan_condition, scan_labels

    stacked, swept, plain, other = (synthetic_scan(2, 2, seed=s) for s in range(4))
    stacked.meta["intervention"] = {"name": "stack", "parts": [parse("yarn:factor=8").to_dict(),
                                                               parse("disable_rope:layers=0:1").to_dict()]}
    swept.meta["sweep"] = {"cell": {"intervention": "disable_rope", "what_if": "ntk:factor=2"}}
    assert scan_condition(stacked) == "yarn:factor=8 + disable_rope:layers=0:1"
    assert scan_condition(swept) == "disable_rope + ntk:factor=2"
    unknown = synthetic_scan(2, 2)
    unknown.meta["intervention"] = {"name": "retired_spec", "alpha": 3, "beta": None, "resolved": {}}
    assert scan_condition(unknown) == "retired_spec:alpha=3"  # a spec this posprobe does not know: as recorded
    # two plain scans of one model: the scan names tell them apart, then a number
    assert scan_labels([plain, other, stacked], names=["seed0", "seed1", "s"]) == [
        "synthetic (seed0)", "synthetic (seed1)", "synthetic · yarn:factor=8 + disable_rope:layers=0:1"]
    assert scan_labels([plain, other]) == ["synthetic", "synthetic (2)"]
    assert scan_labels([plain, plain], names=["a", "a"]) == ["synthetic (a)", "synthetic (a) (2)"]
    with pytest.raises(ValueError, match="one name per scan"):
        scan_labels([plain, other], names=["only one"])
