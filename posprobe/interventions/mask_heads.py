"""Head masking: chosen heads attend uniformly (METRICS.md sections 5 and 7; the ablation of Wu et al. 2024).

Owns `mask_heads(model, heads)` (a context manager that yields the `ModelAccess` with the heads masked) and
`mask_heads_edits(info, heads)` (the underlying `AttentionEdit`s, for `access.run(..., edits=...)` or
`access.greedy(..., edits=...)`). A masked head's attention probabilities are replaced by the uniform distribution
over the keys its query can see: the causal prefix, cut to the layer's sliding window where it has one. Its value
vectors and output projection are untouched, so the head still writes, but it no longer selects (Wu et al. mask
retrieval heads this way and needle retrieval fails). Leaving the block removes the edits; the model is unchanged.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from posprobe.access import AttentionEdit, EditContext, ModelAccess, ModelInfo, causal_key_mask
from posprobe.errors import InterventionError


class UniformHeads:
    """The probs-stage edit function: rows of `heads` become uniform over the visible keys (window respected)."""

    def __init__(self, layer: int, heads: tuple[int, ...], sliding_window: int | None) -> None:
        self.layer, self.heads, self.sliding_window = layer, heads, sliding_window

    def __call__(self, probs: Tensor, ctx: EditContext) -> Tensor:
        allowed = causal_key_mask(ctx.query_index.to(probs.device), ctx.n_keys, self.sliding_window)
        uniform = allowed.to(probs.dtype) / allowed.sum(-1, keepdim=True).to(probs.dtype)  # [cq, nk]
        out = probs.clone()
        out[:, list(self.heads)] = uniform
        return out

    def __repr__(self) -> str:
        return f"UniformHeads(layer={self.layer}, heads={self.heads}, sliding_window={self.sliding_window})"


def _normalise(info: ModelInfo, heads: Any) -> dict[int, tuple[int, ...]]:
    """(layer, head) pairs -> {layer: sorted heads}, validated against the model's shape."""
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise InterventionError(f"heads must be an iterable of (layer, head) pairs, e.g. [(5, 0), (11, 3)]; got "
                                f"{heads!r}.")
    by_layer: dict[int, set[int]] = {}
    for pair in heads:
        try:
            layer, head = pair
        except (TypeError, ValueError):
            raise InterventionError(f"Each head must be a (layer, head) pair of integers; got {pair!r}. Write "
                                    f"heads as e.g. [(5, 0), (11, 3)].") from None
        if isinstance(layer, bool) or isinstance(head, bool) or not isinstance(layer, numbers.Integral) \
                or not isinstance(head, numbers.Integral):
            raise InterventionError(f"Each head must be a (layer, head) pair of integers; got {pair!r}.")
        layer, head = int(layer), int(head)
        if not 0 <= layer < info.n_layers or not 0 <= head < info.n_heads:
            raise InterventionError(f"Head ({layer}, {head}) does not exist in {info.name}: it has layers "
                                    f"0..{info.n_layers - 1} and query heads 0..{info.n_heads - 1} per layer.")
        by_layer.setdefault(layer, set()).add(head)
    return {layer: tuple(sorted(hs)) for layer, hs in sorted(by_layer.items())}


def mask_heads_edits(info: ModelInfo, heads: Iterable[Any]) -> list[AttentionEdit]:
    """One probs-stage `AttentionEdit` per layer that makes the given (layer, head) pairs attend uniformly."""
    return [AttentionEdit(layer, UniformHeads(layer, hs, info.layers[layer].sliding_window), stage="probs")
            for layer, hs in _normalise(info, heads).items()]


@contextlib.contextmanager
def mask_heads(model: Any, heads: Iterable[Any], *, tokenizer: Any = None,
               backend: str | None = None) -> Iterator[ModelAccess]:
    """Mask `heads` ((layer, head) pairs) for every pass and generation inside the block; yields the access.

    model: anything `posprobe.load_model` accepts, or a `ModelAccess`. Use the yielded access inside the block:

        with mask_heads(access, [(11, 2), (5, 0)]) as masked:
            masked.greedy(ids, 8)
    """
    from posprobe.models import load_model

    access = load_model(model, tokenizer=tokenizer, backend=backend)
    edits = mask_heads_edits(access.info, heads)
    with access.editing(edits):
        yield access


__all__ = ["UniformHeads", "mask_heads", "mask_heads_edits"]
