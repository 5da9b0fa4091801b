"""pattern_examples probe: stored patterns equal the model's eager attention, top-k keeps the heaviest keys, tokens
are the ids run, the size budget decides the layout, and the tables survive save / load.

Ground truth: the model's own eager attention (`output_attentions=True`) on a tiny Gemma 3 layout (4 query heads /
1 KV head, sliding window 8 on layer 0) and a GQA Llama, both random and seeded (no download); PlantedAccess heads
whose patterns are known exactly (previous token, sink, uniform, diagonal).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import posprobe
from posprobe.errors import ProbeError, UnknownNameError
from posprobe.probes import get_probe
from posprobe.probes.base import BUDGETS, Budget
from posprobe.probes.pattern_examples import (
    BYTES_PER_ENTRY,
    PatternExamplesConfig,
    choose_layout,
    estimate_bytes,
    skip_reason,
)
from posprobe.render import pattern_view as viewer
from posprobe.testing import PlantedAccess, per_head, planted_info, previous_token, sink, uniform
from tests.probes.test_rope_chunks import _eager_attentions
from tests.test_fast_path import _gemma3, _llama_gqa

ATOL = 1e-3  # float16 storage: |w - fp16(w)| <= 2.5e-4 for w <= 1, plus the attention call's own rounding


@pytest.fixture(scope="module", params=["gemma3_window8", "llama_gqa"])
def access(request):
    from posprobe.adapters.hf import HFAccess

    model, tok = {"gemma3_window8": _gemma3, "llama_gqa": _llama_gqa}[request.param]()
    model.config._attn_implementation = "sdpa"
    return HFAccess(model, tok, name=f"tiny-{request.param}")


def _scan(access, **config):
    cfg = PatternExamplesConfig(**{"n_tokens": 96, **config})
    return posprobe.scan(access, probes=["pattern_examples"], budget="quick", configs={"pattern_examples": cfg},
                         progress=False)


def _eager(access, ids):
    """[layers] of [H, n, n]: the model's eager attention probabilities (output_attentions)."""
    return [a[0].double().numpy() for a in _eager_attentions(access, ids)]


def _visible(n: int, window: int | None) -> np.ndarray:
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    return (k <= q) & ((q - k) < window if window else True)


@pytest.fixture(scope="module")
def full_scan(access):
    return _scan(access, full_rows=True)


def test_full_rows_equal_eager_output_attentions(access, full_scan):
    scan = full_scan
    assert viewer.example_names(scan) == ["text", "repeated", "needle"]
    assert set(viewer.examples_table(scan)["layout"]) == {"full"}
    checked = 0
    for index in range(3):
        ids = viewer_ids(scan, index)
        eager = _eager(access, ids)
        for layer in range(access.info.n_layers):
            visible = _visible(len(ids), access.info.layers[layer].sliding_window)
            for head in range(access.info.n_heads):
                z = viewer.pattern_matrix(scan, layer, head, index)
                ref = eager[layer][head]
                assert np.isfinite(z[visible]).all(), "a full row stores every key the query sees"
                assert np.isnan(z[~visible]).all(), "keys a query cannot see are never stored"
                np.testing.assert_allclose(z[visible], ref[visible], atol=ATOL, rtol=0)
                assert np.abs(ref[~visible]).max(initial=0) < 1e-6
                np.testing.assert_allclose(np.nansum(z, 1), 1.0, atol=0.05)  # rows sum to 1 (fp16 sums)
                checked += 1
    assert checked == 3 * access.info.n_layers * access.info.n_heads
    if access.info.layers[0].sliding_window:  # the Gemma layout: the window really bounds the stored rows
        rows = scan.tables[viewer.PATTERNS]
        layer0 = rows[rows["layer"] == 0]
        assert int((layer0["query"] - layer0["key"]).max()) == access.info.layers[0].sliding_window - 1


def viewer_ids(scan, index: int) -> list[int]:
    tokens = scan.tables[viewer.TOKENS]
    return tokens[tokens["example"] == index].sort_values("position")["token_id"].astype(int).tolist()


def test_top_k_keeps_the_heaviest_keys_heaviest_first(access):
    k = 4
    scan = _scan(access, full_rows=False, top_k=k, examples=("text", "repeated"))
    assert set(viewer.examples_table(scan)["layout"]) == {"top_k"}
    rows = scan.tables[viewer.PATTERNS]
    for index in range(2):
        ids = viewer_ids(scan, index)
        n = len(ids)
        eager = _eager(access, ids)
        for layer in range(access.info.n_layers):
            visible = _visible(n, access.info.layers[layer].sliding_window)
            for head in range(access.info.n_heads):
                ref = eager[layer][head]
                mine = rows[(rows["example"] == index) & (rows["layer"] == layer) & (rows["head"] == head)]
                counts = mine.groupby("query").size().reindex(range(n), fill_value=0).to_numpy()
                assert (counts == np.minimum(visible.sum(1), k)).all()
                for query, group in mine.groupby("query", sort=True):
                    keys = group["key"].to_numpy(dtype=int)
                    weights = group["weight"].to_numpy(dtype=float)
                    assert visible[query, keys].all()
                    np.testing.assert_allclose(weights, ref[query, keys], atol=ATOL, rtol=0)
                    assert (np.diff(weights) <= 0).all(), "stored heaviest first"
                    rest = np.setdiff1d(np.flatnonzero(visible[query]), keys)
                    assert ref[query, rest].max(initial=0) <= weights.min() + ATOL, "a heavier key was dropped"


def test_token_strings_are_the_ids_that_ran(access, full_scan):
    from posprobe.probes.induction import repeated_random_tokens
    from posprobe.tasks.needle import make_needle_trial
    from posprobe.tasks.text import text_ids

    scan, tok = full_scan, access.tokenizer
    from posprobe.probes.induction import bos_prefix

    block = (96 - len(bos_prefix(access))) // 2
    expected = {0: text_ids(access, 96, seed=0 * 7_919 + 101),
                1: repeated_random_tokens(access, block, 1, 0)[0].tolist()}
    table = viewer.examples_table(scan)
    needle_n = int(table.loc[table["name"] == "needle", "n_tokens"].iloc[0])
    expected[2] = list(make_needle_trial(access, needle_n, 0.5, 0).input_ids)
    for index, ids in expected.items():
        assert viewer_ids(scan, index) == ids
        assert viewer.example_tokens(scan, index) == [tok.decode([i], skip_special_tokens=False) for i in ids]
        assert int(table.loc[table["example"] == index, "n_tokens"].iloc[0]) == len(ids)
    assert viewer.example_tokens(scan, "text")[0] == tok.decode([tok.bos_token_id], skip_special_tokens=False)


def _planted(n_layers: int = 2):
    info = planted_info(n_layers=n_layers, n_heads=4)
    return PlantedAccess(info, per_head(previous_token, sink, uniform, lambda n: torch.eye(n)))


def test_planted_heads_are_stored_exactly():
    access = _planted()
    scan = posprobe.scan(access, probes=["pattern_examples"], budget="quick", progress=False,
                         configs={"pattern_examples": PatternExamplesConfig(top_k=2, full_rows=False,
                                                                            examples=("text", "repeated"))})
    for layer in range(2):
        top = viewer.top_keys(scan, layer, 0, "repeated", query=50, k=5)
        assert top["key"].tolist() == [49] and top["weight"].tolist() == [1.0] and top["distance"].tolist() == [1]
        assert viewer.top_keys(scan, layer, 1, "text", query=30)["key"].tolist()[0] == 0  # sink
        assert viewer.top_keys(scan, layer, 3, "text", query=30)["key"].tolist()[0] == 30  # diagonal
        uniform_row = viewer.top_keys(scan, layer, 2, "text", query=9)
        assert len(uniform_row) == 2 and np.allclose(uniform_row["weight"], 0.1, atol=1e-3)


def test_chunking_does_not_change_the_tables():
    configs = [PatternExamplesConfig(examples=("text",), n_tokens=64, chunk_size=c) for c in (7, 256)]
    scans = [posprobe.scan(_planted(), probes=["pattern_examples"], budget="quick", progress=False,
                           configs={"pattern_examples": c}) for c in configs]
    assert scans[0].tables[viewer.PATTERNS].equals(scans[1].tables[viewer.PATTERNS])


def test_the_size_estimate_decides_the_layout_and_is_exact():
    dense = PlantedAccess(planted_info(), per_head(*[uniform] * 4))  # no weight is 0: the estimate is exact
    scan = posprobe.scan(dense, probes=["pattern_examples"], budget="quick", progress=False)
    summary = scan.meta["summaries"]["pattern_examples"]
    assert summary["bytes"] == summary["estimated_bytes"] == len(scan.tables[viewer.PATTERNS]) * BYTES_PER_ENTRY
    sparse = posprobe.scan(_planted(), probes=["pattern_examples"], budget="quick", progress=False)
    summary = sparse.meta["summaries"]["pattern_examples"]
    assert summary["bytes"] < summary["estimated_bytes"]  # zeros of the planted heads are not stored

    def layout(info, budget: str, **cfg):
        config = PatternExamplesConfig(max_megabytes=BUDGETS[budget].knob("pattern_examples",
                                                                          PatternExamplesConfig, "max_megabytes"),
                                       **cfg)
        return choose_layout(info, config, [128, 128, 128])

    gemma_like = planted_info(n_layers=18, n_heads=4, n_kv_heads=1)
    smol_like = planted_info(n_layers=30, n_heads=9, n_kv_heads=3)
    seven_b = planted_info(n_layers=32, n_heads=32, n_kv_heads=8)
    seventy_b = planted_info(n_layers=80, n_heads=64, n_kv_heads=8)
    assert layout(gemma_like, "quick")[:2] == ("full", 128)
    assert layout(smol_like, "quick")[:2] == ("top_k", 16) and layout(smol_like, "quick")[2] is None
    assert layout(smol_like, "full")[0] == "full"
    assert layout(seven_b, "standard")[2] is not None and layout(seven_b, "full")[2] is None
    assert all(layout(seventy_b, b)[2] is not None for b in BUDGETS)
    assert layout(seventy_b, "quick", enabled=True)[:3] == ("top_k", 16, None)
    # the estimate is the sum over queries of min(k, visible keys) per head
    assert estimate_bytes(planted_info(1, 1), [4], 2) == (1 + 2 + 2 + 2) * BYTES_PER_ENTRY


def test_big_models_are_skipped_unless_forced():
    big = planted_info(n_layers=80, n_heads=64, n_kv_heads=8)
    quick = PatternExamplesConfig(max_megabytes=24)
    reason = skip_reason(big, quick)
    assert reason is not None and "MB" in reason and "enabled=True" in reason
    assert skip_reason(big, PatternExamplesConfig(max_megabytes=24, enabled=True)) is None
    assert "off" in skip_reason(planted_info(), PatternExamplesConfig(max_megabytes=24, enabled=False))
    access = PlantedAccess(big, per_head(*[uniform] * 64))
    scan = posprobe.scan(access, probes=["pattern_examples"], budget="quick", progress=False)
    assert "pattern_examples" in scan.meta["skipped"] and access.calls == 0
    assert not viewer.has_examples(scan) and "skipped" in viewer.no_examples_reason(scan)
    forced = Budget("forced", (64,), 1, 32, probes={"pattern_examples": {"max_megabytes": 4096}})
    assert skip_reason(big, PatternExamplesConfig(max_megabytes=forced.probes["pattern_examples"]["max_megabytes"]))\
        is None


def test_bad_configs_fail_before_any_pass():
    access = _planted()
    for cfg, error in ((PatternExamplesConfig(n_tokens=2), ProbeError),
                       (PatternExamplesConfig(examples=("text", "text")), ProbeError),
                       (PatternExamplesConfig(examples=("poem",)), UnknownNameError),
                       (PatternExamplesConfig(top_k=0), ProbeError)):
        with pytest.raises(error):
            posprobe.scan(access, probes=["pattern_examples"], budget="quick", progress=False,
                          configs={"pattern_examples": cfg})
    assert access.calls == 0


def test_save_load_round_trip_and_old_scans(tmp_path):
    scan = posprobe.scan(_planted(), probes=["head_basics", "pattern_examples"], budget="quick", progress=False)
    loaded = posprobe.load(scan.save(tmp_path / "scan"))
    for name in (viewer.PATTERNS, viewer.TOKENS, viewer.EXAMPLES):
        assert loaded.tables[name].equals(scan.tables[name]), name
        assert loaded.tables[name].dtypes.to_dict() == scan.tables[name].dtypes.to_dict()
    assert loaded.tables[viewer.PATTERNS]["weight"].dtype == np.float16
    np.testing.assert_array_equal(viewer.pattern_matrix(loaded, 1, 0, "needle"),
                                  viewer.pattern_matrix(scan, 1, 0, "needle"))
    # a scan saved without the probe (as every scan before it) still loads, and says it has no examples
    old = posprobe.scan(_planted(), probes=["head_basics"], budget="quick", progress=False)
    reloaded = posprobe.load(old.save(tmp_path / "old"))
    assert not viewer.has_examples(reloaded) and viewer.example_names(reloaded) == []
    assert "did not run" in viewer.no_examples_reason(reloaded)
    assert isinstance(scan.tables[viewer.TOKENS], pd.DataFrame)


def test_registered_with_a_budget_knob():
    probe = get_probe("pattern_examples")
    assert not probe.streaming and probe.Config is PatternExamplesConfig
    assert [BUDGETS[b].knob("pattern_examples", PatternExamplesConfig, "max_megabytes")
            for b in ("quick", "standard", "full")] == [24, 48, 128]


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_every_adapter_stores_the_same_patterns(backend):
    pytest.importorskip({"transformer_lens": "transformer_lens", "nnsight": "nnsight"}[backend])
    config = {"pattern_examples": PatternExamplesConfig(n_tokens=64, examples=("text", "repeated"))}
    scans = [posprobe.scan("tiny-rope", backend=b, probes=["pattern_examples"], budget="quick", progress=False,
                           configs=config) for b in ("hf", backend)]
    for name in (viewer.TOKENS, viewer.EXAMPLES):
        assert scans[0].tables[name].equals(scans[1].tables[name])
    info = scans[0].info
    for example in ("text", "repeated"):
        for layer in range(info.n_layers):
            for head in range(info.n_heads):
                ours, theirs = (viewer.pattern_matrix(s, layer, head, example) for s in scans)
                np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
                np.testing.assert_allclose(ours, theirs, atol=ATOL, equal_nan=True)
