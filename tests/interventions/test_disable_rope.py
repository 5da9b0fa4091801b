"""disable_rope: identity rotation inside the block (rotated q == un-rotated q), equivalence with a NoPE model holding
the same weights, exact restore of logits on exit, chosen layers only, clear errors."""

from __future__ import annotations

import pytest
import torch

from posprobe.access import Tap
from posprobe.errors import InterventionError
from posprobe.interventions import DisableRope, LayerRange, disable_rope, rope_layers, rotary_edits
from posprobe.models import tiny_model, wrap

IDS = torch.tensor([[1, 40, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66, 67]])


@pytest.fixture(scope="module")
def twins():
    """A tiny RoPE (Llama) model and a NoPE (SmolLM3, no_rope_layers all 0) model with identical weights."""
    rope, tokenizer = tiny_model("rope", seed=3)
    nope, _ = tiny_model("nope", seed=4)
    nope.load_state_dict(rope.state_dict(), strict=True)
    return wrap(rope, tokenizer=tokenizer, name="rope"), wrap(nope, tokenizer=tokenizer, name="nope")


def test_exit_restores_logits_bit_for_bit(tiny_rope):
    before = tiny_rope.run(IDS, logits="all").logits
    with disable_rope(tiny_rope) as access:
        assert access is tiny_rope
        inside = access.run(IDS, logits="all").logits
    after = tiny_rope.run(IDS, logits="all").logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, inside)


def test_rope_disabled_model_equals_nope_model_with_same_weights(twins):
    rope, nope = twins
    reference = nope.run(IDS, logits="all").logits
    assert not torch.allclose(rope.run(IDS, logits="all").logits, reference, atol=1e-4)
    with disable_rope(rope):
        torch.testing.assert_close(rope.run(IDS, logits="all").logits, reference, rtol=1e-5, atol=1e-5)
        generated = rope.greedy(IDS, 6)  # the KV-cached generation path sees the edit too
    assert torch.equal(generated, nope.greedy(IDS, 6))


def test_identity_rotation_only_in_chosen_layers(tiny_rope):
    seen = {}

    def grab(cap):
        seen[cap.layer] = torch.equal(cap.q, cap.q_pre) and torch.equal(cap.k, cap.k_pre)

    with disable_rope(tiny_rope, layers=[0]):
        tiny_rope.run(IDS, taps=(Tap.Q, Tap.K, Tap.Q_PRE, Tap.K_PRE), on_layer=grab)
    assert seen == {0: True, 1: False}


def test_rotary_edit_specs(tiny_rope):
    assert rope_layers(tiny_rope.info) == [0, 1]
    assert [e.layer for e in rotary_edits(tiny_rope.info)] == [0, 1]
    assert [e.layer for e in rotary_edits(tiny_rope.info, [1, 1])] == [1]


def test_refuses_a_model_name_and_takes_layer_ranges(tiny_rope):
    with pytest.raises(InterventionError, match="never loads a model of its own"):
        disable_rope("tiny-rope", layers=[1])
    assert [e.layer for e in DisableRope(layers="1:").edits(tiny_rope)] == [1]
    assert [e.layer for e in DisableRope(layers=LayerRange(0, 2)).edits(tiny_rope)] == [0, 1]
    assert [e.layer for e in DisableRope(layers="1,0").edits(tiny_rope)] == [0, 1]
    assert DisableRope(layers="0:2").describe(tiny_rope)["resolved"] == {"layers": "0:2"}
    with pytest.raises(InterventionError, match="does not fit"):
        DisableRope(layers="1:3").edits(tiny_rope)


def test_errors(tiny_rope, tiny_nope):
    with pytest.raises(InterventionError, match="no RoPE layer"):
        with disable_rope(tiny_nope):
            pass
    with pytest.raises(InterventionError, match="do not exist"):
        with disable_rope(tiny_rope, layers=[5]):
            pass
    with pytest.raises(InterventionError, match="empty"):
        with disable_rope(tiny_rope, layers=[]):
            pass
    assert tiny_rope._edits == []  # a failed entry leaves nothing behind


@pytest.mark.real_model
def test_gemma_restored_bit_for_bit(gemma):
    ids = gemma.encode("The old farmer carried a wooden chair near the harbour. The baker sold")
    before = gemma.run(ids, logits="all").logits
    with disable_rope(gemma, layers=[5, 11, 17]):  # the global (theta 1M) layers only
        partial = gemma.run(ids, logits="last").logits
    with disable_rope(gemma):
        inside = gemma.run(ids, logits="all").logits
    after = gemma.run(ids, logits="all").logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, inside, atol=1e-3)
    assert not torch.allclose(before[:, -1:], partial, atol=1e-4)
