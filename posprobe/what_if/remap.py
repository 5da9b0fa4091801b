"""Position remapping and masking what-ifs applied at the attention logits: STRING, Self-Extend, StreamingLLM
(sink + window), LM-Infinite (Lambda mask + distance cap). Definitions: docs/interventions.md.

Owns one engine, `PairwiseAttention`: an `AttentionEdit(stage="scores")` per touched layer whose function gets the
layer's rotated q and k (`EditContext.query/key`, HF adapter) and, where the method says so, replaces the logit of
(query i, key j) by the logit at another relative position, computed by rotating the already-rotated q by
delta_q(i) and k by delta_k(j) (RoPE composes: R(a) R(p) = R(p + a)) with the frequencies the layer uses now
(`current_inv_freq`: the model's, or those of a RoPE-rescaling what-if applied on top). Masks set logits to -inf,
so their probabilities are exactly 0. The logits of the pairs a method leaves alone are the model's own. (Methods
that change every logit of a query or head alike, Ms-PoE and log-n, edit q/k instead: `posprobe.what_if.query_key`.)

With d = p_i - p_j (positions, not indices) and L the native length (`max_position_embeddings`):
- STRING (An et al. 2024): d' = d for d < S, else d - S + W (query shifted by W - S). Paper: S = L / 3, W = 128.
- Self-Extend (Jin et al. 2024): d' = d for d < W (neighbour window), else (floor(p_i / G) + W - floor(W / G)) -
  floor(p_j / G) (grouped positions), one softmax over the merged logits.
- StreamingLLM (Xiao et al. 2024): keys j < n_sink or d < window; positions as in the rolling cache (a sink key's
  distance is min(p_i, n_sink + window - 1) - p_j), or the original ones with `positions="original"`.
- LM-Infinite (Han et al. 2024): keys j < n_global or d < n_local (the Lambda mask), distances capped at `cap`.
These run the layer's attention eagerly, in chunks of queries (`query_chunk`: rows such that one chunk's [b, H,
rows, n] logits and their temporaries stay under `SCORE_CHUNK_BYTES`), so memory is O(rows x n) per layer, not
O(n^2); the values are those of the whole-matrix computation (tests/what_if/test_remap.py checks chunked ==
unchunked). Every query's logits depend only on its own position and the keys, so any chunking gives the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from posprobe.access import AttentionEdit, EditContext, ModelAccess, expand_kv
from posprobe.errors import InterventionError
from posprobe.interventions.spec import register
from posprobe.what_if.base import (
    WhatIf,
    current_inv_freq,
    key_positions,
    native_length,
    rotary_offset,
    rotate,
)

# Bytes one query chunk of a layer's edited attention may take: its float32 logits, the remapped logits, their merge,
# the int64 distance matrix, masks and probabilities, ~32 bytes per (head, query, key) in all.
SCORE_CHUNK_BYTES = 256 * 2**20
BYTES_PER_PAIR = 32


@dataclass
class Plan:
    """What a method does to the logits of one call. Shapes broadcast to [b, H, nq, nk] (deltas: [b, H|1, n])."""

    remap: Tensor | None = None  # bool: pairs whose logit is recomputed at the remapped positions
    delta_q: Tensor | float | None = None  # position shift of each query (positions, may be fractional)
    delta_k: Tensor | None = None  # position shift of each key
    keep: Tensor | None = None  # bool: pairs that stay visible (None: all the model allows)


@dataclass(frozen=True)
class PairwiseAttention(WhatIf):
    """Base of the what-ifs that change (query, key) logits: subclasses implement `plan`."""

    def plan(self, access: ModelAccess, ctx: EditContext, pos_q: Tensor, pos_k: Tensor) -> Plan:
        """The method for queries at positions pos_q [b, nq] and keys at pos_k [b, nk] (long)."""
        raise NotImplementedError

    def context_limit(self, access: ModelAccess) -> int | None:
        return None  # the method is the experiment: no length limit while applied

    def layer_edits(self, access: ModelAccess, layers: list[int]) -> list[Any]:
        return [AttentionEdit(layer=layer, fn=_EditFunction(self, access, layer), stage="scores") for layer in layers]

    def logits(self, access: ModelAccess, scores: Tensor, ctx: EditContext) -> Tensor:
        query, key = _query_key(self.name, ctx)
        q = query[:, :, ctx.query_index - (ctx.n_keys - query.shape[2])]  # the rows of this call / chunk
        n_heads = q.shape[1]
        pos_k = key_positions(ctx, q.shape[0], q.device)
        pos_q = pos_k[:, ctx.query_index]
        plan = self.plan(access, ctx, pos_q, pos_k)
        out = scores
        span = None if plan.remap is None else _remapped_keys(plan.remap, scores.shape[-1])
        if plan.remap is not None and span is not None:
            # only the keys [lo, hi) where some pair is remapped are recomputed (STRING: the far keys of a chunk)
            lo, hi = span
            inv_freq = current_inv_freq(access, ctx.layer).to(q.device)
            offset = rotary_offset(access, ctx.layer)
            qb = q.to(scores.dtype)
            if plan.delta_q is not None:
                dq = plan.delta_q if isinstance(plan.delta_q, Tensor) else torch.full_like(pos_q, plan.delta_q,
                                                                                            dtype=scores.dtype)
                qb = rotate(qb, _heads(dq, q.shape[0])[..., None].to(scores.dtype) * inv_freq, offset)
            kb = expand_kv(key[:, :, lo:hi], n_heads).to(scores.dtype)
            if plan.delta_k is not None:
                delta_k = _heads(plan.delta_k, q.shape[0])[..., lo:hi]
                kb = rotate(kb, delta_k[..., None].to(scores.dtype) * inv_freq, offset)
            scale = ctx.scale if ctx.scale is not None else access.info.attn_scale
            remapped = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale)
            if ctx.softcap is not None:
                remapped = torch.tanh(remapped / ctx.softcap) * ctx.softcap
            part = scores[..., lo:hi]  # edited in place (the adapter hands each call fresh logits)
            remap = plan.remap[..., lo:hi] if plan.remap.shape[-1] > 1 else plan.remap
            part.copy_(torch.where(remap & (part > float("-inf")), remapped, part))
        if plan.keep is not None:
            out = out.masked_fill(~plan.keep, float("-inf"))
        return out


class _EditFunction:
    """The scores-stage function of one layer (a class so edits print and compare sensibly)."""

    def __init__(self, spec: PairwiseAttention, access: ModelAccess, layer: int) -> None:
        self.spec, self.access, self.layer = spec, access, layer

    def __call__(self, scores: Tensor, ctx: EditContext) -> Tensor:
        return self.spec.logits(self.access, scores, ctx)

    def query_chunk(self, batch: int, heads: int, n_keys: int) -> int:
        """Query rows per chunk (the HF adapter computes the layer's attention that many queries at a time)."""
        return max(1, SCORE_CHUNK_BYTES // (BYTES_PER_PAIR * batch * heads * max(n_keys, 1)))

    def __repr__(self) -> str:
        return f"{self.spec} on layer {self.layer}"


def _query_key(name: str, ctx: EditContext) -> tuple[Tensor, Tensor]:
    """The layer's rotated q [b, H, cq, d] and k [b, G, nk, d], which only some adapters hand to attention edits."""
    if ctx.query is None or ctx.key is None:
        raise InterventionError(f"{name}: this adapter does not hand q/k to attention edits (EditContext."
                                f"query/key); the position what-ifs run on the HF backend.")
    return ctx.query, ctx.key


def _remapped_keys(remap: Tensor, n_keys: int) -> tuple[int, int] | None:
    """[lo, hi): the keys that some (query, head) pair of `remap` (bool, broadcasting to [b, H, cq, nk]) remaps;
    None when it remaps none."""
    if remap.shape[-1] == 1:
        return (0, n_keys) if bool(remap.any()) else None
    columns = torch.nonzero(remap.flatten(0, -2).any(0))[:, 0]
    return (int(columns[0]), int(columns[-1]) + 1) if len(columns) else None


def _heads(x: Tensor, batch: int) -> Tensor:
    """[b, n] -> [b, 1, n]; [b, H, n] unchanged."""
    return x[:, None] if x.dim() == 2 else x


def _distance(pos_q: Tensor, pos_k: Tensor) -> Tensor:
    return (pos_q[:, :, None] - pos_k[:, None, :])[:, None]  # [b, 1, nq, nk]


def _positive_int(name: str, label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InterventionError(f"{name}: {label} must be a positive integer; got {value!r}.")


# ---------------------------------------------------------------------------------------------------------------
# Remapping


@register
@dataclass(frozen=True)
class STRING(PairwiseAttention):
    """STRING (An et al. 2024): distances >= shift S become d - S + W, re-using well-trained short distances."""

    name: ClassVar[str] = "string"
    summary: ClassVar[str] = "STRING: distances >= shift mapped to d - shift + window (paper: shift L/3, window 128)"

    shift: int | None = field(default=None, metadata={"help": "S; none = native length // 3 (paper)"})
    window: int = field(default=128, metadata={"help": "W, local window kept exact (paper: 128)"})

    def offsets(self, access: ModelAccess) -> tuple[int, int]:
        native = native_length(access)
        if self.shift is not None:
            shift = self.shift
        elif native is not None:
            shift = native // 3
        else:
            raise InterventionError("string: the model reports no max_position_embeddings; give shift=S.")
        _positive_int(self.name, "shift", shift)
        _positive_int(self.name, "window", self.window)
        if self.window >= shift:
            raise InterventionError(f"string: window ({self.window}) must be smaller than shift ({shift}), or the "
                                    f"shifted distances d - S + W would be longer than the original ones.")
        return shift, self.window

    def plan(self, access: ModelAccess, ctx: EditContext, pos_q: Tensor, pos_k: Tensor) -> Plan:
        shift, window = self.offsets(access)
        return Plan(remap=_distance(pos_q, pos_k) >= shift, delta_q=float(window - shift))

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        shift, window = self.offsets(access)
        return {**super().resolved(access), "shift": shift, "window": window}


@register
@dataclass(frozen=True)
class SelfExtend(PairwiseAttention):
    """Self-Extend (Jin et al. 2024): grouped positions floor(p / G) beyond a neighbour window W."""

    name: ClassVar[str] = "self_extend"
    summary: ClassVar[str] = "Self-Extend: exact neighbour attention within window, grouped positions p // group beyond"

    group: int = field(default=8, metadata={"help": "G, group size (positions floor(p / G) beyond the window)"})
    window: int = field(default=1024, metadata={"help": "W, neighbour window with exact positions"})

    def plan(self, access: ModelAccess, ctx: EditContext, pos_q: Tensor, pos_k: Tensor) -> Plan:
        _positive_int(self.name, "group", self.group)
        _positive_int(self.name, "window", self.window)
        g, w = self.group, self.window
        grouped_q = torch.div(pos_q, g, rounding_mode="floor") + (w - w // g)
        grouped_k = torch.div(pos_k, g, rounding_mode="floor")
        return Plan(remap=_distance(pos_q, pos_k) >= w, delta_q=grouped_q - pos_q, delta_k=grouped_k - pos_k)

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        native = native_length(access)
        # longest n whose grouped distances stay below the native length: (n - 1) // G + W - W // G < L
        reach = None if native is None else (native - 1 - self.window + self.window // self.group) * self.group + 1
        return {**super().resolved(access), "trained_reach": reach}


# ---------------------------------------------------------------------------------------------------------------
# Masks


@register
@dataclass(frozen=True)
class StreamingLLM(PairwiseAttention):
    """StreamingLLM (Xiao et al. 2024): attention sinks (the first n_sink tokens) + a window of recent tokens."""

    name: ClassVar[str] = "streaming_llm"
    summary: ClassVar[str] = "StreamingLLM: n_sink first tokens + recent window; positions as in the rolling cache"
    needs_rope: ClassVar[bool] = False

    n_sink: int = field(default=4, metadata={"help": "attention-sink tokens kept (paper: 4)"})
    window: int | None = field(default=None, metadata={"help": "recent tokens kept (query included); none = native "
                                                                "length - n_sink (a cache of the native size)"})
    positions: Literal["cache", "original"] = field(default="cache", metadata={"help": "cache: positions within "
                                                                               "the rolling cache (paper); original"})

    def sizes(self, access: ModelAccess) -> tuple[int, int]:
        native = native_length(access)
        if self.window is not None:
            window = self.window
        elif native is not None:
            window = native - self.n_sink
        else:
            raise InterventionError("streaming_llm: the model reports no max_position_embeddings; give window=.")
        _positive_int(self.name, "window", window)
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise InterventionError(f"streaming_llm: n_sink must be a non-negative integer; got {self.n_sink!r}.")
        if self.positions not in ("cache", "original"):
            raise InterventionError(f"streaming_llm: positions must be 'cache' or 'original'; got {self.positions!r}.")
        return self.n_sink, window

    def plan(self, access: ModelAccess, ctx: EditContext, pos_q: Tensor, pos_k: Tensor) -> Plan:
        n_sink, window = self.sizes(access)
        d = _distance(pos_q, pos_k)
        sink = (pos_k < n_sink)[:, None, None, :]
        keep = sink | (d < window)
        if self.positions == "original" or not access.info.layers[ctx.layer].has_rope:
            return Plan(keep=keep)
        cache_q = torch.clamp(pos_q, max=n_sink + window - 1)
        return Plan(remap=sink & (d >= window), delta_q=cache_q - pos_q, keep=keep)

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        n_sink, window = self.sizes(access)
        return {**super().resolved(access), "n_sink": n_sink, "window": window}


@register
@dataclass(frozen=True)
class LMInfinite(PairwiseAttention):
    """LM-Infinite (Han et al. 2024): Lambda mask (n_global first tokens + n_local recent) + distance cap."""

    name: ClassVar[str] = "lm_infinite"
    summary: ClassVar[str] = "LM-Infinite: Lambda mask (global first tokens + local window), distances capped"
    needs_rope: ClassVar[bool] = False

    n_global: int = field(default=10, metadata={"help": "first tokens every query sees"})
    n_local: int | None = field(default=None, metadata={"help": "recent tokens (query included); none = native"})
    cap: int | None = field(default=None, metadata={"help": "distance limit; none = native length; 0 = no cap"})

    def sizes(self, access: ModelAccess) -> tuple[int, int, int | None]:
        native = native_length(access)
        local = self.n_local if self.n_local is not None else native
        cap = native if self.cap is None else (self.cap or None)
        if local is None or (native is None and self.cap is None):  # no native length and n_local or cap missing
            raise InterventionError("lm_infinite: the model reports no max_position_embeddings; give n_local, cap.")
        _positive_int(self.name, "n_local", local)
        if isinstance(self.n_global, bool) or not isinstance(self.n_global, int) or self.n_global < 0:
            raise InterventionError(f"lm_infinite: n_global must be a non-negative integer; got {self.n_global!r}.")
        return self.n_global, local, cap

    def plan(self, access: ModelAccess, ctx: EditContext, pos_q: Tensor, pos_k: Tensor) -> Plan:
        n_global, local, cap = self.sizes(access)
        d = _distance(pos_q, pos_k)
        keep = (pos_k < n_global)[:, None, None, :] | (d < local)
        if cap is None or not access.info.layers[ctx.layer].has_rope:
            return Plan(keep=keep)
        # d' = min(d, cap): the query at position cap, the key at 0, for every pair farther than cap
        return Plan(remap=d > cap, delta_q=(cap - pos_q).float(), delta_k=(-pos_k).float(), keep=keep)

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        n_global, local, cap = self.sizes(access)
        return {**super().resolved(access), "n_global": n_global, "n_local": local, "cap": cap}
