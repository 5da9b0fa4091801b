"""Attention entropy per head and by position (docs/probes/attention_entropy.md; after Zhang et al. 2024).

Owns the head columns `entropy_mean` (H_i = -sum_j a_ij log a_ij in nats, mean over sampled queries i >= 1),
`entropy_norm` (H_i / log(k_i) with k_i the number of keys query i can see: i + 1 under causal attention,
min(i + 1, window) on sliding-window layers, so 1 always means uniform over what the query can see) and
`entropy_nosink` (entropy after dropping the first `n_sink` keys and renormalising), and the curves
`entropy_by_position` (log2 query-position buckets, one series per context length) and `entropy_by_length`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from posprobe.access import LayerCapture, ModelInfo, Tap
from posprobe.devices import accumulator_dtype
from posprobe.errors import ProbeError
from posprobe.probes.base import ProbeResult, ScanContext, StreamingProbe, TextSample, curve_frame, head_frame


@dataclass(frozen=True)
class AttentionEntropyConfig:
    chunk_size: int = 256  # queries per pattern chunk, at most (fewer where memory asks: LayerCapture.query_chunk)
    n_sink: int = 1  # keys dropped for entropy_nosink: BOS / position 0 is the usual attention sink
    n_position_buckets: int = 14  # log2 buckets of query position: [1,2), [2,4), ... up to 8k


def entropy_rows(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last axis (0 log 0 = 0)."""
    return torch.special.entr(probs).sum(-1)


class _Reducer:
    taps = frozenset({Tap.PATTERN})

    def __init__(self, ctx: ScanContext, config: AttentionEntropyConfig) -> None:
        self.ctx, self.config, info = ctx, config, ctx.info
        shape = (info.n_layers, info.n_heads)
        self.sums = {k: torch.zeros(shape, dtype=torch.float64) for k in ("raw", "norm", "nosink")}
        self.counts = {k: torch.zeros(info.n_layers, dtype=torch.float64) for k in ("raw", "nosink")}
        nb = config.n_position_buckets
        self.by_pos: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.by_len: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._nb = nb
        self.sample: TextSample | None = None

    def begin(self, sample: TextSample) -> None:
        self.sample = sample
        length = sample.context_length
        info = self.ctx.info
        if length not in self.by_pos:
            self.by_pos[length] = (torch.zeros(info.n_layers, info.n_heads, self._nb, dtype=torch.float64),
                                   torch.zeros(info.n_layers, self._nb, dtype=torch.float64))
            self.by_len[length] = (torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64),
                                   torch.zeros(info.n_layers, dtype=torch.float64))

    def on_layer(self, cap: LayerCapture) -> None:
        """Reduce one layer where it lives (any device, any dtype); its sums go to the CPU once, at the end.
        Every row of a batch counts as its own text (sums over rows; counts are rows x queries)."""
        cfg, layer, window = self.config, cap.layer, cap.info.sliding_window
        queries = self.ctx.query_sample(cap.n_tokens)
        acc = accumulator_dtype(cap.device)
        nb = self._nb
        local: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor) -> None:
            local[name] = value if name not in local else local[name] + value

        for qidx, probs, start in cap.pattern_band_chunks(cap.query_chunk(cfg.chunk_size), queries):
            b = probs.shape[0]  # probs cover the keys [start, start + width) the chunk can see; the rest are 0
            terms = torch.special.entr(probs)  # [b, H, cq, width] in the pattern's dtype (float32+), summed in `acc`
            h = terms.sum(-1, dtype=acc)  # [b, H, cq]
            visible = (qidx + 1).to(acc) if window is None else (qidx + 1).clamp(max=window).to(acc)
            hn = h / torch.log(visible)
            add("raw", h.sum((0, 2)))
            add("norm", hn.sum((0, 2)))
            add("n_raw", torch.tensor(float(b * len(qidx)), dtype=acc))
            keep = qidx >= cfg.n_sink
            if keep.any():
                # entropy of rest / Z with rest = keys >= n_sink: (sum entr(rest)) / Z + log Z, no copy of the rows
                cut = max(0, cfg.n_sink - start)  # sink keys inside the band (none once the window left them)
                rest_terms = (h - terms[..., :cut].sum(-1, dtype=acc))[:, :, keep]
                z = probs[..., cut:].sum(-1, dtype=acc)[:, :, keep]
                # rows with (almost) no mass outside the sink have no defined remainder: entropy 0, as a pure sink
                h_rest = torch.where(z > 1e-6, rest_terms / z.clamp(min=1e-6) + torch.log(z.clamp(min=1e-6)), 0.0)
                add("nosink", h_rest.sum((0, 2)))
                add("n_nosink", (b * keep.sum()).to(acc))
            buckets = torch.floor(torch.log2(qidx.to(acc))).long().clamp(0, nb - 1)
            hm = h.sum(0)  # [H, cq]
            add("pos_sum", torch.zeros(hm.shape[0], nb, dtype=acc, device=hm.device).index_add_(1, buckets, hm))
            add("pos_n", torch.zeros(nb, dtype=acc, device=hm.device).index_add_(
                0, buckets, torch.full((len(qidx),), float(b), dtype=acc, device=hm.device)))
        if not local:
            return
        if self.sample is None:
            raise ProbeError(f"attention_entropy got layer {layer} before any text: its sums are kept per context "
                             f"length, which begin(sample) sets. Call begin(sample) before each pass (scan() does).")
        length = self.sample.context_length
        host = {name: value.cpu().double() for name, value in local.items()}  # one transfer per layer
        pos_sum, pos_n = self.by_pos[length]
        len_sum, len_n = self.by_len[length]
        self.sums["raw"][layer] += host["raw"]
        self.sums["norm"][layer] += host["norm"]
        self.counts["raw"][layer] += host["n_raw"]
        if "nosink" in host:
            self.sums["nosink"][layer] += host["nosink"]
            self.counts["nosink"][layer] += host["n_nosink"]
        pos_sum[layer] += host["pos_sum"]
        pos_n[layer] += host["pos_n"]
        len_sum[layer] += host["raw"]
        len_n[layer] += host["n_raw"]

    def finish(self) -> ProbeResult:
        info: ModelInfo = self.ctx.info
        n_raw = self.counts["raw"].clamp(min=1)[:, None]
        heads = head_frame(info, {
            "entropy_mean": self.sums["raw"] / n_raw,
            "entropy_norm": self.sums["norm"] / n_raw,
            "entropy_nosink": self.sums["nosink"] / self.counts["nosink"].clamp(min=1)[:, None],
        })
        # curve rows as arrays, in the order of the per-row loops they replace: by position (length, layer, bucket,
        # head), then by length (length, layer, head)
        heads_idx = np.arange(info.n_heads)
        parts: list[pd.DataFrame] = []
        for length, (s, n) in self.by_pos.items():
            mean = (s / n.clamp(min=1)[:, None, :]).numpy()  # [L, H, buckets]
            layers, buckets = np.nonzero(n.numpy())
            layer_col: np.ndarray = np.repeat(layers, info.n_heads)
            bucket_col: np.ndarray = np.repeat(buckets, info.n_heads)
            head_col = np.tile(heads_idx, len(layers))
            parts.append(pd.DataFrame({"curve": "entropy_by_position", "series": f"len={length}", "layer": layer_col,
                                       "head": head_col, "x": np.exp2(bucket_col.astype(np.float64)),
                                       "y": mean[layer_col, head_col, bucket_col]}))
        for length, (s, n) in self.by_len.items():
            mean = (s / n.clamp(min=1)[:, None]).numpy()  # [L, H]
            parts.append(pd.DataFrame({"curve": "entropy_by_length", "series": "",
                                       "layer": np.repeat(np.arange(info.n_layers), info.n_heads),
                                       "head": np.tile(heads_idx, info.n_layers), "x": float(length),
                                       "y": mean.reshape(-1)}))
        table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            columns=["curve", "series", "layer", "head", "x", "y"])
        curves = curve_frame(table, PROBE.name)
        return ProbeResult(heads=heads, curves=curves)


PROBE = StreamingProbe(
    "attention_entropy", AttentionEntropyConfig,
    "attention entropy (raw, normalised, sink-excluded) per head; entropy by position and length", _Reducer)
