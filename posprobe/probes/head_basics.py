"""Head basics: sink mass, previous-token score, attention vs distance (METRICS.md sections 2 and 3).

Owns the head columns `sink_mass` (mean a_{i,0}), `previous_token_score` (mean a_{i,i-1}) and `distance_corr`
(Spearman correlation of attention with log(1 + i - j) over visible causal pairs, sink column j = 0 excluded; after
Hong et al. 2024; attention is taken relative to uniform by default, see the config), and the curve `attention_vs_distance` (mean attention per key at distance d, log2 bins, sink
excluded). Streaming: reduced per layer from chunked patterns over sampled queries; pairs for the rank correlation
are a seeded random subsample per layer and sample (`pairs_per_sample`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from posprobe.access import LayerCapture, ModelInfo, Tap
from posprobe.probes.base import ProbeResult, ScanContext, TextSample, curve_frame, head_frame


@dataclass(frozen=True)
class HeadBasicsConfig:
    chunk_size: int = 256  # queries per pattern chunk: bounds memory at chunk_size x n x heads floats
    pairs_per_sample: int = 4000  # (query, key) pairs kept per head per text for the Spearman correlation
    n_distance_bins: int = 16  # log2 distance bins of the attention-vs-distance curve: 0, 1, 2-3, 4-7, ...
    # distance_corr ranks a_ij * k_i (attention relative to uniform over the k_i visible keys) rather than raw a_ij:
    # pooled over queries, raw a_ij of a perfectly uniform head falls as 1/(i+1) and long distances only occur at
    # large i, so raw pooling reports about -0.56 for a uniform head. Set False for the literal METRICS formula.
    relative_to_uniform: bool = True


def distance_bins(dist: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin index of non-negative distances: 0 -> 0, d >= 1 -> floor(log2 d) + 1, clipped to n_bins - 1."""
    safe = dist.clamp(min=1).float()
    bins = torch.floor(torch.log2(safe)).long() + 1
    bins = torch.where(dist <= 0, torch.zeros_like(bins), bins)
    return bins.clamp(max=n_bins - 1)


def visible_mask(query_index: torch.Tensor, n: int, window: int | None) -> torch.Tensor:
    keys = torch.arange(n)
    dist = query_index[:, None] - keys[None, :]
    mask = dist >= 0
    if window is not None:
        mask &= dist < window
    return mask


class _Reducer:
    taps = frozenset({Tap.PATTERN})

    def __init__(self, ctx: ScanContext, config: HeadBasicsConfig) -> None:
        self.ctx, self.config, info = ctx, config, ctx.info
        shape = (info.n_layers, info.n_heads)
        self.sink = torch.zeros(shape, dtype=torch.float64)
        self.prev = torch.zeros(shape, dtype=torch.float64)
        self.count = torch.zeros(shape[0], dtype=torch.float64)
        self.dist_sum = torch.zeros(*shape, config.n_distance_bins, dtype=torch.float64)
        self.dist_n = torch.zeros(shape[0], config.n_distance_bins, dtype=torch.float64)
        self.pairs: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {l: [] for l in range(info.n_layers)}
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self.sample: TextSample | None = None

    def begin(self, sample: TextSample) -> None:
        self.sample = sample

    def on_layer(self, cap: LayerCapture) -> None:
        cfg, layer = self.config, cap.layer
        queries = self.ctx.query_sample(cap.n_tokens)
        n = cap.n_tokens
        keys = torch.arange(n)
        values, logd = [], []
        for qidx, probs in cap.pattern_chunks(cfg.chunk_size, queries):
            p = probs.double().mean(0)  # [H, cq, n] (batch of identical-length texts averaged)
            self.sink[layer] += p[:, :, 0].sum(-1)
            self.prev[layer] += p[:, torch.arange(len(qidx)), qidx - 1].sum(-1)
            self.count[layer] += len(qidx)
            vis = visible_mask(qidx, n, cap.info.sliding_window)
            n_visible = vis.sum(-1).double()  # k_i, sink included
            vis[:, 0] = False  # sink column excluded from distance statistics
            dist = qidx[:, None] - keys[None, :]
            bins = distance_bins(dist, cfg.n_distance_bins)
            flat_bins = bins[vis]
            self.dist_n[layer].index_add_(0, flat_bins, torch.ones(len(flat_bins), dtype=torch.float64))
            for h in range(p.shape[0]):
                self.dist_sum[layer, h].index_add_(0, flat_bins, p[h][vis])
            rel = p * n_visible[None, :, None] if cfg.relative_to_uniform else p
            rel = torch.round(rel, decimals=5)  # float noise must not break ties (a uniform head is exactly flat)
            values.append(rel[:, vis])  # [H, pairs]
            logd.append(torch.log1p(dist[vis].double()))
        a = torch.cat(values, dim=1)
        d = torch.cat(logd)
        if len(d) > cfg.pairs_per_sample:
            pick = torch.randperm(len(d), generator=self.generator)[: cfg.pairs_per_sample]
            a, d = a[:, pick], d[pick]
        self.pairs[layer].append((a.numpy(), d.numpy()))

    def finish(self) -> ProbeResult:
        info: ModelInfo = self.ctx.info
        count = self.count.clamp(min=1)[:, None]
        corr = np.full((info.n_layers, info.n_heads), np.nan)
        for layer, chunks in self.pairs.items():
            if not chunks:
                continue
            a = np.concatenate([c[0] for c in chunks], axis=1)
            d = np.concatenate([c[1] for c in chunks])
            for h in range(info.n_heads):
                if np.ptp(a[h]) > 0 and np.ptp(d) > 0:
                    corr[layer, h] = spearmanr(a[h], d).statistic
        heads = head_frame(info, {
            "sink_mass": self.sink / count,
            "previous_token_score": self.prev / count,
            "distance_corr": corr,
        })
        mean = self.dist_sum / self.dist_n.clamp(min=1)[:, None, :]
        rows = []
        x = [0.0] + [float(2 ** (b - 1)) for b in range(1, self.config.n_distance_bins)]
        for layer in range(info.n_layers):
            for b in range(self.config.n_distance_bins):
                if self.dist_n[layer, b] == 0:
                    continue
                for h in range(info.n_heads):
                    rows.append({"curve": "attention_vs_distance", "layer": layer, "head": h, "x": x[b],
                                 "y": float(mean[layer, h, b])})
        curves = curve_frame(pd.DataFrame(rows, columns=["curve", "layer", "head", "x", "y"]), PROBE.name)
        return ProbeResult(heads=heads, curves=curves)


class HeadBasics:
    name = "head_basics"
    Config = HeadBasicsConfig
    description = "sink mass, previous-token score, Spearman of attention vs log distance; attention-vs-distance curve"
    streaming = True

    def skip_reason(self, info: ModelInfo, config: HeadBasicsConfig) -> str | None:
        return None

    def reducer(self, ctx: ScanContext, config: HeadBasicsConfig) -> _Reducer:
        return _Reducer(ctx, config)


PROBE = HeadBasics()
