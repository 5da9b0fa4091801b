"""RoPE frequency usage per head (docs/probes/rope_frequency.md; after Barbero et al. 2024, "Round and
Round We Go! What makes Rotary Positional Encodings useful?").

Owns the head columns `rope_high_freq_share` (share of the logit usage in the fastest 1/8 of rotary chunks),
`rope_low_freq_share` (slowest 1/8), `rope_freq_centroid` (usage-weighted mean of k / (r/2) over rotary chunks) and
`rope_nonrotary_share` (the band of non-rotated dims of a partial-rotary head; 0 when the whole head rotates), the
curves `rope_usage_spectrum` (per head: x = chunk k, y = logit_share; the non-rotated band as series "nonrotary"
at x = r/2), `rope_layer_spectrum` (per layer, mean over heads), `rope_q_norm` (per head: mean_i ||q_i^(k)||) and
`rope_k_norm` (per layer, one series per KV head "kv<g>": mean_j ||k_j^(k)||), and the tables
`rope_frequency.chunks` (per layer and band: base and scaled frequency, wavelength, theta, rope type) and
`rope_frequency.layers` (which layers were measured, and why the others were skipped).

logit_share[l,h,k] = E_ij[a_ij |c_k(i,j)|] / sum_k E_ij[a_ij |c_k(i,j)|] with c_k from the shared kernel
(`posprobe.probes.rope_chunks`), over every visible key of `max_queries` queries per text (an even subset of the scan's
query sample); the summary reports the largest |sum_k c_k * scale - logit| seen (exactness check). Norms are computed on
pre-rotary q/k over every position (rotation preserves chunk norms; post-rotary, with any cos/sin multiplier divided
out, is used where an adapter gives no pre-rotary tensor in the [b, heads, n, d] layout). Layers without RoPE are
skipped with a reason; a model without any RoPE layer is skipped by `scan()`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from posprobe.access import LayerCapture, LayerInfo, ModelInfo, Tap
from posprobe.errors import ProbeError
from posprobe.probes.base import (
    MODEL_LEVEL,
    ProbeResult,
    ScanContext,
    StreamingProbe,
    TextSample,
    curve_frame,
    head_frame,
)
from posprobe.probes.rope_chunks import (
    NONROTARY,
    ROTARY,
    band_labels,
    chunk_norms,
    effective_frequencies,
    fastest_slowest,
    has_nonrotary_band,
    layer_chunk_usage,
)


@dataclass(frozen=True)
class RopeFrequencyConfig:
    band_fraction: float = 0.125  # "fastest / slowest 1/8 of chunks" (METRICS.md section 1)
    # Queries per text for logit_share, evenly spread over the scan's query sample. Materialising c_k costs
    # queries x keys x r/2 x heads; on Gemma 3 270M (one 1024-token text) 64 instead of 256 queries moves the head
    # summaries by at most 0.025 (SmolLM2-135M: 0.06; analyses/rope_frequency_usage.py). None = every sampled query.
    max_queries: int | None = 64
    # Queries per contribution block (memory ~ block x keys x (r/2) x heads floats). None = as many as fit in about
    # 8 MiB (rope_chunks.CHUNK_BLOCK_BYTES): the kernel is memory-bound, and blocks of that size ran fastest on two
    # CPU cores at 512+ keys. The result does not depend on it beyond float32 rounding.
    block_size: int | None = None
    check_exactness: bool = True  # verify sum_k c_k * scale == logit on one block per layer (reported in summary)


def layer_skip_reason(info: ModelInfo, layer: int) -> str | None:
    """Why a layer has no rotary chunks to measure (None when it has)."""
    lay = info.layers[layer]
    if lay.has_rope:
        return None
    return f"layer {layer} has no RoPE ({lay.positional.value} positional encoding): no rotary chunks to measure"


def model_skip_reason(info: ModelInfo) -> str | None:
    if info.has_rope:
        return None
    kinds = sorted({layer.positional.value for layer in info.layers})
    return (f"{info.name} has no RoPE layer (positional encoding: {', '.join(kinds)}); RoPE chunk statistics do not "
            f"apply")


def frequency_table(info: ModelInfo) -> pd.DataFrame:
    """One row per (RoPE layer, band): chunk index, band, base and scaled angular frequency, wavelength, theta.

    Built as one frame from per-layer arrays (one small frame per layer cost ~1 ms each in a short scan)."""
    columns = ["layer", "chunk", "band", "frequency", "effective_frequency", "wavelength", "rope_theta", "rotary_dim",
               "rope_type", "chunk_layout"]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    for lay in info.layers:
        if not lay.has_rope:
            continue
        base: np.ndarray = lay.chunk_frequencies().astype(np.float64)  # refuses a RoPE layer without r / theta
        theta, rotary_dim, layout = lay.rope_theta, lay.rotary_dim, lay.chunk_layout
        if theta is None or rotary_dim is None or layout is None:
            raise ProbeError(f"Layer {lay.index} is a RoPE layer without rope_theta / rotary_dim / chunk_layout (got "
                             f"{theta!r} / {rotary_dim!r} / {layout!r}); its frequency table is undefined. Fix the "
                             f"model's LayerInfo (adapters/architectures.py).")
        scaled, rope_type = effective_frequencies(lay, info.max_positions)
        extra = int(has_nonrotary_band(lay, info.head_dim))  # the non-rotated band: frequency 0, infinite wavelength
        n = lay.n_chunks + extra
        with np.errstate(divide="ignore"):
            wavelength = 2 * np.pi / base
        values = {
            "layer": np.full(n, lay.index, dtype=np.int64), "chunk": np.arange(n),
            "band": np.array([ROTARY] * lay.n_chunks + [NONROTARY] * extra, dtype=object),
            "frequency": np.append(base, [0.0] * extra),
            "effective_frequency": np.append(np.asarray(scaled, dtype=np.float64), [0.0] * extra),
            "wavelength": np.append(wavelength, [np.inf] * extra), "rope_theta": np.full(n, float(theta)),
            "rotary_dim": np.full(n, int(rotary_dim), dtype=np.int64),
            "rope_type": np.full(n, rope_type, dtype=object), "chunk_layout": np.full(n, layout.value, dtype=object)}
        for name in columns:
            parts[name].append(values[name])
    if not parts["layer"]:
        return pd.DataFrame(columns=columns)
    return pd.DataFrame({name: np.concatenate(parts[name]) for name in columns}, columns=columns)


def usage_summaries(share: np.ndarray, n_chunks: int, fraction: float) -> dict[str, np.ndarray]:
    """Per-head summaries of a [H, bands] share matrix whose first `n_chunks` columns are rotary chunks."""
    m = fastest_slowest(n_chunks, fraction)
    rotary = share[:, :n_chunks]
    rotary_total = rotary.sum(-1)
    k = np.arange(n_chunks) / n_chunks  # k / (r/2)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid = (rotary * k).sum(-1) / rotary_total
    return {
        "rope_high_freq_share": rotary[:, :m].sum(-1),
        "rope_low_freq_share": rotary[:, n_chunks - m :].sum(-1),
        "rope_freq_centroid": centroid,
        "rope_nonrotary_share": share[:, n_chunks:].sum(-1),
    }


def _norm_sums(pre: torch.Tensor | None, post: torch.Tensor, lay: LayerInfo) -> torch.Tensor:
    """Per-band chunk norms summed over batch and positions, [heads, bands].

    From the pre-rotary tensor when the adapter gives one in the post-rotary layout [b, heads, n, d]; else from the
    post-rotary one (the rotation preserves every chunk norm), with the cos/sin multiplier some scalings fold into
    the rotation (YaRN's attention factor) divided out of the rotary bands. A pre-rotary tensor of another shape
    (e.g. [b, n, heads, d] from a per-head q-norm hook) is never summed along the wrong axis.
    """
    if pre is not None and pre.shape == post.shape:
        return chunk_norms(pre.float(), lay).sum((0, 2), dtype=torch.float64)
    norms = chunk_norms(post.float(), lay).sum((0, 2), dtype=torch.float64)
    if lay.rotary_cos_scale not in (0.0, 1.0):
        norms[:, : lay.n_chunks] /= lay.rotary_cos_scale
    return norms


_CURVE_KEYS = ("curve", "series", "layer", "head", "x", "y")


def _layer_curve_rows(layer: int, labels: list[str], share: np.ndarray, q_norm: np.ndarray,
                      k_norm: np.ndarray) -> dict[str, np.ndarray]:
    """One layer's curve rows as columns of arrays: for every band, the usage and q-norm row of each head
    (alternating), the layer-mean usage row, then a k-norm row per KV head (the order the per-row loop this replaces
    wrote). `finish` concatenates the layers into one frame."""
    n_heads, n_kv, n_band = share.shape[0], k_norm.shape[0], len(labels)
    nonrotary = np.array([label == NONROTARY for label in labels])
    with warnings.catch_warnings():  # a band NaN for every head (no usage at all) has a NaN layer mean
        warnings.simplefilter("ignore", RuntimeWarning)
        layer_mean = np.nanmean(share, axis=0)  # [bands]
    per_band = 2 * n_heads + 1 + n_kv  # rows per band
    curve = np.array(["rope_usage_spectrum", "rope_q_norm"] * n_heads + ["rope_layer_spectrum"]
                     + ["rope_k_norm"] * n_kv, dtype=object)
    head = np.concatenate([np.repeat(np.arange(n_heads), 2), np.full(1 + n_kv, MODEL_LEVEL)])
    y = np.concatenate([np.stack([share.T, q_norm.T], axis=-1).reshape(n_band, 2 * n_heads),  # [bands, 2H]
                        layer_mean[:, None], k_norm.T], axis=1)  # [bands, per_band]
    series = np.repeat(np.where(nonrotary, NONROTARY, "").astype(object)[:, None], per_band, axis=1)
    kv_labels = np.array([f"kv{kv}" for kv in range(n_kv)], dtype=object)
    series[:, 2 * n_heads + 1:] = np.where(nonrotary[:, None], kv_labels + f" {NONROTARY}", kv_labels)
    return {"curve": np.tile(curve, n_band), "series": series.reshape(-1),
            "layer": np.full(n_band * per_band, layer, dtype=np.int64), "head": np.tile(head, n_band),
            "x": np.repeat(np.arange(n_band), per_band), "y": y.reshape(-1)}


class _Reducer:
    taps = frozenset({Tap.Q, Tap.K, Tap.Q_PRE, Tap.K_PRE, Tap.PATTERN})

    def __init__(self, ctx: ScanContext, config: RopeFrequencyConfig) -> None:
        if not 0 < config.band_fraction <= 0.5:
            raise ProbeError(f"rope_frequency band_fraction must lie in (0, 0.5] (the fastest and slowest bands may "
                             f"not overlap), got {config.band_fraction}. The default 0.125 is METRICS.md's 1/8.")
        if (config.max_queries is not None and config.max_queries < 1) or (config.block_size is not None
                                                                            and config.block_size < 1):
            raise ProbeError(f"rope_frequency max_queries and block_size must be >= 1 (max_queries may be None), got "
                             f"{config.max_queries} and {config.block_size}.")
        self.ctx, self.config = ctx, config
        self.usage: dict[int, torch.Tensor] = {}  # layer -> [H, bands] sum of a_ij |c_k|
        self.q_norm: dict[int, torch.Tensor] = {}  # layer -> [H, bands] sum over positions
        self.k_norm: dict[int, torch.Tensor] = {}  # layer -> [G, bands]
        self.norm_rows: dict[int, int] = {}
        self.max_error: dict[int, float] = {}
        self.sample: TextSample | None = None

    def begin(self, sample: TextSample) -> None:
        self.sample = sample

    def on_layer(self, cap: LayerCapture) -> None:
        if not cap.info.has_rope:
            return
        layer, q, k = cap.layer, cap.q, cap.k
        if q is None or k is None:
            raise ProbeError(f"Layer {layer}: the capture holds no post-rotary q/k. rope_frequency needs Tap.Q and "
                             f"Tap.K (its taps request them); an access that drops them cannot be measured.")
        cfg = self.config
        queries = self.ctx.query_sample(cap.n_tokens)
        if cfg.max_queries is not None and len(queries) > cfg.max_queries:
            queries = queries[torch.linspace(0, len(queries) - 1, cfg.max_queries).round().long().unique()]
        sums = layer_chunk_usage(cap, queries, block_size=cfg.block_size, check=cfg.check_exactness)
        qn = _norm_sums(cap.q_pre, q, cap.info).cpu()  # [H, bands], to the CPU accumulators once per layer
        kn = _norm_sums(cap.k_pre, k, cap.info).cpu()  # [G, bands]
        if layer not in self.usage:  # first pass over this layer
            self.usage[layer] = torch.zeros_like(sums.usage)
            self.q_norm[layer], self.k_norm[layer] = torch.zeros_like(qn), torch.zeros_like(kn)
            self.norm_rows[layer], self.max_error[layer] = 0, 0.0
        self.usage[layer] += sums.usage
        self.q_norm[layer] += qn
        self.k_norm[layer] += kn
        self.norm_rows[layer] += int(q.shape[0] * q.shape[2])
        self.max_error[layer] = max(self.max_error[layer], sums.max_logit_error)

    def finish(self) -> ProbeResult:
        info: ModelInfo = self.ctx.info
        cfg = self.config
        columns = {name: np.full((info.n_layers, info.n_heads), np.nan) for name in
                   ("rope_high_freq_share", "rope_low_freq_share", "rope_freq_centroid", "rope_nonrotary_share")}
        parts: list[dict[str, np.ndarray]] = []
        layer_rows: list[dict] = []
        for lay in info.layers:
            layer = lay.index
            reason = layer_skip_reason(info, layer)
            if reason is None and layer not in self.usage:
                reason = f"layer {layer} was never seen by a pass"
            layer_rows.append({"layer": layer, "measured": reason is None, "reason": reason or "",
                               "rope_theta": lay.rope_theta if lay.has_rope else float("nan"),
                               "rotary_dim": lay.rotary_dim or 0, "max_logit_error": self.max_error.get(layer, np.nan)})
            if reason is not None:
                continue
            usage = self.usage[layer].numpy()
            total = usage.sum(-1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                share = usage / total
            for name, values in usage_summaries(share, lay.n_chunks, cfg.band_fraction).items():
                columns[name][layer] = values
            q_norm = (self.q_norm[layer] / self.norm_rows[layer]).numpy()
            k_norm = (self.k_norm[layer] / self.norm_rows[layer]).numpy()
            parts.append(_layer_curve_rows(layer, band_labels(lay, info.head_dim), share, q_norm, k_norm))
        heads = head_frame(info, columns)
        table = (pd.DataFrame({key: np.concatenate([part[key] for part in parts]) for key in _CURVE_KEYS})
                 if parts else pd.DataFrame(columns=list(_CURVE_KEYS)))
        curves = curve_frame(table, PROBE.name)
        layers = pd.DataFrame(layer_rows)
        measured = [e for e in self.max_error.values()]
        summary = {
            "band_fraction": cfg.band_fraction,
            "skipped_layers": {int(r["layer"]): r["reason"] for r in layer_rows if not r["measured"]},
            "max_logit_error": max(measured) if measured else None,
        }
        tables = {"chunks": frequency_table(info), "layers": layers}
        return ProbeResult(heads=heads, curves=curves, tables=tables, summary=summary)


PROBE = StreamingProbe(
    "rope_frequency", RopeFrequencyConfig,
    "RoPE frequency usage (Barbero et al. 2024): per-chunk q/k norms and attention-weighted logit share; high/low-"
    "frequency share and centroid per head", _Reducer, skip=lambda info, config: model_skip_reason(info))
