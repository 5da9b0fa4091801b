"""The optimised shared streaming pass equals a naive reference (issue 20 item 1).

The fast path reads grouped-query KV heads without expanding them (`grouped_matmul`), splits each layer's keys into
rotary bands once (memoised on the capture) and reads the RoPE probes' probabilities from the capture's shared
pattern chunks. The references here are the plain formulas: `expand_kv` + full `chunk_contributions` over every key,
and the model's own eager attention with `output_attentions` for the probabilities. Models: a Gemma 3 layout (4 query
heads / 1 KV head, sliding + global layers, window 8 shorter than the text), a GQA Llama, and a partial-rotary
GPT-NeoX (the non-rotated band), and GPT-J (interleaved chunks, partial rotary).
"""

from __future__ import annotations

import pytest
import torch

from posprobe.access import Tap, attention_scores, expand_kv, grouped_matmul
from posprobe.probes.rope_chunks import (
    chunk_contributions,
    layer_chunk_usage,
    layer_long_range,
)
from tests.probes.test_rope_chunks import (
    _eager_attentions,  # the model's eager attention, output_attentions
)

TEXT = "The lighthouse keeper wrote down every passing ship in a worn blue ledger. " * 2


def _tok():
    from posprobe.models import tiny_model

    return tiny_model("rope")[1]


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = _tok()
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                              query_pre_attn_scalar=16)
    return Gemma3ForCausalLM(config).eval(), tok


def _llama_gqa():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tok()
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval(), tok


def _neox_partial():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = _tok()
    torch.manual_seed(2)
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=512)
    return GPTNeoXForCausalLM(config).eval(), tok


def _gptj_interleaved():
    from transformers import GPTJConfig, GPTJForCausalLM

    tok = _tok()
    torch.manual_seed(3)
    config = GPTJConfig(vocab_size=len(tok), n_embd=64, n_inner=128, n_layer=2, n_head=4, rotary_dim=8,
                        n_positions=512)
    return GPTJForCausalLM(config).eval(), tok


@pytest.fixture(scope="module", params=["gemma3", "llama_gqa", "neox_partial", "gptj_interleaved"])
def access(request):
    from posprobe.adapters.hf import HFAccess

    model, tok = {"gemma3": _gemma3, "llama_gqa": _llama_gqa, "neox_partial": _neox_partial,
                  "gptj_interleaved": _gptj_interleaved}[request.param]()
    model.config._attn_implementation = "sdpa"
    return HFAccess(model, tok, name=f"tiny-{request.param}")


def test_grouped_matmul_equals_expanded_kv():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 5, 8), torch.randn(2, 3, 7, 8)
    ref = torch.matmul(q, expand_kv(k, 6).transpose(-1, -2))
    assert torch.allclose(grouped_matmul(q, k.transpose(-1, -2)), ref, atol=1e-6)
    assert torch.allclose(attention_scores(q, k, 0.5, softcap=3.0), attention_scores(q, expand_kv(k, 6), 0.5, 3.0),
                          atol=1e-6)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        grouped_matmul(torch.randn(1, 5, 2, 4), torch.randn(1, 2, 4, 3))


def test_fast_path_equals_naive_reference(access):
    ids = access.encode(TEXT)
    n = len(ids)
    eager = _eager_attentions(access, ids)
    queries = torch.linspace(1, n - 1, 40).round().long().unique()
    distance = 12
    windows = {layer.sliding_window for layer in access.info.layers}
    seen: dict[int, dict] = {}

    def on_layer(cap):
        if not cap.info.has_rope:
            return
        # the fast path, with chunks that split the queries unevenly (pattern chunks of 24, blocks of 5)
        usage = layer_chunk_usage(cap, queries, block_size=5, pattern_chunk=24)
        long = layer_long_range(cap, queries, distance, pattern_chunk=24)
        seen[cap.layer] = {"usage": usage, "long": long, "pattern": cap.pattern(queries).clone(),
                           "q": cap.q.clone(), "k": cap.k.clone(), "info": cap.info}

    access.run(ids, taps=[Tap.Q, Tap.K, Tap.PATTERN], on_layer=on_layer)
    assert seen, "no RoPE layer reached the callback"
    for layer, got in seen.items():
        probs = eager[layer][:, :, queries].float()  # the model's own eager attention: [1, H, cq, n]
        assert torch.allclose(got["pattern"], probs, atol=2e-6), f"layer {layer}: pattern != eager attention"
        k = expand_kv(got["k"], access.info.n_heads).float()  # the naive reference: expanded KV heads, every key
        c = chunk_contributions(got["q"][:, :, queries].float(), k, got["info"])  # [1, H, bands, cq, n]
        ref_usage = torch.einsum("bhcqk,bhqk->hc", c.abs(), probs).double()
        assert torch.allclose(got["usage"].usage, ref_usage, rtol=1e-5, atol=1e-6), f"layer {layer}: chunk usage"
        assert got["usage"].max_logit_error < 1e-4
        far = (queries[:, None] - torch.arange(n)[None, :]) >= distance
        w = probs * far
        assert torch.allclose(got["long"].signed, torch.einsum("bhcqk,bhqk->hc", c, w).double(), rtol=1e-5,
                              atol=1e-6), f"layer {layer}: long-range signed contributions"
        assert torch.allclose(got["long"].mass, w.sum((0, 2, 3)).double(), atol=1e-6)
    if access.info.name == "tiny-gemma3":  # the window is shorter than the text: masked keys really were exercised
        assert windows == {8, None} and n > 16


# ---------------------------------------------------------------------------------------------------------------
# finish(): tables built from arrays equal the per-row loops they replaced (kept here as the naive references)


def _naive_head_basics(r):
    import numpy as np
    import pandas as pd
    from scipy.stats import spearmanr

    from posprobe.probes.head_basics import bin_edges

    info = r.ctx.info
    corr = np.full((info.n_layers, info.n_heads), np.nan)
    for layer, chunks in r.pairs.items():
        if not chunks:
            continue
        a = np.concatenate([c[0] for c in chunks], axis=1)
        d = np.concatenate([c[1] for c in chunks])
        for h in range(info.n_heads):
            if np.ptp(a[h]) > 0 and np.ptp(d) > 0:
                corr[layer, h] = spearmanr(a[h], d).statistic
    mean = r.dist_sum / r.dist_n.clamp(min=1)[:, None, :]
    rows = []
    x = [float(lo) for lo, _ in bin_edges(r.config.n_distance_bins)]
    for layer in range(info.n_layers):
        for b in range(r.config.n_distance_bins):
            if r.dist_n[layer, b] == 0:
                continue
            for h in range(info.n_heads):
                rows.append({"curve": "attention_vs_distance", "layer": layer, "head": h, "x": x[b],
                             "y": float(mean[layer, h, b])})
    return corr, pd.DataFrame(rows, columns=["curve", "layer", "head", "x", "y"])


def _naive_entropy_curves(r):
    import numpy as np
    import pandas as pd

    info = r.ctx.info
    rows = []
    for length, (s, n) in r.by_pos.items():
        mean = s / n.clamp(min=1)[:, None, :]
        for layer in range(info.n_layers):
            for b in np.flatnonzero(n[layer].numpy()):
                for head in range(info.n_heads):
                    rows.append({"curve": "entropy_by_position", "series": f"len={length}", "layer": layer,
                                 "head": head, "x": float(2**b), "y": float(mean[layer, head, b])})
    for length, (s, n) in r.by_len.items():
        mean = s / n.clamp(min=1)[:, None]
        for layer in range(info.n_layers):
            for head in range(info.n_heads):
                rows.append({"curve": "entropy_by_length", "series": "", "layer": layer, "head": head,
                             "x": float(length), "y": float(mean[layer, head])})
    return pd.DataFrame(rows, columns=["curve", "series", "layer", "head", "x", "y"])


def _naive_rope_frequency_curves(r):
    import numpy as np
    import pandas as pd

    from posprobe.probes.base import MODEL_LEVEL
    from posprobe.probes.rope_chunks import NONROTARY, band_labels

    info = r.ctx.info
    rows = []
    for lay in info.layers:
        layer = lay.index
        if not lay.has_rope or layer not in r.usage:
            continue
        usage = r.usage[layer].numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            share = usage / usage.sum(-1, keepdims=True)
        q_norm = (r.q_norm[layer] / r.norm_rows[layer]).numpy()
        k_norm = (r.k_norm[layer] / r.norm_rows[layer]).numpy()
        for band, label in enumerate(band_labels(lay, info.head_dim)):
            series = NONROTARY if label == NONROTARY else ""
            for head in range(info.n_heads):
                rows.append({"curve": "rope_usage_spectrum", "series": series, "layer": layer, "head": head,
                             "x": band, "y": share[head, band]})
                rows.append({"curve": "rope_q_norm", "series": series, "layer": layer, "head": head, "x": band,
                             "y": q_norm[head, band]})
            rows.append({"curve": "rope_layer_spectrum", "series": series, "layer": layer, "head": MODEL_LEVEL,
                         "x": band, "y": float(np.nanmean(share[:, band]))})
            for kv in range(k_norm.shape[0]):
                rows.append({"curve": "rope_k_norm", "series": f"kv{kv}" + (f" {NONROTARY}" if series else ""),
                             "layer": layer, "head": MODEL_LEVEL, "x": band, "y": k_norm[kv, band]})
    return pd.DataFrame(rows, columns=["curve", "series", "layer", "head", "x", "y"])


def _naive_frequency_table(info):
    import numpy as np
    import pandas as pd

    from posprobe.probes.rope_chunks import NONROTARY, effective_frequencies, has_nonrotary_band

    rows = []
    for lay in info.layers:
        if not lay.has_rope:
            continue
        base = lay.chunk_frequencies()
        scaled, rope_type = effective_frequencies(lay, info.max_positions)
        for k in range(lay.n_chunks):
            rows.append({"layer": lay.index, "chunk": k, "band": "rotary", "frequency": float(base[k]),
                         "effective_frequency": float(scaled[k]), "wavelength": float(2 * np.pi / base[k]),
                         "rope_theta": float(lay.rope_theta), "rotary_dim": int(lay.rotary_dim),
                         "rope_type": rope_type, "chunk_layout": lay.chunk_layout.value})
        if has_nonrotary_band(lay, info.head_dim):
            rows.append({"layer": lay.index, "chunk": lay.n_chunks, "band": NONROTARY, "frequency": 0.0,
                         "effective_frequency": 0.0, "wavelength": float("inf"), "rope_theta": float(lay.rope_theta),
                         "rotary_dim": int(lay.rotary_dim), "rope_type": rope_type,
                         "chunk_layout": lay.chunk_layout.value})
    columns = ["layer", "chunk", "band", "frequency", "effective_frequency", "wavelength", "rope_theta", "rotary_dim",
               "rope_type", "chunk_layout"]
    return pd.DataFrame(rows, columns=columns)


def _naive_positional_heads(r):
    import numpy as np
    import pandas as pd

    from posprobe.probes.positional_heads import spearman_by_chunk
    from posprobe.probes.rope_chunks import NONROTARY, band_labels

    info = r.ctx.info
    corr = np.full((info.n_layers, info.n_heads), np.nan)
    rows = []
    for layer, signed in r.long_signed.items():
        lay = info.layers[layer]
        weight = r.long_weight[layer].numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            contrib = signed.numpy() / weight[:, None]
        contrib[weight <= 0] = np.nan
        for head in range(info.n_heads):
            corr[layer, head] = spearman_by_chunk(contrib[head, : lay.n_chunks])
        for band, label in enumerate(band_labels(lay, info.head_dim)):
            for head in range(info.n_heads):
                if np.isfinite(contrib[head, band]):
                    rows.append({"curve": "long_contrib_by_chunk", "series": NONROTARY if label == NONROTARY
                                 else "", "layer": layer, "head": head, "x": band, "y": contrib[head, band]})
    return corr, pd.DataFrame(rows, columns=["curve", "series", "layer", "head", "x", "y"])


def _streamed_reducers(access, lengths=(20, 33), n_texts=2):
    """The four streaming reducers after shared passes over seeded texts of two lengths (what scan() runs)."""
    from posprobe.probes import get_probe
    from posprobe.probes.base import Budget, ScanContext
    from posprobe.scan import Dispatch, shared_texts

    budget = Budget("t", context_lengths=lengths, n_texts=n_texts, max_queries=12)
    ctx = ScanContext(access=access, budget=budget, seed=3, texts=())
    ctx.texts = shared_texts(access, budget, 3)
    names = ["head_basics", "attention_entropy", "rope_frequency", "positional_heads"]
    reducers = {name: get_probe(name).reducer(ctx, get_probe(name).Config()) for name in names}
    taps = frozenset().union(*(r.taps for r in reducers.values()))
    dispatch = Dispatch(list(reducers.values()))
    for sample in ctx.texts:
        for r in reducers.values():
            r.begin(sample)
        access.run(sample.input_ids, taps=taps, on_layer=dispatch)
    return reducers


def test_finish_tables_equal_per_row_references(access):
    import numpy as np
    import pandas as pd

    from posprobe.probes.base import curve_frame
    from posprobe.probes.rope_frequency import frequency_table

    reducers = _streamed_reducers(access)
    hb = reducers["head_basics"]
    result = hb.finish()
    corr, rows = _naive_head_basics(hb)
    assert np.isfinite(corr).any(), "no Spearman correlation was defined: the comparison would be vacuous"
    np.testing.assert_allclose(result.heads["distance_corr"].to_numpy(), corr.reshape(-1), rtol=1e-12, atol=1e-14)
    pd.testing.assert_frame_equal(result.curves, curve_frame(rows, "head_basics"))

    ent = reducers["attention_entropy"]
    pd.testing.assert_frame_equal(ent.finish().curves, curve_frame(_naive_entropy_curves(ent), "attention_entropy"))

    rf = reducers["rope_frequency"]
    got = rf.finish()
    pd.testing.assert_frame_equal(got.curves, curve_frame(_naive_rope_frequency_curves(rf), "rope_frequency"))
    pd.testing.assert_frame_equal(frequency_table(access.info), _naive_frequency_table(access.info))
    pd.testing.assert_frame_equal(got.tables["chunks"], _naive_frequency_table(access.info))

    ph = reducers["positional_heads"]
    got = ph.finish()
    corr, rows = _naive_positional_heads(ph)
    np.testing.assert_allclose(got.heads["dim_distance_corr"].to_numpy(), corr.reshape(-1), rtol=1e-12,
                               atol=1e-14)
    pd.testing.assert_frame_equal(got.curves, curve_frame(rows, "positional_heads"))
    assert len(got.curves) and len(result.curves), "empty curves: the comparison would be vacuous"


def test_spearman_rows_equal_scipy():
    import numpy as np
    from scipy.stats import rankdata, spearmanr

    from posprobe.probes.positional_heads import spearman_by_chunk, spearman_by_chunk_rows
    from posprobe.probes.rank_correlation import average_ranks, spearman_rows

    rng = np.random.default_rng(0)
    a = np.round(rng.random((6, 500)), 2)  # many ties
    a[3] = 0.5  # a constant row: NaN, as the per-head loop gave
    d = np.log1p(rng.integers(0, 60, 500).astype(float))
    assert np.array_equal(average_ranks(a), rankdata(a, axis=-1))
    ref = [spearmanr(a[h], d).statistic if np.ptp(a[h]) > 0 else np.nan for h in range(6)]
    np.testing.assert_allclose(spearman_rows(a, d), ref, rtol=1e-12, atol=1e-14)
    b = rng.random((6, 500))
    np.testing.assert_allclose(spearman_rows(a, b), [spearmanr(a[h], b[h]).statistic if h != 3 else np.nan
                                                     for h in range(6)], rtol=1e-12, atol=1e-14)
    values = rng.random((5, 9))
    values[1, 2] = np.nan  # a row with a missing band takes the one-by-one path
    values[4] = 1.0
    np.testing.assert_allclose(spearman_by_chunk_rows(values), [spearman_by_chunk(v) for v in values], rtol=1e-12)


def test_pattern_of_a_query_subset_is_read_from_the_memoised_chunk(access):
    ids = access.encode(TEXT)
    n = len(ids)
    superset = torch.linspace(1, n - 1, 30).round().long().unique()
    subset = superset[torch.linspace(0, len(superset) - 1, 9).round().long().unique()]
    outside = torch.tensor([0, n - 1])  # query 0 is not in the superset: computed, not gathered
    checked = []

    def on_layer(cap):
        calls = []
        source = cap.pattern_source  # the adapter's full-row source (the model's own attention call)
        assert source is not None
        cap.pattern_source = lambda index: calls.append(len(index)) or source(index)
        full = cap.pattern(superset)
        part = cap.pattern(subset)
        assert calls == [len(superset)], "the subset was recomputed instead of gathered"
        torch.testing.assert_close(part, source(subset), rtol=0, atol=1e-7)  # a fresh computation of those rows
        torch.testing.assert_close(part, full[:, :, torch.searchsorted(superset, subset)], rtol=0, atol=0)
        cap.pattern(outside)
        assert calls == [len(superset), 2]
        checked.append(cap.layer)

    access.run(ids, taps=[Tap.PATTERN], on_layer=on_layer)
    assert checked == list(range(access.info.n_layers))


def test_window_split_bands_equal_full_rows(access, monkeypatch):
    """Sliding-window layers read their chunks as bands over the visible keys, in chunks split at the window
    (`LayerCapture.query_chunks`, `pattern_band_chunks`). Every streaming reducer's sums equal those of the plain
    path: chunks of `chunk_size` queries and full [b, H, cq, n] rows from key 0."""
    from posprobe.access import LayerCapture

    fast = _streamed_reducers(access)
    split = []
    original = LayerCapture.query_chunks

    def counted(self, chunk_size=None, queries=None):
        chunks = original(self, chunk_size, queries)
        split.append(self.info.sliding_window is not None and len(chunks) > 1)
        return chunks

    monkeypatch.setattr(LayerCapture, "query_chunks", counted)
    _streamed_reducers(access)  # the fast path again, counting the window splits
    monkeypatch.setattr(LayerCapture, "query_chunks", lambda self, chunk_size=None, queries=None: list(
        (torch.arange(self.n_tokens) if queries is None else queries).to(self.device).split(
            chunk_size or self.query_chunk())))
    monkeypatch.setattr(LayerCapture, "pattern_band", lambda self, query_index: (self.pattern(query_index), 0))
    plain = _streamed_reducers(access)
    if access.info.name == "tiny-gemma3":  # window 8 < the texts: the split and the bands really were exercised
        assert any(split)

    def close(a, b, what):
        assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=1e-6), what  # float32 sums

    hb_f, hb_p = fast["head_basics"], plain["head_basics"]
    for name in ("sink", "prev", "learned_sink", "count", "dist_sum", "dist_n"):
        close(getattr(hb_f, name), getattr(hb_p, name), f"head_basics.{name}")
    for layer in hb_f.pairs:
        for (va, da), (vb, db) in zip(hb_f.pairs[layer], hb_p.pairs[layer], strict=True):
            # values are rounded to 5 decimals (ties stay ties): float noise may flip a last digit, no more
            diff = abs(va - vb)
            assert diff.max() <= 1.01e-5 and (diff > 0).mean() < 0.01, f"head_basics pairs, layer {layer}"
            close(da, db, f"head_basics pair distances, layer {layer}")
    en_f, en_p = fast["attention_entropy"], plain["attention_entropy"]
    for name in en_f.sums:
        close(en_f.sums[name], en_p.sums[name], f"attention_entropy.{name}")
    for length in en_f.by_pos:
        close(en_f.by_pos[length][0], en_p.by_pos[length][0], "entropy_by_position")
    rf_f, rf_p = fast["rope_frequency"], plain["rope_frequency"]
    for layer in rf_f.usage:
        close(rf_f.usage[layer], rf_p.usage[layer], f"rope_frequency usage, layer {layer}")
    ph_f, ph_p = fast["positional_heads"], plain["positional_heads"]
    for layer in ph_f.long_signed:
        close(ph_f.long_signed[layer], ph_p.long_signed[layer], f"positional_heads signed, layer {layer}")
        close(ph_f.long_weight[layer], ph_p.long_weight[layer], f"positional_heads mass, layer {layer}")
