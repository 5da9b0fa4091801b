"""Single-dimension scaling against position bias (Yu et al. 2024, "Mitigate Position Bias in Large Language Models
via Scaling a Single Dimension"; docs/interventions.md).

Owns the search for positional hidden dimensions (`find_positional_dimensions`), the scaling intervention spec
`PositionalDimension` (registered as "positional_dimension"; `scale_dimension` / `positional_dimension` build it and
bind it to an access), and the task-loss measurement the search validates with (`answer_loss`).

Search (after the paper's reference code; the numbers are config fields):
1. residual stream (`resid_post` of every layer) averaged over seeded random-character sequences -> [L, n, D];
2. per layer and dimension, the min-max normalised curve after the first `fit_skip` of positions is fitted with a
   cubic; the dimension is monotonic in that layer if the fitted curve never changes direction; a dimension's
   monotonic layers are its increasing or its decreasing ones, whichever are more; dimensions monotonic in more than
   L/4 layers are kept;
3. kept dimensions are ranked by smoothness (the smallest, over their monotonic layers, sum of squared second
   differences of the Savitzky-Golay-smoothed normalised curve after `smooth_skip`; small = smooth);
4. the `top_k` smoothest are validated by task loss: the answer loss of a held-out task split with the dimension
   scaled by `validation_factor` (the paper uses 0); candidates are then ranked by that loss.

Scaling: in the chosen layers, that dimension of the post-norm attention input is multiplied by `factor` when
computing the keys of every position and the query of the last position only (`ProjectionInputEdit(keys=True,
queries="last")`); values use the unscaled input. In generation every decoding step treats the newest token as
"the last position" and every earlier token as a non-last one, exactly as if the whole sequence were recomputed
each step (the HF adapter does this KV-cached with two one-token passes per step; other backends recompute).
Leaving the block removes the edits: logits are bit-for-bit what they were before.
"""

from __future__ import annotations

import dataclasses
import math
import random
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import numpy as np
import pandas as pd
import torch

from posprobe.access import (
    Edit,
    LayerCapture,
    ModelAccess,
    ModelInfo,
    ProjectionInputEdit,
    Tap,
)
from posprobe.errors import InterventionError, UnknownNameError
from posprobe.interventions.spec import (
    Bound,
    Intervention,
    LayerRange,
    calibrated,
    layer_range_of,
    register,
    runner_contexts,
)
from posprobe.tasks.base import Prompt, Task

# The dimension the search finds on the embedded model, with the factor and layers tuned on kv_words (20 pairs,
# tuning seeds 1 * 1_000_003 + t; analyses/calibration.py); used when positional_dimension() is called without dim.
# Gemma 3 270M: dim 558 is decreasing in position and monotonic in 14 of the 15 searched layers (3-16), by far the
# smoothest (0.040; next 0.157), and zeroing it lowers the validation answer loss most (0.565 -> 0.484). Factor sweep
# in layers 9:18 (stepwise answer loss; none: 0.501): 0.5 -> 0.437, 0 -> 0.386, -0.5 -> 0.346, -1 -> 0.324,
# -2 -> 0.355; in the reference-like layers 6:17 the same grid gives 0.451 / 0.416 / 0.394 / 0.385.
# name -> (dim, factor, layers)
KNOWN_DIMENSIONS: dict[str, tuple[int, float, LayerRange]] = {"gemma-3-270m": (558, -1.0, LayerRange(9, 18))}


@dataclass(frozen=True)
class PositionalDimensionSearchConfig:
    """How `find_positional_dimensions` searches (Yu et al. 2024; reference values in comments)."""

    n_sequences: int = 24  # random-character sequences averaged (reference: 200+ of 1000 tokens; CPU budget here)
    length: int = 512  # tokens per sequence; 512 = Gemma 3's sliding window, every layer sees the whole prefix
    add_bos: bool = True  # BOS first, as the model is used (Gemma's attention sink lives on BOS)
    seed: int = 0  # seed of the random strings
    degree: int = 3  # polynomial degree of the monotonicity fit (reference: cubic)
    fit_skip: float = 0.3  # share of the first positions left out of the fit (reference: 300 of 1000 tokens)
    smooth_skip: float = 0.2  # share left out of the smoothness measure (reference: 200 of 1000)
    smooth_window: int = 11  # Savitzky-Golay window (odd; reference 10) with polyorder 3
    min_layer_share: float = 0.25  # keep dims monotonic in more than this share of the layers (reference: L // 4)
    search_layers: LayerRange | str | range | None = None  # layers tested; None: 2:L-1 (reference)
    top_k: int = 5  # smoothest candidates validated by task loss (reference: 10 by smoothness, 3 by loss)
    validate: bool = True  # run the task-loss validation (needs separate q/k projections, e.g. Llama, Gemma)
    validation_task: str = "kv_words"  # task of the held-out validation split
    validation_items: int = 20  # items per validation prompt
    validation_positions: int = 5  # evenly spaced gold positions
    validation_trials: int = 6  # trials per gold position
    validation_seed: int = 4242  # base seed: task seeds 4242 * 1_000_003 + t, disjoint from evaluation seeds 0..100
    validation_factor: float = 0.0  # the scaling used while validating (reference: 0)
    validation_layers: LayerRange | str | range | None = None  # scaled while validating; None: default_layers

    def __post_init__(self) -> None:
        for name in ("search_layers", "validation_layers"):
            layers = LayerRange.coerce(getattr(self, name), f"PositionalDimensionSearchConfig.{name}")
            object.__setattr__(self, name, layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("search_layers", "validation_layers"):
            d[name] = None if getattr(self, name) is None else str(getattr(self, name))
        return d


def default_layers(info: ModelInfo) -> list[int]:
    """Layers scaled by default: the reference's 10..25 of 28 (Gemma 7B) as shares of depth: 0.36 L .. 0.93 L."""
    n = info.n_layers
    first = min(n - 1, int(round(0.36 * n)))
    last = max(first, min(n - 1, int(round(0.93 * n)) - 1))
    return list(range(first, last + 1))


def _layer_list(info: ModelInfo, layers: LayerRange | str | range | None) -> list[int]:
    chosen = LayerRange.coerce(layers, "positional_dimension layers")
    return default_layers(info) if chosen is None else chosen.indices(info.n_layers, info.name)


# ---------------------------------------------------------------------------------------------------------------
# Scaling


def _dims(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [x for x in value.split(",") if x.strip()]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = [value]
    try:
        dims = tuple(sorted({int(d) for d in value}))
    except (TypeError, ValueError):
        raise InterventionError(f"dims must be residual dimension indices (an int, a list, or text \"558\"); got "
                                f"{value!r}.") from None
    if any(d < 0 for d in dims):
        raise InterventionError(f"dims must be non-negative residual dimension indices; got {list(dims)}.")
    return dims


@register
@dataclass(frozen=True)
class PositionalDimension(Intervention):
    """Scale residual dimension(s) of the attention input for keys (all positions) and the last query.

    Unset settings resolve on the access it is applied to: the dimension, factor and layers recorded for the model
    (KNOWN_DIMENSIONS); for a model without a record the dimension comes from `find_positional_dimensions` run on
    that access (once, cached on it, recorded in provenance), the factor is 0 (the paper's) and the layers
    `default_layers`.
    """

    name: ClassVar[str] = "positional_dimension"
    summary: ClassVar[str] = "scale a positional residual dimension for keys and the last query (Yu et al. 2024)"

    dims: int | Sequence[int] | str | None = field(default=(), metadata={  # stored as a sorted tuple
        "help": "residual dimensions; none = recorded for the model, else found by the search on it"})
    factor: float | int | None = field(default=None, metadata={"help": "multiplier; none = recorded, else 0"})
    layers: LayerRange | str | range | None = field(default=None, metadata={
        "help": "START:STOP (stop exclusive); none = recorded, else 0.36L to 0.93L"})
    search_sequences: int = field(default=24, metadata={
        "help": "random strings averaged when the dimension must be searched"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", _dims(self.dims))
        object.__setattr__(self, "layers", LayerRange.coerce(self.layers, "positional_dimension layers"))
        if self.factor is not None:
            try:
                factor = float(self.factor)
            except (TypeError, ValueError):
                factor = math.nan
            if not math.isfinite(factor):
                raise InterventionError(f"factor must be a finite number (the paper's grid: 0.5, 0, -0.5, -1); got "
                                        f"{self.factor!r}.")
            object.__setattr__(self, "factor", factor)

    def settings(self, access: ModelAccess) -> tuple[tuple[int, ...], float, list[int], str]:
        """(dims, factor, layers, source of the dimension) on `access`; searches once per access when needed."""
        info = access.info
        known = KNOWN_DIMENSIONS.get(info.name)
        dims = cast(tuple[int, ...], self.dims)  # a sorted tuple after __post_init__
        factor, layers, source = self.factor, self.layers, "given"
        if not dims:
            if known is not None:
                dims, source = (known[0],), "recorded (KNOWN_DIMENSIONS)"
                factor = known[1] if factor is None else factor
                layers = known[2] if layers is None else layers
            else:
                dims, source = (self._searched(access),), "find_positional_dimensions on this model"
        bad = [d for d in dims if not 0 <= d < info.d_model]
        if bad:
            raise InterventionError(f"Dimensions {bad} do not exist: {info.name}'s residual stream has d_model = "
                                    f"{info.d_model} dimensions (0..{info.d_model - 1}).")
        return dims, 0.0 if factor is None else float(factor), _layer_list(info, layers), source

    def _searched(self, access: ModelAccess) -> int:
        config = PositionalDimensionSearchConfig(n_sequences=self.search_sequences)

        def search() -> PositionalDimensionSearch:
            return find_positional_dimensions(access, config)

        def record(found: PositionalDimensionSearch) -> dict[str, Any]:
            return {"search_config": config.to_dict(), "best": found.best,
                    "candidates": found.candidates.head(5).to_dict("records"), "baseline": found.baseline}

        return calibrated(access, (self.name, "search", *config.to_dict().items()), search, record).best

    def edits(self, access: ModelAccess) -> list[Edit]:
        dims, factor, layers, _ = self.settings(access)
        edits: list[Edit] = [ProjectionInputEdit(layer, dims, factor, keys=True, queries="last") for layer in layers]
        probe = access.encode("a b", add_bos=True)[:2] or [0]
        try:  # surface an adapter that cannot scale projection inputs now, not in the middle of an evaluation
            access.run(probe, edits=edits)
        except InterventionError as exc:
            raise InterventionError(f"positional_dimension cannot run on {access.info.name}: {exc}") from None
        return edits

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        dims, factor, layers, source = self.settings(access)
        return {"dims": list(dims), "factor": factor, "layers": layer_range_of(layers), "source": source}


ScaleDimension = PositionalDimension  # the name of the class before specs (issue 16)


def scale_dimension(model: Any, dim: int | Sequence[int], factor: float | int, layers: Any = None
                    ) -> PositionalDimension | Bound:
    """Scale residual dimension `dim` (or several) by `factor` in `layers` when computing keys (all positions) and
    the query of the last position (Yu et al. 2024). layers: a LayerRange / "9:18" (stop exclusive) or None for
    `default_layers`. model: a ModelAccess (returns the spec bound to it: `with scale_dimension(access, 297, 0.0)
    as model: ...`) or None (the spec, for `evaluate_positions(model, intervention=...)`)."""
    spec = PositionalDimension(dims=dim, factor=factor, layers=LayerRange.coerce(layers, "scale_dimension layers"))
    return spec if model is None else spec.bind(model)


def positional_dimension(model: Any = None, dim: int | None = None, factor: float | int | None = None,
                         layers: Any = None) -> PositionalDimension | Bound:
    """The `PositionalDimension` spec with the model's recorded defaults for whatever is not given (KNOWN_DIMENSIONS;
    for other models the search runs on the access it is applied to). model: a ModelAccess (bound) or None."""
    spec = PositionalDimension(dims=() if dim is None else dim, factor=factor,
                               layers=LayerRange.coerce(layers, "positional_dimension layers"))
    return spec if model is None else spec.bind(model)


# ---------------------------------------------------------------------------------------------------------------
# Task loss (validation of the search; also the tuning measure of analyses/calibration.py)


def answer_loss(access: ModelAccess, prompts: Sequence[Prompt], *, intervention: Any = None,
                stepwise: bool = False, batch_rows: int = 8) -> pd.DataFrame:
    """Per prompt: `loss` (mean negative log-likelihood of the answer tokens), `first_loss` (of the first answer
    token that is not whitespace), `correct` (every answer token is the argmax: greedy would produce the answer).

    stepwise=False: one teacher-forced pass over prompt + answer (edits see the answer tokens as ordinary queries);
    stepwise=True: one pass per answer token with the logits of the last position, exactly what greedy decoding with
    full recomputation computes (needed for edits defined on "the last position", such as `scale_dimension`).
    """
    outer, per_batch, _ = runner_contexts(intervention, access, runner="answer_loss")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(prompts):
        if not p.answer_ids:
            raise InterventionError(f"Prompt {i} has no answer tokens; answer_loss needs task prompts with answers.")
        groups.setdefault((p.n_tokens, len(p.answer_ids)), []).append(i)
    records: dict[int, dict[str, Any]] = {}
    with outer:
        for (_, _n_answer), indices in sorted(groups.items()):
            for at in range(0, len(indices), max(1, batch_rows)):
                rows = [prompts[i] for i in indices[at : at + max(1, batch_rows)]]
                answers = torch.tensor([p.answer_ids for p in rows], dtype=torch.long)  # [b, m]
                with per_batch(rows):
                    logprobs = _answer_logprobs(access, rows, answers, stepwise)  # [b, m, V] log-softmax rows
                picked = logprobs.gather(-1, answers[..., None])[..., 0]  # [b, m]
                argmax_ok = (logprobs.argmax(-1) == answers).all(-1)
                for r, i in enumerate(indices[at : at + max(1, batch_rows)]):
                    p = prompts[i]
                    first = next((j for j, t in enumerate(p.answer_ids)
                                  if access.decode([t]).strip()), 0)
                    records[i] = {"task": p.task, "n_items": p.n_items, "gold_position": p.gold_index,
                                  "seed": p.seed, "loss": float(-picked[r].mean()),
                                  "first_loss": float(-picked[r, first]), "correct": bool(argmax_ok[r])}
    return pd.DataFrame([records[i] for i in range(len(prompts))])


def _logits(logits: torch.Tensor | None) -> torch.Tensor:
    if logits is None:  # pragma: no cover - run(logits=...) always returns them; a broken adapter would not
        raise InterventionError("The model access returned no logits for a run that asked for them.")
    return logits


def _answer_logprobs(access: ModelAccess, rows: list[Prompt], answers: torch.Tensor, stepwise: bool) -> torch.Tensor:
    ids = torch.tensor([p.input_ids for p in rows], dtype=torch.long)
    n, m = ids.shape[1], answers.shape[1]
    if not stepwise:
        full = torch.cat([ids, answers[:, :-1]], 1)
        logits = _logits(access.run(full, logits=list(range(n - 1, n - 1 + m))).logits)
        return torch.log_softmax(logits.double(), -1)
    steps = []
    for s in range(m):
        full = torch.cat([ids, answers[:, :s]], 1)
        steps.append(torch.log_softmax(_logits(access.run(full, logits="last").logits)[:, -1].double(), -1))
    return torch.stack(steps, 1)


def task_prompts(access: ModelAccess, task: str | Task, n_items: int, positions: int | Sequence[int], trials: int,
                 seed: int) -> list[Prompt]:
    """Prompts of `task` for `trials` seeds (task seed `seed * 1_000_003 + t`) x gold positions (as
    evaluate_positions)."""
    from posprobe.tasks import get_task
    from posprobe.tasks.evaluate import _positions, trial_seed

    task_obj = get_task(task)
    slots = _positions(n_items, positions)
    return [task_obj.make(access, n_items, g, trial_seed(seed, t)) for t in range(trials) for g in slots]


# ---------------------------------------------------------------------------------------------------------------
# Search


@dataclass
class PositionalDimensionSearch:
    """Result of `find_positional_dimensions`.

    candidates: one row per dimension kept by the monotonicity filter, best first (`rank`), with `direction`,
    `n_monotonic_layers`, `monotonic_layers`, `smoothness`, `smoothness_rank` and, for validated ones,
    `validation_loss`, `validation_accuracy`, `loss_change` (vs. the unscaled model). `mean_hidden`: [L, n, D] the
    averaged residual stream (the curves are its columns); `baseline`: the unscaled validation loss / accuracy.
    """

    candidates: pd.DataFrame
    mean_hidden: np.ndarray
    config: PositionalDimensionSearchConfig
    model: str
    baseline: dict[str, float] = field(default_factory=dict)
    monotonic_counts: np.ndarray | None = None  # [D] number of monotonic layers per dimension

    @property
    def best(self) -> int:
        if self.candidates.empty:
            raise InterventionError("The search kept no dimension: none is monotonic in position in more than "
                                    f"{self.config.min_layer_share:.0%} of the layers.")
        return int(self.candidates["dim"].iloc[0])

    def curves(self, dims: Iterable[int] | None = None, step: int = 1) -> pd.DataFrame:
        """Evidence: averaged residual value by position for `dims` (default the top 5), every layer:
        columns dim, layer, position, value, monotonic (this layer counts for the dim)."""
        dims = list(self.candidates["dim"].head(5)) if dims is None else [int(d) for d in dims]
        n_layers, n_pos, _ = self.mean_hidden.shape
        positions = np.arange(0, n_pos, max(1, step))
        mono = {int(r.dim): set(int(x) for x in str(r.monotonic_layers).split(",") if x)
                for r in self.candidates.itertuples()}
        frames = []
        for dim in dims:
            for layer in range(n_layers):
                frames.append(pd.DataFrame({"dim": dim, "layer": layer, "position": positions,
                                            "value": self.mean_hidden[layer, positions, dim],
                                            "monotonic": layer in mono.get(dim, set())}))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["dim", "layer", "position", "value", "monotonic"])

    def curve_frame(self, dims: Iterable[int] | None = None, step: int = 4) -> pd.DataFrame:
        """The evidence curves in posprobe's curve format (curve "positional_dimension", series "dim <d>")."""
        df = self.curves(dims, step)
        return pd.DataFrame({"curve": "positional_dimension", "series": "dim " + df["dim"].astype(str),
                             "layer": df["layer"].astype("int64"), "head": -1, "x": df["position"].astype(float),
                             "y": df["value"].astype(float)})


def random_string_ids(access: ModelAccess, length: int, seed: int, add_bos: bool = True) -> list[int]:
    """`length` token ids of a seeded random-character string (letters, digits, punctuation, some spaces)."""
    rng = random.Random(f"positional_dimension/{seed}")
    alphabet = string.ascii_letters + string.digits + string.punctuation + "     "
    ids: list[int] = list(access.encode("", add_bos=True)) if add_bos else []
    while len(ids) < length:
        chunk = "".join(rng.choice(alphabet) for _ in range(4 * length))
        ids.extend(access.encode(chunk, add_bos=False))
    return ids[:length]


def mean_hidden_states(access: ModelAccess, config: PositionalDimensionSearchConfig,
                       progress: Callable[[Iterable[Any], str], Iterable[Any]] | None = None) -> np.ndarray:
    """Residual stream after every layer averaged over `n_sequences` random strings: [L, length, D] (float64)."""
    info = access.info
    length = min(config.length, info.max_positions or config.length)
    total = np.zeros((info.n_layers, length, info.d_model))
    batches = [list(range(s, min(s + 4, config.n_sequences))) for s in range(0, config.n_sequences, 4)]
    iterator: Iterable[Any] = batches if progress is None else progress(batches, "random-string passes")
    for batch in iterator:
        ids = torch.tensor([random_string_ids(access, length, config.seed * 100_003 + i, config.add_bos)
                            for i in batch])

        def on_layer(cap: LayerCapture) -> None:
            if cap.resid_post is not None:  # asked for below (taps=RESID_POST)
                total[cap.layer] += cap.resid_post.double().sum(0).numpy()

        access.run(ids, taps={Tap.RESID_POST}, on_layer=on_layer)
    return total / max(config.n_sequences, 1)


def _normalise(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-max normalise columns of [n, D]; also a mask of non-constant columns."""
    low, high = curves.min(0), curves.max(0)
    spread = high - low
    ok = spread > 1e-12 * np.maximum(1.0, np.abs(high))
    return (curves - low) / np.where(ok, spread, 1.0), ok


def monotonic_directions(curve: np.ndarray, degree: int = 3) -> np.ndarray:
    """Per column of [n, D]: +1 if a degree-`degree` fit of the normalised curve never decreases, -1 if it never
    increases, 0 otherwise (constant columns: 0)."""
    y, ok = _normalise(curve)
    x = np.linspace(0.0, 1.0, len(y))
    coefs = np.polyfit(x, y, degree)  # [deg + 1, D]
    fitted = np.vander(x, degree + 1) @ coefs  # [n, D]
    diff = np.diff(fitted, axis=0)
    tol = 1e-9
    inc = np.all(diff >= -tol, axis=0)
    dec = np.all(diff <= tol, axis=0)
    out = np.where(inc & ~dec, 1, np.where(dec & ~inc, -1, 0))
    return np.where(ok, out, 0)


def smoothness(curve: np.ndarray, window: int = 11) -> np.ndarray:
    """Per column of [n, D]: sum of squared second differences of the Savitzky-Golay-smoothed normalised curve."""
    from scipy.signal import savgol_filter

    y, ok = _normalise(curve)
    window = min(window, len(y) - (1 - len(y) % 2))  # odd and <= n
    if window > 3:
        y = savgol_filter(y, window_length=window, polyorder=3, axis=0)
    out = np.square(np.diff(y, n=2, axis=0)).sum(0)
    return np.where(ok, out, np.inf)


def _search_layers(info: ModelInfo, config: PositionalDimensionSearchConfig) -> list[int]:
    chosen = LayerRange.coerce(config.search_layers, "PositionalDimensionSearchConfig.search_layers")
    if chosen is not None:
        return chosen.indices(info.n_layers, info.name)
    return list(range(2, info.n_layers - 1)) if info.n_layers >= 6 else list(range(info.n_layers))


def rank_dimensions(mean_hidden: np.ndarray, config: PositionalDimensionSearchConfig,
                    layers: Sequence[int]) -> tuple[pd.DataFrame, np.ndarray]:
    """Steps 2-3 of the search on averaged states [L, n, D]: candidates (smoothest first) and monotonic counts [D]."""
    n_layers, n_pos, d_model = mean_hidden.shape
    fit_from = int(round(config.fit_skip * n_pos))
    smooth_from = int(round(config.smooth_skip * n_pos))
    if n_pos - fit_from < config.degree + 2:
        raise InterventionError(f"Too few positions ({n_pos}) for a degree-{config.degree} fit after skipping "
                                f"{fit_from}; use longer sequences (config.length).")
    directions = np.stack([monotonic_directions(mean_hidden[layer, fit_from:], config.degree) for layer in layers])
    smooth = np.stack([smoothness(mean_hidden[layer, smooth_from:], config.smooth_window) for layer in layers])
    increasing = (directions == 1).sum(0)
    decreasing = (directions == -1).sum(0)
    use_inc = increasing > decreasing
    counts = np.where(use_inc, increasing, decreasing)
    threshold = int(config.min_layer_share * n_layers)
    rows = []
    layer_arr = np.asarray(layers)
    for dim in np.flatnonzero(counts > threshold):
        sign = 1 if use_inc[dim] else -1
        mono = directions[:, dim] == sign
        rows.append({"dim": int(dim), "direction": "increasing" if sign > 0 else "decreasing",
                     "n_monotonic_layers": int(counts[dim]),
                     "monotonic_layers": ",".join(str(int(x)) for x in layer_arr[mono]),
                     "smoothness": float(smooth[mono, dim].min())})
    df = pd.DataFrame(rows, columns=["dim", "direction", "n_monotonic_layers", "monotonic_layers", "smoothness"])
    df = df.sort_values(["smoothness", "n_monotonic_layers"], ascending=[True, False], kind="stable")
    df["smoothness_rank"] = np.arange(1, len(df) + 1)
    return df.reset_index(drop=True), counts


def validate_dimensions(access: ModelAccess, dims: Sequence[int], config: PositionalDimensionSearchConfig,
                        progress: Callable[[Iterable[Any], str], Iterable[Any]] | None = None
                        ) -> tuple[pd.DataFrame, dict[str, float]]:
    """Step 4: answer loss (stepwise, as greedy decoding) on the validation split with each dim scaled."""
    prompts = task_prompts(access, config.validation_task, config.validation_items, config.validation_positions,
                           config.validation_trials, config.validation_seed)
    layers = _layer_list(access.info, config.validation_layers)
    base = answer_loss(access, prompts, stepwise=True)
    baseline = {"loss": float(base["loss"].mean()), "accuracy": float(base["correct"].mean())}
    rows = []
    iterator: Iterable[int] = dims if progress is None else progress(list(dims), "validating dimensions")
    for dim in iterator:
        scaled = PositionalDimension(dims=dim, factor=config.validation_factor, layers=layer_range_of(layers))
        df = answer_loss(access, prompts, intervention=scaled, stepwise=True)
        rows.append({"dim": int(dim), "validation_loss": float(df["loss"].mean()),
                     "validation_accuracy": float(df["correct"].mean()),
                     "loss_change": float(df["loss"].mean()) - baseline["loss"]})
    return pd.DataFrame(rows, columns=["dim", "validation_loss", "validation_accuracy", "loss_change"]), baseline


def find_positional_dimensions(model: Any = None, config: PositionalDimensionSearchConfig | None = None, *,
                               tokenizer: Any = None, backend: str | None = None, progress: bool = False,
                               **overrides: Any) -> PositionalDimensionSearch:
    """The Yu et al. search for residual dimensions that encode position (see the module docstring).

    model: anything `posprobe.load_model` accepts, or a ModelAccess. Keyword overrides replace config fields
    (e.g. n_sequences=8, validate=False). Returns candidates best first with their evidence (`.curves()`).
    """
    from posprobe.models import load_model

    config = config or PositionalDimensionSearchConfig()
    if overrides:
        names = [f.name for f in dataclasses.fields(PositionalDimensionSearchConfig)]
        bad = next((k for k in overrides if k not in names), None)
        if bad is not None:
            raise UnknownNameError("find_positional_dimensions option", bad, names)
        config = dataclasses.replace(config, **overrides)
    if config.n_sequences < 1:
        raise InterventionError(f"n_sequences must be >= 1; got {config.n_sequences}.")
    access = load_model(model, tokenizer=tokenizer, backend=backend)
    wrap = None
    if progress:
        from tqdm.auto import tqdm

        def wrap(iterable: Iterable[Any], desc: str) -> Iterable[Any]:
            return tqdm(iterable, desc=desc, leave=False)

    mean_hidden = mean_hidden_states(access, config, wrap)
    candidates, counts = rank_dimensions(mean_hidden, config, _search_layers(access.info, config))
    baseline: dict[str, float] = {}
    for column in ("validation_loss", "validation_accuracy", "loss_change"):
        candidates[column] = np.nan
    if config.validate and len(candidates) and config.top_k > 0:
        top = [int(d) for d in candidates["dim"].head(config.top_k)]
        validated, baseline = validate_dimensions(access, top, config, wrap)
        candidates = candidates.drop(columns=["validation_loss", "validation_accuracy", "loss_change"]).merge(
            validated, on="dim", how="left")
        head = candidates[candidates["dim"].isin(top)].sort_values("validation_loss", kind="stable")
        rest = candidates[~candidates["dim"].isin(top)]
        candidates = pd.concat([head, rest], ignore_index=True)
    candidates.insert(0, "rank", np.arange(1, len(candidates) + 1))
    return PositionalDimensionSearch(candidates=candidates, mean_hidden=mean_hidden.astype(np.float32),
                                     config=config, model=access.info.name, baseline=baseline,
                                     monotonic_counts=counts)


__all__ = ["KNOWN_DIMENSIONS", "PositionalDimension", "PositionalDimensionSearch", "PositionalDimensionSearchConfig",
           "ScaleDimension",
           "answer_loss", "default_layers", "find_positional_dimensions", "mean_hidden_states",
           "monotonic_directions", "positional_dimension", "random_string_ids", "rank_dimensions", "scale_dimension",
           "smoothness", "task_prompts", "validate_dimensions"]
