"""Interventions: frozen specs applied by whoever runs the model, restored exactly on exit (docs/interventions.md).

Owns the public intervention names. The protocol (`Intervention`, `LayerRange`, the registry) lives in `spec.py`;
each intervention lives in its own module and registers itself there. Built-in registrations, in one block:
"""

from posprobe.interventions.disable_rope import (
    DisableRope,
    disable_rope,
    rope_layers,
    rotary_edits,
)
from posprobe.interventions.found_in_the_middle import (
    FoundInTheMiddle,
    FoundInTheMiddleConfig,
    found_in_the_middle,
)
from posprobe.interventions.mask_heads import MaskHeads, mask_heads, mask_heads_edits
from posprobe.interventions.positional_dimension import (
    PositionalDimension,
    find_positional_dimensions,
    positional_dimension,
    scale_dimension,
)
from posprobe.interventions.spec import (
    Bound,
    Intervention,
    LayerRange,
    get_class,
    list_interventions,
    parameters,
    parse,
    register,
)


def get_intervention(name: str, model: object = None, **settings: object) -> object:
    """The intervention `name` with its default settings (keyword settings override them); bound to `model` when
    one (a ModelAccess) is given. Same as `parse(name)` / `get_class(name).build(**settings)`."""
    spec = get_class(name).build(**settings)
    return spec if model is None else spec.bind(model)


__all__ = ["Bound", "DisableRope", "FoundInTheMiddle", "FoundInTheMiddleConfig", "Intervention", "LayerRange",
           "MaskHeads", "PositionalDimension", "disable_rope", "find_positional_dimensions", "found_in_the_middle",
           "get_class", "get_intervention", "list_interventions", "mask_heads", "mask_heads_edits", "parameters",
           "parse", "positional_dimension", "register", "rope_layers", "rotary_edits", "scale_dimension"]
