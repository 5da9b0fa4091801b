"""Interventions: context managers that edit a model through the access interface and restore it exactly.

Owns the public intervention names (METRICS.md section 7). Each intervention lives in its own module.
"""

from posprobe.interventions.disable_rope import disable_rope, rope_layers, rotary_edits
from posprobe.interventions.mask_heads import mask_heads, mask_heads_edits
