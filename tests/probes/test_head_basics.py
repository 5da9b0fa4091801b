"""head_basics: planted patterns give the known answers; a hand-wired real model's previous-token head is found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import posprobe
from posprobe.probes.base import Budget
from posprobe.testing import PlantedAccess, per_head, planted_info, previous_token, sink, uniform

TINY = Budget("test", context_lengths=(48, 96), n_texts=2, max_queries=64, retrieval_trials=1, bias_trials=1,
              implicit_sequences=4)


@pytest.fixture(scope="module")
def planted_scan():
    access = PlantedAccess(planted_info(n_layers=2, n_heads=4), per_head(previous_token, sink, uniform, torch.eye))
    return posprobe.scan(access, probes=["head_basics", "attention_entropy"], budget=TINY, progress=False)


def _metric(scan, metric, head, layer=0):
    row = scan.heads[(scan.heads.layer == layer) & (scan.heads["head"] == head)]
    return float(row[metric].iloc[0])


def test_previous_token_head_scores_one(planted_scan):
    assert _metric(planted_scan, "previous_token_score", head=0) == pytest.approx(1.0)
    assert _metric(planted_scan, "sink_mass", head=0) < 0.05  # only query 1 attends to position 0
    assert _metric(planted_scan, "previous_token_score", head=3) == 0.0  # diagonal head


def test_sink_head_scores_one(planted_scan):
    assert _metric(planted_scan, "sink_mass", head=1) == pytest.approx(1.0)


def test_uniform_head_has_mean_attention_one_over_i(planted_scan):
    # queries are evenly spaced over 1..n-1; mean a_{i,0} of a uniform head is mean 1/(i+1)
    value = _metric(planted_scan, "sink_mass", head=2)
    assert 0.0 < value < 0.2


def test_distance_corr_sign(planted_scan):
    # a previous-token head is an indicator at distance 1 among tied zeros: negative, and the most local head
    prev = _metric(planted_scan, "distance_corr", head=0)
    assert prev < -0.2
    assert _metric(planted_scan, "distance_corr", head=3) < -0.2  # diagonal head: distance 0 indicator
    # uniform relative to the visible keys: a constant, no trend (undefined correlation -> NaN)
    assert np.isnan(_metric(planted_scan, "distance_corr", head=2))


def test_attention_vs_distance_curve_of_previous_token_head(planted_scan):
    curve = planted_scan.curve("attention_vs_distance", layer=0, head=0)
    assert curve.loc[curve.x == 1.0, "y"].item() == pytest.approx(1.0)
    assert curve.loc[curve.x != 1.0, "y"].abs().max() == pytest.approx(0.0)


def test_hand_wired_previous_token_head_in_real_model():
    from tests.planted_models import previous_token_model

    model, tok = previous_token_model(layer=1, head=2)
    scan = posprobe.scan(model, tokenizer=tok, probes=["head_basics"], budget=TINY, progress=False)
    top = scan.rank("previous_token_score", top=1)
    assert (int(top.layer[0]), int(top["head"][0])) == (1, 2)
    assert float(top.previous_token_score[0]) > 0.95


@pytest.mark.parametrize("window", [None, 5])
def test_binned_key_sums_match_brute_force(window):
    from posprobe.probes.head_basics import bin_edges, binned_key_sums

    torch.manual_seed(0)
    n, n_bins = 40, 7
    qidx = torch.tensor([0, 1, 2, 7, 16, 39])
    p = torch.rand(3, len(qidx), n)
    mass, count = binned_key_sums(p, qidx, window, n_bins)
    for r, i in enumerate(qidx.tolist()):
        for b, (lo, hi) in enumerate(bin_edges(n_bins)):
            keys = [j for j in range(1, i + 1) if lo <= i - j <= hi and (window is None or i - j < window)]
            assert count[r, b] == len(keys)
            assert torch.allclose(mass[:, r, b], p[:, r, keys].double().sum(-1), atol=1e-6)
