"""Semantic shape aliases (jaxtyping) used in signatures; checked at runtime in the test run only.

Owns the vocabulary of tensor shapes: b = batch, H = query heads, G = KV heads, q = query positions,
k = key positions, n = sequence, d = head dim, D = model dim, V = vocabulary.
"""

from __future__ import annotations

from jaxtyping import Bool, Float, Int
from torch import Tensor

Pattern = Float[Tensor, "b H q k"]  # attention probabilities, rows sum to 1
Scores = Float[Tensor, "b H q k"]  # pre-softmax logits
QueryStates = Float[Tensor, "b H n d"]
KeyStates = Float[Tensor, "b G n d"]
Resid = Float[Tensor, "b n D"]
TokenIds = Int[Tensor, "b n"]
PosIds = Int[Tensor, "b n"]
QueryIndex = Int[Tensor, " q"]
KeyMask = Bool[Tensor, "q k"]

__all__ = ["KeyMask", "KeyStates", "Pattern", "PosIds", "QueryIndex", "QueryStates", "Resid", "Scores", "TokenIds"]
