"""implicit_position: planted residuals with known answers (a position direction, 1/(i+1) variance, no position),
the shuffled-label control at chance, disjoint train/test sequences, ridge parity with scikit-learn, Chi et al.'s
variance law on a random-init NoPE model, and the real model normal vs RoPE-disabled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import posprobe
from posprobe.errors import ProbeError
from posprobe.probes.base import Budget
from posprobe.probes.implicit_position import (
    ImplicitPositionConfig,
    loglog_slope,
    ridge_fit_predict,
    split_sequences,
    stratified_positions,
)
from posprobe.testing import PlantedAccess, planted_info

N_TOKENS, D_MODEL = 128, 32
BUDGET = Budget("test", context_lengths=(64,), n_texts=1, max_queries=32, retrieval_trials=1, bias_trials=1,
                implicit_sequences=12)


def _planted_tensors(layer: int, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Layer 0: a position direction in the residual and attention output with Var ~ 1/(i+1).
    Layer 1: no position at all; residual = a fixed vector plus small noise, constant-variance attention output."""
    n = input_ids.shape[1]
    gen = torch.Generator().manual_seed(int(input_ids.sum()) * 7 + layer)  # a different draw for every sequence
    noise = torch.randn(1, n, D_MODEL, generator=gen)
    attn_noise = torch.randn(1, n, D_MODEL, generator=gen)
    pos = torch.arange(n, dtype=torch.float32)[None, :, None]
    if layer == 0:
        resid = noise.clone()
        resid[..., 0] += 16.0 * pos[..., 0] / n  # signal variance 21 vs noise 1: R^2 ~ 0.95
        attn = attn_noise / torch.sqrt(pos + 1.0)
    else:
        resid = torch.ones(1, n, D_MODEL) + 0.05 * noise
        attn = attn_noise
    return {"resid_post": resid, "attn_out": attn}


def _planted_scan(**config):
    info = planted_info(n_layers=2, n_heads=2, head_dim=D_MODEL // 2)
    access = PlantedAccess(info, tensors=_planted_tensors)
    defaults = dict(context_length=N_TOKENS, input="random", positions_per_sequence=32, mlp_max_iter=100)
    cfg = ImplicitPositionConfig(**{**defaults, **config})
    return posprobe.scan(access, probes=["implicit_position"], budget=BUDGET, configs={"implicit_position": cfg},
                         progress=False)


@pytest.fixture(scope="module")
def planted_scan():
    return _planted_scan()


def _score(scan, layer, regressor, features, target, labels="true", metric="r2"):
    table = scan.tables["implicit_position.probes"]
    row = table[(table.layer == layer) & (table.regressor == regressor) & (table.features == features)
                & (table.target == target) & (table.labels == labels)]
    assert len(row) == 1
    return float(row[metric].iloc[0])


def test_planted_position_direction_is_decoded(planted_scan):
    assert _score(planted_scan, 0, "ridge", "hidden", "position") > 0.9
    assert _score(planted_scan, 0, "ridge", "hidden", "position", metric="spearman") > 0.9
    mad = _score(planted_scan, 0, "ridge", "hidden", "position", metric="mad")
    assert mad < 0.5 * _score(planted_scan, 0, "ridge", "hidden", "position", metric="mad_baseline")
    assert _score(planted_scan, 0, "mlp", "hidden", "position") > 0.6


def test_planted_variance_decodes_log_position_from_scale_features(planted_scan):
    # log Var(attn_out) = -log(i + 1) + noise: a linear function of log-position
    assert _score(planted_scan, 0, "ridge", "scale", "log_position") > 0.85


def test_layer_without_position_is_at_chance(planted_scan):
    for features in ("hidden", "direction", "scale"):
        assert _score(planted_scan, 1, "ridge", features, "position") < 0.1


def test_shuffled_labels_score_at_chance(planted_scan):
    table = planted_scan.tables["implicit_position.probes"]
    control = table[table.labels == "shuffled"]
    assert set(control.regressor) == {"ridge", "mlp"}
    assert control.r2.max() < 0.1  # layer 0 carries position with R^2 > 0.9, yet shuffled training learns nothing
    assert (control.mad / control.mad_baseline).min() > 0.85
    summary = planted_scan.meta["summaries"]["implicit_position"]
    assert summary["control_max_r2"] == pytest.approx(control.r2.max())
    # the control is also visible as curves in every scan
    series = set(planted_scan.curve("implicit_r2_by_layer").series)
    assert "ridge/hidden/position/shuffled" in series and "ridge/hidden/position" in series


def test_train_and_test_sequences_are_disjoint(planted_scan):
    summary = planted_scan.meta["summaries"]["implicit_position"]
    assert summary["train_test_disjoint"] is True
    n_sequences = BUDGET.probes["implicit_position"]["n_sequences"]  # the posprobe 0.1 keyword implicit_sequences=12
    assert summary["n_train_sequences"] + summary["n_test_sequences"] == n_sequences
    table = planted_scan.tables["implicit_position.probes"]
    k = summary["positions_per_sequence"]
    assert set(table.n_test) == {summary["n_test_sequences"] * k}
    assert set(table.n_train) == {summary["n_train_sequences"] * k}
    train, test = split_sequences(12, 0.25, seed=0)
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(12))


def test_variance_slope_matches_planted_law(planted_scan):
    layers = planted_scan.tables["implicit_position.layers"].set_index("layer")
    assert layers.loc[0, "attn_var_slope"] == pytest.approx(-1.0, abs=0.08)
    assert layers.loc[1, "attn_var_slope"] == pytest.approx(0.0, abs=0.08)
    assert planted_scan.meta["summaries"]["implicit_position"]["attn_var_slope"][0] == pytest.approx(
        layers.loc[0, "attn_var_slope"])
    curve = planted_scan.curve("variance_by_position", layer=0)
    assert set(curve.series) == {"attn_out", "resid_post"}
    assert curve.x.min() == 1.0 and curve.x.max() == N_TOKENS


def test_similarity_by_offset(planted_scan):
    layers = planted_scan.tables["implicit_position.layers"].set_index("layer")
    assert layers.loc[1, "similarity_offset_1"] > 0.95  # a fixed vector plus small noise
    assert layers.loc[0, "similarity_offset_far"] < 0.5  # independent noise dominates
    curve = planted_scan.curve("similarity_by_offset", layer=1)
    assert curve.x.min() == 1.0 and curve.x.max() == (N_TOKENS - 1) // 2


def test_scan_round_trips(planted_scan, tmp_path):
    loaded = posprobe.load(planted_scan.save(tmp_path / "scan"))
    assert loaded.equals(planted_scan)
    assert loaded.meta["probes"]["implicit_position"]["input"] == "random"


def test_bad_config_is_a_clear_error():
    with pytest.raises(ProbeError, match="feature_sets"):
        _planted_scan(feature_sets=("pixels",))
    with pytest.raises(ProbeError, match="at least 4 sequences"):
        _planted_scan(n_sequences=3)


def test_ridge_matches_scikit_learn():
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 10)), rng.normal(size=(200, 2))
    x_test = rng.normal(size=(50, 10))
    pred, alpha = ridge_fit_predict(x, y, np.repeat(np.arange(10), 20), x_test, [3.0], folds=3)
    reference = make_pipeline(StandardScaler(), Ridge(alpha=3.0)).fit(x, y).predict(x_test)
    np.testing.assert_allclose(pred, reference, rtol=1e-8, atol=1e-10)
    assert list(alpha) == [3.0, 3.0]


def test_ridge_cv_prefers_strong_shrinkage_for_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 40))
    y = np.stack([x[:, 0] + 0.01 * rng.normal(size=300), rng.normal(size=300)], axis=1)
    _, alpha = ridge_fit_predict(x, y, np.repeat(np.arange(15), 20), x[:5], [1e-2, 1.0, 1e2, 1e4, 1e6], folds=3)
    assert alpha[0] <= 1.0 and alpha[1] >= 1e4


def test_helpers():
    rng = np.random.default_rng(0)
    picked = stratified_positions(100, 10, rng)
    assert len(picked) == 10 and picked.min() >= 1 and picked.max() <= 99 and len(set(picked)) == 10
    assert list(stratified_positions(5, 10, rng)) == [1, 2, 3, 4]
    x = np.arange(1, 100, dtype=float)
    assert loglog_slope(x, 3.0 / x) == pytest.approx(-1.0)
    assert np.isnan(loglog_slope(x[:2], x[:2]))


@pytest.fixture(scope="module")
def random_nope_scan():
    """Chi et al.'s setting, as measured in METRICS.md: random-init NoPE, 4 layers, d=256, random tokens, no BOS."""
    from posprobe.models import tiny_model, wrap

    model, tokenizer = tiny_model("nope", n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, seed=0)
    access = wrap(model, tokenizer=tokenizer, name="random-nope-4x256")
    cfg = ImplicitPositionConfig(context_length=256, n_sequences=16, input="random", bos=False,
                                 regressors=("ridge",))
    return posprobe.scan(access, probes=["implicit_position"], configs={"implicit_position": cfg}, progress=False)


def test_random_init_nope_variance_shrinks_like_one_over_position(random_nope_scan):
    layers = random_nope_scan.tables["implicit_position.layers"].set_index("layer")
    assert -1.1 < layers.loc[0, "attn_var_slope"] < -0.7  # near -1 (the finite vocabulary's mean flattens it)
    assert layers.loc[3, "attn_var_slope"] > layers.loc[0, "attn_var_slope"]


def test_random_init_nope_position_lives_in_scale(random_nope_scan):
    scale = max(_score(random_nope_scan, l, "ridge", "scale", "log_position") for l in range(4))
    hidden = max(_score(random_nope_scan, l, "ridge", "hidden", "log_position") for l in range(4))
    assert scale > 0.8
    assert hidden < scale - 0.3
    assert random_nope_scan.meta["summaries"]["implicit_position"]["control_max_r2"] < 0.1


def test_zoo_tiny_models_as_baselines():
    cfg = ImplicitPositionConfig(context_length=64, positions_per_sequence=16, regressors=("ridge",))
    for name in ("tiny-nope", "tiny-rope"):
        scan = posprobe.scan(name, probes=["implicit_position"], budget="quick", configs={"implicit_position": cfg},
                             progress=False)
        table = scan.tables["implicit_position.probes"]
        assert set(table.layer) == {0, 1} and table.r2.notna().all()
        assert {"implicit_r2_by_layer", "implicit_mad_by_layer", "variance_slope_by_layer", "variance_by_position",
                "similarity_by_offset"} <= set(scan.curves.curve)
        assert scan.meta["summaries"]["implicit_position"]["n_sequences"] == 16


@pytest.mark.real_model
def test_gemma_normal_and_rope_disabled(gemma):
    from posprobe.interventions import disable_rope

    cfg = ImplicitPositionConfig(context_length=128, n_sequences=8, positions_per_sequence=32,
                                 regressors=("ridge",), feature_sets=("hidden", "scale"))
    configs = {"implicit_position": cfg}
    normal = posprobe.scan(gemma, probes=["implicit_position"], configs=configs, progress=False)
    with disable_rope(gemma) as ablated:
        no_rope = posprobe.scan(ablated, probes=["implicit_position"], configs=configs, progress=False)
    for scan in (normal, no_rope):
        r2 = scan.curve("implicit_r2_by_layer")
        hidden = r2[r2.series == "ridge/hidden/log_position"]
        assert len(hidden) == 18
        assert hidden.y.iloc[4:14].median() > 0.5  # position is linearly decodable in middle layers
        assert scan.meta["summaries"]["implicit_position"]["control_max_r2"] < 0.2
    assert len(no_rope.meta["summaries"]["implicit_position"]["active_edits"]) == 18
    assert normal.meta["summaries"]["implicit_position"]["active_edits"] == []
    a = normal.tables["implicit_position.layers"]["attn_var_slope"].to_numpy()
    b = no_rope.tables["implicit_position.layers"]["attn_var_slope"].to_numpy()
    assert not np.allclose(a, b)


def test_figures(planted_scan):
    from posprobe.render import FIGURES
    from posprobe.render.implicit import implicit_comparison, variance_slope_comparison

    assert {"implicit_probe", "implicit_variance", "implicit_similarity"} <= set(FIGURES)
    fig = planted_scan.figure("implicit_probe", metric="r2", regressor="ridge")
    names = {trace.name for trace in fig.data}
    assert "ridge/hidden/position" in names and "ridge/hidden/position/shuffled" in names
    assert not any(name.startswith("mlp") for name in names)
    assert len(planted_scan.figure("implicit_variance").data) == 2
    assert len(planted_scan.figure("implicit_similarity", layers=[1]).data) == 1
    both = {"a": planted_scan, "b": planted_scan}
    assert len(implicit_comparison(both, metric="mad").data) == 4
    assert len(variance_slope_comparison(both).data) == 3


def test_mlp_learns_a_signal_and_falls_back_to_the_mean_on_noise():
    from posprobe.probes.implicit_position import mlp_fit_predict

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 30)
    x = rng.normal(size=(600, 8))
    x_test = rng.normal(size=(200, 8))
    config = ImplicitPositionConfig(mlp_max_iter=100)
    signal = np.sin(x[:, 0]) + x[:, 1] ** 2
    pred = mlp_fit_predict(x, signal, groups, x_test, config, seed=0)
    truth = np.sin(x_test[:, 0]) + x_test[:, 1] ** 2
    assert 1 - ((pred - truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum() > 0.6  # a linear fit gets ~0.2
    noise = rng.normal(size=600)
    pred = mlp_fit_predict(x, noise, groups, x_test, config, seed=0)
    assert pred.std() < 0.2 * noise.std()  # nothing to learn: (close to) the constant training-mean predictor


def test_quick_budget_fits_ridge_only_and_every_curve_row_has_a_series(tmp_path):
    """A budget with implicit_mlp=False drops the slow MLP fit (an explicit config still wins); curves whose rows
    omit `series` (similarity_by_offset) come back from Parquet as "" (a NaN key would vanish from groupbys)."""
    import dataclasses

    quick = dataclasses.replace(BUDGET, implicit_mlp=False)
    info = planted_info(n_layers=2, n_heads=2, head_dim=D_MODEL // 2)
    cfg = ImplicitPositionConfig(context_length=N_TOKENS, input="random", positions_per_sequence=32)
    scan = posprobe.scan(PlantedAccess(info, tensors=_planted_tensors), probes=["implicit_position"], budget=quick,
                         configs={"implicit_position": cfg}, progress=False)
    probes = scan.tables["implicit_position.probes"]
    assert set(probes["regressor"]) == {"ridge"}
    assert scan.meta["summaries"]["implicit_position"]["regressors"] == ["ridge"]
    explicit = posprobe.scan(PlantedAccess(info, tensors=_planted_tensors), probes=["implicit_position"],
                             budget=quick, progress=False,
                             configs={"implicit_position": dataclasses.replace(cfg, regressors=("ridge", "mlp"),
                                                                              mlp_max_iter=20)})
    assert set(explicit.tables["implicit_position.probes"]["regressor"]) == {"ridge", "mlp"}
    loaded = posprobe.load(scan.save(tmp_path / "scan"))
    curves = loaded.curves[loaded.curves["probe"] == "implicit_position"]
    assert curves["series"].notna().all()
    similarity = curves[curves["curve"] == "similarity_by_offset"]
    assert len(similarity) > 0 and (similarity["series"] == "").all()
