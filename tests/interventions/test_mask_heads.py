"""mask_heads: masked heads attend uniformly over the visible keys (causal prefix, sliding window), checked against
an independent construction (zeroed logits); exit restores logits bit-for-bit; KV-cached generation agrees with
recomputation; every accepted model form and every bad input."""

from __future__ import annotations

import pytest
import torch

from posprobe.access import AttentionEdit, EditContext
from posprobe.errors import InterventionError
from posprobe.interventions.mask_heads import MaskHeads, UniformHeads, mask_heads, mask_heads_edits

TEXT = "The old farmer carried a wooden chair near the harbour. A young teacher found the blue lantern."


def _zero_logits_edits(heads_by_layer):
    """Reference: setting a head's visible logits to 0 makes softmax uniform over exactly the visible keys."""

    def make(heads):
        def fn(scores, ctx):
            out = scores.clone()
            sub = out[:, list(heads)]
            out[:, list(heads)] = torch.where(torch.isfinite(sub), torch.zeros_like(sub), sub)
            return out

        return fn

    return [AttentionEdit(layer, make(heads), stage="scores") for layer, heads in heads_by_layer.items()]


def _window_model():
    from transformers import MistralConfig, MistralForCausalLM

    from posprobe.adapters.hf import HFAccess
    from posprobe.models import tiny_model

    _, tok = tiny_model("rope")
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           max_position_embeddings=512)
    model = MistralForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    return HFAccess(model, tok, name="tiny-mistral-window8")


def test_uniform_rows_respect_causality_and_window():
    fn = UniformHeads(0, (1, 3), sliding_window=4)
    probs = torch.softmax(torch.randn(1, 4, 3, 10), -1)
    ctx = EditContext(layer=0, query_index=torch.tensor([2, 6, 9]), n_keys=10, position_ids=None)
    out = fn(probs, ctx)
    assert torch.equal(out[:, [0, 2]], probs[:, [0, 2]])  # other heads untouched
    expected = torch.zeros(3, 10)
    expected[0, 0:3] = 1 / 3  # query 2 sees keys 0..2
    expected[1, 3:7] = 1 / 4  # query 6 sees keys 3..6 (window 4)
    expected[2, 6:10] = 1 / 4
    for head in (1, 3):
        assert torch.allclose(out[0, head], expected)
    assert probs.shape == out.shape


@pytest.mark.parametrize("which", ["tiny_rope", "window"])
def test_masked_logits_equal_the_zero_logit_reference(which, request):
    access = _window_model() if which == "window" else request.getfixturevalue("tiny_rope")
    ids = access.encode(TEXT)
    heads = [(0, 1), (1, 0), (1, 3)]
    with mask_heads(access, heads) as masked:
        assert masked is access
        edited = access.run(ids, logits="all").logits
    reference = access.run(ids, logits="all", edits=_zero_logits_edits({0: (1,), 1: (0, 3)})).logits
    plain = access.run(ids, logits="all").logits
    assert torch.allclose(edited, reference, atol=1e-5)
    assert not torch.allclose(edited, plain, atol=1e-4)


def test_exit_restores_logits_bit_for_bit(tiny_rope):
    ids = tiny_rope.encode(TEXT)
    before = tiny_rope.run(ids, logits="all").logits
    with mask_heads(tiny_rope, [(0, 0), (1, 2)]):
        inside = tiny_rope.run(ids, logits="all").logits
    after = tiny_rope.run(ids, logits="all").logits
    assert not torch.allclose(before, inside, atol=1e-4)
    assert torch.equal(before, after)
    assert tiny_rope._edits == []


def test_exit_restores_after_an_exception(tiny_rope):
    ids = tiny_rope.encode(TEXT)
    before = tiny_rope.run(ids, logits="last").logits
    with pytest.raises(RuntimeError, match="boom"):
        with mask_heads(tiny_rope, [(0, 0)]):
            raise RuntimeError("boom")
    assert torch.equal(before, tiny_rope.run(ids, logits="last").logits)


@pytest.mark.parametrize("which", ["tiny_rope", "window"])
def test_kv_cached_greedy_under_mask_matches_recompute(which, request):
    from posprobe.access import ModelAccess

    access = _window_model() if which == "window" else request.getfixturevalue("tiny_rope")
    ids = access.encode("The engineer counted the stone bridge")  # longer than the window of 8
    with mask_heads(access, [(0, 1), (1, 1)]):
        cached = access.greedy(ids, 8)
        recomputed = ModelAccess.greedy(access, ids, 8)
    assert torch.equal(cached, recomputed)


def test_refuses_a_model_name_and_accepts_numpy_ints_and_text(tiny_rope):
    import numpy as np

    with pytest.raises(InterventionError, match="never loads a model of its own"):
        mask_heads("tiny-rope", [(0, 1)])  # it would edit a copy nobody evaluates
    heads = [(np.int64(0), np.int64(1))]
    with mask_heads(tiny_rope, heads) as access:
        inside = access.run(access.encode(TEXT), logits="last").logits
    outside = tiny_rope.run(tiny_rope.encode(TEXT), logits="last").logits
    assert access is tiny_rope and not torch.allclose(inside, outside, atol=1e-5)
    with MaskHeads(heads="L0H1").applied(tiny_rope):
        assert torch.equal(tiny_rope.run(tiny_rope.encode(TEXT), logits="last").logits, inside)
    assert MaskHeads(heads="L1H2,L0H1").heads == ((0, 1), (1, 2)) == MaskHeads(heads=[(1, 2), (0, 1)]).heads


def test_no_heads_is_a_no_op(tiny_rope):
    ids = tiny_rope.encode(TEXT)
    with mask_heads(tiny_rope, []):
        inside = tiny_rope.run(ids, logits="all").logits
    assert torch.equal(inside, tiny_rope.run(ids, logits="all").logits)


@pytest.mark.parametrize("heads, match", [
    ([(2, 0)], r"layers 0\.\.1"),
    ([(0, 4)], r"query heads 0\.\.3"),
    ([(0,)], "pair"),
    ([(0.5, 1)], "integers"),
    ("0,1", "L<layer>H<head>"),
])
def test_bad_heads_are_intervention_errors(tiny_rope, heads, match):
    with pytest.raises(InterventionError, match=match):
        with mask_heads(tiny_rope, heads):
            pass
    assert tiny_rope._edits == []


def test_edits_group_heads_per_layer(tiny_rope):
    edits = mask_heads_edits(tiny_rope.info, [(1, 3), (0, 2), (1, 0), (1, 3)])
    assert [(e.layer, e.fn.heads, e.stage) for e in edits] == [(0, (2,), "probs"), (1, (0, 3), "probs")]


@pytest.mark.real_model
def test_gemma_masked_heads_match_reference_and_restore(gemma):
    ids = gemma.encode(TEXT * 2)
    before = gemma.run(ids, logits="all").logits
    heads = [(5, 1), (11, 2), (3, 0)]  # a global layer (5, 11) and a sliding-window layer (3)
    with mask_heads(gemma, heads):
        inside = gemma.run(ids, logits="all").logits
    reference = gemma.run(ids, logits="all", edits=_zero_logits_edits({3: (0,), 5: (1,), 11: (2,)})).logits
    after = gemma.run(ids, logits="all").logits
    identity = gemma.run(ids, logits="all", edits=[AttentionEdit(5, lambda p, ctx: p)]).logits
    assert torch.allclose(identity, before, atol=1e-3)  # the eager path of edited layers is faithful on Gemma
    assert torch.allclose(inside, reference, atol=1e-4)
    assert not torch.allclose(inside, before, atol=1e-3)
    assert torch.equal(before, after)
