"""Disable RoPE: the identity rotation in all or chosen layers, a "NoPE ablation" of any RoPE model
(docs/interventions.md).

Owns the `DisableRope(layers=...)` spec (registered as "disable_rope") and `disable_rope(access, layers=None)`, the
spec bound to an access: a context manager yielding it with `RotaryEdit`s active: inside the block every pass (and
greedy generation) of that access computes attention from un-rotated q and k in the chosen layers; everything else
(weights, norms, masks, windows) is unchanged. Leaving the block removes the edits, so logits are bit-for-bit what they
were before. `rope_layers(info)` lists the layers that have RoPE, and `rotary_edits(info, layers)` gives the edit specs
for use with `access.run(..., edits=...)` directly.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from posprobe.access import Edit, ModelAccess, ModelInfo, RotaryEdit
from posprobe.errors import InterventionError
from posprobe.interventions.spec import (
    Bound,
    Intervention,
    LayerRange,
    layer_range_of,
    register,
)


def rope_layers(info: ModelInfo) -> list[int]:
    """Indices of the layers that apply a rotary embedding."""
    return [layer.index for layer in info.layers if layer.has_rope]


def _layer_choice(value: Any) -> LayerRange | tuple[int, ...] | None:
    """None, a LayerRange / slice text ("9:18"), or explicit indices ([5, 11, 17] or text "5,11,17")."""
    if value is None or isinstance(value, LayerRange):
        return value
    if isinstance(value, str):
        if ":" in value:
            return LayerRange.parse(value)
        value = [x for x in value.split(",") if x.strip()]
    if isinstance(value, range):
        return LayerRange.coerce(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    try:
        return tuple(sorted({int(x) for x in value}))
    except (TypeError, ValueError):
        raise InterventionError(f"disable_rope layers must be None (every RoPE layer), a LayerRange / \"9:18\" "
                                f"(stop exclusive), or a list of layer indices such as [5, 11, 17]; got "
                                f"{value!r}.") from None


def rotary_edits(info: ModelInfo, layers: Any = None) -> list[RotaryEdit]:
    """`RotaryEdit`s for `layers` (default: every RoPE layer), validated against the model's facts.

    layers: None, a LayerRange (or "9:18", stop exclusive), or explicit layer indices."""
    with_rope = rope_layers(info)
    layers = _layer_choice(layers)
    if layers is None:
        if not with_rope:
            raise InterventionError(
                f"{info.name} has no RoPE layer (every layer is "
                f"{info.layers[0].positional.value if info.layers else '?'}), so there is nothing to disable. "
                f"disable_rope applies to RoPE models; a NoPE model is already its own NoPE ablation."
            )
        return [RotaryEdit(layer) for layer in with_rope]
    if isinstance(layers, LayerRange):
        chosen = layers.indices(info.n_layers, info.name)
    else:
        chosen = list(layers)
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


@register
@dataclass(frozen=True)
class DisableRope(Intervention):
    """The identity rotation in the chosen layers (a NoPE ablation; see the module docstring)."""

    name: ClassVar[str] = "disable_rope"
    summary: ClassVar[str] = "identity rotation in all or chosen RoPE layers (NoPE ablation)"

    layers: LayerRange | Sequence[int] | range | int | str | None = field(  # stored: LayerRange / index tuple
        default=None, metadata={"help": "none = every RoPE layer; START:STOP (stop exclusive) or indices 5,11,17"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _layer_choice(self.layers))

    def edits(self, access: ModelAccess) -> list[Edit]:
        return list(rotary_edits(access.info, self.layers))

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        return {"layers": layer_range_of([e.layer for e in self.edits(access)])}


def disable_rope(model: Any = None, layers: Any = None) -> DisableRope | Bound:
    """`DisableRope(layers)` bound to `model` (a ModelAccess): a context manager yielding the access.

        with posprobe.interventions.disable_rope(access) as nope:
            ablated = posprobe.scan(nope, probes=["implicit_position"])

    model None gives the unbound spec; a model name raises (an intervention never loads a model of its own).
    """
    spec = DisableRope(layers=layers)
    return spec if model is None else spec.bind(model)


__all__ = ["DisableRope", "disable_rope", "rope_layers", "rotary_edits"]
