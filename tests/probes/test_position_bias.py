"""position_bias: planted U-shaped vs flat attention, exact binning, document-level curve, scan integration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import posprobe
from posprobe.errors import ProbeError
from posprobe.probes.position_bias import (
    PositionBiasConfig,
    binned_attention,
    document_attention,
    middle_third,
    relative_bins,
    u_score,
)
from posprobe.testing import PlantedAccess, per_head, planted_info, previous_token, sink, uniform


def u_shaped(n: int, depth: float = 8.0) -> torch.Tensor:
    """Row i: weights 1 + depth * (2 j / i - 1)^2 over keys 1..i (high at both ends), plus weight 1 on the sink."""
    p = torch.zeros(n, n)
    p[0, 0] = 1.0
    for i in range(1, n):
        j = torch.arange(1, i + 1, dtype=torch.float64)
        p[i, 1 : i + 1] = (1 + depth * (2 * j / i - 1) ** 2).float()
        p[i, 0] = 1.0
    return p / p.sum(-1, keepdim=True)


SMALL = PositionBiasConfig(context_length=96, n_contexts=2, doc_task="kv_words", doc_items=6, doc_trials=2)


def planted_scan(*builders, config=SMALL, seed=0):
    access = PlantedAccess(planted_info(n_layers=2, n_heads=len(builders)), patterns=per_head(*builders))
    return posprobe.scan(access, probes=["position_bias"], budget="quick", seed=seed,
                         configs={"position_bias": config}, progress=False)


def test_relative_bins_by_hand():
    bins = relative_bins(torch.tensor([6]), 8, 3)
    # keys 1..6 of query 6: j/i = 1/6 .. 1 -> bins 0,0,1,1,2,2; sink and future keys -1
    assert bins.tolist() == [[-1, 0, 0, 1, 1, 2, 2, -1]]
    assert middle_third(12).tolist() == [4, 5, 6, 7] and middle_third(3).tolist() == [1]


def test_uniform_attention_bins_to_one():
    probs = uniform(40)[None, None].expand(1, 2, -1, -1)
    queries = torch.arange(30, 40)
    curve = binned_attention(probs[:, :, queries], queries, 6)
    assert torch.allclose(curve, torch.ones(2, 6, dtype=torch.float64))


def test_planted_u_scores_above_one_and_flat_scores_one():
    scan = planted_scan(u_shaped, uniform)
    heads = scan.heads.set_index(["layer", "head"])
    assert (heads.xs(0, level="head")["u_score"] > 2).all()  # planted U
    assert np.allclose(heads.xs(1, level="head")["u_score"], 1.0, atol=1e-9)  # flat
    assert np.allclose(heads.xs(1, level="head")["u_first"], 1.0)
    # document level: the gold document at the ends gets more attention per token than in the middle
    assert (heads.xs(0, level="head")["doc_u_score"] > 1.5).all()
    assert np.allclose(heads.xs(1, level="head")["doc_u_score"], 1.0, atol=1e-9)
    summary = scan.meta["summaries"]["position_bias"]
    assert summary["attention_u_shaped"] and summary["context_length"] == 96


def test_sink_is_separate_and_previous_token_is_all_recency():
    scan = planted_scan(sink, previous_token)
    heads = scan.heads.set_index(["layer", "head"])
    assert np.allclose(heads.xs(0, level="head")["u_sink"], 1.0)
    assert np.allclose(heads.xs(0, level="head")["u_first"], 0.0)
    assert math.isnan(heads.xs(0, level="head")["u_score"].iloc[0])  # no attention anywhere but the sink
    assert np.allclose(heads.xs(1, level="head")["u_middle"], 0.0)
    assert (heads.xs(1, level="head")["u_last"] > 0).all() and heads.xs(1, level="head")["u_score"].isna().all()


def test_curves_tables_and_determinism():
    a = planted_scan(u_shaped, uniform)
    curve = a.curve("attention_by_relative_position", layer=-1, head=-1)
    assert len(curve) == SMALL.n_bins and curve["x"].between(0, 1).all()
    docs = a.curve("document_attention")
    assert sorted(docs["x"].unique()) == list(range(SMALL.doc_items))
    assert set(docs["layer"].unique()) == {-1, 0, 1}
    slots = a.curve("slot_attention", layer=-1, head=-1)
    assert len(slots) == SMALL.doc_items
    table = a.tables["position_bias.documents"]
    assert len(table) == SMALL.doc_trials * SMALL.doc_items * 2
    b = planted_scan(u_shaped, uniform)
    assert a.heads.equals(b.heads) and a.curves.equals(b.curves)


def test_document_attention_reads_the_gold_span():
    # all attention of the last query on the gold item's tokens: every slot's gold attention = 1 / span length
    from posprobe.tasks import get_task

    task = get_task("kv_words")

    def on_gold(layer, ids):
        n = ids.shape[1]
        probs = torch.zeros(ids.shape[0], 1, n, n)
        probs[..., :, 0] = 1.0
        for r in range(ids.shape[0]):
            gold = [p for p in (task.make(access, 5, k, 0) for k in range(5)) if list(p.input_ids) == ids[r].tolist()]
            a, b = gold[0].gold_span
            probs[r, 0, -1] = 0.0
            probs[r, 0, -1, a:b] = 1.0 / (b - a)
        return probs

    access = PlantedAccess(planted_info(n_layers=1, n_heads=1), patterns=on_gold)
    docs = document_attention(access, task, n_items=5, n_trials=1, seed=0)
    prompts = [task.make(access, 5, k, 0) for k in range(5)]
    expected = [1.0 / (p.gold_span[1] - p.gold_span[0]) for p in prompts]
    assert np.allclose(docs.gold[0, :, 0, 0], expected)


def test_u_score_formula_and_bad_config():
    assert u_score(np.array([3.0, 1, 1, 1, 1, 5.0]))[()] == pytest.approx(4.0)
    assert np.allclose(u_score(np.ones((2, 3, 9))), 1.0)
    with pytest.raises(ProbeError, match="n_bins"):
        planted_scan(uniform, config=PositionBiasConfig(n_bins=2))


def test_registered_and_runs_on_tiny_model(tiny_rope):
    assert "position_bias" in posprobe.list_probes()
    config = PositionBiasConfig(context_length=64, n_contexts=1, doc_items=4, doc_trials=1)
    scan = posprobe.scan(tiny_rope, probes=["position_bias"], budget="quick", configs={"position_bias": config},
                         progress=False)
    assert scan.heads["u_score"].notna().all() and (scan.heads["u_sink"] > 0).all()
    assert np.isfinite(scan.curve("document_attention")["y"]).all()


@pytest.mark.real_model
def test_gemma_position_bias_small(gemma):
    config = PositionBiasConfig(context_length=256, n_contexts=1, doc_items=5, doc_trials=1)
    scan = posprobe.scan(gemma, probes=["position_bias"], budget="quick", configs={"position_bias": config},
                         progress=False)
    heads = scan.heads
    assert len(heads) == 18 * 4 and heads["u_sink"].between(0, 1).all()
    assert heads["u_score"].notna().mean() > 0.9
    model = scan.curve("attention_by_relative_position", layer=-1, head=-1)
    assert len(model) == config.n_bins and (model["y"] >= 0).all()


def test_bootstrap_interval_of_u_score():
    from posprobe.probes.position_bias import bootstrap_u

    rng = np.random.default_rng(0)
    u_trials = np.array([3.0, 1, 1, 1, 1, 1, 3.0]) + rng.normal(0, 0.1, size=(30, 7))
    low, high = bootstrap_u(u_trials, 500, seed=1)
    assert 2.5 < low <= high < 3.5  # around the planted u = 3, far above 1
    assert low <= u_score(u_trials.mean(0))[()] <= high
    assert all(math.isnan(v) for v in bootstrap_u(u_trials[:1]))
    assert bootstrap_u(u_trials, 500, seed=1) == (low, high)
