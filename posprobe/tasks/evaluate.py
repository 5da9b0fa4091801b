"""The behavioural U-curve: accuracy of a retrieval task as a function of the gold item's position.

Owns `evaluate_positions` (docs/tasks.md, the behavioural U-curve; after Liu et al. 2023):
for every trial seed the same items are laid out once per gold position (gold moved, distractor order fixed),
answered greedily with the access's KV-cached `greedy`, scored by the task's exact-match rule, and summarised per
gold position with Wilson binomial intervals. A trial whose prompt the model cannot run (too long, out of memory:
`trial_errors`) is counted in `n_errors` and listed in the per-trial records, never dropped silently; any other
error (a misconfigured intervention, a bug) raises at once. Also owns `summarize_trials` and `wilson_interval`.

Batching: a greedy call takes rows of equal token length only (no padding, which the access does not support).
By default the prompts of one trial run as one batch (they have the same length by construction, see
`posprobe.tasks.base`); with `batch_size=N` the prompts of all trials are grouped by token length and each group
runs N rows at a time, across trials. Each row's completion is cut at its first stop token, so a batch gives the
same answers as one-at-a-time generation; records keep the trial order whatever the batching.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import numpy as np
import pandas as pd

from posprobe.errors import ContextLengthError, InputError
from posprobe.interventions.spec import resolve, runner_contexts
from posprobe.tasks.base import Prompt, Task

TRIAL_COLUMNS = ["task", "n_items", "gold_position", "relative_position", "trial", "seed", "n_tokens", "correct",
                 "error", "completion", "answer", "natural"]
SUMMARY_COLUMNS = ["task", "n_items", "gold_position", "relative_position", "n", "n_correct", "n_errors",
                   "accuracy", "ci_low", "ci_high"]


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ((nan, nan) when there are no trials)."""
    if trials <= 0:
        return math.nan, math.nan
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds at the edges (no 1e-17 residue)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def trial_seed(seed: int, trial: int) -> int:
    """The task seed of trial `trial` in a run with base seed `seed` (independent streams per base seed)."""
    return seed * 1_000_003 + trial


def even_positions(n_items: int, count: int) -> list[int]:
    """`count` evenly spaced gold positions over 0..n_items-1, always including the first and the last."""
    count = max(1, min(count, n_items))
    return sorted({int(round(x)) for x in np.linspace(0, n_items - 1, count)})


# --- interventions ---------------------------------------------------------------------------------------------------
# How an intervention reaches the access: posprobe.interventions.spec.runner_contexts (one place for every runner).


def _describe(obj: Any) -> Any:
    if obj is None:
        return None
    if is_dataclass(obj) and not isinstance(obj, type):
        try:
            return {"type": type(obj).__name__, **asdict(obj)}
        except TypeError:
            pass
    return repr(obj)


# --- generation ---------------------------------------------------------------------------------------------------


def _stop_ids(access: Any, task: Task) -> list[int]:
    ids = set()
    eos = getattr(access.tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    for text in task.stop_strings():
        encoded = access.encode(text, add_bos=False)
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
    return sorted(ids)


def _cut(row: list[int], stop: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop:
            return row[: i + 1]
    return row


def _generate(access: Any, prompts: Sequence[Prompt], max_new_tokens: int, stop: list[int],
              per_batch: Callable[[list[Prompt]], Any], prefill: dict[str, Any]) -> list[list[int]]:
    import torch

    ids = torch.tensor([p.input_ids for p in prompts], dtype=torch.long)
    with per_batch(list(prompts)):
        new = access.greedy(ids, max_new_tokens, stop_ids=stop, **prefill)
    stop_set = set(stop)
    return [_cut([int(t) for t in row], stop_set) for row in new.tolist()]


def _batches(prompts: Sequence[Prompt], batch_size: int) -> Iterator[list[int]]:
    """Indices into `prompts`, one list per greedy call: prompts of equal token length (no padding), in their
    order, at most `batch_size` a call; the lengths in the order they first occur."""
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(prompt.n_tokens, []).append(index)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


# --- the evaluation ---------------------------------------------------------------------------------------------------


def evaluate_positions(
    model: Any = None,
    task: str | Task = "kv_words",
    n_items: int | Sequence[int] | None = None,
    gold_positions: int | Sequence[int] | None = None,
    n_trials: int = 40,
    intervention: Any = None,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool | None = None,
    tokenizer: Any = None,
    prefill_chunk: int | str | None = "auto",
) -> pd.DataFrame:
    """Accuracy of `task` per gold position (the behavioural U-curve of Liu et al. 2023), with Wilson 95% intervals.

    model: anything `posprobe.load_model` accepts (None = the embedded Gemma 3 270M). task: a registered name
    (`posprobe.tasks.list_tasks()`) or a Task object. n_items: items per prompt (an int or several; default the
    task's). gold_positions: explicit 0-based slots (negative = from the end), or a count of evenly spaced slots
    (default 5, first and last included). n_trials: trials per (n_items, gold position); trial t uses task seed
    `seed * 1_000_003 + t`, the same items for every gold position.

    intervention: None; an intervention spec (`posprobe.interventions`, e.g. `MaskHeads(heads=[(5, 1)])`), its
    text form (`"mask_heads:heads=L5H1"`) or a spec bound to this same access (`mask_heads(access, heads)`),
    applied to the access this function runs, per generation batch for per-prompt specs (Found-in-the-Middle); a
    spec bound to another access raises. Also the user's own forms: a context manager (entered once around all
    trials, e.g. `access.editing(edits)`); a callable `access -> context manager`; or an object with a
    `prompt_context(access, prompts) -> context manager` method, entered around every generation batch with the
    batch's prompts (row r is prompts[r]; their `spans` locate each document).

    batch_size: rows per greedy call. Default (None): the gold positions of one trial, one trial at a time. An int
    packs rows across trials (and n_items), grouped by token length, e.g. 32 on a GPU for fewer greedy calls;
    prompts of different lengths never share a call. Answers equal batch_size=1; an intervention's
    `prompt_context` gets each call's prompts; a prompt that cannot run is still one errored trial row (a failed
    batch is retried row by row). Returns one row per
    (n_items, gold_position): `task, n_items, gold_position, relative_position, n, n_correct, n_errors, accuracy,
    ci_low, ci_high` (accuracy over the trials that ran; `n` counts them; trials the model could not run are in
    `n_errors`).
    prefill_chunk: prompt tokens per prefill pass of the KV-cached greedy call (`HFAccess.greedy`). "auto"
    (default): one pass unless one layer's attention scores over the prompt would exceed the memory budget
    (`posprobe.devices.prefill_chunk_size`), then chunks that fit; None: one pass; an int: chunks of that size.
    Answers equal one pass (to float rounding); what changes is the prefill's peak memory (docs/hardware.md,
    "Memory of greedy decoding"). Another backend's greedy takes "auto" only.
    `table.attrs` holds provenance and speed (`tokens_per_second`, `prompt_tokens`, `generated_tokens`,
    `seconds`, `n_errors`, `model`, `seed`, `task_config`, `intervention`: the spec's settings, what they resolved
    to and its calibrations) and `trials`: per-trial records
    (`pd.DataFrame(table.attrs["trials"])`: completion, correct, error, ...).
    """
    from posprobe.models import load_model
    from posprobe.tasks.registry import get_task

    resolve(intervention, model)  # a malformed spec, or one bound to another model, raises before loading
    access = load_model(model, tokenizer=tokenizer)
    outer, per_batch, spec = runner_contexts(intervention, access, runner="evaluate_positions")
    task_obj = get_task(task)
    sizes = [task_obj.default_items] if n_items is None else ([n_items] if isinstance(n_items, int) else
                                                              list(n_items))
    if not isinstance(n_trials, int) or n_trials < 1:
        raise InputError(f"n_trials must be a positive integer; got {n_trials!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be a positive integer (rows per greedy call) or None (one batch per "
                         f"trial); got {batch_size!r}.")
    steps = max_new_tokens or task_obj.max_new_tokens
    prefill = _prefill_keywords(access, prefill_chunk)
    stop = _stop_ids(access, task_obj)
    plan = [(size, _positions(size, gold_positions)) for size in sizes]
    total = sum(n_trials * len(positions) for _, positions in plan)
    show = sys.stderr.isatty() if progress is None else progress
    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    prompt_tokens = generated_tokens = 0
    gen_seconds = 0.0
    started = time.time()

    def trial_rows(size: int, positions: list[int], trial: int) -> list[tuple[int, int, Prompt]]:
        return [(size, trial, task_obj.make(access, size, g, trial_seed(seed, trial))) for g in positions]

    # A unit is a list of (n_items, trial, prompt) rows batched together, and its rows per call: one trial (default)
    # or every prompt of the run. Generators, so prompts are made inside `outer` as the runs need them.
    units: Iterator[tuple[list[tuple[int, int, Prompt]], int]] = (
        ((trial_rows(size, positions, trial), len(positions)) for size, positions in plan for trial in range(n_trials))
        if batch_size is None else
        iter([([row for size, positions in plan for trial in range(n_trials)
                for row in trial_rows(size, positions, trial)], batch_size)]))
    with outer, tqdm(total=total, disable=not show, desc=f"{task_obj.name} prompts", file=sys.stderr,
                     leave=False) as bar:
        for unit, rows_per_call in units:
            outputs: dict[int, tuple[list[int], str | None]] = {}
            for indices in _batches([prompt for _, _, prompt in unit], rows_per_call):
                t0 = time.time()
                outputs.update(zip(indices, _generate_or_errors(access, [unit[i][2] for i in indices], steps, stop,
                                                                per_batch, prefill)))
                gen_seconds += time.time() - t0
                bar.update(len(indices))
            for index, (size, trial, prompt) in enumerate(unit):
                row, error = outputs[index]
                completion = access.decode(row) if error is None else ""
                prompt_tokens += prompt.n_tokens if error is None else 0
                generated_tokens += len(row)
                records.append({
                    "task": task_obj.name, "n_items": size, "gold_position": prompt.gold_index,
                    "relative_position": prompt.gold_index / max(size - 1, 1), "trial": trial,
                    "seed": trial_seed(seed, trial), "n_tokens": prompt.n_tokens,
                    "correct": bool(error is None and task_obj.score(prompt, completion)),
                    "error": error or "", "completion": completion, "answer": prompt.answer,
                    "natural": prompt.natural,
                })
    trials = pd.DataFrame(records, columns=TRIAL_COLUMNS)
    table = summarize_trials(trials)
    n_errors = int((trials["error"] != "").sum())
    if n_errors:
        first = trials.loc[trials["error"] != "", "error"].iloc[0]
        warnings.warn(f"{n_errors} of {len(trials)} trials raised and are excluded from accuracy (counted in "
                      f"n_errors); first error: {first}", RuntimeWarning, stacklevel=2)
    table.attrs.update({
        "model": access.info.name,
        "task": task_obj.name,
        "task_config": _describe(task_obj),
        "seed": seed,
        "n_trials": n_trials,
        "max_new_tokens": steps,
        "prefill_chunk": prefill_chunk,
        "intervention": spec.describe(access) if spec is not None else _describe(intervention),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated_tokens,
        "seconds": time.time() - started,
        "generation_seconds": gen_seconds,
        "tokens_per_second": (prompt_tokens + generated_tokens) / gen_seconds if gen_seconds > 0 else math.nan,
        "n_errors": n_errors,
        "trials": trials.to_dict("records"),
    })
    return table


def _positions(n_items: int, gold_positions: int | Sequence[int] | None) -> list[int]:
    if gold_positions is None:
        return even_positions(n_items, 5)
    if isinstance(gold_positions, int):
        if gold_positions < 1:
            raise InputError(f"gold_positions as a count must be >= 1; got {gold_positions}.")
        return even_positions(n_items, gold_positions)
    out = []
    for g in gold_positions:
        index = g + n_items if g < 0 else g
        if not 0 <= index < n_items:
            raise InputError(f"gold position {g} is outside 0..{n_items - 1} for n_items={n_items}. Give positions "
                             f"inside the list (negative counts from the end) or a count of evenly spaced ones.")
        out.append(int(index))
    return sorted(set(out))


def trial_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that come from running the model on one prompt and are recorded for that trial alone: a prompt
    longer than the model supports, out of memory. Everything else (posprobe errors of a misconfigured
    intervention, TypeError / AttributeError bugs, ...) raises at once with its traceback."""
    import torch

    return ContextLengthError, torch.OutOfMemoryError, MemoryError


def _prefill_keywords(access: Any, prefill_chunk: Any) -> dict[str, Any]:
    """The `prefill_chunk` keyword for `access.greedy`: none for "auto" (any access's greedy runs as it chooses);
    a chosen value only for a greedy that takes it (the HF adapter's, or a wrapper passing **kwargs on), else the
    InputError saying so."""
    import inspect

    from posprobe.devices import check_prefill_chunk

    if check_prefill_chunk(prefill_chunk) == "auto":
        return {}
    try:
        params = inspect.signature(access.greedy).parameters
        takes = "prefill_chunk" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):  # pragma: no cover - a builtin greedy
        takes = False
    if not takes:
        raise InputError(f"prefill_chunk={prefill_chunk!r} was given, but this access's greedy ("
                         f"{type(access).__name__}, backend {getattr(access, 'backend', '?')!r}) does not prefill a "
                         f"KV cache in chunks. Leave prefill_chunk='auto', or use backend='hf'.")
    return {"prefill_chunk": prefill_chunk}


def _generate_or_errors(access: Any, batch: list[Prompt], steps: int, stop: list[int],
                        per_batch: Callable[[list[Prompt]], Any],
                        prefill: dict[str, Any]) -> list[tuple[list[int], str | None]]:
    """Generate a batch; if running it fails (see `trial_errors`), retry row by row so one prompt that is too long
    or too big costs only its own trial."""
    recorded = trial_errors()
    try:
        return [(row, None) for row in _generate(access, batch, steps, stop, per_batch, prefill)]
    except recorded as exc:
        if len(batch) == 1:
            return [([], f"{type(exc).__name__}: {exc}")]
    out: list[tuple[list[int], str | None]] = []
    for prompt in batch:
        try:
            out.append((_generate(access, [prompt], steps, stop, per_batch, prefill)[0], None))
        except recorded as exc:
            out.append(([], f"{type(exc).__name__}: {exc}"))
    return out


def summarize_trials(trials: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per (task, n_items, gold_position): trials run, correct, errors, accuracy and its Wilson interval."""
    rows = []
    for (task, size, gold), group in trials.groupby(["task", "n_items", "gold_position"], sort=True):
        ok = group[group["error"] == ""]
        n, k = len(ok), int(ok["correct"].sum())
        low, high = wilson_interval(k, n, confidence)
        rows.append({"task": task, "n_items": int(size), "gold_position": int(gold),
                     "relative_position": float(group["relative_position"].iloc[0]), "n": n, "n_correct": k,
                     "n_errors": len(group) - n, "accuracy": k / n if n else math.nan, "ci_low": low,
                     "ci_high": high})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# --- a position sweep as a scan ---------------------------------------------------------------------------------------


def _label(intervention: Any, access: Any) -> str:
    spec = resolve(intervention, access)
    if intervention is None:
        return "none"
    return str(spec) if spec is not None else repr(intervention)


def position_sweep(
    model: Any = None,
    task: str | Task = "kv_words",
    n_items: int | Sequence[int] | None = None,
    gold_positions: int | Sequence[int] | None = None,
    n_trials: int = 40,
    interventions: Sequence[Any] = (),
    seed: int = 0,
    *,
    baseline: bool = True,
    batch_size: int | None = None,
    progress: bool | None = None,
    tokenizer: Any = None,
    backend: str | None = None,
) -> Any:
    """`evaluate_positions` for the baseline and every intervention on ONE access, as a `Scan` the explorer shows.

    Every condition uses the same trials (seeds), so conditions differ only by the intervention. The Scan holds
    the summary in `tables["evaluate.<task>"]` (one row per intervention x n_items x gold position; column
    `intervention` is "none" or the spec's text form, e.g. "mask_heads:heads=L5H1"), every trial in
    `tables["evaluate.trials"]`, an identity heads table (no head metrics) and, in `meta["evaluate"]`, the task,
    positions, trials, seed and each condition's provenance (settings, resolved values, calibrations). Everything
    that can be checked without the model (task, intervention text, specs bound to another access) is checked
    before the model is loaded.
    """
    from posprobe.models import load_model
    from posprobe.scan import results_scan
    from posprobe.tasks.registry import get_task

    started = time.time()
    task_obj = get_task(task)
    conditions = ([None] if baseline else []) + list(interventions)
    if not conditions:
        raise InputError("position_sweep has nothing to run: baseline=False and no interventions.")
    for intervention in conditions:
        resolve(intervention, model)
    sizes = [task_obj.default_items] if n_items is None else ([n_items] if isinstance(n_items, int) else
                                                              list(n_items))
    for size in sizes:
        _positions(size, gold_positions)
    access = load_model(model, tokenizer=tokenizer, backend=backend)
    summaries: list[pd.DataFrame] = []
    trials: list[pd.DataFrame] = []
    described: list[Any] = []
    for intervention in conditions:
        label = _label(intervention, access)
        if label in {d["label"] for d in described}:
            raise InputError(f"The intervention {label!r} is given twice; each condition of a sweep must differ.")
        table = evaluate_positions(access, task_obj, sizes, gold_positions, n_trials, intervention, seed,
                                   batch_size=batch_size, progress=progress)
        summaries.append(table.assign(intervention=label))
        trials.append(pd.DataFrame(table.attrs["trials"], columns=TRIAL_COLUMNS).assign(intervention=label))
        described.append({"label": label, "intervention": table.attrs["intervention"],
                          "n_errors": table.attrs["n_errors"], "seconds": table.attrs["seconds"],
                          "tokens_per_second": table.attrs["tokens_per_second"]})
    summary = pd.concat(summaries, ignore_index=True)
    summary = summary[["intervention", *[c for c in summary.columns if c != "intervention"]]]
    return results_scan(  # provenance (model, backend, weights_hash, model_info, versions, created) as scan()'s
        access, tables={f"evaluate.{task_obj.name}": summary, "evaluate.trials": pd.concat(trials, ignore_index=True)},
        budget={"name": "evaluate"}, seed=seed, text_source=None,
        evaluate={"task": task_obj.name, "task_config": _describe(task_obj), "n_items": sizes,
                  "gold_positions": sorted(set(summary["gold_position"].tolist())), "n_trials": n_trials,
                  "conditions": described},
        timings_s={"total": time.time() - started})


__all__ = ["evaluate_positions", "even_positions", "position_sweep", "summarize_trials", "trial_seed",
           "wilson_interval"]
