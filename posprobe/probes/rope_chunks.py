"""The RoPE chunk kernel shared by `rope_frequency` and `positional_heads` ("RoPE layout" in docs/probes/index.md).

Owns the one definition of the per-chunk logit contribution `c_k(i, j) = q~_i^(k) . k~_j^(k)` on post-rotary
vectors: `split_chunks` cuts a head vector into its `r/2` two-dimensional rotary chunks (half-split or interleaved,
as `LayerInfo.chunk_layout` says) plus, when `rotary_dim < head_dim` (partial rotary: GPT-NeoX, Pythia), one band of
the non-rotated dimensions (frequency 0, always the last band). On that split, `chunk_contributions` evaluates c_k for
all (query, key) pairs, `chunk_dot` for matched pairs, and `weighted_chunk_contributions` gives sum_j w_ij c_k(i,j)
exactly through linearity in the key. Summed over bands and multiplied by the attention scale, c_k is the model's
pre-softmax logit before masking and softcapping. Also: `chunk_norms`, per-chunk frequencies with RoPE scaling
(`effective_frequencies`), and the per-layer streaming reductions the two probes read (`layer_chunk_usage`: the
attention-weighted |c_k| of rope_frequency; `layer_long_range`: the long-distance signed c_k of positional_heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from posprobe.access import (
    ChunkLayout,
    LayerCapture,
    LayerInfo,
    causal_key_mask,
    grouped_matmul,
    query_key_range,
)
from posprobe.devices import accumulator_dtype
from posprobe.errors import ProbeError

NONROTARY = "nonrotary"  # band label of the non-rotated dimensions of a partial-rotary head
ROTARY = "rotary"


def n_bands(layer: LayerInfo, head_dim: int) -> int:
    """Number of bands: r/2 rotary chunks, plus one for the non-rotated dims when rotary_dim < head_dim."""
    return layer.n_chunks + (1 if has_nonrotary_band(layer, head_dim) else 0)


def has_nonrotary_band(layer: LayerInfo, head_dim: int) -> bool:
    return layer.has_rope and (layer.rotary_dim or 0) < head_dim


def _check_layer(layer: LayerInfo, head_dim: int) -> int:
    """The layer's rotary width r, once checked against a head of `head_dim` dims."""
    if not layer.has_rope:
        raise ProbeError(f"Layer {layer.index} has no RoPE ({layer.positional.value}); it has no rotary chunks. "
                         f"Skip it (the RoPE probes do so with a reason).")
    if layer.rotary_dim is None or layer.rotary_offset + layer.rotary_dim > head_dim or layer.rotary_dim % 2:
        raise ProbeError(f"Layer {layer.index} reports rotary_dim={layer.rotary_dim} for head_dim={head_dim}; "
                         f"it must be even and at most the head dim. Fix the model's LayerInfo "
                         f"(adapters/architectures.py).")
    return int(layer.rotary_dim)


def split_chunks(
    x: Float[Tensor, "*batch d"], layer: LayerInfo
) -> tuple[Float[Tensor, "*batch c 2"], Float[Tensor, "*batch rest"] | None]:
    """Split head vectors into rotary chunks [..., r/2, 2] (layout from `layer.chunk_layout`) and the non-rotated
    dims [..., d - r] (None when the whole head rotates). The chunks may be a view of x: do not modify them."""
    d = x.shape[-1]
    r = _check_layer(layer, d)
    a, b = layer.chunk_coordinates()
    offset = int(layer.rotary_offset)
    if offset + r > d or (a.size and int(max(a.max(), b.max())) >= offset + r):
        raise ProbeError(f"Chunk coordinates of layer {layer.index} exceed the rotated dims [{offset}, {offset + r}) "
                         f"of a {d}-dim head. Fix the model's LayerInfo (adapters/architectures.py).")
    half = r // 2  # both layouts are slices of the rotated dims (no gather): interleaved chunks are a view of x
    if layer.chunk_layout is ChunkLayout.INTERLEAVED:
        chunks = x[..., offset : offset + r].unflatten(-1, (half, 2))
    else:
        chunks = torch.stack((x[..., offset : offset + half], x[..., offset + half : offset + r]), dim=-1)
    if r == d:
        return chunks, None
    rest = x[..., r:] if offset == 0 else torch.cat((x[..., :offset], x[..., offset + r:]), dim=-1)
    return chunks, rest


def chunk_norms(x: Float[Tensor, "*batch d"], layer: LayerInfo) -> Float[Tensor, "*batch band"]:
    """||x^(k)||_2 per band (rotary chunks, then the non-rotated band when present).

    A chunk's norm is sqrt(a^2 + b^2) of its two coordinates, read as two strided views (no stacked copy; a
    `vector_norm` over a last axis of 2 was ~3x slower and differs from this by float64 rounding only)."""
    r = _check_layer(layer, x.shape[-1])
    offset, half = int(layer.rotary_offset), r // 2
    if layer.chunk_layout is ChunkLayout.INTERLEAVED:
        first, second = x[..., offset : offset + r : 2], x[..., offset + 1 : offset + r : 2]
    else:
        first, second = x[..., offset : offset + half], x[..., offset + half : offset + r]
    norms = (first * first).add_(second * second).sqrt_()
    rest = None if r == x.shape[-1] else (x[..., r:] if offset == 0 else torch.cat((x[..., :offset],
                                                                                   x[..., offset + r:]), dim=-1))
    if rest is not None:
        norms = torch.cat((norms, torch.linalg.vector_norm(rest, dim=-1, keepdim=True)), dim=-1)
    return norms


def chunk_contributions(
    q: Float[Tensor, "b h nq d"], k: Float[Tensor, "b h nk d"], layer: LayerInfo
) -> Float[Tensor, "b h band nq nk"]:
    """c_k(i, j) = q_i^(k) . k_j^(k) for every band k (post-rotary q and k, KV heads already expanded).

    Summed over bands and multiplied by the attention scale this is the model's pre-softmax logit (before masking
    and softcapping).
    """
    qc, qr = split_chunks(q, layer)
    kc, kr = split_chunks(k, layer)
    # [b, h, c, nq, 2] @ [b, h, c, 2, nk]: one small matmul per (batch, head, chunk)
    c = torch.matmul(qc.movedim(-2, 2), kc.movedim(-2, 2).transpose(-1, -2))
    if qr is not None and kr is not None:  # q and k have the same head dim: both or neither have the band
        c = torch.cat((c, torch.matmul(qr, kr.transpose(-1, -2)).unsqueeze(2)), dim=2)
    return c


def chunk_dot(x: Float[Tensor, "*batch d"], y: Float[Tensor, "*batch d"],
              layer: LayerInfo) -> Float[Tensor, "*batch band"]:
    """Per-band dot product of paired vectors: the same c_k as `chunk_contributions`, for matched (i, j) pairs."""
    xc, xr = split_chunks(x, layer)
    yc, yr = split_chunks(y, layer)
    out = (xc * yc).sum(-1)
    if xr is not None:
        out = torch.cat((out, (xr * yr).sum(-1, keepdim=True)), dim=-1)
    return out


def weighted_chunk_contributions(
    q: Float[Tensor, "b h nq d"], k: Float[Tensor, "b h nk d"], weights: Float[Tensor, "b h nq nk"], layer: LayerInfo
) -> Float[Tensor, "b h nq band"]:
    """sum_j w_ij c_k(i, j) per query and band, exactly, via linearity in the key: chunk_dot(q_i, sum_j w_ij k_j)."""
    return chunk_dot(q, torch.matmul(weights, k), layer)


def band_labels(layer: LayerInfo, head_dim: int) -> list[str]:
    return [ROTARY] * layer.n_chunks + ([NONROTARY] if has_nonrotary_band(layer, head_dim) else [])


def effective_frequencies(layer: LayerInfo, max_positions: int | None = None) -> tuple[np.ndarray, str]:
    """Per-chunk angular frequency after RoPE scaling, and the rope type it was computed for.

    Static scalings have closed forms: "linear" (w / factor), "llama3" (Llama 3.1 band-wise interpolation) and
    "yarn" (ramp between interpolation and extrapolation). Position-dependent scalings ("dynamic", "longrope") have
    no single frequency per chunk: NaN is returned and the probes report the base frequencies beside it.
    The probes never need these numbers for their sums: they read the rotated q/k the model itself produced.
    """
    base = layer.chunk_frequencies()
    scaling = layer.rope_scaling or {}
    rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
    factor = float(scaling.get("factor") or 1.0)
    if rope_type == "default":
        return base, rope_type
    if rope_type == "linear":
        return base / factor, rope_type
    if rope_type == "llama3":
        old = float(scaling.get("original_max_position_embeddings", 8192))
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / base
        smooth = np.clip((old / wavelen - low) / max(high - low, 1e-12), 0.0, 1.0)
        return (1 - smooth) * base / factor + smooth * base, rope_type
    if rope_type == "yarn":
        old = float(scaling.get("original_max_position_embeddings") or (max_positions or 0) / factor or 4096)
        fast, slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)
        if layer.rotary_dim is None or layer.rope_theta is None:
            raise ProbeError(f"Layer {layer.index} has yarn rope_scaling but no rotary_dim / rope_theta "
                             f"({layer.rotary_dim!r} / {layer.rope_theta!r}); its scaled frequencies are undefined. "
                             f"Fix the model's LayerInfo (adapters/architectures.py).")
        r, theta = float(layer.rotary_dim), float(layer.rope_theta)

        def correction_dim(rotations: float) -> float:
            return r * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(fast), correction_dim(slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, r - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(layer.n_chunks) - lo) / (hi - lo), 0.0, 1.0)
        extrapolate = 1.0 - ramp
        return base / factor * (1 - extrapolate) + base * extrapolate, rope_type
    return np.full_like(base, np.nan), rope_type


# ---------------------------------------------------------------------------------------------------------------
# Per-layer streaming reductions


def _wide(cap: LayerCapture) -> tuple[Tensor, Tensor]:
    """Post-rotary q [b,H,n,d] and k [b,G,n,d] (KV heads not expanded) in float32 or wider, converted once per layer
    (memoised on the capture: chunk products of bf16 / fp16 models in float32)."""
    if cap.q is None or cap.k is None:
        raise ProbeError(f"Layer {cap.layer}: the capture holds no post-rotary q/k. The RoPE probes need "
                         f"Tap.Q and Tap.K; request them in the probe's taps.")
    hit = cap.extras.get("rope_wide_qk")
    if hit is None:
        wide = torch.promote_types(cap.q.dtype, torch.float32)
        hit = cap.extras["rope_wide_qk"] = (cap.q.to(wide), cap.k.to(wide))
    return hit


def _key_bands(cap: LayerCapture) -> tuple[Tensor, Tensor, Tensor | None]:
    """The layer's keys split into bands once per layer (memoised), bands last: the two coordinates of every rotary
    chunk as [b, G, n, c] each, and the non-rotated dims [b, G, n, rest] (None when the whole head rotates)."""
    hit = cap.extras.get("rope_key_bands")
    if hit is None:
        kc, kr = split_chunks(_wide(cap)[1], cap.info)  # [b, G, n, c, 2]
        hit = cap.extras["rope_key_bands"] = (kc[..., 0].contiguous(), kc[..., 1].contiguous(), kr)
    return hit


def visible_keys(cap: LayerCapture, query_index: Tensor) -> tuple[int, int, Tensor, Tensor]:
    """(start, stop, post-rotary q [b,H,cq,d], post-rotary k [b,G,nk,d] over the keys these queries can see).

    k keeps the model's KV heads (grouped-query models: G < H); read it with `grouped_matmul` or `expand_kv`."""
    q, k = _wide(cap)
    start, stop = query_key_range(query_index, cap.info.sliding_window)
    return start, stop, q[:, :, query_index.to(q.device)], k[:, :, start:stop]


@dataclass
class ChunkUsage:
    """`usage[h, k] = sum_rows sum_j a_ij |c_k(i,j)|` over (batch, query) rows of one layer in one pass, and
    `max_logit_error` = max |sum_k c_k(i,j) * scale - scale * q_i.k_j| over the checked visible pairs."""

    usage: Tensor  # [H, bands] float64
    n_rows: int
    max_logit_error: float


# Bytes of chunk contributions one block of `layer_chunk_usage` materialises when its size is not given. The kernel
# is memory-bound (two broadcast products into one reused workspace, abs in place, one row-vector x matrix product
# per head). On two CPU cores (Gemma 3 270M, 512 tokens) 8 MiB blocks took the layer's usage to 0.07 s from 0.11 s
# at 2 MiB and 4 MiB; 16 MiB was no faster. Python overhead per block, not bandwidth, sets the floor at short lengths.
CHUNK_BLOCK_BYTES = 8 * 2**20


def chunk_block_size(n_heads: int, n_bands: int, n_keys: int, block_bytes: int = CHUNK_BLOCK_BYTES) -> int:
    """Queries per block so that the block's contributions [heads, bands, queries, keys] (float32) fit in
    `block_bytes` (at least one query)."""
    return max(1, int(block_bytes) // (4 * n_heads * n_bands * max(1, n_keys)))


def layer_chunk_usage(cap: LayerCapture, queries: Tensor, *, block_size: int | None = None, check: bool = True,
                      pattern_chunk: int = 256) -> ChunkUsage:
    """Attention-weighted absolute chunk contributions of one RoPE layer over `queries` (METRICS.md section 1).

    Contributions are materialised `block_size` queries at a time over only the keys those queries can see (causal
    + sliding window): memory is bounded by block_size x keys x bands x heads floats (None: blocks of about
    `CHUNK_BLOCK_BYTES`, `chunk_block_size`), plus the capture's pattern of
    `pattern_chunk` queries (read once per chunk, shared through the capture's memo with the other probes). Keys are
    split into bands once per layer and read per KV head (no expanded copy for grouped-query models). With `check`,
    the first block also verifies that the bands sum to the model's logit (`max_logit_error`). Every block of the
    layer writes its contributions into one buffer (a fresh one per block doubled the products' time).
    """
    layer, model = cap.info, cap.model
    scale = float(cap.extras.get("attn_scale", model.attn_scale))
    k0_all, k1_all, kr_all = _key_bands(cap)  # [b, G, n, c] x 2, [b, G, n, rest] | None
    b, groups = k0_all.shape[0], k0_all.shape[1]
    heads, n_chunks = model.n_heads, layer.n_chunks
    per_group = heads // groups
    usage = torch.zeros(heads, n_bands(layer, model.head_dim), dtype=accumulator_dtype(cap.device), device=cap.device)
    max_error = 0.0
    first = True
    window = layer.sliding_window
    work: Tensor | None = None
    for cidx, chunk_probs, band_start in cap.pattern_band_chunks(cap.query_chunk(pattern_chunk), queries):
        _, _, q_chunk, _ = visible_keys(cap, cidx)
        qc_chunk, qr_chunk = split_chunks(q_chunk, layer)  # [b, H, cq, c, 2], [b, H, cq, rest]
        # each query's chunk coordinates as [b, G, H/G, cq, 1, c]: broadcast against the keys' [b, G, 1, 1, nk, c]
        q0 = qc_chunk[..., 0].contiguous().view(b, groups, per_group, len(cidx), 1, n_chunks)
        q1 = qc_chunk[..., 1].contiguous().view(b, groups, per_group, len(cidx), 1, n_chunks)
        step = block_size or chunk_block_size(b * heads, n_chunks, min(int(cidx.max()) + 1, window or cap.n_tokens))
        for s in range(0, len(cidx), step):
            qi = cidx[s : s + step]
            cq = len(qi)
            start, stop = query_key_range(qi, layer.sliding_window)
            nk = stop - start
            # [b, H, cq, nk], exactly 0 where masked (the band holds keys band_start.., a superset of start..stop)
            probs = chunk_probs[:, :, s : s + cq, start - band_start : stop - band_start]
            # c[b, G, h, i, j, k] = q_ik . k_jk, bands last: two broadcast products (no 2-wide matmul)
            shape = (b, groups, per_group, cq, nk, n_chunks)
            if work is None or work.numel() < math.prod(shape):  # one buffer for every block
                most = b * heads * step * min(int(cidx.max()) + 1, window or cap.n_tokens) * n_chunks
                work = torch.empty(max(most, math.prod(shape)), dtype=q0.dtype, device=q0.device)
            c = torch.mul(q0[:, :, :, s : s + cq], k0_all[:, :, None, None, start:stop],
                          out=work[: math.prod(shape)].view(shape))
            c.addcmul_(q1[:, :, :, s : s + cq], k1_all[:, :, None, None, start:stop])
            rest = None
            if qr_chunk is not None and kr_all is not None:  # the non-rotated band: one grouped matmul over those dims
                rest = grouped_matmul(qr_chunk[:, :, s : s + cq], kr_all[:, :, start:stop].transpose(-1, -2))
            if check and first:
                visible = causal_key_mask(qi, stop, layer.sliding_window, key_start=start)
                total = c.sum(-1).reshape(b, heads, cq, nk) + (rest if rest is not None else 0)
                logits = grouped_matmul(q_chunk[:, :, s : s + cq], _wide(cap)[1][:, :, start:stop].transpose(-1, -2))
                max_error = float((total * scale - logits * scale).abs()[..., visible].max())
            first = False
            p = probs.to(c.dtype)
            # sum_{i,j} a_ij |c_ijk| per head: one row-vector x matrix product, [1, cq*nk] @ [cq*nk, bands]
            a = c.abs_().view(b * heads, cq * nk, n_chunks)
            block = torch.bmm(p.reshape(b * heads, 1, cq * nk), a).view(b, heads, n_chunks).sum(0)
            if rest is not None:
                block = torch.cat((block, torch.einsum("bhqk,bhqk->h", rest.abs_(), p)[:, None]), dim=1)
            usage += block.to(usage.dtype)
    return ChunkUsage(usage=usage.cpu().double(), n_rows=int(_wide(cap)[0].shape[0]) * len(queries),
                      max_logit_error=max_error)


@dataclass
class LongRange:
    """Sums over (batch, query) rows of one layer: `signed[h, k] = sum_{i-j>=D} a_ij c_k(i,j)`,
    `mass[h] = sum_{i-j>=D} a_ij`, and `n_rows` = rows that have at least one key at distance >= D."""

    signed: Tensor  # [H, bands] float64
    mass: Tensor  # [H] float64
    n_rows: int


def layer_long_range(cap: LayerCapture, queries: Tensor, distance: int, *, pattern_chunk: int = 256,
                     exclude_sink: bool = False) -> LongRange:
    """Long-distance chunk contributions of one RoPE layer over `queries` (METRICS.md section 2).

    Uses linearity of c_k in the key: sum_j w_ij c_k(i,j) = chunk_dot(q_i, sum_j w_ij k_j), with w_ij = a_ij on keys
    at distance >= D (key 0 dropped when `exclude_sink`), so nothing of size queries x keys x bands is materialised.
    sum_j w_ij k_j is one grouped matmul per KV head (no expanded keys).
    """
    layer, model = cap.info, cap.model
    acc = accumulator_dtype(cap.device)
    signed = torch.zeros(model.n_heads, n_bands(layer, model.head_dim), dtype=acc, device=cap.device)
    mass = torch.zeros(model.n_heads, dtype=acc, device=cap.device)
    for qidx, probs, band_start in cap.pattern_band_chunks(cap.query_chunk(pattern_chunk), queries):
        start, stop, q, k = visible_keys(cap, qidx)  # the band holds keys band_start.., a superset of start..stop
        stop = min(stop, int(qidx.max()) - distance + 1)  # keys past this are nearer than D to every query
        if stop <= start:
            continue
        k = k[:, :, : stop - start]
        rows = slice(None)
        if len(qidx) > 1 and bool((qidx[1:] >= qidx[:-1]).all()):  # sorted queries: those with a far key are a suffix
            rows = slice(int(torch.searchsorted(qidx, start + distance)), None)
            qidx, q = qidx[rows], q[:, :, rows]
        far = (qidx[:, None] - torch.arange(start, stop, device=qidx.device)[None, :]) >= distance  # [cq, nk]
        if exclude_sink and start == 0:
            far[:, 0] = False
        if not bool(far.any()):
            continue
        w = probs[:, :, rows, start - band_start : stop - band_start].masked_fill(~far, 0.0)  # a_ij on far keys
        signed += chunk_dot(q, grouped_matmul(w.to(q.dtype), k), layer).sum((0, 2)).to(acc)
        mass += w.sum((0, 2, 3)).to(acc)
    n_rows = int(_wide(cap)[0].shape[0]) * int((queries >= distance + int(exclude_sink)).sum())
    return LongRange(signed=signed.cpu().double(), mass=mass.cpu().double(), n_rows=n_rows)


def fastest_slowest(n_chunks: int, fraction: float) -> int:
    """How many chunks make the fastest (and the slowest) `fraction` of a head: round(fraction * r/2), at least 1."""
    return max(1, int(round(fraction * n_chunks)))
