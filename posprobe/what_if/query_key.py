"""What-ifs that edit each layer's rotated queries and keys before the attention kernel: Ms-PoE (per-head position
scaling) and log-n query temperature. Definitions: docs/interventions.md ("Context-extension what-ifs").

Owns `QueryKeyWhatIf`, an `AttentionEdit(stage="qk")` per touched layer. Unlike the pairwise engine
(`posprobe.what_if.remap`), which recomputes logits eagerly in query chunks, these methods change every logit of a
query (or of a head) the same way, so they can be written as new q/k: RoPE composes (R(a) R(p) = R(p + a)), so a
query rotated at p and then by delta(p) is the query rotated at p + delta(p); a per-query factor multiplies q. The
layer then runs through the model's own kernel (SDPA on CPU / GPU), at the cost of a plain pass, and every probe
reads the pattern of the edited q/k.

With p a position and L the native length (`max_position_embeddings`):
- Ms-PoE (Zhang et al. 2024): head h sees positions p / r_h, r = min + (max - min) * k / H for k = 0..H-1 (1.2 to
  1.8); the heads take ratios in the order of the official code: by the outlier score (minus the share of keys
  getting more than 3x the mean attention from the call's last query, pre-rotary q/k, 1/sqrt(d)), or
  `order="index"` (its "normal" head type). Keys are rotated per query head, so grouped-query keys are expanded to
  one head per query head for the layer.
- log-n temperature (Chiang & Cholak 2022; Qwen's logn-attn): q_i * max(1, ln(p_i + 1) / ln L).
tests/what_if/test_remap.py checks both against a naive eager reference written from these formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from posprobe.access import AttentionEdit, EditContext, ModelAccess, expand_kv
from posprobe.errors import InterventionError
from posprobe.interventions.spec import register
from posprobe.what_if.base import WhatIf, current_inv_freq, key_positions, native_length, rotary_offset, rotate


@dataclass(frozen=True)
class QueryKeyWhatIf(WhatIf):
    """Base of the what-ifs that replace a layer's rotated q / k: subclasses implement `edit`."""

    def edit(self, access: ModelAccess, q: Tensor, k: Tensor, ctx: EditContext, pos_q: Tensor,
             pos_k: Tensor) -> tuple[Tensor, Tensor]:
        """New (q [b, H, nq, d], k [b, G or H, nk, d]) for queries at positions pos_q [b, nq], keys at pos_k."""
        raise NotImplementedError

    def context_limit(self, access: ModelAccess) -> int | None:
        return None  # the method is the experiment: no length limit while applied

    def layer_edits(self, access: ModelAccess, layers: list[int]) -> list[Any]:
        return [AttentionEdit(layer=layer, fn=_QueryKeyFunction(self, access, layer), stage="qk") for layer in layers]


class _QueryKeyFunction:
    """The qk-stage function of one layer (a class so edits print and compare sensibly)."""

    def __init__(self, spec: QueryKeyWhatIf, access: ModelAccess, layer: int) -> None:
        self.spec, self.access, self.layer = spec, access, layer

    def __call__(self, qk: tuple[Tensor, Tensor], ctx: EditContext) -> tuple[Tensor, Tensor]:
        q, k = qk
        pos_k = key_positions(ctx, q.shape[0], q.device)
        return self.spec.edit(self.access, q, k, ctx, pos_k[:, ctx.query_index], pos_k)

    @property
    def prefill_chunks(self) -> bool:
        """Whether greedy decoding may prefill the prompt in chunks (HFAccess.greedy) with the values of one pass:
        not under Ms-PoE's outlier order, which ranks the heads by the call's last query (a chunk's last)."""
        return not (isinstance(self.spec, MsPoE) and self.spec.order == "outlier")

    def __repr__(self) -> str:
        return f"{self.spec} on layer {self.layer}"


def _rotated_by(x: Tensor, shift: Tensor, inv_freq: Tensor, offset: int) -> Tensor:
    """x rotated by `shift` [b, H, n] positions more, computed in float32 (or wider) and returned in x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return rotate(x.to(dtype), shift[..., None].to(dtype) * inv_freq.to(dtype), offset).to(x.dtype)


@register
@dataclass(frozen=True)
class MsPoE(QueryKeyWhatIf):
    """Ms-PoE (Zhang et al. 2024): per-head position scaling p / r_h, r_h in [ratio_min, ratio_max)."""

    name: ClassVar[str] = "ms_poe"
    summary: ClassVar[str] = "Ms-PoE: head h sees positions p / r_h, ratios 1.2..1.8 ordered by the outlier head score"

    ratio_min: float | int = field(default=1.2, metadata={"help": "smallest ratio"})
    ratio_max: float | int = field(default=1.8, metadata={"help": "ratio bound (r_k = min + (max - min) k / H)"})
    order: Literal["outlier", "index"] = field(default="outlier", metadata={"help": "outlier (head score, per "
                                                                            "pass) or index (the code's 'normal')"})

    def default_layers(self, access: ModelAccess) -> list[int]:
        return [i for i in super().default_layers(access) if i >= 2]  # the official apply_layers: 2..last

    def ratios(self, n_heads: int, device: torch.device) -> Tensor:
        if not 0 < float(self.ratio_min) <= float(self.ratio_max):
            raise InterventionError(f"ms_poe: need 0 < ratio_min <= ratio_max; got {self.ratio_min}, "
                                    f"{self.ratio_max}.")
        k = torch.arange(n_heads, device=device, dtype=torch.float32)
        return float(self.ratio_min) + (float(self.ratio_max) - float(self.ratio_min)) * k / n_heads

    def head_ratios(self, access: ModelAccess, q: Tensor, k: Tensor, pos_k: Tensor, layer: int) -> Tensor:
        """[b, H] ratio of every head: the ratio table indexed by the head order (as the official code does)."""
        b, n_heads = q.shape[:2]
        table = self.ratios(n_heads, q.device)
        if self.order == "index":
            order = (n_heads - 1 - torch.arange(n_heads, device=q.device))[None].expand(b, -1)
        elif self.order == "outlier":
            order = self.outlier_order(access, q, k, pos_k, layer)
        else:
            raise InterventionError(f"ms_poe: order must be 'outlier' or 'index'; got {self.order!r}.")
        return table[order]

    def outlier_order(self, access: ModelAccess, q: Tensor, k: Tensor, pos_k: Tensor, layer: int) -> Tensor:
        """argsort of -(share of keys above 3x the mean attention of the call's last query), pre-rotary q/k,
        1/sqrt(d)."""
        inv_freq = current_inv_freq(access, layer).to(q.device)
        offset = rotary_offset(access, layer)
        last = pos_k[:, -1:]  # the call's last query is its last key
        q_last = rotate(q[:, :, -1:].float(), -last[:, None, :, None].float() * inv_freq, offset)
        keys = rotate(expand_kv(k, q.shape[1]).float(), -pos_k[:, None, :, None].float() * inv_freq, offset)
        visible = pos_k <= last  # [b, nk]
        logits = torch.matmul(q_last, keys.transpose(-1, -2))[:, :, 0] / math.sqrt(q.shape[-1])  # [b, H, nk]
        probs = torch.softmax(logits.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        share = (probs > 3 * probs.mean(-1, keepdim=True)).float().mean(-1)
        return torch.argsort(-share, dim=-1, stable=True)

    def edit(self, access: ModelAccess, q: Tensor, k: Tensor, ctx: EditContext, pos_q: Tensor,
             pos_k: Tensor) -> tuple[Tensor, Tensor]:
        shrink = 1.0 / self.head_ratios(access, q, k, pos_k, ctx.layer)[..., None] - 1  # [b, H, 1]: p -> p / r
        inv_freq = current_inv_freq(access, ctx.layer).to(q.device)
        offset = rotary_offset(access, ctx.layer)
        q_new = _rotated_by(q, pos_q[:, None].float() * shrink, inv_freq, offset)
        k_new = _rotated_by(expand_kv(k, q.shape[1]), pos_k[:, None].float() * shrink, inv_freq, offset)
        return q_new, k_new


@register
@dataclass(frozen=True)
class LogNTemperature(QueryKeyWhatIf):
    """log-n attention temperature: q_i times max(1, ln(p_i + 1) / ln L) past the trained length L."""

    name: ClassVar[str] = "logn"
    summary: ClassVar[str] = "log-n scaling: queries beyond the trained length times ln(p + 1) / ln(L)"
    needs_rope: ClassVar[bool] = False

    trained_length: int | None = field(default=None, metadata={"help": "L; none = the model's native length"})

    def length(self, access: ModelAccess) -> int:
        length = self.trained_length or native_length(access)
        if length is None or length < 2:
            raise InterventionError("logn: give trained_length (the model reports no max_position_embeddings).")
        return int(length)

    def edit(self, access: ModelAccess, q: Tensor, k: Tensor, ctx: EditContext, pos_q: Tensor,
             pos_k: Tensor) -> tuple[Tensor, Tensor]:
        scale = torch.clamp(torch.log(pos_q.double() + 1) / math.log(self.length(access)), min=1.0)
        return q * scale[:, None, :, None].to(q.dtype), k

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        return {**super().resolved(access), "trained_length": self.length(access)}
