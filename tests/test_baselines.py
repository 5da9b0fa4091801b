"""Random-init baselines: same shape as the reference, NoPE or RoPE in every layer, seeded, accept any model spec."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from posprobe.access import Positional
from posprobe.baselines import random_init_like
from posprobe.errors import UnknownNameError
from posprobe.testing import planted_info

SHAPE = ("n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model")


@pytest.fixture(scope="module")
def gemma_shape():
    """Gemma 3 270M's shape (18 layers, d_model 640, 4 query heads / 1 KV head of dim 256), without loading it."""
    info = planted_info(n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256, rope_theta=1e4)
    return dataclasses.replace(info, d_model=640, name="gemma-shaped")


@pytest.mark.parametrize("kind, positional", [("nope", Positional.NONE), ("rope", Positional.ROPE)])
def test_same_shape_and_positional_scheme(gemma_shape, kind, positional):
    access = random_init_like(gemma_shape, kind)
    info = access.info
    assert {f: getattr(info, f) for f in SHAPE} == {f: getattr(gemma_shape, f) for f in SHAPE}
    assert {layer.positional for layer in info.layers} == {positional}
    assert info.name == f"random-{kind}(gemma-shaped)"
    if kind == "rope":
        assert {layer.rope_theta for layer in info.layers} == {1e4}
    out = access.run(access.encode("a short check"), logits="last").logits
    assert out.shape == (1, 1, info.vocab_size) and torch.isfinite(out).all()


def test_seeded(tiny_rope):
    a = random_init_like(tiny_rope, "nope", seed=1)
    b = random_init_like(tiny_rope.info, "nope", seed=1)
    c = random_init_like("tiny-rope", "nope", seed=2)
    assert a.weights_hash() == b.weights_hash() != c.weights_hash()
    assert {f: getattr(a.info, f) for f in SHAPE} == {f: getattr(tiny_rope.info, f) for f in SHAPE}


def test_unknown_kind():
    with pytest.raises(UnknownNameError, match="nope"):
        random_init_like(planted_info(), "alibi")
