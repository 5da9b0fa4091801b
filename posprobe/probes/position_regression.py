"""Position regression: predicting a token's position from features, on sequences split train / test.

Owns the statistics toolkit of the `implicit_position` probe (docs/probes/implicit_position.md), kept apart from the
probe's model passes: `split_sequences` (seeded, disjoint train / test sequences), `stratified_positions` and
`log_spaced` (which positions are sampled), `ridge_fit_predict` (ridge with the alpha chosen by grouped k-fold
cross-validation, all alphas from one eigendecomposition), `mlp_fit_predict` (a small MLP with early stopping on
held-out training sequences, falling back to the training mean), `probe_scores` (R^2 in the target's space,
Spearman, MAD in positions and its median baseline) and `loglog_slope`. Pure numpy / scikit-learn: no model, no
torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import spearmanr


def split_sequences(n_sequences: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of sequence indices into disjoint (train, test): test >= 1 and train >= 3 sequences."""
    order = np.random.default_rng(seed).permutation(n_sequences)
    n_test = min(max(1, int(round(test_fraction * n_sequences))), n_sequences - 3)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def stratified_positions(n_tokens: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k positions from 1..n-1, one uniformly random position in each of k equal strata (all of them if k >= n-1)."""
    candidates = np.arange(1, n_tokens)
    if k >= len(candidates):
        return candidates
    return np.array([rng.choice(stratum) for stratum in np.array_split(candidates, k)])


def log_spaced(lo: int, hi: int, k: int) -> np.ndarray:
    """Up to k distinct integers from lo to hi (inclusive), spaced evenly in log."""
    if hi < lo:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.round(np.geomspace(lo, hi, k)).astype(np.int64))


def loglog_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of log y against log x (NaN with fewer than 3 usable points)."""
    keep = (x > 0) & (y > 0) & np.isfinite(y)
    if keep.sum() < 3:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train.mean(0)
    std = train.std(0)
    std[std < 1e-12] = 1.0
    return [(x - mean) / std for x in (train, *others)]


def _ridge_path(x: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Ridge coefficients [alpha, features, targets] of centred y on standardised x for every alpha (one eigh of
    the features x features Gram matrix, shared by all alphas and targets)."""
    eigval, eigvec = np.linalg.eigh(x.T @ x)
    eigval = np.clip(eigval, 0.0, None)
    projected = eigvec.T @ (x.T @ y)  # [p, t]
    return np.einsum("qp,aq,qt->apt", eigvec.T, 1.0 / (eigval[None, :] + alphas[:, None]), projected)


def ridge_fit_predict(x_train: np.ndarray, y_train: np.ndarray, groups: np.ndarray, x_test: np.ndarray,
                      alphas: Sequence[float], folds: int) -> tuple[np.ndarray, np.ndarray]:
    """Ridge per target column, alpha chosen per column by grouped k-fold CV. Returns (pred [m, t], alpha [t])."""
    alpha_grid = np.asarray(alphas, dtype=np.float64)
    unique = np.unique(groups)
    n_folds = min(folds, len(unique))
    sse = np.zeros((len(alpha_grid), y_train.shape[1]))
    if n_folds >= 2:
        fold_of = {g: i % n_folds for i, g in enumerate(unique)}
        fold = np.array([fold_of[g] for g in groups])
        for f in range(n_folds):
            tr, va = fold != f, fold == f
            xt, xv = _standardise(x_train[tr], x_train[va])
            mean = y_train[tr].mean(0)
            coef = _ridge_path(xt, y_train[tr] - mean, alpha_grid)
            pred = np.einsum("np,apt->ant", xv, coef) + mean
            sse += ((pred - y_train[va][None]) ** 2).sum(1)
    best = sse.argmin(0)  # all-zero sse (no CV possible) picks the smallest alpha
    xt, xs = _standardise(x_train, x_test)
    mean = y_train.mean(0)
    coef = _ridge_path(xt, y_train - mean, alpha_grid)  # [a, p, t]
    chosen = coef[best, :, np.arange(y_train.shape[1])]  # [t, p]
    return xs @ chosen.T + mean, alpha_grid[best]


def mlp_fit_predict(x_train: np.ndarray, y_train: np.ndarray, groups: np.ndarray, x_test: np.ndarray,
                    config: Any, seed: int) -> np.ndarray:
    """A one-hidden-layer MLP on standardised features and a standardised (single) target.

    config: anything with the MLP settings of `ImplicitPositionConfig` (`mlp_hidden`, `mlp_l2`, `mlp_max_iter`,
    `mlp_patience`, `mlp_validation_fraction`).

    Model selection uses held-out *training sequences* (grouped, so no within-sequence leakage): early stopping per
    L2 strength in `config.mlp_l2`, then the best of those and of the constant (training-mean) predictor. A probe
    with nothing to learn (shuffled labels) therefore predicts the mean instead of its random initialisation.
    """
    from sklearn.neural_network import MLPRegressor

    xt, xs = _standardise(x_train, x_test)
    mean, std = float(y_train.mean()), max(float(y_train.std()), 1e-12)
    ys = (y_train - mean) / std
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(config.mlp_validation_fraction * len(unique))))
    val = np.isin(groups, rng.choice(unique, size=min(n_val, len(unique) - 1), replace=False))
    fit = ~val
    constant = float(ys[fit].mean())
    best_mse = float(((ys[val] - constant) ** 2).mean())
    best: MLPRegressor | None = None
    for l2 in config.mlp_l2:
        model = MLPRegressor(hidden_layer_sizes=(config.mlp_hidden,), alpha=l2,
                             batch_size=min(256, int(fit.sum())), random_state=seed)
        weights: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        stale = 0
        for _ in range(config.mlp_max_iter):
            model.partial_fit(xt[fit], ys[fit])  # one epoch of minibatch Adam
            mse = float(((model.predict(xt[val]) - ys[val]) ** 2).mean())
            if mse < best_mse - 1e-4:
                best_mse, stale = mse, 0
                weights = ([w.copy() for w in model.coefs_], [b.copy() for b in model.intercepts_])
            else:
                stale += 1
                if stale >= config.mlp_patience:
                    break
        if weights is not None:
            model.coefs_, model.intercepts_ = weights
            best = model
    if best is None:
        return np.full(len(xs), constant * std + mean)
    return best.predict(xs) * std + mean


def target_values(positions: np.ndarray, target: str) -> np.ndarray:
    return np.log(positions) if target == "log_position" else positions


def probe_scores(pred: np.ndarray, truth: np.ndarray, target: str, train_positions: np.ndarray) -> dict[str, float]:
    """R^2 (target space), Spearman vs position, MAD in positions, and the MAD of predicting the training median."""
    y = target_values(truth, target)
    residual = float(((pred - y) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else float("nan")
    pred_pos = np.exp(pred) if target == "log_position" else pred
    rho = spearmanr(pred, truth).statistic if np.ptp(pred) > 0 and np.ptp(truth) > 0 else 0.0
    return {"r2": r2, "spearman": float(rho), "mad": float(np.abs(pred_pos - truth).mean()),
            "mad_baseline": float(np.abs(np.median(train_positions) - truth).mean())}
