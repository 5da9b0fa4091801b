"""Retrieval heads: which heads copy the needle into the answer (docs/probes/retrieval.md; Wu et al. 2024).

Owns the head columns `retrieval_score` (mean over scored trials of copied needle tokens / needle length) and
`retrieval_activation` (share of scored trials in which the head copied at least one needle token), the curves
`retrieval_by_depth` / `retrieval_by_length` (per head) and `needle_accuracy_by_depth` / `needle_accuracy_by_length`
(model level), and the per-trial tables `retrieval.trials` (length, depth, answer correct?, scored?) and
`retrieval.copies` (per trial x head: copied needle tokens), so scores can be broken down by depth and length.

Definition (Wu et al. 2024): at each answer step, w = the token being produced and j* = argmax_j a_ij of head
(l, h) at the query i that produces it; the head copied if j* lies in the needle span and token[j*] == w. A copied
needle position counts once per trial (the paper's set of copied tokens), so a trial's score is in [0, 1].
- `mode="teacher_forced"` (default): one forward pass per trial with the reference answer appended; the steps are
  the answer positions, and the answer counts as correct when the argmax at every answer position is the
  reference token (exactly when greedy decoding would produce it). Attention is read only at the answer
  positions, chunk-wise, from the q/k the model computed; logits only at those positions.
- `mode="generate"`: greedy decoding as the paper (`access.greedy`, KV-cached in the HF adapter), then one pass
  over prompt + generated tokens reading attention at the positions that produced each generated token; w is the
  generated token. Correct when the generation starts with the answer tokens.
- Needle span: by default the answer's tokens inside the needle (`span="answer"`, so a perfect copier scores 1);
  `span="needle"` uses the whole needle statement as the reference code does (its maximum is then below 1).
- Trials the model answers wrongly are counted and reported in `summary` and `retrieval.trials`; they are
  excluded from the scores only because `include_wrong=False` says so (the paper keeps only answered trials).
  When no trial is answered correctly the scores are NaN and a RuntimeWarning plus `summary["warning"]` say why.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from posprobe.access import LayerCapture, ModelAccess, ModelInfo, Tap
from posprobe.errors import ProbeError
from posprobe.probes.base import ProbeResult, ScanContext, TaskProbe, curve_frame, head_frame, per_level
from posprobe.tasks.base import pad_left, pad_token_id
from posprobe.tasks.needle import NeedleTrial, grid_for_trials, make_needle_trial, minimum_context_length


@dataclass(frozen=True)
class RetrievalConfig:
    # budget knobs: a field left at None takes its value from the scan's budget level (docs: "Budgets")
    BUDGET_KNOBS: ClassVar[dict[str, dict[str, Any]]] = {"n_trials": per_level(6, 20, 60)}
    # one pass per trial with the reference answer appended; "generate" decodes greedily first (the paper's way)
    mode: Literal["teacher_forced", "generate"] = "teacher_forced"
    task: Literal["needle", "passkey"] = "needle"  # the magic-number needle: one copy of the answer in the prompt
    n_trials: int | None = None  # needle trials (lengths x depths); None: the budget's (BUDGET_KNOBS)
    context_lengths: tuple[int, ...] | None = None  # None: the budget's context lengths (clipped, see below)
    # lengths are clipped to [shortest prompt that fits, min(max_context_length, model maximum)]; None: no extra cap
    max_context_length: int | None = None
    depths: tuple[float | int, ...] | None = None  # None: evenly spaced so that lengths x depths gives n_trials cells
    span: Literal["answer", "needle"] = "answer"  # which needle tokens count (answer: a perfect copier scores 1)
    include_wrong: bool = False  # the paper scores only trials the model answered; wrong ones are reported anyway
    threshold: float = 0.1  # Wu et al.: a head whose retrieval_score exceeds 0.1 is a retrieval head
    n_digits: int = 7  # digits of the needle value: 7 copy steps plus the leading space with digit-split tokenizers
    extra_new_tokens: int = 4  # generate mode decodes len(answer) + this many tokens (steps after it still count)
    chunk_size: int = 64  # answer queries per pattern chunk (answers are short: usually one chunk)


@dataclass(frozen=True)
class TrialOutcome:
    """One trial's result: copies [n_layers, n_heads] (distinct needle positions copied), steps and correctness."""

    trial: NeedleTrial
    copies: np.ndarray
    steps: tuple[int, ...]
    correct: bool
    token_accuracy: float
    span: tuple[int, int]


def _check(config: RetrievalConfig) -> None:
    if config.mode not in ("teacher_forced", "generate"):
        raise ProbeError(f"RetrievalConfig.mode must be 'teacher_forced' or 'generate'; got {config.mode!r}.")
    if config.span not in ("answer", "needle"):
        raise ProbeError(f"RetrievalConfig.span must be 'answer' or 'needle'; got {config.span!r}.")
    if config.n_trials is not None and config.n_trials < 1:
        raise ProbeError(f"RetrievalConfig.n_trials must be at least 1 (or None for the budget's); got "
                         f"{config.n_trials}.")
    if config.chunk_size < 1 or config.extra_new_tokens < 0:
        raise ProbeError("RetrievalConfig.chunk_size must be >= 1 and extra_new_tokens >= 0.")


def _stop_ids(access: ModelAccess) -> tuple[int, ...]:
    eos = getattr(access.tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else ()


def score_trial(access: ModelAccess, trial: NeedleTrial, config: RetrievalConfig = RetrievalConfig()) -> TrialOutcome:
    """Run one trial in `config.mode` and count, per head, the distinct needle positions it copied."""
    return score_batch(access, [trial], config)[0]


def score_batch(access: ModelAccess, trials: Sequence[NeedleTrial],
                config: RetrievalConfig = RetrievalConfig()) -> list[TrialOutcome]:
    """Score several trials with one scoring pass: sequences of different lengths are left-padded, with an
    attention mask and explicit position_ids (`pad_left`), so every row sees exactly its own unpadded sequence.
    Attention is read only at the answer queries of each row (never on padding); results equal `score_trial` one
    trial at a time. Generate mode decodes each trial on its own first (greedy), then scores them together."""
    info = access.info
    teacher_forced = config.mode == "teacher_forced"
    steps_of: list[list[int]] = []
    for trial in trials:
        if teacher_forced:
            steps_of.append(list(trial.answer_ids))
        else:
            max_new = len(trial.answer_ids) + config.extra_new_tokens
            out = access.greedy(trial.ids(), max_new, stop_ids=_stop_ids(access))[0]
            steps_of.append([int(t) for t in out.tolist()])
    batch = pad_left([list(t.input_ids) + s[:-1] for t, s in zip(trials, steps_of)], pad_token_id(access.tokenizer))
    firsts = [batch.column(r, len(t.input_ids) - 1) for r, t in enumerate(trials)]  # column producing step 0
    row_queries = [torch.arange(first, first + len(steps)) for first, steps in zip(firsts, steps_of)]
    queries = torch.unique(torch.cat(row_queries))  # sorted union: every column is a real answer query of a row
    spans = [t.answer_span if config.span == "answer" else t.needle_span for t in trials]
    copies: list[np.ndarray] = [np.zeros((info.n_layers, info.n_heads), dtype=np.int64) for _ in trials]
    on_device: dict[str, torch.Tensor] = {}

    def on_layer(cap: LayerCapture) -> None:
        if "ids" not in on_device or on_device["ids"].device != cap.device:
            on_device["ids"] = batch.input_ids.to(cap.device)
        ids = on_device["ids"]
        hits = [torch.zeros(info.n_heads, stop - start, dtype=torch.bool, device=cap.device) for start, stop in spans]
        for qidx, probs in cap.pattern_chunks(cap.query_chunk(config.chunk_size), queries):  # fewer if memory asks
            for r, (start, stop) in enumerate(spans):
                mine = torch.isin(qidx, row_queries[r].to(qidx.device))
                if not bool(mine.any()):
                    continue
                cols = qidx[mine]
                j_star = probs[r][:, mine].argmax(-1)  # [H, cq] columns of the padded row
                w = torch.as_tensor(steps_of[r], device=cap.device)[cols - firsts[r]]
                key = j_star - batch.offsets[r]  # sequence index of the attended key
                copied = (key >= start) & (key < stop) & (ids[r][j_star] == w[None, :])
                heads, where = copied.nonzero(as_tuple=True)
                hits[r][heads, key[heads, where] - start] = True
        for r, hit in enumerate(hits):
            copies[r][cap.layer] = hit.sum(-1).cpu().numpy()

    padding = batch.run_kwargs()  # empty when nothing is padded (the unpadded fast path)
    result = access.run(batch.input_ids, taps={Tap.PATTERN}, on_layer=on_layer,
                        logits=queries if teacher_forced else "none", attention_mask=padding.get("attention_mask"),
                        position_ids=padding.get("position_ids"))
    outcomes = []
    for r, (trial, steps) in enumerate(zip(trials, steps_of)):
        answer = list(trial.answer_ids)
        if teacher_forced:
            picked = torch.searchsorted(queries, row_queries[r])  # this row's answer columns among the logits
            logits = result.requested_logits()
            predicted = logits[r, picked.to(logits.device)].argmax(-1).cpu()
            matches = (predicted == torch.as_tensor(steps)).tolist()
        else:
            matches = [i < len(steps) and steps[i] == a for i, a in enumerate(answer)]
        outcomes.append(TrialOutcome(trial=trial, copies=copies[r], steps=tuple(steps), correct=all(matches),
                                     token_accuracy=float(np.mean(matches)), span=spans[r]))
    return outcomes


def score_trials(
    access: ModelAccess,
    trials: Sequence[NeedleTrial],
    config: RetrievalConfig = RetrievalConfig(),
    *,
    progress: Callable[[Iterable[Any], str], Iterable[Any]] | None = None,
    batch_size: int = 1,
) -> ProbeResult:
    """Retrieval scores of every head over the given trials (the probe's work, usable on hand-made trials).

    batch_size: trials per scoring pass (left-padded; the scores equal batch_size=1)."""
    _check(config)
    if not trials:
        raise ProbeError("score_trials needs at least one needle trial; build some with "
                         "posprobe.tasks.needle.make_needle_trials(access, lengths, depths).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ProbeError(f"batch_size must be a positive integer (trials per pass); got {batch_size!r}.")
    groups = [list(trials[i: i + batch_size]) for i in range(0, len(trials), batch_size)]
    iterator = progress(groups, f"retrieval trials ({config.mode})") if progress is not None else groups
    outcomes = [outcome for group in iterator for outcome in score_batch(access, group, config)]
    return summarize(access.info, outcomes, config, decode=access.decode)


def summarize(
    info: ModelInfo,
    outcomes: Sequence[TrialOutcome],
    config: RetrievalConfig,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> ProbeResult:
    """Heads table, curves, per-trial tables and summary from trial outcomes."""
    trial_rows, copy_rows = [], []
    layers: np.ndarray
    heads: np.ndarray
    layers, heads = np.meshgrid(np.arange(info.n_layers), np.arange(info.n_heads), indexing="ij")
    for o in outcomes:
        t = o.trial
        span_len = o.span[1] - o.span[0]
        scored = o.correct or config.include_wrong
        trial_rows.append({
            "trial": t.index, "task": t.task, "mode": config.mode, "context_length": t.context_length,
            "n_tokens": t.n_tokens, "depth": t.depth, "actual_depth": t.actual_depth,
            "needle_start": t.needle_span[0], "needle_stop": t.needle_span[1], "span_start": o.span[0],
            "span_stop": o.span[1], "n_steps": len(o.steps), "correct": o.correct,
            "token_accuracy": o.token_accuracy, "scored": scored, "answer": t.answer,
            "output": decode(list(o.steps)) if decode is not None else "",
            "n_heads_copying": int((o.copies > 0).sum()),
        })
        copy_rows.append(pd.DataFrame({
            "trial": t.index, "layer": layers.ravel(), "head": heads.ravel(), "copies": o.copies.ravel(),
            "score": o.copies.ravel() / span_len, "correct": o.correct, "scored": scored,
        }))
    trials = pd.DataFrame(trial_rows)
    copies = pd.concat(copy_rows, ignore_index=True)
    used = copies[copies["scored"]]
    shape = (info.n_layers, info.n_heads)
    n_correct = int(trials["correct"].sum())
    n_scored = int(trials["scored"].sum())
    summary: dict[str, Any] = {
        "mode": config.mode, "task": config.task, "span": config.span, "include_wrong": config.include_wrong,
        "n_trials": len(trials), "n_correct": n_correct, "n_wrong": len(trials) - n_correct, "n_scored": n_scored,
        "accuracy": n_correct / len(trials), "threshold": config.threshold,
        "context_lengths": sorted({int(x) for x in trials["context_length"]}),
        "depths": sorted({float(x) for x in trials["depth"]}),
    }
    if n_scored == 0:
        score = np.full(shape, np.nan)
        activation = np.full(shape, np.nan)
        message = (f"retrieval: the model answered none of the {len(trials)} needle trials correctly, so no head "
                   f"has a retrieval score (all NaN). Retrieval heads are defined on answered trials (Wu et al.). "
                   f"Use shorter contexts (RetrievalConfig.context_lengths), the passkey task, or "
                   f"RetrievalConfig(include_wrong=True) to score copying on failed trials anyway.")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        summary["warning"] = message
    else:
        grouped = used.groupby(["layer", "head"])
        score = np.array(grouped["score"].mean(), dtype=np.float64).reshape(shape)
        activation = np.array((used["copies"] > 0).groupby([used["layer"], used["head"]]).mean(),
                              dtype=np.float64).reshape(shape)
        if n_correct < len(trials):
            what = "scored anyway (include_wrong=True)" if config.include_wrong else \
                "excluded from the scores (include_wrong=False)"
            summary["note"] = f"{len(trials) - n_correct} of {len(trials)} trials answered wrongly; {what}."
        flat = [(float(score[l, h]), l, h) for l in range(shape[0]) for h in range(shape[1])]
        flat.sort(key=lambda x: -x[0])
        n_ret = int((score > config.threshold).sum())
        summary.update({"n_retrieval_heads": n_ret, "share_retrieval_heads": n_ret / score.size,
                        "top_heads": [{"layer": l, "head": h, "retrieval_score": s} for s, l, h in flat[:10]]})
    heads_df = head_frame(info, {"retrieval_score": score, "retrieval_activation": activation})
    curves = _curves(trials, used, info)
    return ProbeResult(heads=heads_df, curves=curves, tables={"trials": trials, "copies": copies},
                       summary=summary)


def _curves(trials: pd.DataFrame, used: pd.DataFrame, info: ModelInfo) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    meta = trials.set_index("trial")[["depth", "context_length"]]
    for key, curve in (("depth", "by_depth"), ("context_length", "by_length")):
        accuracy = trials.groupby(key)["correct"].mean()
        rows += [{"curve": f"needle_accuracy_{curve}", "x": float(x), "y": float(y)} for x, y in accuracy.items()]
        if len(used):
            per_head = used.join(meta, on="trial").groupby([key, "layer", "head"])["score"].mean()
            rows += [{"curve": f"retrieval_{curve}", "layer": int(l), "head": int(h), "x": float(x), "y": float(y)}
                     for (x, l, h), y in per_head.items()]
    frame = pd.DataFrame(rows, columns=["curve", "layer", "head", "x", "y"])
    frame[["layer", "head"]] = frame[["layer", "head"]].fillna(-1)
    return curve_frame(frame, PROBE.name)


def mode_agreement(a: ProbeResult, b: ProbeResult) -> dict[str, Any]:
    """Spearman correlation over heads of two runs' retrieval scores, on the trials both answered correctly.

    Both results must come from the same trials (e.g. teacher-forced and generate mode of `score_trials`).
    """
    ta, tb = a.tables["trials"], b.tables["trials"]
    both = set(ta.loc[ta["correct"], "trial"]) & set(tb.loc[tb["correct"], "trial"])
    out: dict[str, Any] = {"n_trials": int(len(ta)), "n_common_correct": len(both), "spearman": math.nan,
                           "max_abs_diff": math.nan}
    if not both:
        return out
    scores = []
    for result in (a, b):
        c = result.tables["copies"]
        scores.append(c[c["trial"].isin(both)].groupby(["layer", "head"])["score"].mean().to_numpy())
    out["max_abs_diff"] = float(np.abs(scores[0] - scores[1]).max())
    if np.ptp(scores[0]) > 0 and np.ptp(scores[1]) > 0:
        out["spearman"] = float(spearmanr(scores[0], scores[1]).statistic)
    elif np.array_equal(scores[0], scores[1]):
        out["spearman"] = 1.0
    return out


# ---------------------------------------------------------------------------------------------------------------
# The probe


def context_lengths(access: ModelAccess, lengths: Sequence[int], config: RetrievalConfig) -> list[int]:
    """The probe's lengths clipped to [shortest prompt that fits, min(max_context_length, model maximum minus the
    answer)]: the scoring pass appends the answer (teacher-forced) or the generated tokens to the prompt, so a prompt
    at the model's full context (the `long` budget) leaves room for them."""
    low = minimum_context_length(access, config.task, config.n_digits)
    answer_room = config.n_digits + 2 + (config.extra_new_tokens if config.mode == "generate" else 0)
    model_high = access.info.max_positions - answer_room if access.info.max_positions else math.inf
    high = min(model_high, config.max_context_length or math.inf)
    if high < low:
        raise ProbeError(f"The retrieval probe needs contexts of at least {low} tokens for its {config.task} prompt, "
                         f"but at most {high} are allowed (model maximum / RetrievalConfig.max_context_length). "
                         f"Raise max_context_length or use a model with longer contexts.")
    return sorted({int(min(max(n, low), high)) for n in lengths})


def build_trials(access: ModelAccess, n_trials: int, lengths: Sequence[int], config: RetrievalConfig,
                 seed: int) -> list[NeedleTrial]:
    """The probe's trials: cells (length, depth) spread over the grid, each trial with its own seeded needle."""
    if config.depths is None:
        cells = grid_for_trials(lengths, n_trials)
    else:
        grid = [(length, float(d)) for d in config.depths for length in lengths]
        cells = [grid[i % len(grid)] for i in range(n_trials)]
    return [make_needle_trial(access, length, depth, seed * 1_000_003 + index, task=config.task,
                              n_digits=config.n_digits, index=index)
            for index, (length, depth) in enumerate(cells)]


def run_retrieval(ctx: ScanContext, config: RetrievalConfig) -> ProbeResult:
    """The retrieval probe on the scan's model: needle trials over the budget's lengths x depths, then scoring."""
    config = ctx.budgeted(PROBE.name, config)
    _check(config)
    if config.n_trials is None:
        raise ProbeError("RetrievalConfig.n_trials was left unset by the budget; give n_trials in the config or drop "
                         "the None from the Budget's probes= entry.")
    lengths = context_lengths(ctx.access, config.context_lengths or ctx.budget.context_lengths, config)
    trials = build_trials(ctx.access, config.n_trials, lengths, config, ctx.seed)
    return score_trials(ctx.access, trials, config, progress=ctx.progress, batch_size=ctx.batch_size)


PROBE = TaskProbe("retrieval", RetrievalConfig,
                  "retrieval heads (Wu et al.): needle-copying score per head over needle trials (lengths x depths)",
                  run_retrieval)
