"""Head basics: sink mass, previous-token score, attention vs distance (docs/probes/head_basics.md).

Owns the head columns `sink_mass` (mean a_{i,0}), `learned_sink_mass` (mean 1 - sum_j a_ij: the share a learned sink
logit takes; only for models with learned sinks, gpt-oss, NaN on their layers without one), `previous_token_score` (mean
a_{i,i-1}) and `distance_corr` (Spearman correlation of attention with log(1 + i - j) over visible causal pairs, sink
column j = 0 excluded; after Hong et al. 2024; attention is taken relative to uniform by default, see the config), and
the curve `attention_vs_distance` (mean attention per key at distance d, log2 bins, sink excluded). Streaming: reduced
per layer from chunked patterns over sampled queries; pairs for the rank correlation are a seeded random subsample per
layer and sample (`pairs_per_sample`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from posprobe.access import LayerCapture, ModelInfo, Tap
from posprobe.devices import accumulator_dtype
from posprobe.probes.base import ProbeResult, ScanContext, StreamingProbe, TextSample, curve_frame, head_frame
from posprobe.probes.rank_correlation import spearman_rows


@dataclass(frozen=True)
class HeadBasicsConfig:
    # queries per pattern chunk, at most: bounds memory at chunk_size x n x heads floats; fewer where the memory
    # estimate says a long context's [chunk x n] rows would not fit (LayerCapture.query_chunk)
    chunk_size: int = 256
    pairs_per_sample: int = 4000  # (query, key) pairs per head per text for the Spearman correlation: keys drawn
    # uniformly from each sampled query's visible non-sink keys, so every query weighs the same
    n_distance_bins: int = 16  # log2 distance bins of the attention-vs-distance curve: 0, 1, 2-3, 4-7, ...
    # distance_corr ranks a_ij * k_i (attention relative to uniform over the k_i visible keys) rather than raw a_ij:
    # pooled over queries, raw a_ij of a perfectly uniform head falls as 1/(i+1) and long distances only occur at
    # large i, so raw pooling reports about -0.56 for a uniform head. Set False to rank raw a_ij.
    relative_to_uniform: bool = True


def bin_edges(n_bins: int) -> list[tuple[int, float]]:
    """Distance bins (lo, hi) inclusive: (0, 0), (1, 1), (2, 3), (4, 7), ...; the last bin is open-ended."""
    edges: list[tuple[int, float]] = [(0, 0.0)]
    for b in range(1, n_bins):
        edges.append((2 ** (b - 1), float(2**b - 1) if b < n_bins - 1 else float("inf")))
    return edges


def binned_key_sums(p: torch.Tensor, qidx: torch.Tensor, window: int | None, n_bins: int,
                    first_key: int = 1, key_start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the attention mass and number of visible keys in each distance bin, from prefix sums.

    p: [H, cq, width] probabilities of queries `qidx` over keys [key_start, key_start + width), a range that holds
    every key they can see (`LayerCapture.pattern_band`). Keys before `first_key` (the sink) are excluded.
    Returns (mass [H, cq, n_bins], count [cq, n_bins]) in float64 (float32 on MPS), on p's device. O(cq * n).
    """
    acc = accumulator_dtype(p.device)
    cs = torch.empty(*p.shape[:-1], p.shape[-1] + 1, dtype=acc, device=p.device)  # cs[..., j] = sum_{t < j} p_t
    cs[..., 0] = 0
    torch.cumsum(p, dim=-1, dtype=acc, out=cs[..., 1:])  # in place: no float64 copy of p, no padded copy
    i = qidx[:, None].to(acc)  # [cq, 1]
    edges = bin_edges(n_bins)
    lo = torch.tensor([lo for lo, _ in edges], dtype=acc, device=p.device)  # [bins]: the bin's smallest distance
    hi = torch.tensor([hi if hi != float("inf") else 1e18 for _, hi in edges], dtype=acc, device=p.device)
    a = (i - hi).clamp(min=float(first_key))  # [cq, bins]: the bin's smallest key
    if window is not None:
        a = torch.maximum(a, i - window + 1)
    c = i - lo  # the bin's largest key
    count = (c - a + 1).clamp(min=0)
    a_idx = (a - key_start).clamp(min=0).long()  # prefix-sum columns are keys relative to the band's first
    c_idx = torch.maximum((c + 1 - key_start).clamp(min=0).long(), a_idx)
    H = p.shape[0]
    mass = cs.gather(-1, c_idx[None].expand(H, -1, -1)) - cs.gather(-1, a_idx[None].expand(H, -1, -1))
    mass = torch.where(count[None] > 0, mass, torch.zeros_like(mass))
    return mass, count


class _Reducer:
    taps = frozenset({Tap.PATTERN})

    def __init__(self, ctx: ScanContext, config: HeadBasicsConfig) -> None:
        self.ctx, self.config, info = ctx, config, ctx.info
        shape = (info.n_layers, info.n_heads)
        self.sink = torch.zeros(shape, dtype=torch.float64)
        self.prev = torch.zeros(shape, dtype=torch.float64)
        self.learned_sink = torch.zeros(shape, dtype=torch.float64)  # 1 - row sum: the learned sink's share (gpt-oss)
        self.count = torch.zeros(shape[0], dtype=torch.float64)
        self.dist_sum = torch.zeros(*shape, config.n_distance_bins, dtype=torch.float64)
        self.dist_n = torch.zeros(config.n_distance_bins, dtype=torch.float64).repeat(shape[0], 1)
        self.pairs: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {l: [] for l in range(info.n_layers)}
        self.sample: TextSample | None = None

    def begin(self, sample: TextSample) -> None:
        self.sample = sample

    def on_layer(self, cap: LayerCapture) -> None:
        """Reduce one layer where it lives (any device, any dtype); its sums go to the CPU once, at the end."""
        cfg, layer, window = self.config, cap.layer, cap.info.sliding_window
        queries = self.ctx.query_sample(cap.n_tokens)
        per_query = max(1, -(-cfg.pairs_per_sample // len(queries)))
        acc = accumulator_dtype(cap.device)
        sink = prev = dist_sum = dist_n = None
        count = 0
        values: list[torch.Tensor] = []
        logd: list[torch.Tensor] = []
        rows_index = self.sample.indices if self.sample is not None else (0,)
        generators = [torch.Generator().manual_seed(self._pair_seed(index, layer)) for index in rows_index]
        for qidx, probs, start in cap.pattern_band_chunks(cap.query_chunk(cfg.chunk_size), queries):
            # probs cover keys [start, start + width): every key these queries can see (the rest are exactly 0)
            b = probs.shape[0]  # every row of a batch is its own text: sums over rows, counts of rows x queries
            rows = torch.arange(len(qidx), device=qidx.device)
            chunk_sink = (probs[:, :, :, 0].sum((0, 2), dtype=acc) if start == 0  # key 0 out of every query's window
                          else probs.new_zeros(probs.shape[1], dtype=acc))
            chunk_prev = probs[:, :, rows, qidx - 1 - start].sum((0, 2), dtype=acc)
            if cap.info.learned_sinks:  # the sink logit's softmax share is what the rows are missing
                self.learned_sink[layer] += (1 - probs.sum(-1, dtype=acc)).sum((0, 2)).cpu().double()
            mass, n_keys = binned_key_sums(probs.sum(0, dtype=acc) if b > 1 else probs[0], qidx, window,
                                           cfg.n_distance_bins, key_start=start)
            sink = chunk_sink if sink is None else sink + chunk_sink
            prev = chunk_prev if prev is None else prev + chunk_prev
            dist_sum = mass.sum(1) if dist_sum is None else dist_sum + mass.sum(1)
            dist_n = b * n_keys.sum(0) if dist_n is None else dist_n + b * n_keys.sum(0)
            count += b * len(qidx)
            # Spearman pairs: `per_query` keys drawn uniformly from each query's visible non-sink keys, per row
            low = torch.ones_like(qidx) if window is None else (qidx - window + 1).clamp(min=1)
            span = (qidx - low + 1).clamp(min=0)
            ok = span > 0
            n_ok = int(ok.sum())
            if not n_ok:
                continue
            if bool(ok[-n_ok:].all()):  # the usual case (sorted queries, only query 0 has no key): a view, no copy
                ok = slice(len(qidx) - n_ok, None)
            n_visible = (span[ok] + 1).to(acc)  # k_i with the sink
            for r in range(b):
                u = torch.rand(n_ok, per_query, generator=generators[r], dtype=torch.float64).to(qidx.device)
                keys = low[ok, None] + (u * span[ok, None]).long()
                p = probs[r, :, ok]  # [H, n_ok, n]
                a = p.gather(-1, (keys - start)[None].expand(p.shape[0], -1, -1)).to(acc)
                if cfg.relative_to_uniform:
                    a = a * n_visible[None, :, None]
                    a = torch.round(a, decimals=5)  # float noise must not break ties (a uniform head is exactly flat)
                values.append(a.reshape(p.shape[0], -1))
                logd.append(torch.log1p((qidx[ok, None] - keys).to(acc)).reshape(-1))
        if sink is None or prev is None or dist_sum is None or dist_n is None:  # no chunk: all four are set together
            return
        self.sink[layer] += sink.cpu().double()
        self.prev[layer] += prev.cpu().double()
        self.count[layer] += count
        self.dist_sum[layer] += dist_sum.cpu().double()
        self.dist_n[layer] += dist_n.cpu().double()
        if values:
            self.pairs[layer].append((torch.cat(values, dim=1).cpu().numpy(), torch.cat(logd).cpu().numpy()))

    def _pair_seed(self, index: int, layer: int) -> int:
        """A seed per (scan seed, context length, text, layer): the pairs drawn for a text do not depend on which
        batch it ran in or on the order of layers and texts."""
        length = self.sample.context_length if self.sample is not None else 0
        return (self.ctx.seed * 1_000_003 + length * 7_919 + index * 131 + layer) % (2**63)

    def finish(self) -> ProbeResult:
        """Tables from the per-layer sums, built as arrays (no per-row Python): the Spearman correlations of a
        layer's heads in one `spearman_rows` call, the curve rows ordered layer, bin, head."""
        info: ModelInfo = self.ctx.info
        count = self.count.clamp(min=1)[:, None]
        corr = np.full((info.n_layers, info.n_heads), np.nan)
        for layer, chunks in self.pairs.items():
            if not chunks:
                continue
            a = np.concatenate([c[0] for c in chunks], axis=1)
            d = np.concatenate([c[1] for c in chunks])
            corr[layer] = spearman_rows(a, d)  # NaN for a constant head (or constant distances), as before
        heads = head_frame(info, {
            "sink_mass": self.sink / count,
            "previous_token_score": self.prev / count,
            "distance_corr": corr,
            **({"learned_sink_mass": torch.where(torch.tensor([[lay.learned_sinks] for lay in info.layers]),
                                                 self.learned_sink / count, float("nan"))}
               if any(lay.learned_sinks for lay in info.layers) else {}),
        })
        mean = (self.dist_sum / self.dist_n.clamp(min=1)[:, None, :]).numpy()  # [L, H, bins]
        x = np.array([float(lo) for lo, _ in bin_edges(self.config.n_distance_bins)])
        layers, bins = np.nonzero(self.dist_n.numpy() != 0)  # (layer, bin) pairs with keys, layer-major
        n_heads = info.n_heads
        layer_col: np.ndarray = np.repeat(layers, n_heads)
        bin_col: np.ndarray = np.repeat(bins, n_heads)
        head_col = np.tile(np.arange(n_heads), len(layers))
        curves = curve_frame(pd.DataFrame({"curve": "attention_vs_distance", "layer": layer_col, "head": head_col,
                                           "x": x[bin_col], "y": mean[layer_col, head_col, bin_col]}), PROBE.name)
        return ProbeResult(heads=heads, curves=curves)


PROBE = StreamingProbe(
    "head_basics", HeadBasicsConfig,
    "sink mass, previous-token score, Spearman of attention vs log distance; attention-vs-distance curve", _Reducer)
