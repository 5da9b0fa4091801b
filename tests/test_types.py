"""The jaxtyping + beartype import hook is active in the test run: a wrong shape/dtype fails loudly."""

from __future__ import annotations

import pytest
import torch

from posprobe.access import causal_key_mask


def test_shape_annotations_are_checked_at_runtime():
    assert causal_key_mask(torch.arange(4), 4, None).shape == (4, 4)
    with pytest.raises(Exception, match="(?i)type-check|jaxtyping|beartype|violat"):
        causal_key_mask(torch.arange(4.0), 4, None)  # float query index violates Int[Tensor, " q"]
