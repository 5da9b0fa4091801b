"""posprobe's own deprecated calls fail the test run (tests/conftest.py); posprobe calls transformers' current API."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import posprobe
from posprobe.adapters._compat import cache_kwargs

_FAKE = os.path.join(os.path.dirname(posprobe.__file__), "_deprecation_probe.py")


def _run_as_posprobe(source: str, namespace: dict) -> None:
    exec(compile(source, _FAKE, "exec"), namespace)


def test_a_deprecation_raised_from_posprobe_code_is_an_error():
    with pytest.raises(FutureWarning, match="posprobe called a deprecated API"):
        _run_as_posprobe("warnings.warn('old kwarg', FutureWarning)", {"warnings": warnings})


def test_a_deprecation_reached_through_a_library_from_posprobe_is_an_error(tiny_rope):
    """transformers' renamed-kwarg warning, attributed by transformers to torch's Module.__call__, still counts."""
    from transformers import DynamicCache

    model = tiny_rope.model
    ns = {"model": model, "ids": torch.tensor([[1, 2, 3]]), "DynamicCache": DynamicCache}
    if "cache" not in cache_kwargs(model, None):
        pytest.skip("this transformers has no `cache` keyword yet; past_key_values is current")
    with pytest.raises(FutureWarning, match="past_key_values"):
        _run_as_posprobe("model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)", ns)


def test_deprecations_from_tests_themselves_stay_warnings():
    with pytest.warns(FutureWarning):
        # stacklevel=1 (the default, written out): the warning is attributed to this test's own frame, the case checked
        warnings.warn("a test's own call", FutureWarning, stacklevel=1)


def test_kv_cached_greedy_uses_the_current_keyword(tiny_rope):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = tiny_rope.greedy(tiny_rope.encode("the cat sat on the"), 3)
    assert out.shape == (1, 3)
