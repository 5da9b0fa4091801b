"""rope_frequency: planted single-chunk heads, layout invariance, partial rotary, GQA, skips, Gemma 3 (METRICS.md 1)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import posprobe
from posprobe.access import ChunkLayout, LayerInfo, Positional, Tap
from posprobe.probes import get_probe
from posprobe.probes.base import Budget
from posprobe.probes.rope_chunks import chunk_norms
from posprobe.testing import PlantedAccess, planted_info
from tests.probes.test_rope_chunks import interleaved_twin, rotate_half_split

ONE_TEXT = Budget("test", context_lengths=(96,), n_texts=1, max_queries=48, retrieval_trials=1, bias_trials=1,
                  implicit_sequences=1)
TWO_TEXTS = Budget("test2", context_lengths=(64, 96), n_texts=1, max_queries=40, retrieval_trials=1, bias_trials=1,
                   implicit_sequences=1)
COLUMNS = ["rope_high_freq_share", "rope_low_freq_share", "rope_freq_centroid", "rope_nonrotary_share"]


def planted_chunk_model(plan: dict[int, list[int]], head_dim: int = 32):
    """A tiny Llama whose W_Q rows are zeroed in every layer except those of the chunks `plan[head]` lists, so
    c_k(i, j) = 0 for every other chunk of that head."""
    from posprobe.adapters.hf import HFAccess
    from posprobe.models import tiny_model

    model, tok = tiny_model("rope", d_model=128, n_heads=4, n_kv_heads=2, head_dim=head_dim, seed=3)
    c = head_dim // 2
    with torch.no_grad():
        for block in model.model.layers:
            w = block.self_attn.q_proj.weight
            for head, chunks in plan.items():
                keep = torch.zeros(head_dim, dtype=torch.bool)
                for k in chunks:
                    keep[k] = keep[k + c] = True
                w[head * head_dim:(head + 1) * head_dim][~keep] = 0.0
    return HFAccess(model, tok, name="tiny-planted-chunks")


def test_planted_fastest_and_slowest_chunk_heads():
    # head_dim 32: 16 chunks, the fastest / slowest 1/8 are chunks {0, 1} / {14, 15}
    access = planted_chunk_model({0: [0], 1: [15], 2: [1], 3: [7]})
    scan = posprobe.scan(access, probes=["rope_frequency"], budget=ONE_TEXT, progress=False)
    heads = scan.heads.set_index(["layer", "head"])
    for layer in range(access.info.n_layers):
        h = heads.loc[layer]
        assert h.loc[0, "rope_high_freq_share"] == pytest.approx(1.0, abs=1e-6)
        assert h.loc[0, "rope_low_freq_share"] == pytest.approx(0.0, abs=1e-6)
        assert h.loc[0, "rope_freq_centroid"] == pytest.approx(0.0, abs=1e-6)
        assert h.loc[1, "rope_low_freq_share"] == pytest.approx(1.0, abs=1e-6)
        assert h.loc[1, "rope_high_freq_share"] == pytest.approx(0.0, abs=1e-6)
        assert h.loc[1, "rope_freq_centroid"] == pytest.approx(15 / 16, abs=1e-6)
        assert h.loc[2, "rope_high_freq_share"] == pytest.approx(1.0, abs=1e-6)
        assert h.loc[2, "rope_freq_centroid"] == pytest.approx(1 / 16, abs=1e-6)
        assert h.loc[3, "rope_high_freq_share"] == pytest.approx(0.0, abs=1e-6)  # a middle chunk: neither band
        assert h.loc[3, "rope_low_freq_share"] == pytest.approx(0.0, abs=1e-6)
        assert h.loc[3, "rope_freq_centroid"] == pytest.approx(7 / 16, abs=1e-6)
        assert (h["rope_nonrotary_share"] == 0).all()
    # the q norms say the same: head 0 has norm only in chunk 0
    q0 = scan.curve("rope_q_norm", layer=0, head=0).sort_values("x")["y"].to_numpy()
    assert q0[0] > 0 and np.allclose(q0[1:], 0)
    usage = scan.curve("rope_usage_spectrum", layer=1, head=1).sort_values("x")["y"].to_numpy()
    assert usage[-1] == pytest.approx(1.0) and usage.sum() == pytest.approx(1.0)
    assert scan.meta["summaries"]["rope_frequency"]["max_logit_error"] < 1e-4


def test_unplanted_heads_spread_usage(tiny_rope):
    scan = posprobe.scan(tiny_rope, probes=["rope_frequency"], budget=ONE_TEXT, progress=False)
    h = scan.heads
    assert ((h["rope_high_freq_share"] > 0.01) & (h["rope_high_freq_share"] < 0.9)).all()
    spectrum = scan.curves[scan.curves["curve"] == "rope_usage_spectrum"]
    sums = spectrum.groupby(["layer", "head"])["y"].sum()
    assert np.allclose(sums, 1.0)


def _numeric(df: pd.DataFrame) -> pd.DataFrame:
    return df.select_dtypes("number").reset_index(drop=True)


def test_interleaved_layout_gives_the_same_numbers(tiny_rope):
    probes = ["rope_frequency", "positional_heads"]
    configs = {"positional_heads": get_probe("positional_heads").Config(threshold=0.0)}
    half = posprobe.scan(tiny_rope, probes=probes, budget=TWO_TEXTS, configs=configs, progress=False)
    twin = interleaved_twin(tiny_rope)
    inter = posprobe.scan(twin, probes=probes, budget=TWO_TEXTS, configs=configs, progress=False)
    assert inter.info.layers[0].chunk_layout is ChunkLayout.INTERLEAVED
    assert np.isfinite(half.heads["dim_distance_corr"]).all()
    pd.testing.assert_frame_equal(_numeric(half.heads), _numeric(inter.heads), atol=1e-5, rtol=1e-4)
    assert (half.heads["is_positional_head"] == inter.heads["is_positional_head"]).all()
    key = ["curve", "series", "layer", "head", "x"]
    a, b = half.curves.sort_values(key).reset_index(drop=True), inter.curves.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key], b[key])
    assert np.allclose(a["y"], b["y"], atol=1e-5, rtol=1e-4)
    # a wrongly declared layout is caught: the twin read as half-split gives different usage
    wrong = dataclasses.replace(twin.info, layers=tuple(dataclasses.replace(lay, chunk_layout=ChunkLayout.HALF_SPLIT)
                                                        for lay in twin.info.layers))
    misread = posprobe.scan(PlantedAccess(wrong, tensors=twin.tensors, tokenizer=twin.tokenizer),
                            probes=["rope_frequency"], budget=TWO_TEXTS, progress=False)
    assert not np.allclose(misread.heads["rope_freq_centroid"], half.heads["rope_freq_centroid"], atol=1e-3)


def _partial_rotary_access(rotary_dim: int = 8, head_dim: int = 16, thetas=(1e4, 1e6)) -> PlantedAccess:
    """Two RoPE layers (different theta) with partial rotary; head 0 writes only the non-rotated dims, head 1 only
    chunk 0, head 2 only the slowest chunk, head 3 everything."""
    base = planted_info(n_layers=len(thetas), n_heads=4, n_kv_heads=2, head_dim=head_dim)
    layers = tuple(LayerInfo(i, "full_attention", Positional.ROPE, rope_theta=t, rotary_dim=rotary_dim,
                             chunk_layout=ChunkLayout.HALF_SPLIT) for i, t in enumerate(thetas))
    info = dataclasses.replace(base, layers=layers)
    c = rotary_dim // 2
    masks = torch.zeros(4, head_dim, dtype=torch.bool)
    masks[0, rotary_dim:] = True
    masks[1, [0, c]] = True
    masks[2, [c - 1, rotary_dim - 1]] = True
    masks[3] = True

    def tensors(layer: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        n = ids.shape[1]
        g = torch.Generator().manual_seed(layer)
        q_pre = torch.randn(ids.shape[0], 4, n, head_dim, generator=g) * masks[None, :, None, :]
        k_pre = torch.randn(ids.shape[0], 2, n, head_dim, generator=g) + 0.5
        pos = torch.arange(n)
        theta = thetas[layer]
        return {"q_pre": q_pre, "k_pre": k_pre, "q": rotate_half_split(q_pre, pos, theta, rotary_dim),
                "k": rotate_half_split(k_pre, pos, theta, rotary_dim)}

    return PlantedAccess(info, tensors=tensors)


def test_partial_rotary_reports_the_nonrotated_band_and_per_layer_theta():
    access = _partial_rotary_access()
    scan = posprobe.scan(access, probes=["rope_frequency", "positional_heads"], budget=ONE_TEXT, progress=False)
    h = scan.heads.set_index(["layer", "head"])
    for layer in (0, 1):
        assert h.loc[(layer, 0), "rope_nonrotary_share"] == pytest.approx(1.0, abs=1e-6)
        assert np.isnan(h.loc[(layer, 0), "rope_freq_centroid"])  # no rotary usage at all
        assert h.loc[(layer, 1), "rope_high_freq_share"] == pytest.approx(1.0, abs=1e-6)
        assert h.loc[(layer, 2), "rope_low_freq_share"] == pytest.approx(1.0, abs=1e-6)
        assert 0 < h.loc[(layer, 3), "rope_nonrotary_share"] < 1
    assert scan.meta["summaries"]["rope_frequency"]["max_logit_error"] < 1e-4
    chunks = scan.tables["rope_frequency.chunks"]
    assert set(chunks["band"]) == {"rotary", "nonrotary"}
    for layer, theta in ((0, 1e4), (1, 1e6)):
        rows = chunks[(chunks["layer"] == layer) & (chunks["band"] == "rotary")].sort_values("chunk")
        assert np.allclose(rows["frequency"], theta ** (-2 * np.arange(4) / 8))
        assert (rows["rope_theta"] == theta).all()
        nonrot = chunks[(chunks["layer"] == layer) & (chunks["band"] == "nonrotary")]
        assert len(nonrot) == 1 and int(nonrot["chunk"].iloc[0]) == 4 and float(nonrot["frequency"].iloc[0]) == 0.0
    spectrum = scan.curve("rope_usage_spectrum", layer=0, head=0)
    assert set(spectrum["series"]) == {"", "nonrotary"}
    assert float(spectrum[spectrum["series"] == "nonrotary"]["y"].iloc[0]) == pytest.approx(1.0)
    long = scan.curve("long_contrib_by_chunk", layer=0, head=3)
    assert set(long["series"]) == {"", "nonrotary"} and len(long) == 5


def test_kv_heads_and_pre_vs_post_rotary_norms(tiny_rope):
    """Keys are reported per KV head (GQA); norms from post-rotary q/k equal those from pre-rotary ones."""
    scan = posprobe.scan(tiny_rope, probes=["rope_frequency"], budget=ONE_TEXT, progress=False)
    k_norm = scan.curve("rope_k_norm")
    assert set(k_norm["series"]) == {f"kv{g}" for g in range(tiny_rope.info.n_kv_heads)}
    assert set(k_norm["head"]) == {-1}
    # direct computation on the same text
    ids = scan_text(tiny_rope)
    caps = {}
    tiny_rope.run(ids, taps=[Tap.K_PRE], on_layer=lambda c: caps.__setitem__(c.layer, (c.k_pre.clone(), c.info)))
    for layer, (k_pre, info) in caps.items():
        expected = chunk_norms(k_pre.double(), info).mean((0, 2))  # [G, C]
        for g in range(tiny_rope.info.n_kv_heads):
            got = k_norm[(k_norm["layer"] == layer) & (k_norm["series"] == f"kv{g}")].sort_values("x")["y"]
            assert np.allclose(got, expected[g].numpy(), rtol=1e-6)
    # an access that only hands out post-rotary q/k (the norms fall back to them) gives the same norms
    post_only = PlantedAccess(tiny_rope.info, tensors=lambda layer, ids: {
        k: v for k, v in model_tensors(tiny_rope)(layer, ids).items() if k in ("q", "k")},
        tokenizer=tiny_rope.tokenizer)
    other = posprobe.scan(post_only, probes=["rope_frequency"], budget=ONE_TEXT, progress=False)
    for curve in ("rope_q_norm", "rope_k_norm", "rope_usage_spectrum"):
        assert np.allclose(scan.curve(curve)["y"], other.curve(curve)["y"], rtol=1e-5, atol=1e-6)


def scan_text(access) -> torch.Tensor:
    from posprobe.scan import shared_texts

    return shared_texts(access, ONE_TEXT, seed=0)[0].input_ids


def model_tensors(access):
    """(layer, ids) -> the model's own q, k, q_pre, k_pre (half-split, unpermuted)."""
    cache = {}

    def tensors(layer, ids):
        key = tuple(ids.flatten().tolist())
        if key not in cache:
            grabbed = {}
            access.run(ids, taps=[Tap.Q, Tap.K, Tap.Q_PRE, Tap.K_PRE], on_layer=lambda c: grabbed.__setitem__(
                c.layer, {n: getattr(c, n).clone() for n in ("q", "k", "q_pre", "k_pre")}))
            cache.clear()
            cache[key] = grabbed
        return cache[key][layer]

    return tensors


def test_models_without_rope_are_skipped_with_a_reason(tiny_nope, tiny_absolute):
    for access in (tiny_nope, tiny_absolute):
        scan = posprobe.scan(access, probes=["rope_frequency", "positional_heads", "head_basics"], budget=ONE_TEXT,
                             progress=False)
        for name in ("rope_frequency", "positional_heads"):
            assert "no RoPE" in scan.meta["skipped"][name]
        assert "rope_high_freq_share" not in scan.heads and "previous_token_score" in scan.heads


def test_nope_layers_inside_a_rope_model_are_skipped_with_a_reason():
    """SmolLM3-style model: layer 1 has no RoPE. It is reported as skipped, the RoPE layer is measured."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    from posprobe.adapters.hf import HFAccess
    from posprobe.models import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = SmolLM3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, no_rope_layers=[1, 0],
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = SmolLM3ForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    access = HFAccess(model, tok, name="tiny-smollm3-mixed")
    assert [lay.has_rope for lay in access.info.layers] == [True, False]
    scan = posprobe.scan(access, probes=["rope_frequency", "positional_heads"], budget=ONE_TEXT, progress=False)
    h = scan.heads.set_index(["layer", "head"])
    assert np.isfinite(h.loc[0, "rope_high_freq_share"]).all() and np.isnan(h.loc[1, "rope_high_freq_share"]).all()
    assert np.isnan(h.loc[1, "positional_head_score"]).all() and not h.loc[1, "is_positional_head"].any()
    layers = scan.tables["rope_frequency.layers"].set_index("layer")
    assert bool(layers.loc[0, "measured"]) and not bool(layers.loc[1, "measured"])
    assert "no RoPE" in layers.loc[1, "reason"]
    assert "1" in scan.meta["summaries"]["rope_frequency"]["skipped_layers"]
    assert set(scan.curves["layer"]) == {0}


def test_spectrum_figure_and_scan_round_trip(tiny_rope, tmp_path):
    scan = posprobe.scan(tiny_rope, probes=["rope_frequency", "positional_heads"], budget=ONE_TEXT, progress=False)
    loaded = posprobe.load(scan.save(tmp_path / "scan"))
    assert loaded.equals(scan)
    fig = loaded.figure("rope_spectrum", curve="rope_q_norm")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (tiny_rope.info.n_layers, tiny_rope.info.layers[0].n_chunks)
    assert np.allclose(np.nansum(z, axis=1), 1.0)  # normalised rows
    assert np.isfinite(np.asarray(fig.data[0].customdata, dtype=float)).all()  # frequencies in hover
    signed = loaded.figure("rope_spectrum", curve="long_contrib_by_chunk", head=0)
    assert signed.data[0].zmid == 0


@pytest.mark.real_model
def test_gemma_frequency_usage(gemma):
    """Gemma 3 270M: exact decomposition, usage in low frequencies, high-frequency heads are previous-token heads."""
    from scipy.stats import spearmanr

    budget = Budget("gemma-test", context_lengths=(384,), n_texts=1, max_queries=64, retrieval_trials=1,
                    bias_trials=1, implicit_sequences=1)
    scan = posprobe.scan(gemma, probes=["rope_frequency", "positional_heads", "head_basics"], budget=budget,
                         progress=False)
    summary = scan.meta["summaries"]["rope_frequency"]
    assert summary["max_logit_error"] < 1e-4
    assert summary["skipped_layers"] == {}
    h = scan.heads
    assert h["rope_low_freq_share"].mean() > 3 * h["rope_high_freq_share"].mean()
    k_norm = scan.curve("rope_k_norm")
    concentrated = 0
    for _, g in k_norm.groupby("layer"):
        m = g.sort_values("x")["y"].to_numpy()
        concentrated += m[-16:].sum() > m[:16].sum()  # slowest 1/8 of 128 chunks vs fastest 1/8
    assert concentrated >= 16
    rho = spearmanr(h["rope_high_freq_share"], h["previous_token_score"]).statistic
    assert rho > 0.5
    top = scan.rank("rope_high_freq_share", top=1).iloc[0]
    assert top["previous_token_score"] > 0.3
    chunks = scan.tables["rope_frequency.chunks"]
    assert set(chunks[chunks["layer"] == 5]["rope_theta"]) == {1e6}
    assert set(chunks[chunks["layer"] == 4]["rope_theta"]) == {1e4}


@pytest.mark.parametrize("bad", [{"band_fraction": 0.0}, {"band_fraction": 0.6}, {"max_queries": 0}, {"block_size": 0}])
def test_invalid_config_is_an_error(tiny_rope, bad):
    from posprobe.errors import ProbeError

    with pytest.raises(ProbeError, match="rope_frequency"):
        posprobe.scan(tiny_rope, probes=["rope_frequency"], budget=ONE_TEXT,
                      configs={"rope_frequency": get_probe("rope_frequency").Config(**bad)}, progress=False)


def test_query_subsample_is_close_to_all_queries(tiny_rope):
    Config = get_probe("rope_frequency").Config
    few = posprobe.scan(tiny_rope, probes=["rope_frequency"], budget=ONE_TEXT, progress=False,
                        configs={"rope_frequency": Config(max_queries=12)})
    every = posprobe.scan(tiny_rope, probes=["rope_frequency"], budget=ONE_TEXT, progress=False,
                          configs={"rope_frequency": Config(max_queries=None)})
    assert not np.allclose(few.heads["rope_freq_centroid"], every.heads["rope_freq_centroid"], atol=1e-9)
    assert np.allclose(few.heads["rope_freq_centroid"], every.heads["rope_freq_centroid"], atol=0.05)
