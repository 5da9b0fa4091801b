"""Spearman rank correlations of many rows at once, as `scipy.stats.spearmanr` computes each of them.

Owns `average_ranks` (scipy's `rankdata(method="average")` along the last axis of a 2-d array, one sort for all rows)
and `spearman_rows` (per row, the Spearman correlation of `a[r]` with `b`, or with `b[r]`): the rank correlations of
`head_basics` (`distance_corr`, docs/probes/head_basics.md) and `positional_heads` (`dim_distance_corr`,
docs/probes/positional_heads.md) for every head of a layer in one call instead of one scipy call per head.
Ties get average ranks; a row whose values (or whose partner's) are constant gets NaN, as scipy does.
"""

from __future__ import annotations

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..m along the last axis of a [rows, m] array, tied values sharing their average rank (float64)."""
    x = np.asarray(values)
    if x.ndim != 2:
        raise ValueError(f"average_ranks takes a [rows, m] array; got shape {x.shape}")
    rows, m = x.shape
    if m == 0:
        return np.zeros((rows, 0))
    order = np.argsort(x, axis=-1)  # stability is not needed: tied values get one shared rank
    ordered = np.take_along_axis(x, order, axis=-1)
    starts = np.ones((rows, m), dtype=bool)  # True where a run of equal values starts (every row's first value)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = np.flatnonzero(starts.reshape(-1))  # flat index of each run's first value
    size: np.ndarray = np.diff(np.append(first, rows * m))  # runs never cross rows: each row starts a run
    begin = first % m  # the run's 0-based position in its row's sorted order
    mean_rank = begin + (size + 1) / 2  # average of the 1-based ranks begin + 1 .. begin + size
    ranks = np.empty((rows, m))
    np.put_along_axis(ranks, order, np.repeat(mean_rank, size).reshape(rows, m), axis=-1)
    return ranks


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of every row of `a` [rows, m] with `b` ([m], shared, or [rows, m], row-wise).

    Equals `[spearmanr(a[r], b or b[r]).statistic for r]` (average ranks for ties, Pearson correlation of the
    ranks) up to float rounding; NaN where a row or its partner is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ra = average_ranks(a)
    rb = average_ranks(b[None] if b.ndim == 1 else b)
    ca = ra - ra.mean(-1, keepdims=True)
    cb = rb - rb.mean(-1, keepdims=True)
    cov = (ca * cb).sum(-1)
    scale = np.sqrt((ca * ca).sum(-1) * (cb * cb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.clip(cov / scale, -1.0, 1.0)
    constant = (np.ptp(a, axis=-1) == 0) | (np.ptp(b, axis=-1) == 0 if b.ndim == 2 else np.ptp(b) == 0)
    return np.where(constant, np.nan, rho)


__all__ = ["average_ranks", "spearman_rows"]
