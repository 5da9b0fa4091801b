"""Induction and duplicate-token heads, and Gu et al.'s sink rate (docs/probes/induction.md; Olsson et al. 2022;
TransformerLens `detect_head`; Gu et al. 2024, "When Attention Sink Emerges in Language Models").

Owns the head columns
- `induction_score`: on repeated random blocks of `block_length` L tokens, the mean over second-copy queries i of
  a[i, i - L + 1] (attention to the token after the earlier twin of the current token);
- `duplicate_token_score`: the same mean of a[i, i - L] (attention to the earlier twin itself);
- `induction_score_text` / `duplicate_token_score_text`: the same scores on the scan's shared natural text, where
  tokens repeat on their own: per sampled query that has an earlier copy of its token, the attention summed over
  every key the TransformerLens template marks (the token after each earlier copy / each earlier copy), averaged
  over those queries (queries without an earlier copy are not counted);
- `gu_sink_attention`: the head's mean attention to key 0 on `sink_length`-token texts (Gu et al.'s alpha_1);
the curves `induction_by_distance` / `duplicate_by_distance` (per head; x = L, the distance between the two copies,
so a user sees how far each head reaches) and `sink_share_by_key` (model level; x = key position k, y = share of
all layer x head pairs whose mean attention to key k exceeds `sink_epsilon`; Gu et al.'s Sink_k^epsilon), and the
summary `gu_sink_rate` (that share at key 0, the paper's headline number).

Repeated random blocks (the standard construction): for each L and each sequence s, a block of L DISTINCT token ids
is drawn uniformly, without replacement, from the model's ordinary vocabulary (every id below
min(vocab_size, len(tokenizer)) that is not a special or added token) with a `torch.Generator` seeded by
(scan seed, L, s); the input is [BOS] + block + block (BOS only where the model's tokenizer adds one). Distinct
tokens make the earlier twin of query i unique (i - L), so the template scores reduce to the formulas above. The
`n_sequences` sequences of one L run as one batch.

Sink rate (Gu et al.): alpha_k^{l,h} = mean over queries t that can see key k (t >= k, and t - k < window on
sliding layers) of a[t, k], averaged over `sink_n_texts` seeded generated texts of `sink_length` tokens (one batch);
Sink_k = share of (layer, head) pairs with alpha_k > epsilon (0.3 in the paper).

Streaming: every score is reduced layer by layer from chunked patterns of the queries it needs (`TemplateScores` of
`posprobe.probes.template`); no [n, n] pattern is kept. The natural-text columns read the shared text passes (their
sampled queries, shared with the other streaming probes through the capture's pattern memo); the repeated-block and
64-token passes are this probe's own, run when the shared passes end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from posprobe.access import LayerCapture, ModelAccess, ModelInfo, Tap
from posprobe.errors import ProbeError
from posprobe.probes.base import ProbeResult, ScanContext, StreamingProbe, TextSample, curve_frame, head_frame
from posprobe.probes.template import TemplateScores, duplicate_token_template, induction_template, template_rows


@dataclass(frozen=True)
class InductionConfig:
    # L of the headline columns: "BOS + a random 64-token block repeated" (TransformerLens' demos use 50)
    block_length: int = 64
    # L values of the distance curves; None: 8, 16, 32, ... up to half the budget's longest context length (and the
    # model's limit), with block_length always included
    distances: tuple[int, ...] | None = None
    n_sequences: int | None = None  # random blocks per L (one batch); None: the budget's n_texts, at least 2
    max_queries: int | None = None  # second-copy queries read per sequence (evenly spaced); None: budget.max_queries
    chunk_size: int = 256  # queries per pattern chunk: same as head_basics, so the shared-pass memo is reused
    natural_text: bool = True  # also score the shared text passes (the *_text columns)
    sink_length: int = 64  # Gu et al. measure the sink on 64-token inputs
    sink_epsilon: float = 0.3  # Gu et al.'s threshold on a head's mean attention to a key
    sink_n_texts: int = 16  # 64-token texts (Gu et al. average 100 samples; 16 keep a quick scan cheap)


def ordinary_token_ids(access: ModelAccess) -> Tensor:
    """Token ids of the model's ordinary vocabulary: below min(vocab_size, len(tokenizer)), no special/added ids."""
    tok = access.tokenizer
    size = access.info.vocab_size
    if hasattr(tok, "__len__"):
        size = min(size, len(tok))
    special = set(getattr(tok, "all_special_ids", None) or [])
    special |= {getattr(tok, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    special |= set((getattr(tok, "added_tokens_decoder", None) or {}).keys())
    keep = torch.ones(size, dtype=torch.bool)
    drop = torch.tensor(sorted(i for i in special if isinstance(i, int) and 0 <= i < size), dtype=torch.long)
    keep[drop] = False
    return keep.nonzero().flatten()


def bos_prefix(access: ModelAccess) -> list[int]:
    """[BOS] when the model's tokenizer adds one, else []."""
    return access.encode("", add_bos=True)


def repeated_random_tokens(access: ModelAccess, block_length: int, n_sequences: int, seed: int,
                           pool: Tensor | None = None) -> Tensor:
    """[n_sequences, P + 2L] token ids: [BOS] + a random block of L distinct ordinary tokens + the same block.

    Sequence s uses `torch.Generator().manual_seed(seed * 1_000_003 + L * 1_009 + s)`, so a (seed, L, s) triple
    always gives the same block. P = 1 where the tokenizer adds BOS, else 0.
    """
    pool = ordinary_token_ids(access) if pool is None else pool
    if block_length > len(pool):
        raise ProbeError(f"A block of {block_length} distinct tokens needs a vocabulary of at least that many ordinary "
                         f"tokens; this model has {len(pool)}. Use a shorter block_length / distances.")
    prefix = torch.tensor(bos_prefix(access), dtype=torch.long)
    rows = []
    for s in range(n_sequences):
        g = torch.Generator().manual_seed(seed * 1_000_003 + block_length * 1_009 + s)
        block = pool[torch.randperm(len(pool), generator=g)[:block_length]]
        rows.append(torch.cat([prefix, block, block]))
    return torch.stack(rows)


def evenly_spaced(lo: int, hi: int, limit: int) -> Tensor:
    """At most `limit` evenly spaced integers in [lo, hi), both ends included."""
    m = min(limit, hi - lo)
    return torch.linspace(lo, hi - 1, m).round().long().unique()


_TEMPLATES = {"induction": induction_template, "duplicate": duplicate_token_template}


def add_template_chunks(accs: dict[str, TemplateScores], cap: LayerCapture, ids: Tensor, queries: Tensor,
                        chunk_size: int) -> None:
    """Feed the patterns of `queries` (chunk by chunk) to the induction and duplicate accumulators."""
    for qidx, probs in cap.pattern_chunks(cap.query_chunk(chunk_size), queries):  # fewer where memory asks
        for name, acc in accs.items():
            acc.add(cap.layer, qidx, probs, torch.stack([template_rows(_TEMPLATES[name], qidx, row) for row in ids]))


class _Reducer:
    taps = frozenset({Tap.PATTERN})

    def __init__(self, ctx: ScanContext, config: InductionConfig) -> None:
        self.ctx, self.config, info = ctx, config, ctx.info
        self.prefix = len(bos_prefix(ctx.access))
        self.pool = ordinary_token_ids(ctx.access)
        self.distances, self.dropped = self._distances()
        self.n_sequences = config.n_sequences or max(2, ctx.budget.n_texts)
        self.max_queries = config.max_queries or ctx.budget.max_queries
        self.text = {name: TemplateScores(info.n_layers, info.n_heads) for name in ("induction", "duplicate")}
        self.sample: TextSample | None = None

    def _distances(self) -> tuple[list[int], dict[int, str]]:
        cfg, info = self.config, self.ctx.info
        problems = []
        if cfg.block_length < 2:
            problems.append(f"block_length must be >= 2 tokens, got {cfg.block_length}")
        if cfg.distances is not None and (not cfg.distances or min(cfg.distances) < 2):
            problems.append(f"distances must be block lengths >= 2, got {cfg.distances}")
        if not 0 < cfg.sink_epsilon < 1:
            problems.append(f"sink_epsilon must lie in (0, 1), got {cfg.sink_epsilon}")
        if cfg.sink_length < 2 or cfg.sink_n_texts < 1:
            problems.append(f"sink_length must be >= 2 and sink_n_texts >= 1, got {cfg.sink_length} and "
                            f"{cfg.sink_n_texts}")
        if cfg.chunk_size < 1 or (cfg.n_sequences is not None and cfg.n_sequences < 1) or \
                (cfg.max_queries is not None and cfg.max_queries < 1):
            problems.append("chunk_size, n_sequences and max_queries must be >= 1 (or None for the budget's)")
        limit = info.max_positions
        fits = min(len(self.pool), (limit - self.prefix) // 2 if limit else len(self.pool))
        if cfg.block_length > fits:
            problems.append(f"block_length {cfg.block_length} does not fit: at most {fits} (distinct ordinary "
                            f"tokens: {len(self.pool)}; positions: {limit} for [BOS] + 2 blocks)")
        if problems:
            raise ProbeError("InductionConfig is invalid: " + "; ".join(problems) + ". Fix the config, e.g. "
                             "get_probe('induction').Config(block_length=64).")
        if cfg.distances is not None:
            wanted = sorted(set(cfg.distances) | {cfg.block_length})
            cap = fits
        else:
            cap = min(fits, max(max(self.ctx.budget.context_lengths) // 2, cfg.block_length))
            wanted = sorted({2**p for p in range(3, 20) if 2**p <= cap} | {cfg.block_length})
        kept = [d for d in wanted if d <= cap]
        dropped = {d: f"needs {self.prefix + 2 * d} positions / {d} distinct tokens; at most L = {fits} fits"
                   for d in wanted if d > cap}
        return kept, dropped

    # --- shared natural-text passes ---------------------------------------------------------------------------------
    def begin(self, sample: TextSample) -> None:
        self.sample = sample

    def on_layer(self, cap: LayerCapture) -> None:
        if not self.config.natural_text or self.sample is None:
            return
        add_template_chunks(self.text, cap, self.sample.input_ids, self.ctx.query_sample(cap.n_tokens),
                            self.config.chunk_size)

    # --- own passes ---------------------------------------------------------------------------------------------
    def _repeated(self, length: int) -> dict[str, TemplateScores]:
        info, cfg = self.ctx.info, self.config
        ids = repeated_random_tokens(self.ctx.access, length, self.n_sequences, self.ctx.seed, self.pool)
        start = self.prefix + length  # first query of the second copy
        queries = evenly_spaced(start, start + length, self.max_queries)
        acc = {name: TemplateScores(info.n_layers, info.n_heads) for name in ("induction", "duplicate")}

        self.ctx.access.run(ids, taps=self.taps,
                            on_layer=lambda cap: add_template_chunks(acc, cap, ids, queries, cfg.chunk_size))
        return acc

    def _sink(self) -> np.ndarray:
        """alpha[l, h, k]: mean attention to key k over the queries that see it, on sink_length-token texts."""
        from posprobe.tasks.text import text_ids

        info, cfg = self.ctx.info, self.config
        n = min(cfg.sink_length, info.max_positions or cfg.sink_length)
        ids = torch.tensor([text_ids(self.ctx.access, n, seed=self.ctx.seed * 7_919 + 31 * s + 3)
                            for s in range(cfg.sink_n_texts)])
        alpha = np.full((info.n_layers, info.n_heads, n), np.nan)

        def on_layer(cap: LayerCapture) -> None:
            total = torch.zeros(info.n_heads, n, dtype=torch.float64)
            for _, probs in cap.pattern_chunks(cfg.chunk_size, torch.arange(n)):
                total += probs.sum((0, 2), dtype=torch.float64).cpu()  # masked entries are exactly 0
            t = torch.arange(n)
            window = cap.info.sliding_window
            visible = (t[:, None] >= t[None, :]) & ((t[:, None] - t[None, :]) < (window or n + 1))
            alpha[cap.layer] = (total / (visible.sum(0).double() * ids.shape[0])).numpy()

        self.ctx.access.run(ids, taps=self.taps, on_layer=on_layer)
        return alpha

    def finish(self) -> ProbeResult:
        info: ModelInfo = self.ctx.info
        cfg = self.config
        rows: list[dict] = []
        headline: dict[str, np.ndarray] = {}
        for length in self.ctx.progress(self.distances, "induction: repeated random blocks"):
            acc = self._repeated(length)
            for name, curve in (("induction", "induction_by_distance"), ("duplicate", "duplicate_by_distance")):
                score = acc[name].row_mean()
                if length == cfg.block_length:
                    headline[name] = score
                rows += [{"curve": curve, "layer": l, "head": h, "x": float(length), "y": float(score[l, h])}
                         for l in range(info.n_layers) for h in range(info.n_heads)]
        alpha = self._sink()
        share = (alpha > cfg.sink_epsilon).mean((0, 1))
        rows += [{"curve": "sink_share_by_key", "x": float(k), "y": float(share[k])} for k in range(len(share))]
        nan = np.full((info.n_layers, info.n_heads), np.nan)
        text = {name: acc.row_mean() if cfg.natural_text else nan for name, acc in self.text.items()}
        heads = head_frame(info, {
            "induction_score": headline["induction"],
            "duplicate_token_score": headline["duplicate"],
            "induction_score_text": text["induction"],
            "duplicate_token_score_text": text["duplicate"],
            "gu_sink_attention": alpha[:, :, 0],
        })
        curves = curve_frame(pd.DataFrame(rows, columns=["curve", "layer", "head", "x", "y"]), PROBE.name)
        summary = {
            "block_length": cfg.block_length,
            "distances": self.distances,
            "dropped_distances": {str(k): v for k, v in self.dropped.items()},
            "n_sequences": self.n_sequences,
            "bos_prefix": bool(self.prefix),
            "ordinary_vocabulary": len(self.pool),
            "text_queries_with_repeat": {"induction": int(self.text["induction"].row_n.max()),
                                         "duplicate": int(self.text["duplicate"].row_n.max())},
            "gu_sink_rate": float(share[0]),
            "sink_epsilon": cfg.sink_epsilon,
            "sink_length": int(alpha.shape[-1]),
        }
        return ProbeResult(heads=heads, curves=curves, summary=summary)


PROBE = StreamingProbe(
    "induction", InductionConfig,
    "induction and duplicate-token scores on repeated random blocks (by distance) and on natural text; Gu et al.'s "
    "sink rate on 64-token inputs", _Reducer)
