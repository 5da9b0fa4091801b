"""Ms-PoE and log-n as q/k edits before the model's own kernel (posprobe.what_if.query_key).

The logits under Ms-PoE's index order and log-n are checked against the naive reference in test_remap.py; here:
Ms-PoE's outlier head order against the same reference with the order computed from the layer's unrotated q/k;
the patterns probes read; the kernel path (no eager recomputation), the eager-attention model, and KV-cached greedy
decoding. Checked by hand once, each fails here: the outlier order's 3x threshold written 2x; the key rotation left
out (queries only); the eager kernel without the one-key-head-per-query-head module (GQA keys repeated twice).
"""

from __future__ import annotations

import math

import pytest
import torch

from posprobe.access import Tap
from posprobe.adapters import hf
from posprobe.what_if import LogNTemperature, MsPoE
from tests.what_if.conftest import NATIVE, tiny_llama, wrap
from tests.what_if.test_remap import _all, _dist, naive_logits


def _outlier_relative(heads):
    """P for Ms-PoE's outlier order, from the layer's unrotated q, k [H, n, d] as the paper's code scores heads."""
    table = torch.tensor([1.2 + 0.6 * k / heads for k in range(heads)])

    def relative(n, q, k):
        logits = (q[:, -1:] @ k.transpose(-1, -2))[:, 0] / math.sqrt(q.shape[-1])  # the last query, every key
        probs = torch.softmax(logits, dim=-1)
        share = (probs > 3 * probs.mean(-1, keepdim=True)).float().mean(-1)
        ratio = table[torch.argsort(-share, stable=True)]
        return _dist(n)[None] / ratio[:, None, None]

    return relative


def test_ms_poe_outlier_order(tokens):
    """Planted: the random model's heads all score 0 (near-uniform attention: the order would be the identity), so
    the query projection of heads 1-3 is scaled up (x30, x80, x10): peaked heads, and the order at 3x the mean
    ([2, 1, 0, 3] on layer 0) differs from the order at 2x ([1, 2, 0, 3])."""
    model = tiny_llama(seed=3)
    with torch.no_grad():
        for block in model.model.layers:
            heads = block.self_attn.q_proj.weight.view(4, 16, -1)
            for head, factor in enumerate([1.0, 30.0, 80.0, 10.0]):
                heads[head] *= factor
    relative = _outlier_relative(model.config.num_attention_heads)
    with MsPoE(layers="0:").applied(wrap(model)) as access:
        got = access.run(tokens, logits="all").logits
    torch.testing.assert_close(got, naive_logits(model, tokens, relative, _all), atol=1e-5, rtol=0)
    ratios = MsPoE().ratios(4, torch.device("cpu")).flip(0)  # the index order: head h takes table[H - 1 - h]
    index = naive_logits(model, tokens, lambda n: _dist(n)[None] / ratios[:, None, None], _all)
    assert (got - index).abs().max() > 2e-4  # the outlier order is not the index order here


def test_patterns_probes_read_are_those_of_the_edited_q_k(access, model, tokens):
    heads = model.config.num_attention_heads
    ratios = torch.tensor([1.2 + 0.6 * (heads - 1 - h) / heads for h in range(heads)])
    want: list[torch.Tensor] = []
    naive_logits(model, tokens, lambda n: _dist(n)[None] / ratios[:, None, None], _all, probs_out=want)
    got = {}

    def on_layer(cap):
        got[cap.layer] = cap.pattern()[0]

    with MsPoE(order="index", layers="0:").applied(access):
        access.run(tokens, taps=[Tap.PATTERN], on_layer=on_layer)
    for layer, probs in enumerate(want):
        torch.testing.assert_close(got[layer], probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", [MsPoE(layers="0:"), LogNTemperature()], ids=lambda s: s.name)
def test_runs_through_the_models_kernel(access, tokens, spec, monkeypatch):
    """No eager recomputation of the logits: the edited layers call SDPA once each, as a plain pass does."""
    def refuse(*args, **kwargs):
        raise AssertionError("the eager edited-attention path ran")

    calls = []
    original = hf._model_attention

    def counted(module, query, key, *args, **kwargs):
        calls.append(key.shape[1])
        return original(module, query, key, *args, **kwargs)

    monkeypatch.setattr(hf, "_edited_attention", refuse)
    monkeypatch.setattr(hf, "_model_attention", counted)
    with spec.applied(access):
        access.run(tokens, logits="last")
    heads = access.info.n_heads
    assert len(calls) == access.info.n_layers
    assert set(calls) == ({heads} if spec.name == "ms_poe" else {access.info.n_kv_heads})  # keys per query head


@pytest.mark.parametrize("spec", [MsPoE(order="index", layers="0:"), LogNTemperature()], ids=lambda s: s.name)
def test_eager_attention_model_gives_the_same_logits(access, tokens, spec):
    eager_model = tiny_llama(seed=3)
    eager_model.config._attn_implementation = "eager"
    eager = wrap(eager_model)
    with spec.applied(access):
        want = access.run(tokens, logits="all").logits
    with spec.applied(eager):
        got = eager.run(tokens, logits="all").logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", [MsPoE(order="index", layers="0:"), MsPoE(layers="0:"), LogNTemperature()],
                         ids=str)
def test_kv_cached_greedy_matches_recompute(access, tokens, spec):
    """Cached steps see keys the cache holds unedited, positions 0..n-1: the same tokens as recomputing the prefix."""
    with spec.applied(access):
        cached = access.greedy(tokens[:, :NATIVE + 8], 5)
        ref = tokens[:, :NATIVE + 8]
        for _ in range(5):
            ref = torch.cat([ref, access.run(ref, logits="last").logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ref[:, NATIVE + 8:])


def test_backends_without_the_qk_stage_refuse_it(access):
    """A "qk" edit needs the rotated q / k before the kernel: adapters that do not list the stage (TransformerLens,
    nnsight) refuse it before any work instead of treating it as a probabilities edit."""
    from posprobe.access import validate_edits
    from posprobe.errors import InterventionError

    edits = MsPoE(layers="0:").edits(access)
    assert {edit.stage for edit in edits} == {"qk"}
    validate_edits(access.info, edits, access.attention_edit_stages)  # HF: accepted
    with pytest.raises(InterventionError, match="backend='hf'"):
        validate_edits(access.info, edits)  # the default stages of ModelAccess
