"""positional_heads: planted chunk contributions with known answers, brute-force parity, windows, config.

METRICS.md 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import posprobe
from posprobe.access import Tap, expand_kv
from posprobe.errors import ProbeError
from posprobe.probes import get_probe
from posprobe.probes.base import Budget
from posprobe.probes.rope_chunks import chunk_contributions
from posprobe.scan import shared_texts
from posprobe.testing import PlantedAccess, per_head, planted_info, previous_token, sink, uniform

N = 128
BUDGET = Budget("test", context_lengths=(N,), n_texts=1, max_queries=32, retrieval_trials=1, bias_trials=1,
                implicit_sequences=1)
Config = get_probe("positional_heads").Config


def sampled_queries(n: int, m: int) -> torch.Tensor:
    return torch.linspace(1, n - 1, min(m, n - 1)).round().long().unique()  # as ScanContext.query_sample


def planted_access(patterns=None, sliding_window=None) -> PlantedAccess:
    """4 heads, 8 chunks, constant un-rotated q/k with c_k(i, j) = k + 1 (heads 0, 2, 3) or 8 - k (head 1).

    Patterns: head 0 uniform, head 1 uniform, head 2 previous-token, head 3 sink.
    """
    info = planted_info(n_layers=1, n_heads=4, head_dim=16, sliding_window=sliding_window)
    per_chunk = torch.stack([torch.arange(1.0, 9.0), torch.arange(8.0, 0.0, -1), torch.arange(1.0, 9.0),
                             torch.arange(1.0, 9.0)])  # [H, C]

    def tensors(layer, ids):
        b, n = ids.shape
        q = torch.zeros(b, 4, n, 16)
        q[..., :8] = per_chunk[None, :, None, :]  # first coordinate of each half-split chunk
        k = torch.zeros(b, 4, n, 16)
        k[..., :8] = 1.0
        return {"q": q, "k": k}

    return PlantedAccess(info, patterns=patterns or per_head(uniform, uniform, previous_token, sink), tensors=tensors)


def expected_uniform_mass(distance: int, exclude_sink: bool = False) -> float:
    """Mean over sampled queries with a long key of the uniform head's attention mass at distance >= D."""
    q = sampled_queries(N, BUDGET.max_queries).double()
    if exclude_sink:
        q = q[q >= distance + 1]
        return float(((q - distance) / (q + 1)).mean())
    q = q[q >= distance]
    return float(((q - distance + 1) / (q + 1)).mean())


def test_planted_heads_have_the_known_answers():
    scan = posprobe.scan(planted_access(), probes=["positional_heads"], budget=BUDGET, progress=False)
    h = scan.heads.set_index("head")
    d = N // 4
    assert scan.meta["summaries"]["positional_heads"]["long_distance_by_length"] == {str(N): d}
    mass = expected_uniform_mass(d)
    assert h.loc[0, "dim_distance_corr"] == pytest.approx(1.0)
    assert h.loc[0, "long_mass"] == pytest.approx(mass, rel=1e-6)
    assert h.loc[0, "positional_head_score"] == pytest.approx(mass, rel=1e-6)
    assert h.loc[1, "dim_distance_corr"] == pytest.approx(-1.0)
    assert h.loc[1, "positional_head_score"] == pytest.approx(-mass, rel=1e-6)
    assert h.loc[2, "long_mass"] == 0.0 and np.isnan(h.loc[2, "dim_distance_corr"])  # previous-token: nothing far
    assert h.loc[3, "long_mass"] == pytest.approx(1.0) and h.loc[3, "positional_head_score"] == pytest.approx(1.0)
    assert h["is_positional_head"].dtype == bool
    assert list(h["is_positional_head"]) == [mass >= 0.4, False, False, True]
    contrib = scan.curve("long_contrib_by_chunk", head=0).sort_values("x")
    assert np.allclose(contrib["y"], np.arange(1, 9))  # long_contrib = c_k for constant contributions
    assert np.allclose(scan.curve("long_contrib_by_chunk", head=1).sort_values("x")["y"], np.arange(8, 0, -1))
    assert scan.curve("long_contrib_by_chunk", head=2).empty


def test_exclude_sink_and_explicit_distance():
    cfg = Config(exclude_sink=True, long_distance=20, threshold=0.0)
    scan = posprobe.scan(planted_access(), probes=["positional_heads"], budget=BUDGET,
                         configs={"positional_heads": cfg}, progress=False)
    h = scan.heads.set_index("head")
    assert h.loc[0, "long_mass"] == pytest.approx(expected_uniform_mass(20, exclude_sink=True), rel=1e-6)
    assert h.loc[3, "long_mass"] == 0.0  # the sink head has nothing left at long range
    assert list(h["is_positional_head"]) == [True, False, False, False]


def test_windows_shorter_than_the_distance_give_nan():
    def windowed(layer, ids):
        n = ids.shape[1]
        dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        p = ((dist >= 0) & (dist < 8)).float()
        p = p / p.sum(-1, keepdim=True)
        return p[None, None].expand(ids.shape[0], 4, n, n)

    scan = posprobe.scan(planted_access(windowed, sliding_window=8), probes=["positional_heads"], budget=BUDGET,
                         progress=False)
    assert (scan.heads["long_mass"] == 0).all()
    assert scan.heads["positional_head_score"].isna().all() and not scan.heads["is_positional_head"].any()


def test_matches_brute_force_on_tiny_rope(tiny_rope):
    scan = posprobe.scan(tiny_rope, probes=["positional_heads"], budget=BUDGET, progress=False)
    ids = shared_texts(tiny_rope, BUDGET, seed=0)[0].input_ids
    caps = {}
    tiny_rope.run(ids, taps=[Tap.Q, Tap.K, Tap.PATTERN],
                  on_layer=lambda c: caps.__setitem__(c.layer, (c.q.clone(), c.k.clone(), c.pattern().clone(), c.info)))
    queries = sampled_queries(N, BUDGET.max_queries)
    d = N // 4
    for layer, (q, k, probs, info) in caps.items():
        c = chunk_contributions(q, expand_kv(k, tiny_rope.info.n_heads), info)[0][:, :, queries]  # [H, C, nq, n]
        a = probs[0][:, queries]  # [H, nq, n]
        far = (queries[:, None] - torch.arange(N)[None, :]) >= d
        w = a * far
        expected = (c * w[:, None]).sum((-1, -2)) / w.sum((-1, -2))[:, None]  # [H, C]
        mass = w.sum(-1)[:, queries >= d].mean(-1)
        for head in range(tiny_rope.info.n_heads):
            got = scan.curve("long_contrib_by_chunk", layer=layer, head=head).sort_values("x")["y"].to_numpy()
            assert np.allclose(got, expected[head].double().numpy(), rtol=1e-4, atol=1e-6)
        row = scan.heads[scan.heads["layer"] == layer].sort_values("head")
        assert np.allclose(row["long_mass"], mass.double().numpy(), rtol=1e-5)
        assert np.allclose(row["positional_head_score"], row["dim_distance_corr"] * row["long_mass"])


def test_invalid_config_is_an_error(tiny_rope):
    with pytest.raises(ProbeError, match="long_distance"):
        posprobe.scan(tiny_rope, probes=["positional_heads"], budget=BUDGET,
                      configs={"positional_heads": Config(long_distance=0)}, progress=False)
    with pytest.raises(ProbeError, match="fraction"):
        posprobe.scan(tiny_rope, probes=["positional_heads"], budget=BUDGET,
                      configs={"positional_heads": Config(long_distance_fraction=1.5)}, progress=False)


def test_threshold_is_honoured(tiny_rope):
    low = posprobe.scan(tiny_rope, probes=["positional_heads"], budget=BUDGET,
                        configs={"positional_heads": Config(threshold=-1.0)}, progress=False)
    high = posprobe.scan(tiny_rope, probes=["positional_heads"], budget=BUDGET,
                         configs={"positional_heads": Config(threshold=1.01)}, progress=False)
    finite = np.isfinite(low.heads["positional_head_score"])
    assert (low.heads["is_positional_head"] == finite).all() and not high.heads["is_positional_head"].any()
    assert low.meta["probes"]["positional_heads"]["threshold"] == -1.0


@pytest.mark.real_model
def test_gemma_positional_heads(gemma):
    budget = Budget("gemma-test", context_lengths=(256,), n_texts=1, max_queries=64, retrieval_trials=1,
                    bias_trials=1, implicit_sequences=1)
    scan = posprobe.scan(gemma, probes=["positional_heads"], budget=budget, progress=False)
    h = scan.heads
    assert np.isfinite(h["positional_head_score"]).all()
    assert ((h["long_mass"] > 0) & (h["long_mass"] <= 1)).all()
    # slow chunks carry the long-range logit in most heads (Hong et al.): positive correlation on average
    assert h["dim_distance_corr"].mean() > 0.2
    assert h["is_positional_head"].any()
