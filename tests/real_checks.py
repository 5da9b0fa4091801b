"""Shared steps of the real-model tier: one streaming pass vs the model's own eager attention on the same tokens."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from posprobe.access import Tap


def streaming_vs_eager(access, layers: Iterable[int], n_tokens: int = 300, seed: int = 0):
    """(streamed patterns {layer: [H, n, n]}, logits with taps, logits without, eager reference output)."""
    from posprobe.tasks.text import text_ids

    layers = set(layers)
    ids = text_ids(access, n_tokens, seed=seed)
    got = {}

    def on_layer(cap):
        if cap.layer in layers:
            got[cap.layer] = cap.pattern()[0]

    fast = access.run(ids, taps=[Tap.PATTERN], on_layer=on_layer, logits="all").logits
    plain = access.run(ids, logits="all").logits
    model = access.model
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            ref = model(torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    return got, fast, plain, ref
