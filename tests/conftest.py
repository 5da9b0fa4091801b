"""Shared fixtures: seeded tiny models (no download) and, in the `real_model` tier, the embedded Gemma 3 270M.

Run everything: `pytest`. Skip the real-model tier locally: `pytest -m "not real_model"`.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_rope():
    from posprobe.models import load_model

    return load_model("tiny-rope")


@pytest.fixture(scope="session")
def tiny_nope():
    from posprobe.models import load_model

    return load_model("tiny-nope")


@pytest.fixture(scope="session")
def tiny_absolute():
    from posprobe.models import load_model

    return load_model("tiny-absolute")


@pytest.fixture(scope="session")
def gemma():
    """The embedded default model (converted once into the posprobe cache)."""
    from posprobe.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def gemma_quick_scan(gemma):
    """One quick scan of Gemma 3 270M with the streaming head probes, shared by real-model tests."""
    import posprobe

    return posprobe.scan(gemma, probes=["head_basics", "attention_entropy"], budget="quick", progress=False)
