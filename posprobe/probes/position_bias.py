"""U-shaped positional bias in attention (docs/probes/position_bias.md; Liu et al. 2023,
Hsieh et al. 2024).

Owns two measurements, both on position-neutral content, and the `position_bias` task probe that runs them:

- Attention level: for the last `n_query` queries i of generated filler contexts (seeded, no download), the
  attention a_ij to keys j = 1..i averaged into `n_bins` equal bins of relative key position j / i (bin b holds
  (b/n_bins, (b+1)/n_bins]); the sink column j = 0 is reported separately (`u_sink`). Values are attention per key
  relative to uniform over the causal prefix (a_ij * (i + 1); 1 = uniform), which leaves the shape and the u_score
  unchanged and makes curves comparable across lengths. Curve `attention_by_relative_position` per head, per layer
  (head = -1) and model mean (layer = head = -1); head columns `u_score` = mean(first bin, last bin) / mean(middle
  third of bins) (> 1: U-shaped; bins whose centre lies in [1/3, 2/3] form the middle third), `u_first`, `u_middle`,
  `u_last` (the three parts of the ratio) and `u_sink` (mean a_i0).
- Document level (Hsieh et al. 2024): Attn(doc_k) = mean attention from the answer-predicting query (the last prompt
  token) to the tokens of document k, for a fixed relevant document moved through every slot k with the distractor
  order fixed (one trial = one task seed; documents are the items of a `posprobe.tasks` task, default `multidoc`).
  Curve `document_attention` (gold document at slot k) per head, per layer and model mean; curve `slot_attention`
  (attention to whatever document sits at slot k, averaged over all documents and trials: the slot's positional
  bias); head column `doc_u_score` (the u_score formula over slots of the `document_attention` curve); table
  `position_bias.documents` (trial x slot x layer: gold-document attention, mean over heads); the summary adds a
  percentile-bootstrap 95% interval of the model-mean doc_u_score over trials.

The trials of the document level use the same task seeds as `posprobe.evaluate_positions` with the same `seed`, so
the attention curve and the behavioural U-curve can be compared prompt for prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from posprobe.access import LayerCapture, ModelAccess, Tap
from posprobe.errors import ProbeError
from posprobe.probes.base import ProbeResult, ScanContext, TaskProbe, curve_frame, head_frame, per_level
from posprobe.tasks.base import Prompt, Task


@dataclass(frozen=True)
class PositionBiasConfig:
    # budget knobs: a field left at None takes its value from the scan's budget level (docs: "Budgets")
    BUDGET_KNOBS: ClassVar[dict[str, dict[str, Any]]] = {"n_contexts": per_level(4, 12, 40),
                                                         "doc_trials": per_level(4, 12, 40),
                                                         "context_length": per_level(512, 512, 512)}
    n_bins: int = 12  # relative key-position bins; a multiple of 3 so the "middle third" is whole bins
    n_query: int = 16  # last queries per context: the end of a prompt, where an answer would be produced
    # filler tokens; None: the budget's (512 at every level: Gemma 3's sliding window, so every layer sees every
    # key; the `long` budget reads 16384)
    context_length: int | None = None
    n_contexts: int | None = None  # filler contexts; None: the budget's (BUDGET_KNOBS)
    doc_task: str = "multidoc"  # task whose item spans are the documents of the document-level curve
    doc_items: int = 10  # documents (slots) per prompt; the gold document visits every slot
    doc_trials: int | None = None  # task seeds (each moved through all slots); None: the budget's
    batch: bool = True  # run a trial's prompts (equal length by construction) as one batch
    u_margin: float = 0.05  # the summary calls a model-mean curve U-shaped when its u_score exceeds 1 + u_margin
    n_bootstrap: int = 1000  # resamples of the document trials for the 95% interval of the model doc_u_score


# --- attention level ------------------------------------------------------------------------------------------------


def relative_bins(query_index: Tensor, n_keys: int, n_bins: int) -> Tensor:
    """Bin of relative key position j / i for keys j = 1..i of each query i: [q, n_keys], -1 outside (sink, future)."""
    keys = torch.arange(n_keys)
    i = query_index[:, None].clamp(min=1).double()
    rel = keys[None, :].double() / i
    bins = (torch.ceil(rel * n_bins) - 1).long().clamp(0, n_bins - 1)
    valid = (keys[None, :] >= 1) & (keys[None, :] <= query_index[:, None])
    return torch.where(valid, bins, torch.full_like(bins, -1))


def binned_attention(probs: Tensor, query_index: Tensor, n_bins: int) -> Tensor:
    """Mean over keys in each bin of a_ij * (i + 1), averaged over queries and batch rows: [H, n_bins].

    probs: [b, H, q, n] attention of the queries `query_index`. Bins no key falls in (very short prefixes) are
    averaged over the queries that have keys there.
    """
    bins = relative_bins(query_index, probs.shape[-1], n_bins)  # [q, n]
    one_hot = torch.nn.functional.one_hot(bins.clamp(min=0), n_bins).double() * (bins >= 0)[..., None]  # [q, n, B]
    scaled = probs.double().mean(0) * (query_index.double() + 1)[None, :, None]  # [H, q, n]
    sums = torch.einsum("hqn,qnb->hqb", scaled, one_hot)
    counts = one_hot.sum(1)  # [q, B]
    per_query = sums / counts.clamp(min=1)[None]
    has = (counts > 0).double()
    return (per_query * has[None]).sum(1) / has.sum(0).clamp(min=1)[None]


def middle_third(n: int) -> np.ndarray:
    """Indices of the bins / slots whose centre (k + 0.5) / n lies in [1/3, 2/3]."""
    centres = (np.arange(n) + 0.5) / n
    idx = np.flatnonzero((centres >= 1 / 3 - 1e-12) & (centres <= 2 / 3 + 1e-12))
    return idx if len(idx) else np.array([n // 2])


def u_parts(curve: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(u_score, first, middle, last) over the last axis: u = mean(first, last) / mean(middle third)."""
    c = np.asarray(curve, dtype=np.float64)
    first, last = c[..., 0], c[..., -1]
    middle = np.asarray(c[..., middle_third(c.shape[-1])].mean(-1))
    u = np.where(middle > 0, (first + last) / 2 / np.where(middle > 0, middle, 1.0), np.nan)
    return np.asarray(u), np.asarray(first), middle, np.asarray(last)


def u_score(curve: np.ndarray | Tensor) -> np.ndarray:
    """mean(first, last) / mean(middle third) over the last axis (> 1: U-shaped; NaN when the middle is 0)."""
    return u_parts(curve)[0]


def bootstrap_u(curves: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of u_score(mean over trials) from per-trial curves [trials, x].

    (nan, nan) with fewer than two trials.
    """
    curves = np.asarray(curves, dtype=np.float64)
    if curves.shape[0] < 2 or n_resamples < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, curves.shape[0], size=(n_resamples, curves.shape[0]))
    scores = u_score(curves[picks].mean(1))
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    return float(np.quantile(scores, alpha)), float(np.quantile(scores, 1 - alpha))


def attention_curves(access: ModelAccess, contexts: Iterable[Tensor], n_bins: int = 12,
                     n_query: int = 16) -> tuple[Tensor, Tensor]:
    """Binned relative-position attention [L, H, n_bins] and sink attention [L, H] over the last n_query queries.

    contexts: [b, n] id tensors (b contexts of one length per pass); every row weighs as one context."""
    info = access.info
    total = torch.zeros(info.n_layers, info.n_heads, n_bins, dtype=torch.float64)
    sink = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64)
    n = 0
    for ids in contexts:
        length, rows = ids.shape[-1], (ids.shape[0] if ids.dim() == 2 else 1)
        queries = torch.arange(max(1, length - n_query), length)

        def on_layer(cap: LayerCapture, queries: Tensor = queries, rows: int = rows) -> None:
            probs = cap.pattern(queries).cpu()  # [b, H, q, n]: n_query rows of one layer, to the CPU once
            total[cap.layer] += binned_attention(probs, queries, n_bins) * rows
            sink[cap.layer] += probs[..., 0].double().mean((0, 2)) * rows

        access.run(ids, taps={Tap.PATTERN}, on_layer=on_layer)
        n += rows
    if n == 0:
        raise ProbeError("The attention-level position-bias curve needs at least one context (n_contexts >= 1).")
    return total / n, sink / n


# --- document level -------------------------------------------------------------------------------------------------


@dataclass
class DocumentAttention:
    """Document-level attention of one task sweep.

    gold: [trials, slots, L, H] mean attention per token from the last prompt token to the gold document at each
    slot; slots: [L, H, slots] attention to whatever document occupies each slot, averaged over every prompt.
    """

    gold: np.ndarray
    slots: np.ndarray
    positions: list[int]
    task: str
    n_items: int


def _prompt_batches(prompts: list[Prompt], batch: bool) -> list[list[Prompt]]:
    if batch and len({p.n_tokens for p in prompts}) == 1:
        return [prompts]
    return [[p] for p in prompts]


def document_attention(
    access: ModelAccess,
    task: str | Task = "multidoc",
    n_items: int = 10,
    n_trials: int = 4,
    seed: int = 0,
    *,
    positions: Sequence[int] | None = None,
    batch: bool = True,
    progress: Callable[[Iterable[Any], str], Iterable[Any]] | None = None,
) -> DocumentAttention:
    """Attn(doc_k) for a gold item moved through `positions` (default: every slot) over `n_trials` task seeds.

    Trial t uses task seed `seed * 1_000_003 + t` (as `evaluate_positions`), so both see the same prompts.
    """
    from posprobe.tasks import get_task
    from posprobe.tasks.evaluate import trial_seed

    task_obj = get_task(task)
    info = access.info
    slots = list(range(n_items)) if positions is None else sorted({p + n_items if p < 0 else p for p in positions})
    gold = np.zeros((n_trials, len(slots), info.n_layers, info.n_heads))
    slot_sum = np.zeros((info.n_layers, info.n_heads, n_items))
    n_prompts = 0
    trials: Iterable[int] = range(n_trials)
    if progress is not None:
        trials = progress(trials, f"{task_obj.name} document attention")
    for trial in trials:
        prompts = [task_obj.make(access, n_items, k, trial_seed(seed, trial)) for k in slots]
        for rows in _prompt_batches(prompts, batch):
            ids = torch.tensor([p.input_ids for p in rows], dtype=torch.long)
            query = torch.tensor([ids.shape[1] - 1])

            def on_layer(cap: LayerCapture, rows: list[Prompt] = rows, query: Tensor = query,
                         trial: int = trial) -> None:
                probs = cap.pattern(query)[:, :, 0].cpu().double()  # [b, H, n]: one query per row, to the CPU once
                for r, prompt in enumerate(rows):
                    per_slot = torch.stack([probs[r, :, a:b].mean(-1) for a, b in prompt.spans], -1)  # [H, slots]
                    gold[trial, slots.index(prompt.gold_index), cap.layer] = per_slot[:, prompt.gold_index].numpy()
                    slot_sum[cap.layer] += per_slot.numpy()

            access.run(ids, taps={Tap.PATTERN}, on_layer=on_layer)
            n_prompts += len(rows)
    return DocumentAttention(gold=gold, slots=slot_sum / max(n_prompts, 1), positions=slots, task=task_obj.name,
                             n_items=n_items)


# --- the probe --------------------------------------------------------------------------------------------------------


def _curve_rows(curve: str, x: np.ndarray, values: np.ndarray) -> list[dict[str, Any]]:
    """Rows for per-head [L, H, X] values plus per-layer and model means (head / layer = -1)."""
    rows = []
    n_layers, n_heads, _ = values.shape
    for layer in range(n_layers):
        for head in range(n_heads):
            rows += [{"curve": curve, "layer": layer, "head": head, "x": float(xv), "y": float(yv)}
                     for xv, yv in zip(x, values[layer, head])]
        rows += [{"curve": curve, "layer": layer, "head": -1, "x": float(xv), "y": float(yv)}
                 for xv, yv in zip(x, values[layer].mean(0))]
    rows += [{"curve": curve, "layer": -1, "head": -1, "x": float(xv), "y": float(yv)}
             for xv, yv in zip(x, values.mean((0, 1)))]
    return rows


def _check(config: PositionBiasConfig) -> None:
    if config.n_bins < 3:
        raise ProbeError(f"PositionBiasConfig.n_bins must be >= 3 (first, middle and last bins); got {config.n_bins}.")
    if config.n_query < 1:
        raise ProbeError(f"PositionBiasConfig.n_query must be >= 1; got {config.n_query}.")
    if config.doc_items < 3:
        raise ProbeError(f"PositionBiasConfig.doc_items must be >= 3 slots for a U-curve; got {config.doc_items}.")
    for name in ("n_contexts", "doc_trials"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ProbeError(f"PositionBiasConfig.{name} must be >= 1 (or None for the budget's value); "
                             f"got {value}.")


def run_position_bias(ctx: ScanContext, config: PositionBiasConfig) -> ProbeResult:
    from posprobe.tasks.text import text_ids

    config = ctx.budgeted(PROBE.name, config)
    _check(config)
    context_length, n_contexts, n_trials = config.context_length, config.n_contexts, config.doc_trials
    if context_length is None or n_contexts is None or n_trials is None:
        raise ProbeError(f"PositionBiasConfig budget knobs left unset by the budget: context_length="
                         f"{context_length}, n_contexts={n_contexts}, doc_trials={n_trials}. Give them in the config "
                         f"or drop the None from the Budget's probes= entry.")
    access, info = ctx.access, ctx.info
    length = min(context_length, info.max_positions or context_length)
    if length < 4:
        raise ProbeError(f"PositionBiasConfig.context_length must be >= 4 tokens; got {config.context_length}.")
    seeds = [ctx.seed * 100_003 + 7_919 + c for c in range(n_contexts)]
    groups = [seeds[i: i + ctx.batch_size] for i in range(0, n_contexts, ctx.batch_size)]  # equal lengths: exact
    contexts = (torch.tensor([text_ids(access, length, seed=s) for s in group])
                for group in ctx.progress(groups, "position-bias filler contexts"))
    curves, sink = attention_curves(access, contexts, config.n_bins, config.n_query)
    curves_np = curves.numpy()
    u, first, middle, last = u_parts(curves_np)

    docs = document_attention(access, config.doc_task, config.doc_items, n_trials, ctx.seed, batch=config.batch,
                              progress=ctx.progress)
    gold_mean = docs.gold.mean(0).transpose(1, 2, 0)  # [L, H, slots]
    doc_u = u_score(gold_mean)

    heads = head_frame(info, {"u_score": u, "u_first": first, "u_middle": middle, "u_last": last,
                              "u_sink": sink, "doc_u_score": doc_u})
    x_bins = (np.arange(config.n_bins) + 0.5) / config.n_bins
    slots = np.asarray(docs.positions, dtype=np.float64)
    rows = (_curve_rows("attention_by_relative_position", x_bins, curves_np)
            + _curve_rows("document_attention", slots, gold_mean)
            + _curve_rows("slot_attention", np.arange(config.doc_items, dtype=np.float64), docs.slots))
    curves_df = curve_frame(pd.DataFrame(rows, columns=["curve", "layer", "head", "x", "y"]), PROBE.name)

    t, s, n_layers = docs.gold.shape[:3]
    table = pd.DataFrame({
        "trial": np.repeat(np.arange(t), s * n_layers),
        "slot": np.tile(np.repeat(np.asarray(docs.positions), n_layers), t),
        "layer": np.tile(np.arange(n_layers), t * s),
        "attention": docs.gold.mean(-1).reshape(-1),
    })
    model_curve = curves_np.mean((0, 1))
    model_doc = gold_mean.mean((0, 1))
    model_u = float(u_score(model_curve))
    model_doc_u = float(u_score(model_doc))
    doc_low, doc_high = bootstrap_u(docs.gold.mean((2, 3)), config.n_bootstrap, ctx.seed)
    summary = {
        "u_score": model_u,
        "doc_u_score": model_doc_u,
        "doc_u_score_ci_low": doc_low,
        "doc_u_score_ci_high": doc_high,
        "attention_u_shaped": bool(model_u > 1 + config.u_margin),
        "document_u_shaped": bool(model_doc_u > 1 + config.u_margin),
        "sink": float(sink.mean()),
        "context_length": int(length),
        "n_contexts": int(n_contexts),
        "doc_task": docs.task,
        "doc_items": int(config.doc_items),
        "doc_trials": int(n_trials),
    }
    summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    return ProbeResult(heads=heads, curves=curves_df, tables={"documents": table}, summary=summary)


PROBE = TaskProbe("position_bias", PositionBiasConfig,
                  "U-shaped positional bias: attention by relative key position (u_score) and attention to a "
                  "document moved through every slot", run_position_bias)
