"""Disable RoPE: the identity rotation in all or chosen layers, a "NoPE ablation" of any RoPE model (METRICS.md
sections 6 and 7).

Owns `disable_rope(model, layers=None)`, a context manager yielding the model's `ModelAccess` with `RotaryEdit`s
active: inside the block every pass (and greedy generation) of that access computes attention from un-rotated q and
k in the chosen layers; everything else (weights, norms, masks, windows) is unchanged. Leaving the block removes the
edits, so logits are bit-for-bit what they were before. `rope_layers(info)` lists the layers that have RoPE, and
`rotary_edits(info, layers)` gives the edit specs for use with `access.run(..., edits=...)` directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from posprobe.access import ModelAccess, ModelInfo, RotaryEdit
from posprobe.errors import InterventionError


def rope_layers(info: ModelInfo) -> list[int]:
    """Indices of the layers that apply a rotary embedding."""
    return [layer.index for layer in info.layers if layer.has_rope]


def rotary_edits(info: ModelInfo, layers: Iterable[int] | None = None) -> list[RotaryEdit]:
    """`RotaryEdit`s for `layers` (default: every RoPE layer), validated against the model's facts."""
    with_rope = rope_layers(info)
    if layers is None:
        if not with_rope:
            raise InterventionError(
                f"{info.name} has no RoPE layer (every layer is {info.layers[0].positional.value if info.layers else '?'}"
                f"), so there is nothing to disable. disable_rope applies to RoPE models; a NoPE model is already "
                f"its own NoPE ablation."
            )
        return [RotaryEdit(layer) for layer in with_rope]
    chosen = sorted({int(layer) for layer in layers})
    if not chosen:
        raise InterventionError("disable_rope got an empty list of layers. Pass layers=None for every RoPE layer.")
    outside = [layer for layer in chosen if not 0 <= layer < info.n_layers]
    if outside:
        raise InterventionError(
            f"disable_rope layers {outside} do not exist: {info.name} has layers 0..{info.n_layers - 1}."
        )
    without = [layer for layer in chosen if layer not in with_rope]
    if without:
        raise InterventionError(
            f"Layers {without} of {info.name} have no RoPE to disable. Layers with RoPE: {with_rope or 'none'}."
        )
    return [RotaryEdit(layer) for layer in chosen]


@contextlib.contextmanager
def disable_rope(model: Any = None, layers: Iterable[int] | None = None, *, tokenizer: Any = None,
                 backend: str | None = None) -> Iterator[ModelAccess]:
    """Run `model` with the identity rotation in `layers` (default: every RoPE layer) inside the block.

    model: anything `posprobe.load_model` accepts (None = the embedded Gemma 3 270M) or a `ModelAccess`. Yields
    the access; use it for `posprobe.scan(access, ...)`, `access.run(...)` or `access.greedy(...)`.

        with posprobe.interventions.disable_rope(access) as nope:
            ablated = posprobe.scan(nope, probes=["implicit_position"])
    """
    from posprobe.models import load_model

    access = load_model(model, tokenizer=tokenizer, backend=backend)
    edits = rotary_edits(access.info, layers)
    with access.editing(edits):
        yield access


__all__ = ["disable_rope", "rope_layers", "rotary_edits"]
