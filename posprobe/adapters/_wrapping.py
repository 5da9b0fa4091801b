"""Helpers shared by the adapters that wrap a model through another library (TransformerLens, nnsight).

Owns two things those adapters need to keep ARCHITECTURE.md's promise that the user's model is left as it was found:
a private copy of an HF model that shares its weights (libraries that rewire a model in place get the copy), and the
weights hash the HF adapter computes, so a scan's provenance names the same weights whichever backend produced it.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
from torch import Tensor, nn


def private_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree (modules, config, buffers) sharing its parameter tensors (no weight memory).

    TransformerLens' `boot_transformers(hf_model=...)` replaces submodules and switches attention in place; nnsight
    installs per-instance `forward` wrappers on every module. Giving them this copy leaves the user's object intact.
    """
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def state_dict_hash(state_dict: dict[str, Tensor]) -> str:
    """blake2b-96 over sorted parameter names and raw bytes (the digest of every adapter's `weights_hash`). Each
    tensor is hashed through a zero-copy numpy view (`.tobytes()` would copy it: +671 MB for Gemma 3's embedding)."""
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())  # buffer, no copy
    return digest.hexdigest()
