"""STRING, Self-Extend, Ms-PoE, log-n, StreamingLLM and LM-Infinite against a naive eager reference.

The reference is written here from the papers' formulas, independently of posprobe's delta-rotation engine: a
tiny Llama's forward pass re-implemented with an explicit relative-position matrix P[h, i, j] (the distance at
which query i sees key j: the unrotated query is rotated by P, the key not at all) and a visibility matrix; the
model's own modules provide norms, projections and MLPs. Checked by hand once, each fails here: STRING's W - S
query shift written S - W, Self-Extend's + (W - W // G) written + W, Ms-PoE's ratio table k / H written
k / (H - 1), StreamingLLM's cache clamp n_sink + window - 1 written n_sink + window, log-n's ln(p + 1) written
ln(p), LM-Infinite's cap written cap + 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from posprobe.access import Tap
from posprobe.errors import InterventionError
from posprobe.what_if import (
    STRING,
    LMInfinite,
    LogNTemperature,
    MsPoE,
    SelfExtend,
    StreamingLLM,
    YaRN,
)
from tests.what_if.conftest import NATIVE, N


def _rotate(x, angle):  # x [..., d], angle [..., d/2]: HF half-split rotation, written out
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = angle.cos(), angle.sin()
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


def naive_logits(model, ids, relative, visible, query_scale=None, inv_freq=None, probs_out=None):
    """Forward pass of a Llama with attention logit(i, j) = scale * (R(P[h, i, j]) q_i) . k_j, both unrotated.

    relative(n) -> P [H or 1, n, n] float, or relative(n, q, k) with the layer's unrotated q, k [H, n, d] (methods
    whose positions depend on the layer's attention); visible(n) -> bool [n, n] (on top of causal);
    query_scale(n) -> [n]; probs_out: a list that receives every layer's probabilities [H, n, n].
    """
    cfg = model.config
    n = ids.shape[1]
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if inv_freq is None:
        inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    per_layer = relative.__code__.co_argcount == 3
    P = None if per_layer else relative(n).float()
    causal = torch.ones(n, n, dtype=torch.bool).tril() & visible(n)
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        for block in model.model.layers:
            attn = block.self_attn
            x = block.input_layernorm(h)
            q = attn.q_proj(x).view(1, n, heads, d)[0].transpose(0, 1)  # [H, n, d]
            k = attn.k_proj(x).view(1, n, kv_heads, d)[0].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            v = attn.v_proj(x).view(1, n, kv_heads, d)[0].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            if query_scale is not None:
                q = q * query_scale(n)[None, :, None]
            layer_P = relative(n, q, k).float() if per_layer else P
            angle = layer_P[..., None] * inv_freq  # [H|1, n, n, d/2]
            q_at = _rotate(q[:, :, None, :].expand(heads, n, n, d), angle.expand(heads, n, n, d // 2))
            logits = (q_at * k[:, None, :, :]).sum(-1) * attn.scaling
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            if probs_out is not None:
                probs_out.append(probs)
            out = (probs @ v).transpose(0, 1).reshape(1, n, heads * d)
            h = h + attn.o_proj(out)
            h = h + block.mlp(block.post_attention_layernorm(h))
        return model.lm_head(model.model.norm(h))


def _dist(n):
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).float()


def _all(n):
    return torch.ones(n, n, dtype=torch.bool)


def _check(access, model, tokens, spec, relative, visible=_all, query_scale=None):
    with spec.applied(access):
        got = access.run(tokens, logits="all").logits
    want = naive_logits(model, tokens, relative, visible, query_scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    plain = naive_logits(model, tokens, lambda n: _dist(n)[None], _all)
    assert (got - plain).abs().max() > 2e-4, "the what-if changed nothing: the test could not tell (20x atol)"


def test_naive_reference_is_the_model(access, model, tokens):
    """The reference with P = i - j and nothing masked is the plain model (so the reference itself is right)."""
    with torch.no_grad():
        got = model(tokens).logits  # transformers itself (the access refuses 64 > 32 tokens without a what-if)
    torch.testing.assert_close(got, naive_logits(model, tokens, lambda n: _dist(n)[None], _all), atol=1e-5, rtol=0)


def test_string(access, model, tokens):
    S, W = 20, 6

    def relative(n):
        d = _dist(n)
        return torch.where(d >= S, d - S + W, d)[None]

    _check(access, model, tokens, STRING(shift=S, window=W), relative)


def test_string_default_shift_is_a_third_of_the_native_length(access):
    assert STRING(window=4).offsets(access) == (NATIVE // 3, 4)
    with pytest.raises(InterventionError, match="smaller than shift"):
        STRING(window=64).offsets(access)


@pytest.mark.parametrize("G,W", [(4, 8), (3, 10)])
def test_self_extend(access, model, tokens, G, W):
    def relative(n):
        i = torch.arange(n)
        grouped = (i[:, None] // G + W - W // G) - (i[None, :] // G)
        d = _dist(n)
        return torch.where(d < W, d, grouped.float())[None]

    _check(access, model, tokens, SelfExtend(group=G, window=W), relative)


def test_ms_poe_index_order(access, model, tokens):
    heads = model.config.num_attention_heads
    ratios = [1.2 + 0.6 * k / heads for k in range(heads)]
    head_ratio = torch.tensor([ratios[heads - 1 - h] for h in range(heads)])

    _check(access, model, tokens, MsPoE(order="index", layers="0:"),
           lambda n: _dist(n)[None] / head_ratio[:, None, None])


def test_ms_poe_outlier_order_is_a_permutation_of_the_ratio_table(access, tokens):
    spec = MsPoE(layers="0:")
    with spec.applied(access):
        got = access.run(tokens, logits="last").logits
    assert torch.isfinite(got).all()
    with pytest.raises(InterventionError, match="no layer"):
        MsPoE().target_layers(access)  # default layers 2.. do not exist in a 2-layer model


def test_logn(access, model, tokens):
    def query_scale(n):
        return torch.clamp(torch.log(torch.arange(n).double() + 1) / math.log(NATIVE), min=1.0).float()

    _check(access, model, tokens, LogNTemperature(), lambda n: _dist(n)[None], query_scale=query_scale)


def test_streaming_llm_cache_positions(access, model, tokens):
    sink, window = 3, 10

    def visible(n):
        i = torch.arange(n)
        return (i[None, :] < sink) | ((i[:, None] - i[None, :]) < window)

    def relative(n):
        i = torch.arange(n)
        d = _dist(n)
        sink_far = (i[None, :] < sink) & (d >= window)
        cache = torch.clamp(i, max=sink + window - 1)[:, None] - i[None, :]
        return torch.where(sink_far, cache.float(), d)[None]

    _check(access, model, tokens, StreamingLLM(n_sink=sink, window=window), relative, visible)
    _check(access, model, tokens, StreamingLLM(n_sink=sink, window=window, positions="original"),
           lambda n: _dist(n)[None], visible)


def test_lm_infinite(access, model, tokens):
    n_global, local, cap = 4, 12, 16

    def visible(n):
        i = torch.arange(n)
        return (i[None, :] < n_global) | ((i[:, None] - i[None, :]) < local)

    _check(access, model, tokens, LMInfinite(n_global=n_global, n_local=local, cap=cap),
           lambda n: torch.clamp(_dist(n), max=cap)[None], visible)


@pytest.mark.parametrize("spec", [StreamingLLM(n_sink=2, window=5), LMInfinite(n_global=3, n_local=7)])
def test_masks_put_exact_zeros_where_masked(access, tokens, spec):
    """The pattern the probes read under the mask: exactly 0 outside sink/global + window, rows sum to 1."""
    patterns = {}

    def on_layer(cap):
        patterns[cap.layer] = cap.pattern()

    with spec.applied(access):
        access.run(tokens, taps=[Tap.PATTERN], on_layer=on_layer)
    first, window = (2, 5) if spec.name == "streaming_llm" else (3, 7)
    i = torch.arange(N)
    allowed = ((i[None, :] < first) | ((i[:, None] - i[None, :]) < window)) & (i[None, :] <= i[:, None])
    for probs in patterns.values():
        assert torch.all(probs[..., ~allowed] == 0)
        assert torch.all(probs[..., allowed] > 0)
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


@pytest.mark.parametrize("spec", [LogNTemperature(), StreamingLLM(), LMInfinite()], ids=lambda s: s.name)
def test_extension_only_methods_change_nothing_within_the_native_window(access, model, tokens, spec):
    """With their default sizes (window / cache / cap of the native length; log-n from the native length on), these
    methods act only past the window: a prompt of exactly NATIVE tokens gets the plain model's logits. That is why
    the README's context-extension passkey table gives them plain RoPE's 1x row instead of running it again; the
    same spec 8 tokens past the window does change them (so the check can fail)."""
    inside = tokens[:, :NATIVE]
    plain = naive_logits(model, inside, lambda n: _dist(n)[None], _all)
    with spec.applied(access):
        got = access.run(inside, logits="all").logits
        past = access.run(tokens[:, :NATIVE + 8], logits="all").logits
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)
    plain_past = naive_logits(model, tokens[:, :NATIVE + 8], lambda n: _dist(n)[None], _all)
    assert (past[:, NATIVE:] - plain_past[:, NATIVE:]).abs().max() > 2e-4


def test_composes_with_a_rope_rescaling_what_if(access, model, tokens):
    """Self-Extend on top of PI x2 rotates with PI's frequencies (current_inv_freq follows the override)."""
    G, W = 4, 8
    d = model.config.head_dim
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d)) / 2.0

    def relative(n):
        i = torch.arange(n)
        grouped = (i[:, None] // G + W - W // G) - (i[None, :] // G)
        return torch.where(_dist(n) < W, _dist(n), grouped.float())[None]

    from posprobe.what_if import PositionInterpolation

    with PositionInterpolation(factor=2.0).applied(access), SelfExtend(group=G, window=W).applied(access):
        got = access.run(tokens, logits="all").logits
    want = naive_logits(model, tokens, relative, _all, inv_freq=inv_freq)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", [STRING(shift=20, window=6), SelfExtend(group=4, window=8),
                                  StreamingLLM(n_sink=2, window=9), MsPoE(order="index", layers="0:")])
def test_exit_restores_bitwise(access, tokens, spec):
    before = access.run(tokens[:, :NATIVE], logits="all").logits
    with spec.applied(access):
        access.run(tokens, logits="last")
    assert access.info.max_positions == NATIVE
    assert torch.equal(before, access.run(tokens[:, :NATIVE], logits="all").logits)


def test_kv_cached_greedy_matches_recompute(access, tokens):
    with SelfExtend(group=4, window=8).applied(access), YaRN(factor=2.0).applied(access):
        cached = access.greedy(tokens[:, :40], 5)
        ref = tokens[:, :40]
        for _ in range(5):
            ref = torch.cat([ref, access.run(ref, logits="last").logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ref[:, 40:])
