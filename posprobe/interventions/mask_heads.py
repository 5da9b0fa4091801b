"""Head masking: chosen heads attend uniformly (docs/interventions.md; the ablation of Wu et al. 2024).

Owns the `MaskHeads(heads=...)` intervention spec (registered as "mask_heads"), `mask_heads(access, heads)` (the spec
bound to an access: a context manager that yields it with the heads masked) and `mask_heads_edits(info, heads)` (the
underlying `AttentionEdit`s, for `access.run(..., edits=...)` or `access.greedy(..., edits=...)`). A masked head's
attention probabilities are replaced by the uniform distribution over the keys its query can see: the causal prefix,
cut to the layer's sliding window where it has one. Its value vectors and output projection are untouched, so the head
still writes, but it no longer selects (Wu et al. mask retrieval heads this way and needle retrieval fails). Leaving
the block removes the edits; the model is unchanged.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from torch import Tensor

from posprobe.access import (
    AttentionEdit,
    Edit,
    EditContext,
    ModelAccess,
    ModelInfo,
    causal_key_mask,
)
from posprobe.errors import InterventionError
from posprobe.interventions.spec import Bound, Intervention, register


class UniformHeads:
    """The probs-stage edit function: rows of `heads` become uniform over the visible keys (window respected)."""

    def __init__(self, layer: int, heads: tuple[int, ...], sliding_window: int | None) -> None:
        self.layer, self.heads, self.sliding_window = layer, heads, sliding_window

    def __call__(self, probs: Tensor, ctx: EditContext) -> Tensor:
        allowed = causal_key_mask(ctx.query_index.to(probs.device), ctx.n_keys, self.sliding_window)
        uniform = allowed.to(probs.dtype) / allowed.sum(-1, keepdim=True).to(probs.dtype)  # [cq, nk]
        out = probs.clone()
        out[:, list(self.heads)] = uniform
        return out

    def __repr__(self) -> str:
        return f"UniformHeads(layer={self.layer}, heads={self.heads}, sliding_window={self.sliding_window})"


def _normalise(info: ModelInfo, heads: Any) -> dict[int, tuple[int, ...]]:
    """(layer, head) pairs (or their text) -> {layer: sorted heads}, validated against the model's shape."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in _parse_heads(heads):
        if not 0 <= layer < info.n_layers or not 0 <= head < info.n_heads:
            raise InterventionError(f"Head ({layer}, {head}) does not exist in {info.name}: it has layers "
                                    f"0..{info.n_layers - 1} and query heads 0..{info.n_heads - 1} per layer.")
        by_layer.setdefault(layer, []).append(head)
    return {layer: tuple(hs) for layer, hs in sorted(by_layer.items())}


def mask_heads_edits(info: ModelInfo, heads: Iterable[Any]) -> list[AttentionEdit]:
    """One probs-stage `AttentionEdit` per layer that makes the given (layer, head) pairs attend uniformly."""
    return [AttentionEdit(layer, UniformHeads(layer, hs, info.layers[layer].sliding_window), stage="probs")
            for layer, hs in _normalise(info, heads).items()]


def _parse_heads(value: Any) -> tuple[tuple[int, int], ...]:
    """Text "L5H1,L11H2" (or "5.1,11.2") or (layer, head) pairs -> sorted unique pairs (range checked per model)."""
    if value is None:
        return ()
    if isinstance(value, str):
        pairs = []
        for item in (x.strip() for x in value.split(",") if x.strip()):
            match = re.fullmatch(r"[Ll](\d+)[Hh](\d+)|(\d+)\.(\d+)", item)
            if match is None:
                raise InterventionError(f"Cannot read head {item!r}: write heads as L<layer>H<head>, e.g. "
                                        f"heads=L5H1,L11H2.")
            groups = [g for g in match.groups() if g is not None]
            pairs.append((int(groups[0]), int(groups[1])))
        value = pairs
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise InterventionError(f"heads must be (layer, head) pairs, e.g. [(5, 0), (11, 3)], or text \"L5H0,L11H3\"; "
                                f"got {value!r}.")
    out = set()
    for pair in value:
        try:
            layer, head = pair
        except (TypeError, ValueError):
            raise InterventionError(f"Each head must be a (layer, head) pair of integers; got {pair!r}. Write "
                                    f"heads as e.g. [(5, 0), (11, 3)].") from None
        if isinstance(layer, bool) or isinstance(head, bool) or not isinstance(layer, numbers.Integral) \
                or not isinstance(head, numbers.Integral) or layer < 0 or head < 0:
            raise InterventionError(f"Each head must be a (layer, head) pair of non-negative integers; got {pair!r}.")
        out.add((int(layer), int(head)))
    return tuple(sorted(out))


@register
@dataclass(frozen=True)
class MaskHeads(Intervention):
    """Chosen heads attend uniformly over the keys they can see (see the module docstring)."""

    name: ClassVar[str] = "mask_heads"
    summary: ClassVar[str] = "chosen heads attend uniformly over their visible keys (Wu et al. 2024 ablation)"

    heads: Sequence[Any] | str | None = field(  # stored as sorted (layer, head) pairs
        default=(), metadata={"help": "(layer, head) pairs; text L5H1,L11H2; none = no head (a no-op)"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _parse_heads(self.heads))

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """The heads as sorted (layer, head) pairs (what `heads` holds after construction)."""
        return cast(tuple[tuple[int, int], ...], self.heads)

    def edits(self, access: ModelAccess) -> list[Edit]:
        return list(mask_heads_edits(access.info, self.pairs))

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        return {"heads": [f"L{layer}H{head}" for layer, head in self.pairs]}

    def __str__(self) -> str:
        return self.name + (":heads=" + ",".join(f"L{l}H{h}" for l, h in self.pairs) if self.pairs else "")


def mask_heads(model: Any, heads: Sequence[Any] | str | None) -> MaskHeads | Bound:
    """`MaskHeads(heads)` bound to `model` (a ModelAccess): a context manager yielding the access.

        with mask_heads(access, [(11, 2), (5, 0)]) as masked:
            masked.greedy(ids, 8)

    model None gives the unbound spec (for `evaluate_positions(model, intervention=...)`); a model name raises:
    the intervention never loads a model of its own.
    """
    spec = MaskHeads(heads=heads)
    return spec if model is None else spec.bind(model)


__all__ = ["MaskHeads", "UniformHeads", "mask_heads", "mask_heads_edits"]
