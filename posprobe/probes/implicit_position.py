"""Implicit position: how much absolute position the residual stream carries, and where
(docs/probes/implicit_position.md; Haviv et al. 2022 "Transformer LMs without positional encodings still learn
positional information"; Chi et al. 2023 "Latent positional information is in the self-attention variance of
transformer LMs without positional embeddings"; Zuo et al. 2024).

A task probe (`streaming=False`): it runs `n_sequences` (a budget knob: 16 / 48 / 128 sequences) passes of generated
text (`posprobe.tasks.text`) or uniform random tokens, reading `Tap.RESID_POST` and `Tap.ATTN_OUT` of every layer
and reducing each layer as the pass runs. Per sequence, `positions_per_sequence` positions (stratified over
1..n-1; BOS / position 0 is never a probe sample) keep their residual vector and four scale features; nothing
else of the pass is retained, so memory is bounded by layers x sequences x positions_per_sequence x d_model.

Position probes, per layer, trained on whole sequences and tested on other, disjoint sequences (seeded split; the
regressions and scores live in `posprobe.probes.position_regression`):
- feature sets: `hidden` (the residual vector), `direction` (the residual divided by its norm: position carried by
  a direction, not by scale), `scale` (log Var_d and log ||.|| of the residual and of the attention output per
  token: Chi et al.'s variance signal);
- targets: `position` and `log_position` (the better-posed target for scale features, which shrink like 1/i);
- regressors: `ridge` (standardised features, alpha chosen by grouped k-fold CV over training sequences) and `mlp`
  (scikit-learn MLPRegressor, one hidden layer; L2 strength and early stopping chosen on held-out training
  sequences, falling back to the training mean when nothing beats it);
- metrics on the test sequences: R^2 (in the target's own space), Spearman of prediction vs position, MAD (mean
  absolute deviation in positions, Haviv et al.; log predictions are exponentiated), next to `mad_baseline`, the
  MAD of always predicting the training median. Predictions are clipped to the training targets' range first
  (positions outside it are impossible; without the clip one wild extrapolation can dominate R^2);
- control: the same fits on training labels shuffled across training samples (`labels == "shuffled"`); on
  disjoint test sequences they must score at chance: R^2 <= ~0 and MAD ~ mad_baseline (summary: `control_max_r2`,
  `control_min_mad_ratio`). If they do not, the probe leaks. Spearman is NOT a chance measure here: a probe fitted
  to noise is a small random projection of features that themselves vary with position, so its rank correlation
  can be large in either sign while its predictions stay at the mean.

Variance shrinkage: per layer, the mean over sequences of Var_d(attn_out_i) and Var_d(resid_post_i) at every
position; `attn_var_slope` / `resid_var_slope` are least-squares slopes of log Var against log(i + 1) (i + 1 =
tokens a causal query sees, so the uniform-attention law Var ~ 1/(i + 1) has slope exactly -1), fitted on
log-spaced positions 1 <= i < min(n, sliding window). Curves use x = i + 1 for the same reason.
Nearby similarity: per layer, the mean cosine similarity of residual vectors at positions i and i + delta
(i >= 1; at most `similarity_anchors` evenly spaced i), for log-spaced offsets delta.

Outputs: curves `implicit_r2_by_layer`, `implicit_spearman_by_layer`, `implicit_mad_by_layer` (x = layer, series
"regressor/features/target" and ".../shuffled"), `variance_slope_by_layer` (series attn_out / resid_post),
`variance_by_position` and `similarity_by_offset` (one per layer); tables `implicit_position.probes` (one row per
layer x regressor x features x target x labels) and `implicit_position.layers`; a summary in `meta["summaries"]`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from posprobe.access import LayerCapture, ModelInfo, Tap
from posprobe.errors import ProbeError
from posprobe.probes.base import MODEL_LEVEL, ProbeResult, ScanContext, curve_frame, per_level
from posprobe.probes.position_regression import (  # the statistics toolkit; names re-exported here as before
    log_spaced,
    loglog_slope,
    mlp_fit_predict,
    probe_scores,
    ridge_fit_predict,
    split_sequences,
    stratified_positions,
    target_values,
)

FEATURE_SETS = ("hidden", "direction", "scale")
TARGETS = ("position", "log_position")
REGRESSORS = ("ridge", "mlp")
INPUTS = ("text", "random")
SCALE_FEATURES = ("resid_log_var", "resid_log_norm", "attn_log_var", "attn_log_norm")
_TINY = 1e-30


@dataclass(frozen=True)
class ImplicitPositionConfig:
    # budget knobs: a field left at None takes its value from the scan's budget level (docs: "Budgets"). "quick"
    # fits ridge only: with its 16 sequences the MLP trails ridge (R^2 0.80 vs 0.97 on Gemma 3 270M) and took ~2/3
    # of the probe's time
    BUDGET_KNOBS: ClassVar[dict[str, dict[str, Any]]] = {
        "n_sequences": per_level(16, 48, 128), "regressors": per_level(("ridge",), REGRESSORS, REGRESSORS)}
    context_length: int = 512  # tokens per sequence; 512 = Gemma 3's sliding window, so every layer sees the prefix
    n_sequences: int | None = None  # sequences, train + test together; None: the budget's (BUDGET_KNOBS)
    input: str = "text"  # "text": generated sentences (posprobe.tasks.text); "random": uniform random token ids
    bos: bool = True  # put BOS at position 0 (as the model's tokenizer does). A fixed first token is a positional
    # anchor even without any positional encoding (its share of uniform attention is 1/(i+1)); False removes it
    positions_per_sequence: int = 64  # stratified sample per sequence: bounds feature memory, limits within-
    # sequence redundancy (neighbouring positions are near-duplicates)
    test_fraction: float = 0.25  # share of whole sequences held out for testing (disjoint from training)
    feature_sets: tuple[str, ...] = FEATURE_SETS  # see the module docstring
    targets: tuple[str, ...] = TARGETS
    regressors: tuple[str, ...] | None = None  # "ridge", "mlp"; None: the budget's (BUDGET_KNOBS)
    mlp_feature_sets: tuple[str, ...] = ("hidden", "scale")  # the MLP is the slow fit; "direction" is covered by ridge
    shuffled_control: tuple[str, ...] = REGRESSORS  # regressors that also fit shuffled labels (the leak control)
    ridge_alphas: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6)  # on standardised features
    cv_folds: int = 3  # grouped (by sequence) folds for choosing the ridge alpha: no within-sequence leakage
    mlp_hidden: int = 64  # a *small* MLP (Haviv et al. probe a single hidden layer); bigger ones memorise
    mlp_max_iter: int = 200  # epochs at most; early stopping usually ends far sooner
    mlp_patience: int = 10  # epochs without improvement on the validation sequences before stopping
    mlp_validation_fraction: float = 0.2  # share of *training sequences* used for early stopping
    mlp_l2: tuple[float, ...] = (1.0, 10.0, 100.0)  # MLPRegressor alphas tried, chosen on validation sequences:
    # residual features are many and mostly position-free, so weak L2 (sklearn's 1e-4) fails to learn in time
    n_curve_points: int = 48  # log-spaced positions kept in the variance_by_position curves
    n_offsets: int = 16  # log-spaced offsets delta of the similarity curve (1 .. n/2)
    similarity_anchors: int = 512  # evenly spaced positions i whose cos(h_i, h_i+delta) is averaged: bounds the
    # per-layer Gram matrix at anchors x n
    fit_threads: int = 1  # BLAS threads while fitting: more oversubscribes cores torch already uses (10x slower
    # on a busy 2-core machine, measured)


# ---------------------------------------------------------------------------------------------------------------
# Inputs and sampling


def _sequence_ids(ctx: ScanContext, config: ImplicitPositionConfig, index: int, n_tokens: int) -> list[int]:
    seed = ctx.seed * 1_000_003 + 7_919 * index + 17  # distinct from the shared scan texts' seeds
    access = ctx.access
    bos = getattr(access.tokenizer, "bos_token_id", None)
    bos_id = bos if config.bos and access.info.adds_bos else None  # the token put at position 0, if any
    with_bos = bos_id is not None
    if config.input == "text":
        from posprobe.tasks.text import text_ids

        ids = text_ids(access, n_tokens + 1, seed=seed)
        if ids[0] == bos and not with_bos:
            return ids[1 : n_tokens + 1]
        return ids[:n_tokens]
    vocab = access.info.vocab_size
    special = {int(i) for i in (getattr(access.tokenizer, "all_special_ids", None) or []) if 0 <= int(i) < vocab}
    allowed = np.setdiff1d(np.arange(vocab), np.fromiter(special, dtype=np.int64, count=len(special)))
    ids = np.random.default_rng(seed).choice(allowed, size=n_tokens).tolist()
    if bos_id is not None:
        ids[0] = int(bos_id)
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Collection: one pass per sequence, each layer reduced as it runs


class _Collector:
    """Per-layer state filled by `on_layer`; holds only sampled positions' features and per-position sums."""

    def __init__(self, info: ModelInfo, n_sequences: int, n_tokens: int, k: int, offsets: np.ndarray,
                 max_anchors: int = 512) -> None:
        n_layers, rows = info.n_layers, n_sequences * k
        self.k, self.n_tokens, self.offsets = k, n_tokens, offsets
        self.hidden: np.ndarray = np.zeros((n_layers, rows, info.d_model), dtype=np.float32)
        self.scale: np.ndarray = np.zeros((n_layers, rows, len(SCALE_FEATURES)), dtype=np.float64)
        self.positions: np.ndarray = np.zeros(rows, dtype=np.float64)
        self.groups: np.ndarray = np.zeros(rows, dtype=np.int64)
        self.attn_var: np.ndarray = np.zeros((n_layers, n_tokens), dtype=np.float64)
        self.resid_var: np.ndarray = np.zeros((n_layers, n_tokens), dtype=np.float64)
        self.similarity: np.ndarray = np.zeros((n_layers, len(offsets)), dtype=np.float64)
        self.seen: np.ndarray = np.zeros(n_layers, dtype=np.int64)
        self.anchors = torch.linspace(1, n_tokens - 1, min(n_tokens - 1, max_anchors)).round().long().unique()
        self.offset_index = torch.as_tensor(offsets, dtype=torch.long)
        self.batch: list[tuple[int, np.ndarray]] = []  # (sequence index, sampled positions) of each row of a pass

    def begin(self, index: int, sample: np.ndarray, position_ids: np.ndarray) -> None:
        self.begin_batch([(index, sample)], position_ids)

    def begin_batch(self, rows: list[tuple[int, np.ndarray]], position_ids: np.ndarray) -> None:
        """The sequences of one pass, in batch-row order (equal lengths: no padding)."""
        self.batch = list(rows)
        for index, sample in rows:
            where = slice(index * self.k, index * self.k + len(sample))
            self.positions[where] = position_ids[sample]
            self.groups[where] = index

    def on_layer(self, cap: LayerCapture) -> None:
        if cap.resid_post is None or cap.attn_out is None:
            raise ProbeError(f"Layer {cap.layer} handed no resid_post / attn_out; implicit_position needs both taps.")
        for row, (index, sample) in enumerate(self.batch):
            self._row(cap.layer, cap.resid_post[row].detach().float(), cap.attn_out[row].detach().float(), index,
                      sample)

    def _row(self, layer: int, resid: torch.Tensor, attn: torch.Tensor, index: int, sample: np.ndarray) -> None:
        """One sequence's features at one layer. resid / attn: [n, D] float32 on the layer's device."""
        resid_var = resid.var(-1, unbiased=False)
        attn_var = attn.var(-1, unbiased=False)
        resid_norm = resid.norm(dim=-1)
        attn_norm = attn.norm(dim=-1)
        idx = torch.as_tensor(sample, device=resid.device)
        scale = torch.stack([
            resid_var[idx].clamp(min=_TINY).log(), resid_norm[idx].clamp(min=_TINY).log(),
            attn_var[idx].clamp(min=_TINY).log(), attn_norm[idx].clamp(min=_TINY).log(),
        ], dim=-1)
        # cos(h_i, h_{i+delta}) for anchors i >= 1 (BOS excluded: its norm is extreme in real models): one matmul
        unit = resid / resid_norm[:, None].clamp(min=_TINY)
        anchors = self.anchors.to(resid.device)
        gram = unit[anchors] @ unit.T  # [anchors, n]
        partner = anchors[:, None] + self.offset_index.to(resid.device)[None, :]  # [anchors, offsets]
        valid = partner < self.n_tokens
        values = gram.gather(1, partner.clamp(max=self.n_tokens - 1)) * valid
        similarity = values.sum(0) / valid.sum(0).clamp(min=1)
        rows = slice(index * self.k, index * self.k + len(idx))
        # to the CPU once per layer and row: the sampled rows and per-position / per-offset vectors, never [n, D]
        hidden: torch.Tensor
        hidden, scale, resid_var, attn_var, similarity = (t.cpu() for t in (resid[idx], scale, resid_var, attn_var,
                                                                              similarity))
        self.resid_var[layer] += resid_var.double().numpy()
        self.attn_var[layer] += attn_var.double().numpy()
        self.hidden[layer, rows] = hidden.numpy()
        self.scale[layer, rows] = scale.double().numpy()
        self.similarity[layer] += similarity.double().numpy()
        self.seen[layer] += 1


# ---------------------------------------------------------------------------------------------------------------
# Regression (numpy / scikit-learn) on disjoint train / test sequences


def _features(col: _Collector, layer: int, name: str) -> np.ndarray:
    if name == "scale":
        return col.scale[layer]
    hidden: np.ndarray = col.hidden[layer].astype(np.float64)
    if name == "direction":
        return hidden / np.maximum(np.linalg.norm(hidden, axis=1, keepdims=True), _TINY)
    return hidden


def _fit_layer(col: _Collector, layer: int, train: np.ndarray, test: np.ndarray, perm: np.ndarray,
               config: ImplicitPositionConfig, seed: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    positions, groups = col.positions, col.groups
    train_pos, test_pos = positions[train], positions[test]
    for features in config.feature_sets:
        x = _features(col, layer, features)
        x_train, x_test = x[train], x[test]
        for regressor in _regressors(config):
            if regressor == "mlp" and features not in config.mlp_feature_sets:
                continue
            variants = [("true", np.arange(len(train_pos)))]
            if regressor in config.shuffled_control:
                variants.append(("shuffled", perm))
            if regressor == "ridge":  # every target and label variant shares the SVDs: one solve
                columns = [(labels, target) for labels, _ in variants for target in config.targets]
                y = np.stack([target_values(train_pos[order], target) for (labels, order) in variants
                              for target in config.targets], axis=1)
                pred, chosen = ridge_fit_predict(x_train, y, groups[train], x_test, config.ridge_alphas,
                                                 config.cv_folds)  # chosen: the CV alpha of every column
                fits = [(labels, target, pred[:, j], float(chosen[j])) for j, (labels, target) in enumerate(columns)]
            else:
                fits = [(labels, target, mlp_fit_predict(x_train, target_values(train_pos[order], target),
                                                         groups[train], x_test, config, seed), float("nan"))
                        for labels, order in variants for target in config.targets]
            for labels, target, prediction, alpha in fits:
                bounds = target_values(train_pos, target)  # a position outside the training range is impossible
                prediction = np.clip(prediction, bounds.min(), bounds.max())
                rows.append({"layer": layer, "regressor": regressor, "features": features, "target": target,
                             "labels": labels, **probe_scores(prediction, test_pos, target, train_pos),
                             "alpha": alpha, "n_train": int(len(train_pos)), "n_test": int(len(test_pos))})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The probe


def _regressors(config: ImplicitPositionConfig) -> tuple[str, ...]:
    """The regressors of a config whose budget knobs are resolved (`ScanContext.budgeted`)."""
    if config.regressors is None:
        raise ProbeError("ImplicitPositionConfig.regressors was left unset by the budget; give regressors=('ridge',) "
                         "or ('ridge', 'mlp') in the config, or drop the None from the Budget's probes= entry.")
    return config.regressors


def _check_config(config: ImplicitPositionConfig, n_sequences: int) -> None:
    for field_name, given, valid in (("feature_sets", config.feature_sets, FEATURE_SETS),
                                     ("targets", config.targets, TARGETS),
                                     ("regressors", _regressors(config), REGRESSORS),
                                     ("mlp_feature_sets", config.mlp_feature_sets, FEATURE_SETS),
                                     ("shuffled_control", config.shuffled_control, REGRESSORS)):
        unknown = [v for v in given if v not in valid]
        if unknown:
            raise ProbeError(f"implicit_position config {field_name} has unknown entries {unknown}; valid: "
                             f"{list(valid)}.")
    if config.input not in INPUTS:
        raise ProbeError(f"implicit_position config input={config.input!r}; valid: {list(INPUTS)}.")
    for field_name, value in (("test_fraction", config.test_fraction),
                              ("mlp_validation_fraction", config.mlp_validation_fraction)):
        if not 0 < value < 1:
            raise ProbeError(f"implicit_position config {field_name} must lie in (0, 1); got {value}.")
    if n_sequences < 4:
        raise ProbeError(f"implicit_position needs at least 4 sequences (disjoint train and test), got {n_sequences}."
                         f" Raise ImplicitPositionConfig(n_sequences=...) or use a larger budget.")
    if config.context_length < 8 or config.positions_per_sequence < 1:
        raise ProbeError(f"context_length must be >= 8 and positions_per_sequence >= 1; got "
                         f"{config.context_length} and {config.positions_per_sequence}.")


class ImplicitPosition:
    name = "implicit_position"
    Config = ImplicitPositionConfig
    description = ("per-layer probes (ridge / MLP on hidden state, direction, scale features) decoding absolute "
                   "position on held-out sequences with a shuffled-label control; attention-output variance vs "
                   "position; cosine similarity vs offset")
    streaming = False

    def skip_reason(self, info: ModelInfo, config: ImplicitPositionConfig) -> str | None:
        return None

    def run(self, ctx: ScanContext, config: ImplicitPositionConfig) -> ProbeResult:
        started = time.time()
        info = ctx.info
        config = ctx.budgeted(self.name, config)
        n_sequences = config.n_sequences
        if n_sequences is None:
            raise ProbeError("ImplicitPositionConfig.n_sequences was left unset by the budget; give n_sequences in "
                             "the config or drop the None from the Budget's probes= entry.")
        _check_config(config, n_sequences)
        n_tokens = min(config.context_length, info.max_positions or config.context_length)
        rng = np.random.default_rng(ctx.seed + 4_242)
        k = min(config.positions_per_sequence, n_tokens - 1)
        offsets = log_spaced(1, max(1, (n_tokens - 1) // 2), config.n_offsets)
        col = _Collector(info, n_sequences, n_tokens, k, offsets, config.similarity_anchors)
        groups = [list(range(i, min(i + ctx.batch_size, n_sequences))) for i in range(0, n_sequences, ctx.batch_size)]
        for group in ctx.progress(groups, "implicit_position passes"):  # batch_size sequences per pass (equal n)
            ids = torch.tensor([_sequence_ids(ctx, config, index, n_tokens) for index in group])
            position_ids = torch.arange(n_tokens)[None].expand(len(group), -1)
            col.begin_batch([(index, stratified_positions(n_tokens, k, rng)) for index in group],
                            position_ids[0].numpy())
            ctx.access.run(ids, taps=(Tap.RESID_POST, Tap.ATTN_OUT), on_layer=col.on_layer, position_ids=position_ids)
        passes_s = time.time() - started

        train_seq, test_seq = split_sequences(n_sequences, config.test_fraction, ctx.seed)
        train = np.isin(col.groups, train_seq)
        test = np.isin(col.groups, test_seq)
        if np.intersect1d(col.groups[train], col.groups[test]).size:  # by construction; checked, not assumed
            raise ProbeError("implicit_position: train and test sequences overlap; this is a bug in the split.")
        perm = np.random.default_rng(ctx.seed + 99).permutation(int(train.sum()))
        rows: list[dict[str, Any]] = []
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=config.fit_threads, user_api="blas"):
            for layer in ctx.progress(range(info.n_layers), "implicit_position probes"):
                rows += _fit_layer(col, layer, np.flatnonzero(train), np.flatnonzero(test), perm, config, ctx.seed)
        probes = pd.DataFrame(rows)
        fits_s = time.time() - started - passes_s

        layers, curves = self._variance_and_similarity(col, info, n_sequences, config)
        curves = pd.concat([curve_frame(self._probe_curves(probes), self.name), curve_frame(curves, self.name)],
                           ignore_index=True)
        summary = self._summary(probes, layers, config, ctx, n_sequences, n_tokens, k, train_seq, test_seq,
                                col, {"passes": passes_s, "fits": fits_s})
        return ProbeResult(curves=curves, tables={"probes": probes, "layers": layers},
                           summary=summary)

    # --- tables and curves --------------------------------------------------------------------------------------
    @staticmethod
    def _variance_and_similarity(col: _Collector, info: ModelInfo, n_sequences: int,
                                 config: ImplicitPositionConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
        n = col.n_tokens
        rows, layer_rows = [], []
        for layer in range(info.n_layers):
            window = info.layers[layer].sliding_window
            fit_stop = min(n, window) if window else n
            fit_at = log_spaced(1, fit_stop - 1, config.n_curve_points)
            shown = np.unique(np.concatenate([[0], log_spaced(1, n - 1, config.n_curve_points)]))
            slopes = {}
            for series, sums in (("attn_out", col.attn_var[layer]), ("resid_post", col.resid_var[layer])):
                mean = sums / max(n_sequences, 1)
                slopes[series] = loglog_slope(fit_at + 1.0, mean[fit_at])
                rows += [{"curve": "variance_by_position", "series": series, "layer": layer, "x": float(i + 1),
                          "y": float(mean[i])} for i in shown]
                rows.append({"curve": "variance_slope_by_layer", "series": series, "layer": MODEL_LEVEL,
                             "x": float(layer), "y": slopes[series]})
            sim = col.similarity[layer] / max(int(col.seen[layer]), 1)
            rows += [{"curve": "similarity_by_offset", "layer": layer, "x": float(d), "y": float(s)}
                     for d, s in zip(col.offsets, sim)]
            layer_rows.append({"layer": layer, "attn_var_slope": slopes["attn_out"],
                               "resid_var_slope": slopes["resid_post"],
                               "similarity_offset_1": float(sim[0]) if len(sim) else float("nan"),
                               "similarity_offset_far": float(sim[-1]) if len(sim) else float("nan"),
                               "far_offset": int(col.offsets[-1]) if len(col.offsets) else 0})
        return pd.DataFrame(layer_rows), pd.DataFrame(rows)

    @staticmethod
    def _probe_curves(probes: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for row in probes.itertuples(index=False):
            series = f"{row.regressor}/{row.features}/{row.target}" + ("/shuffled" if row.labels == "shuffled" else "")
            for metric in ("r2", "spearman", "mad"):
                rows.append({"curve": f"implicit_{metric}_by_layer", "series": series, "x": float(row.layer),
                             "y": float(getattr(row, metric))})
        return pd.DataFrame(rows, columns=["curve", "series", "x", "y"])

    @staticmethod
    def _summary(probes: pd.DataFrame, layers: pd.DataFrame, config: ImplicitPositionConfig, ctx: ScanContext,
                 n_sequences: int, n_tokens: int, k: int, train_seq: np.ndarray, test_seq: np.ndarray,
                 col: _Collector, seconds: dict[str, float]) -> dict[str, Any]:
        best: dict[str, Any] = {}
        true = probes[probes["labels"] == "true"]
        for (regressor, features, target), group in true.groupby(["regressor", "features", "target"], sort=True):
            top = group.loc[group["r2"].idxmax()]
            best[f"{regressor}/{features}/{target}"] = {
                "layer": int(top["layer"]), "r2": float(top["r2"]), "spearman": float(top["spearman"]),
                "mad": float(top["mad"]), "mad_baseline": float(top["mad_baseline"])}
        control = probes[probes["labels"] == "shuffled"]
        edits = [f"{type(e).__name__}(layer={e.layer})" for e in getattr(ctx.access, "_edits", [])]
        return {
            "input": config.input,
            "regressors": list(_regressors(config)),  # resolved from the budget in run()
            "bos": bool(config.bos and ctx.info.adds_bos),  # whether position 0 actually held BOS
            "context_length": n_tokens,
            "n_sequences": n_sequences,
            "n_train_sequences": int(len(train_seq)),
            "n_test_sequences": int(len(test_seq)),
            "test_sequences": [int(s) for s in test_seq],
            "train_test_disjoint": not bool(np.intersect1d(train_seq, test_seq).size),
            "positions_per_sequence": k,
            "best_layer": best,
            "control_max_r2": float(control["r2"].max()) if len(control) else None,
            "control_min_mad_ratio": float((control["mad"] / control["mad_baseline"]).min()) if len(control) else None,
            "attn_var_slope": [float(v) for v in layers["attn_var_slope"]],
            "resid_var_slope": [float(v) for v in layers["resid_var_slope"]],
            "feature_memory_mb": float((col.hidden.nbytes + col.scale.nbytes) / 2**20),
            "active_edits": edits,
            "seconds": {name: round(value, 2) for name, value in seconds.items()},
        }


PROBE = ImplicitPosition()
