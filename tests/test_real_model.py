"""Real-model tier (Gemma 3 270M): the streaming statistics match eager attention and known heads exist."""

from __future__ import annotations

import pytest
import torch

from tests.real_checks import streaming_vs_eager

pytestmark = pytest.mark.real_model


def test_gemma_streaming_patterns_match_eager_and_logits_unchanged(gemma):
    got, fast, plain, ref = streaming_vs_eager(gemma, (0, 2, 5))
    assert torch.equal(fast, plain)  # reading statistics leaves SDPA's output bit-identical
    for layer, pattern in got.items():
        assert (pattern - ref.attentions[layer][0]).abs().max() < 1e-4
    assert (fast - ref.logits).abs().max() < 1e-3


def test_gemma_has_previous_token_and_sink_heads(gemma_quick_scan):
    heads = gemma_quick_scan.heads
    early = heads[heads["layer"] <= 2]
    assert early["previous_token_score"].max() > 0.5
    assert (heads["sink_mass"] > 0.5).sum() >= 1
    assert heads["entropy_norm"].between(0, 1.0001).all()
