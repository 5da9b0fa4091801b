"""Conformance fixtures: one tiny random-init model per family of `posprobe.adapters.families` (no download).

Models are built once per session and shared by the suite's tests (each test leaves the model as it found it:
that is one of the things the suite checks).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def family_access(name: str):
    """(HFAccess, model) of the registry's tiny `name` model, built once."""
    from posprobe.adapters.families import build_family
    from posprobe.adapters.hf import HFAccess

    model, tokenizer = build_family(name)
    return HFAccess(model, tokenizer, name=f"tiny-{name}")


def eager_reference(access, ids: torch.Tensor):
    """The model's own eager forward with attention weights (the reference every statistic must equal)."""
    model = access.model
    before = model.config._attn_implementation
    access._set_attention("eager")
    try:
        with torch.inference_mode():
            return model(ids, output_attentions=True)
    finally:
        access._set_attention(before)


def lengths(access) -> tuple[int, int]:
    """Two context lengths: one inside every window / attention chunk, one longer than any of them."""
    spans = [x for layer in access.info.layers for x in (layer.sliding_window, layer.attention_chunk) if x]
    longest = max(spans, default=8)
    return max(3, min(spans, default=8) - 2), 3 * longest + 5


def token_ids(access, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, access.info.vocab_size, (1, n), generator=generator)
    bos = getattr(access.tokenizer, "bos_token_id", None)
    if bos is not None:
        ids[0, 0] = bos
    return ids
