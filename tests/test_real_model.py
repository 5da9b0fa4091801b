"""Real-model tier (Gemma 3 270M): the streaming statistics match eager attention and known heads exist."""

from __future__ import annotations

import pytest
import torch

from posprobe.access import Tap

pytestmark = pytest.mark.real_model


def test_gemma_streaming_patterns_match_eager_and_logits_unchanged(gemma):
    from posprobe.tasks.text import text_ids

    ids = text_ids(gemma, 300, seed=0)
    got = {}

    def on_layer(cap):
        if cap.layer in (0, 2, 5):
            got[cap.layer] = cap.pattern()[0]

    fast = gemma.run(ids, taps=[Tap.PATTERN], on_layer=on_layer, logits="all").logits
    plain = gemma.run(ids, logits="all").logits
    assert torch.equal(fast, plain)  # reading statistics leaves SDPA's output bit-identical
    model = gemma.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            ref = model(torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    for layer, pattern in got.items():
        assert (pattern - ref.attentions[layer][0]).abs().max() < 1e-4
    assert (fast - ref.logits).abs().max() < 1e-3


def test_gemma_has_previous_token_and_sink_heads(gemma_quick_scan):
    heads = gemma_quick_scan.heads
    early = heads[heads["layer"] <= 2]
    assert early["previous_token_score"].max() > 0.5
    assert (heads["sink_mass"] > 0.5).sum() >= 1
    assert heads["entropy_norm"].between(0, 1.0001).all()
