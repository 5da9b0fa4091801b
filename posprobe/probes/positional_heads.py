"""Positional heads: which RoPE chunks carry long-distance attention (docs/probes/positional_heads.md; after
Hong et al. 2024, "On the token distance modeling ability of higher RoPE attention dimension"; the exact formula is
posprobe's).

Owns the head columns `dim_distance_corr` (Spearman correlation across rotary chunks k between k and
`long_contrib[l,h,k]`; positive: slow, high-index chunks carry long-distance attention), `long_mass` (mean attention
mass at distance >= D over queries that have such keys), `positional_head_score = dim_distance_corr * long_mass` and
`is_positional_head` (score >= config threshold), and the curve `long_contrib_by_chunk` (per head: x = chunk k,
y = long_contrib; the non-rotated band of a partial-rotary head as series "nonrotary" at x = r/2).

long_contrib[l,h,k] = sum_{i-j>=D} a_ij c_k(i,j) / sum_{i-j>=D} a_ij, summed over sampled queries of every text,
with c_k(i,j) the unscaled chunk dot product of the shared kernel (`posprobe.probes.rope_chunks`). D is
`long_distance` or, by default, a quarter of each text's length. Heads with no attention mass at distance >= D (e.g.
sliding-window layers whose window is shorter than D) get NaN. `distance_corr` itself belongs to `head_basics`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from posprobe.access import LayerCapture, ModelInfo, Tap
from posprobe.errors import ProbeError
from posprobe.probes.base import ProbeResult, ScanContext, StreamingProbe, TextSample, curve_frame, head_frame
from posprobe.probes.rank_correlation import spearman_rows
from posprobe.probes.rope_chunks import NONROTARY, band_labels, layer_long_range
from posprobe.probes.rope_frequency import model_skip_reason


@dataclass(frozen=True)
class PositionalHeadsConfig:
    long_distance: int | None = None  # D in tokens; None = long_distance_fraction of each text's length
    long_distance_fraction: float = 0.25  # "a quarter of the context length" (Hong et al.)
    # Heads with positional_head_score >= threshold are positional heads. The score is a correlation in [-1, 1]
    # times an attention mass in [0, 1]; 0.4 asks for a clearly positive correlation AND most attention at long
    # range (e.g. corr 0.6 with 2/3 of the mass beyond D). On Gemma 3 270M (quick budget) it flags 8 of 72 heads,
    # 0.25 flags 30.
    threshold: float = 0.4
    # The definition counts every key at distance >= D, including the BOS sink (j = 0 is at distance i from every
    # query), so long_mass is mostly sink mass in models with a strong sink. True drops key 0 from the long sums.
    exclude_sink: bool = False
    # queries per pattern chunk, at most: as head_basics (LayerCapture.query_chunk), so the capture's pattern memo is
    # shared
    pattern_chunk: int = 256


def spearman_by_chunk(values: np.ndarray) -> float:
    """Spearman correlation between chunk index and `values` (NaN if undefined: constant or missing values)."""
    keep = np.isfinite(values)
    if keep.sum() < 3 or np.ptp(values[keep]) == 0:
        return float("nan")
    return float(spearmanr(np.arange(len(values))[keep], values[keep]).statistic)


def spearman_by_chunk_rows(values: np.ndarray) -> np.ndarray:
    """`spearman_by_chunk` of every row of a [heads, chunks] array: rows without missing values in one
    `spearman_rows` call, the others one by one."""
    out = np.full(values.shape[0], np.nan)
    complete = np.isfinite(values).all(-1)
    if complete.any() and values.shape[1] >= 3:
        out[complete] = spearman_rows(values[complete], np.arange(values.shape[1], dtype=np.float64))
    for row in np.flatnonzero(~complete):
        out[row] = spearman_by_chunk(values[row])
    return out


class _Reducer:
    taps = frozenset({Tap.Q, Tap.K, Tap.PATTERN})

    def __init__(self, ctx: ScanContext, config: PositionalHeadsConfig) -> None:
        if config.long_distance is not None and config.long_distance < 1:
            raise ProbeError(f"positional_heads long_distance must be >= 1 token, got {config.long_distance}. "
                             f"Use None for a quarter of each context length.")
        if config.long_distance is None and not 0 < config.long_distance_fraction < 1:
            raise ProbeError(f"positional_heads long_distance_fraction must lie in (0, 1), got "
                             f"{config.long_distance_fraction}.")
        self.ctx, self.config = ctx, config
        self.long_signed: dict[int, torch.Tensor] = {}  # layer -> [H, bands]
        self.long_weight: dict[int, torch.Tensor] = {}  # layer -> [H]
        self.long_rows: dict[int, int] = {}
        self.distances: dict[int, int] = {}  # context length -> D used
        self.sample: TextSample | None = None

    def begin(self, sample: TextSample) -> None:
        self.sample = sample

    def distance(self, n_tokens: int) -> int:
        cfg = self.config
        d = cfg.long_distance if cfg.long_distance is not None else max(1, int(round(cfg.long_distance_fraction
                                                                                     * n_tokens)))
        self.distances[n_tokens] = d
        return d

    def on_layer(self, cap: LayerCapture) -> None:
        if not cap.info.has_rope:
            return
        layer = cap.layer
        d = self.distance(cap.n_tokens)
        long = layer_long_range(cap, self.ctx.query_sample(cap.n_tokens), d, pattern_chunk=self.config.pattern_chunk,
                                exclude_sink=self.config.exclude_sink)
        signed, weight = long.signed.cpu().double(), long.mass.cpu().double()  # to the CPU once per layer
        if layer not in self.long_signed:
            self.long_signed[layer] = torch.zeros_like(signed)
            self.long_weight[layer] = torch.zeros_like(weight)
            self.long_rows[layer] = 0
        self.long_signed[layer] += signed
        self.long_weight[layer] += weight
        self.long_rows[layer] += long.n_rows

    def finish(self) -> ProbeResult:
        info: ModelInfo = self.ctx.info
        shape = (info.n_layers, info.n_heads)
        corr, mass = np.full(shape, np.nan), np.full(shape, np.nan)
        parts: list[dict[str, np.ndarray]] = []
        for layer, signed in self.long_signed.items():
            lay = info.layers[layer]
            weight = self.long_weight[layer].numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                contrib = signed.numpy() / weight[:, None]
            contrib[weight <= 0] = np.nan
            if self.long_rows[layer]:
                mass[layer] = weight / self.long_rows[layer]
            corr[layer] = spearman_by_chunk_rows(contrib[:, : lay.n_chunks])
            # curve rows ordered band, head (finite values only), as arrays
            labels = np.array(band_labels(lay, info.head_dim), dtype=object)
            bands, heads_idx = np.nonzero(np.isfinite(contrib.T))  # [bands, H]: band-major
            parts.append({"series": np.where(labels[bands] == NONROTARY, NONROTARY, "").astype(object),
                          "layer": np.full(len(bands), layer, dtype=np.int64), "head": heads_idx, "x": bands,
                          "y": contrib[heads_idx, bands]})
        score = corr * mass
        heads = head_frame(info, {"dim_distance_corr": corr, "long_mass": mass, "positional_head_score": score})
        heads["is_positional_head"] = np.nan_to_num(score, nan=-np.inf).reshape(-1) >= self.config.threshold
        keys = ("series", "layer", "head", "x", "y")  # one frame for every layer (not one per layer)
        table = (pd.DataFrame({"curve": "long_contrib_by_chunk",
                               **{key: np.concatenate([part[key] for part in parts]) for key in keys}})
                 if parts else pd.DataFrame(columns=["curve", *keys]))
        curves = curve_frame(table, PROBE.name)
        skipped = {lay.index: f"layer {lay.index} has no RoPE ({lay.positional.value})" for lay in info.layers
                   if not lay.has_rope}
        summary = {
            "long_distance_by_length": {int(n): int(d) for n, d in sorted(self.distances.items())},
            "threshold": self.config.threshold,
            "n_positional_heads": int(heads["is_positional_head"].sum()),
            "skipped_layers": skipped,
        }
        return ProbeResult(heads=heads, curves=curves, summary=summary)


PROBE = StreamingProbe(
    "positional_heads", PositionalHeadsConfig,
    "positional heads (after Hong et al. 2024): per-chunk long-distance contribution, its Spearman correlation with "
    "chunk index, and a positional-head score", _Reducer, skip=lambda info, config: model_skip_reason(info))
