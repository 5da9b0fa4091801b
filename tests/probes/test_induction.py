"""induction probe and template detector: planted patterns, a hand-wired induction circuit, TransformerLens parity.

Ground truth three ways: PlantedAccess heads whose patterns are built from the tokens (exact answers, GQA info);
a real tiny SmolLM3 whose layer 0 / head 0 is wired as a previous-token head and layer 1 / head 2 as an induction head
(the two-layer circuit of Olsson et al.); and TransformerLens' own `detect_head` / similarity score on identical
weights and identical tokens.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import posprobe
from posprobe.errors import InputError, ProbeError
from posprobe.probes.base import Budget
from posprobe.probes.induction import InductionConfig, ordinary_token_ids, repeated_random_tokens
from posprobe.probes.template import TEMPLATES, template_rows, template_scores
from posprobe.testing import PlantedAccess, planted_info, previous_token, sink, uniform

TINY = Budget("test", context_lengths=(64, 96), n_texts=2, max_queries=48, retrieval_trials=1, bias_trials=1,
              implicit_sequences=4)
QUICK_CFG = InductionConfig(block_length=16, distances=(4, 16, 40), sink_n_texts=4)


def _from_template(name: str):
    """A head that spreads its attention evenly over the keys a template marks (key 0 where it marks none)."""
    fn = TEMPLATES[name]

    def build(ids: torch.Tensor) -> torch.Tensor:
        rows = template_rows(fn, torch.arange(ids.shape[-1]), ids)
        rows[rows.sum(-1) == 0, 0] = 1.0
        return rows / rows.sum(-1, keepdim=True)

    return build


def _random_causal(ids: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(ids.sum()) % 10_007)
    n = ids.shape[-1]
    logits = torch.randn(n, n, generator=g) * 2
    return torch.softmax(logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")), -1)


HEAD_KINDS = {
    "induction": _from_template("induction_head"),
    "duplicate": _from_template("duplicate_token_head"),
    "previous": lambda ids: previous_token(ids.shape[-1]),
    "sink": lambda ids: sink(ids.shape[-1]),
    "uniform": lambda ids: uniform(ids.shape[-1]),
    "random": _random_causal,
}


def token_patterns(kinds: list[str]):
    """A PatternFn: head h of every layer follows HEAD_KINDS[kinds[h]] on each sequence of the batch."""

    def fn(layer: int, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.stack([HEAD_KINDS[k](row) for k in kinds]) for row in input_ids])

    return fn


KINDS = ["induction", "duplicate", "previous", "sink", "uniform", "random"]


@pytest.fixture(scope="module")
def planted_scan():
    info = planted_info(n_layers=2, n_heads=6, n_kv_heads=2)  # GQA: three query heads per KV head
    access = PlantedAccess(info, token_patterns(KINDS))
    return posprobe.scan(access, probes=["induction"], budget=TINY, configs={"induction": QUICK_CFG},
                         progress=False)


def _value(scan, metric, head, layer=0):
    heads = scan.heads
    return float(heads.loc[(heads.layer == layer) & (heads["head"] == head), metric].iloc[0])


def test_planted_heads_get_their_known_scores(planted_scan):
    h = {k: i for i, k in enumerate(KINDS)}
    for layer in (0, 1):
        assert _value(planted_scan, "induction_score", h["induction"], layer) == pytest.approx(1.0)
        assert _value(planted_scan, "duplicate_token_score", h["duplicate"], layer) == pytest.approx(1.0)
        for kind in ("duplicate", "previous", "sink"):
            assert _value(planted_scan, "induction_score", h[kind], layer) == 0.0
        for kind in ("induction", "previous", "sink"):
            assert _value(planted_scan, "duplicate_token_score", h[kind], layer) == 0.0
        # a uniform head gives 1 / (i + 1) to every key: small, not zero
        assert 0 < _value(planted_scan, "induction_score", h["uniform"], layer) < 0.05
    assert list(planted_scan.heads.kv_head[:6]) == [0, 0, 0, 1, 1, 1]


def test_natural_text_columns(planted_scan):
    summary = planted_scan.meta["summaries"]["induction"]
    assert summary["text_queries_with_repeat"]["induction"] > 20  # generated text repeats tokens (spaces, "the")
    assert _value(planted_scan, "induction_score_text", 0) == pytest.approx(1.0)
    assert _value(planted_scan, "duplicate_token_score_text", 1) == pytest.approx(1.0)
    assert _value(planted_scan, "induction_score_text", 3) == 0.0  # a sink head never attends past key 0


def test_distance_curve_covers_every_length(planted_scan):
    curve = planted_scan.curve("induction_by_distance", layer=0, head=0)
    assert sorted(curve.x) == [4.0, 16.0, 40.0]
    assert np.allclose(curve.y, 1.0)
    uniform_curve = planted_scan.curve("induction_by_distance", layer=0, head=KINDS.index("uniform"))
    assert uniform_curve.sort_values("x").y.is_monotonic_decreasing  # 1 / (i + 1) falls as the copies move apart


def test_scores_equal_the_metrics_formula_on_a_random_head():
    """induction_score = mean over second-copy queries of a[i, i - L + 1]; duplicate: a[i, i - L] (METRICS.md 9)."""
    info = planted_info(n_layers=1, n_heads=1)
    access = PlantedAccess(info, token_patterns(["random"]))
    cfg = InductionConfig(block_length=12, distances=(12,), n_sequences=3, max_queries=100, natural_text=False,
                          sink_n_texts=1)
    scan = posprobe.scan(access, probes=["induction"], budget=TINY, configs={"induction": cfg}, progress=False)
    ids = repeated_random_tokens(access, 12, 3, seed=0)
    L, p = 12, 1  # BOS prefix
    ind, dup = [], []
    for row in ids:
        a = _random_causal(row)
        for i in range(p + L, p + 2 * L):
            ind.append(float(a[i, i - L + 1]))
            dup.append(float(a[i, i - L]))
    assert _value(scan, "induction_score", 0) == pytest.approx(np.mean(ind), rel=1e-6)
    assert _value(scan, "duplicate_token_score", 0) == pytest.approx(np.mean(dup), rel=1e-6)


def test_repeated_blocks_are_seeded_distinct_ordinary_tokens():
    access = PlantedAccess(planted_info())
    a = repeated_random_tokens(access, 30, 2, seed=5)
    assert torch.equal(a, repeated_random_tokens(access, 30, 2, seed=5))
    assert not torch.equal(a, repeated_random_tokens(access, 30, 2, seed=6))
    assert a.shape == (2, 61) and bool((a[:, 0] == 1).all())  # BOS first
    assert torch.equal(a[:, 1:31], a[:, 31:])
    pool = set(ordinary_token_ids(access).tolist())
    for row in a:
        block = row[1:31].tolist()
        assert len(set(block)) == 30 and set(block) <= pool and 1 not in block and 2 not in block


def test_gu_sink_metric_by_key():
    info = planted_info(n_layers=2, n_heads=4)
    access = PlantedAccess(info, token_patterns(["sink", "uniform", "previous", "sink"]))
    cfg = InductionConfig(block_length=8, distances=(8,), natural_text=False, sink_n_texts=2)
    scan = posprobe.scan(access, probes=["induction"], budget=TINY, configs={"induction": cfg}, progress=False)
    assert _value(scan, "gu_sink_attention", 0) == pytest.approx(1.0)
    n = 64  # a uniform head's mean attention to key 0 over queries t = 0..63 is mean 1 / (t + 1)
    assert _value(scan, "gu_sink_attention", 1) == pytest.approx(np.mean(1 / np.arange(1, n + 1)))
    summary = scan.meta["summaries"]["induction"]
    assert summary["gu_sink_rate"] == pytest.approx(0.5) and summary["sink_length"] == 64
    share = scan.curve("sink_share_by_key").sort_values("x")
    assert len(share) == n and share.y.iloc[0] == pytest.approx(0.5)
    # previous-token head: key k is attended by query k + 1 only -> mean 1 / (64 - k) > 0.3 for the last keys
    expected = [(0.5 if k == 0 else 0.0) + (0.25 if 1 / (n - k) > 0.3 and k < n - 1 else 0.0)
                + (0.25 if k >= 1 and sum(1 / (t + 1) for t in range(k, n)) / (n - k) > 0.3 else 0.0)
                for k in range(n)]
    assert np.allclose(share.y, expected)


def test_patterns_are_read_in_chunks_only():
    info = planted_info(n_layers=1, n_heads=2)
    seen: list[tuple[int, int]] = []
    base = token_patterns(["induction", "uniform"])

    class Recording(PlantedAccess):
        def _forward(self, input_ids, position_ids, taps, on_layer, logit_positions, edits):
            def spy(cap):
                source = cap.pattern_source
                cap.pattern_source = lambda idx: (seen.append((len(idx), input_ids.shape[1])), source(idx))[1]
                on_layer(cap)
            return super()._forward(input_ids, position_ids, taps, spy, logit_positions, edits)

    cfg = InductionConfig(block_length=100, distances=(100,), chunk_size=32, max_queries=100, natural_text=False,
                          sink_n_texts=1)
    scan = posprobe.scan(Recording(info, base), probes=["induction"], budget=TINY, configs={"induction": cfg},
                         progress=False)
    assert _value(scan, "induction_score", 0) == pytest.approx(1.0)
    assert max(q for q, _ in seen) <= 32
    assert sum(q for q, n in seen if n == 201) == 100  # only the 100 second-copy queries of the 201-token input


def test_bad_configs_fail_before_any_pass():
    access = PlantedAccess(planted_info(vocab_size=40, max_positions=8192))
    for cfg, match in ((InductionConfig(block_length=64), "distinct ordinary"),
                       (InductionConfig(block_length=1), "block_length must be >= 2"),
                       (InductionConfig(sink_epsilon=1.5), "sink_epsilon")):
        with pytest.raises(ProbeError, match=match):
            posprobe.scan(access, probes=["induction"], budget=TINY, configs={"induction": cfg}, progress=False)
    assert access.calls == 0


def test_distances_default_to_the_budget_and_the_model_limit():
    access = PlantedAccess(planted_info(max_positions=120), token_patterns(["uniform"] * 4))
    cfg = InductionConfig(block_length=16, sink_n_texts=1, natural_text=False)
    scan = posprobe.scan(access, probes=["induction"], budget=TINY, configs={"induction": cfg}, progress=False)
    summary = scan.meta["summaries"]["induction"]
    assert summary["distances"] == [8, 16, 32]  # budget: 96 // 2 = 48; 2 * 64 + 1 > 120 positions would not fit


def test_template_refuses_future_keys_before_the_pass():
    access = PlantedAccess(planted_info(), token_patterns(["uniform"] * 4))
    with pytest.raises(InputError, match="lower-triangular"):
        template_scores(access, "hello world", lambda i, j, tok: j == i + 1)
    assert access.calls == 0


def test_one_line_template_matches_transformer_lens_similarity_score():
    """mul / abs equal TL's compute_head_attention_similarity_score on the same patterns and tokens (exclusions too)."""
    from transformer_lens import head_detector as hd

    info = planted_info(n_layers=1, n_heads=3)
    access = PlantedAccess(info, token_patterns(["random", "induction", "uniform"]))
    ids = torch.tensor([access.encode("the cat saw the dog and the cat ran to the dog")])
    tl_patterns = {"previous_token_head": hd.get_previous_token_head_detection_pattern,
                   "duplicate_token_head": hd.get_duplicate_token_head_detection_pattern,
                   "induction_head": hd.get_induction_head_detection_pattern}
    full = token_patterns(["random", "induction", "uniform"])(0, ids)[0]
    for name, build in tl_patterns.items():
        det = build(ids)
        for bos, cur in ((False, False), (True, False), (False, True)):
            ours = template_scores(access, ids, name, exclude_bos=bos, exclude_current_token=cur, chunk_size=5)
            for h in range(3):
                for measure in ("mul", "abs"):
                    ref = hd.compute_head_attention_similarity_score(
                        full[h].clone(), det, exclude_bos=bos, exclude_current_token=cur, error_measure=measure)
                    tol = 1e-6 if measure == "mul" else 6e-4  # TL rounds the abs sum to 3 decimals
                    assert ours[measure][h] == pytest.approx(ref, abs=tol), (name, bos, cur, h, measure)
    # the one-line definition gives the named template's scores
    mine = template_scores(access, ids, lambda i, j, tok: j == i - 1)
    named = template_scores(access, ids, "previous_token_head")
    assert np.allclose(mine[["mul", "abs"]], named[["mul", "abs"]])


# --- a real model with a hand-wired induction circuit --------------------------------------------------------------

INDUCTION_HEAD = (1, 2)
PREVIOUS_HEAD = (0, 0)


def induction_model(amplitude: float = 25.0, content_gain: float = 2.0, seed: int = 0, window: int | None = None):
    """A tiny SmolLM3 (layer 0 RoPE, layer 1 NoPE, GQA 4 heads / 2 KV heads) wired as a two-layer induction circuit.

    Residual = [token subspace A (dims 0-127) | previous-token subspace B (dims 128-255)]. Embeddings are random
    vectors of norm 16 in A (so RMSNorm leaves them unchanged). Layer 0 head 0 is a previous-token head (constant q/k
    biases whose RoPE logit peaks at distance 1, `amplitude` above any other distance); its values copy A and its
    output writes them into B, so B at position j holds token j-1. Layer 1 head 2 (NoPE) matches its query (A: the
    current token) against keys read from B (the token before each key): it attends to the token after each earlier
    copy of the current token. MLPs and every other layer-0 output are zero; other heads keep their random init.
    `window`: layer 1 becomes a sliding-window layer of that many keys (the induction head cannot reach further).
    """
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    from posprobe.models import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(seed)
    d, hd, n_heads, n_kv = 256, 128, 4, 2
    config = SmolLM3Config(vocab_size=len(tok), hidden_size=d, intermediate_size=8, num_hidden_layers=2,
                           num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=hd,
                           max_position_embeddings=2048, attention_bias=True, no_rope_layers=[1, 0],
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                           use_sliding_window=window is not None, sliding_window=window,
                           layer_types=["full_attention", "sliding_attention" if window else "full_attention"])
    model = SmolLM3ForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    A, B = slice(0, hd), slice(hd, d)
    layer0, layer1 = (layer.self_attn for layer in model.model.layers)
    w = 10000.0 ** (-2 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    dist = torch.arange(2048, dtype=torch.float64)
    peak = torch.cos((dist[:, None] - 1) * w).sum(-1)  # per unit amplitude, logit at distance d
    margin = float((peak[1] - torch.cat([peak[:1], peak[2:]])).min())
    per_chunk = math.sqrt(amplitude / margin / layer0.scaling)
    with torch.no_grad():
        emb = torch.randn(len(tok), hd)
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, A] = emb / emb.norm(dim=-1, keepdim=True) * math.sqrt(d)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                         layer.self_attn.o_proj):
                proj.bias.zero_()
        # layer 0 head 0: previous-token head, values = A, output -> B
        layer0.q_proj.weight[0:hd] = 0
        layer0.q_proj.bias[0:hd] = per_chunk * torch.cat([torch.cos(w), -torch.sin(w)]).float()
        layer0.k_proj.weight[0:hd] = 0
        layer0.k_proj.bias[0:hd] = per_chunk * torch.cat([torch.ones(hd // 2), torch.zeros(hd // 2)])
        layer0.v_proj.weight[0:hd] = 0
        layer0.v_proj.weight[0:hd, A] = torch.eye(hd)
        layer0.o_proj.weight.zero_()
        layer0.o_proj.weight[B, 0:hd] = torch.eye(hd)
        # layer 1 head 2 (KV head 1): query = current token (A), key = previous token (B)
        h, kv = INDUCTION_HEAD[1], INDUCTION_HEAD[1] // (n_heads // n_kv)
        layer1.q_proj.weight[h * hd:(h + 1) * hd] = 0
        layer1.q_proj.weight[h * hd:(h + 1) * hd, A] = content_gain * torch.eye(hd)
        layer1.k_proj.weight[kv * hd:(kv + 1) * hd] = 0
        layer1.k_proj.weight[kv * hd:(kv + 1) * hd, B] = content_gain * torch.eye(hd)
    return model, tok


@pytest.fixture(scope="module")
def wired():
    from posprobe.models import wrap

    model, tok = induction_model()
    return model, tok, wrap(model, tokenizer=tok)


def test_hand_wired_induction_head_scores_one_and_others_zero(wired):
    _, _, access = wired
    cfg = InductionConfig(block_length=32, distances=(8, 32, 120), sink_n_texts=2)
    scan = posprobe.scan(access, probes=["induction"], budget=TINY, configs={"induction": cfg}, progress=False)
    top = scan.rank("induction_score", top=2)
    assert (int(top.layer[0]), int(top["head"][0])) == INDUCTION_HEAD
    assert float(top.induction_score[0]) > 0.97
    others = scan.heads[(scan.heads.layer != INDUCTION_HEAD[0]) | (scan.heads["head"] != INDUCTION_HEAD[1])]
    assert others.induction_score.max() < 0.1 and scan.heads.duplicate_token_score.max() < 0.1
    curve = scan.curve("induction_by_distance", *INDUCTION_HEAD)
    assert curve.y.min() > 0.97  # a content match reaches every distance (layer 1 has no RoPE)
    assert _value(scan, "induction_score_text", INDUCTION_HEAD[1], INDUCTION_HEAD[0]) > 0.9


def test_distance_curve_shows_how_far_a_sliding_window_head_reaches():
    """Layer 1 limited to a 50-key window: the token after the twin (distance L - 1) is visible up to L = 50."""
    from posprobe.models import wrap

    model, tok = induction_model(window=50)
    cfg = InductionConfig(block_length=32, distances=(8, 50, 51, 120), natural_text=False, sink_n_texts=1)
    scan = posprobe.scan(wrap(model, tokenizer=tok), probes=["induction"], budget=TINY, configs={"induction": cfg},
                         progress=False)
    curve = scan.curve("induction_by_distance", *INDUCTION_HEAD).set_index("x").y
    assert curve[8.0] > 0.97 and curve[50.0] > 0.97
    assert curve[51.0] == 0.0 and curve[120.0] == 0.0


class TokensView:
    """A TransformerLens model as `detect_head` sees it, tokenizing every prompt to the given ids.

    detect_head takes text and calls `model.to_tokens`; posprobe compares on identical tokens (random blocks do not
    survive a decode / encode round trip), so this view hands TL the ids and runs TL's own cache.
    """

    def __init__(self, bridge, ids: torch.Tensor) -> None:
        self.cfg, self.bridge, self.ids = bridge.cfg, bridge, ids

    def to_tokens(self, seq):
        return self.ids

    def run_with_cache(self, tokens, **kwargs):
        return self.bridge.run_with_cache(tokens, **kwargs)


def tl_detect(bridge, ids: torch.Tensor, name: str, measure: str = "mul") -> np.ndarray:
    from transformer_lens.head_detector import detect_head

    with torch.inference_mode():
        return detect_head(TokensView(bridge, ids[None]), "", name, error_measure=measure).numpy()


def test_parity_with_transformer_lens_detect_head(wired):
    """Identical weights (a TL bridge over the same model) and identical tokens: mul equal, abs to TL's rounding."""
    from posprobe.adapters.transformer_lens import TransformerLensAccess

    model, tok, access = wired
    bridge = TransformerLensAccess.from_hf(model, tok).bridge
    ids = repeated_random_tokens(access, 24, 1, seed=3)[0]
    for name in TEMPLATES:
        ours = template_scores(access, ids, name, chunk_size=16)
        for measure, tol in (("mul", 2e-5), ("abs", 6e-4)):
            ref = tl_detect(bridge, ids, name, measure).reshape(-1)
            assert np.allclose(ours[measure], ref, atol=tol), (name, measure)
    # the probe's induction_score on the same sequence is TL's mul rescaled by n / (second-copy rows): rank-identical
    cfg = InductionConfig(block_length=24, distances=(24,), n_sequences=1, max_queries=24, natural_text=False,
                          sink_n_texts=1, )
    scan = posprobe.scan(access, probes=["induction"], budget=TINY, seed=3, configs={"induction": cfg},
                         progress=False)
    tl = tl_detect(bridge, ids, "induction_head").reshape(-1)
    assert np.allclose(scan.heads.induction_score * 24 / len(ids), tl, atol=2e-5)
    assert spearmanr(scan.heads.induction_score, tl).statistic == pytest.approx(1.0)


@pytest.mark.real_model
def test_gemma_induction_heads_match_transformer_lens_detect_head(gemma):
    """Gemma 3 270M: the same repeated block through posprobe (SDPA model, chunked patterns) and a TL bridge."""
    from posprobe.adapters.transformer_lens import TransformerLensAccess

    cfg = InductionConfig(block_length=64, distances=(64,), n_sequences=1, max_queries=64, natural_text=False,
                          sink_n_texts=4)
    scan = posprobe.scan(gemma, probes=["induction"], budget="quick", configs={"induction": cfg}, progress=False)
    ids = repeated_random_tokens(gemma, 64, 1, seed=0)[0]
    tl = tl_detect(TransformerLensAccess.from_hf(gemma.model, gemma.tokenizer).bridge, ids, "induction_head")
    ours = scan.heads.induction_score.to_numpy()
    assert np.allclose(ours * 64 / len(ids), tl.reshape(-1), atol=1e-4)
    assert spearmanr(ours, tl.reshape(-1)).statistic > 0.99
    top = scan.rank("induction_score", top=3)
    assert (5, 1) in set(zip(top.layer, top["head"]))  # BACKENDS.md: L5H1 ~.9 on this construction
