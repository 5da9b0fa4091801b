"""Interventions: context managers that edit a model through the access interface and restore it exactly.

Owns the public intervention names (METRICS.md section 7). Each intervention lives in its own module.
"""

from posprobe.interventions.disable_rope import disable_rope, rope_layers, rotary_edits
from posprobe.interventions.mask_heads import mask_heads, mask_heads_edits
from posprobe.interventions.found_in_the_middle import FoundInTheMiddle, FoundInTheMiddleConfig, found_in_the_middle
from posprobe.interventions.positional_dimension import (
    find_positional_dimensions,
    positional_dimension,
    scale_dimension,
)

# --- interventions accepted by name (those with a sensible default configuration) --------------------------------
_BY_NAME = {"found_in_the_middle": found_in_the_middle, "positional_dimension": positional_dimension}


def list_interventions() -> list[str]:
    """Names `get_intervention` accepts."""
    return sorted(_BY_NAME)


def get_intervention(name: str, model: object = None, **options: object) -> object:
    """The intervention `name` with its default configuration (keyword options override it), for `model`."""
    from posprobe.errors import UnknownNameError

    if name not in _BY_NAME:
        raise UnknownNameError("intervention", name, _BY_NAME, hint="mask_heads needs heads: call it directly.")
    return _BY_NAME[name](model, **options)
