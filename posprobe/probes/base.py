"""What a probe is: a frozen config, a result of tidy tables, and either a streaming reducer or a run function.

Owns `ProbeResult`, `Budget` (named sizes of the shared text passes, plus per-probe knob overrides; every value is
recorded in the scan), the budget knobs each probe declares in its Config (`BUDGET_KNOBS`, `per_level`,
`resolve_budget`), `ScanContext` (what `scan()` hands a probe: the access, budget, seed, shared text samples), the
`Probe` protocol with the checks `register()` runs (`probe_problems`) and `StreamingProbe` / `TaskProbe`, the shells of
the two kinds of probe. Streaming probes see the shared text passes layer by layer and are fused into one pass with
every other streaming probe; task probes build their own inputs and run their own passes. See the docs pages "Budgets"
and "How to add a probe".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import pandas as pd
import torch
from torch import Tensor

from posprobe.access import LayerCapture, ModelAccess, ModelInfo, Tap
from posprobe.errors import ProbeError, UnknownNameError

HEAD_KEYS = ["layer", "head"]
CURVE_COLUMNS = ["probe", "curve", "series", "layer", "head", "x", "y"]
MODEL_LEVEL = -1  # layer / head value of a curve row that describes the whole model (or a whole layer)


BUDGET_LEVELS = ("quick", "standard", "full")


def per_level(quick: Any, standard: Any, full: Any) -> dict[str, Any]:
    """One budget knob's value at each budget level: `per_level(6, 20, 60)`."""
    return {"quick": quick, "standard": standard, "full": full}


def budget_knobs(config_cls: type) -> dict[str, dict[str, Any]]:
    """A probe config's budget knobs: field name -> value per budget level (the Config's `BUDGET_KNOBS`)."""
    return dict(getattr(config_cls, "BUDGET_KNOBS", {}))


# Budget fields of posprobe 0.1 that are now budget knobs of one probe's Config. Still accepted as keywords of
# Budget (scripts) and read from old scans' meta["budget"]: each becomes a per-probe override in `Budget.probes`.
LEGACY_BUDGET_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "retrieval_trials": (("retrieval", "n_trials"),),
    "bias_trials": (("position_bias", "n_contexts"), ("position_bias", "doc_trials")),
    "implicit_sequences": (("implicit_position", "n_sequences"),),
}


def _legacy_overrides(**legacy: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for field_name, value in legacy.items():
        if value is None:
            continue
        if field_name == "implicit_mlp":  # a switch, not a count: the MLP fit on or off
            out.setdefault("implicit_position", {})["regressors"] = ("ridge", "mlp") if value else ("ridge",)
            continue
        for probe, knob in LEGACY_BUDGET_FIELDS[field_name]:
            out.setdefault(probe, {})[knob] = value
    return out


@dataclass(frozen=True)
class Budget:
    """How much work a scan does. Every field is recorded in `scan.meta["budget"]`.

    The scan-wide fields size the shared text passes every streaming probe reads. Sample counts of single probes
    are not fields here: each probe declares its own budget knobs in its Config (`BUDGET_KNOBS`, a value per
    level), and a knob left at None in the config takes the value of this budget's `level`. `probes` overrides
    knobs per probe: `Budget("mine", (512,), 2, 128, probes={"retrieval": {"n_trials": 4}})`. The keywords of
    posprobe 0.1 (`retrieval_trials`, `bias_trials`, `implicit_sequences`, `implicit_mlp`) still work: they fill
    `probes`.
    """

    name: str
    context_lengths: tuple[int, ...]  # lengths of the shared text passes
    n_texts: int  # text samples per context length
    max_queries: int  # query positions sampled per sequence for attention statistics (evenly spaced)
    level: str = ""  # which level the probes' budget knobs follow; "" = `name` if it is a level, else "standard"
    probes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # probe -> knob -> value overrides
    # True: the shared text passes are one text per sample at the model's full context (ModelInfo.max_positions;
    # max(context_lengths) for a model without one); context_lengths are then the task probes' lengths only
    full_context: bool = False
    retrieval_trials: InitVar[int | None] = None  # posprobe 0.1 keywords: see LEGACY_BUDGET_FIELDS
    bias_trials: InitVar[int | None] = None
    implicit_sequences: InitVar[int | None] = None
    implicit_mlp: InitVar[bool | None] = None

    def __post_init__(self, retrieval_trials: int | None, bias_trials: int | None, implicit_sequences: int | None,
                      implicit_mlp: bool | None) -> None:
        level = self.level or (self.name if self.name in BUDGET_LEVELS else "standard")
        if level not in BUDGET_LEVELS:
            raise UnknownNameError("budget level", level, BUDGET_LEVELS)
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "context_lengths", tuple(int(n) for n in self.context_lengths))
        # lists (as JSON gives them back) become tuples: config fields are immutable
        merged = {probe: {knob: tuple(v) if isinstance(v, list) else v for knob, v in knobs.items()}
                  for probe, knobs in (self.probes or {}).items()}
        for probe, knobs in _legacy_overrides(retrieval_trials=retrieval_trials, bias_trials=bias_trials,
                                              implicit_sequences=implicit_sequences,
                                              implicit_mlp=implicit_mlp).items():
            merged.setdefault(probe, {}).update(knobs)  # given last, so dataclasses.replace(b, bias_trials=2) wins
        object.__setattr__(self, "probes", merged)

    def knob(self, probe: str, config_cls: type, knob: str) -> Any:
        """The value of one budget knob of `probe` under this budget (override, else the level's value)."""
        if knob in self.probes.get(probe, {}):
            return self.probes[probe][knob]
        return budget_knobs(config_cls)[knob][self.level]

    def shared_lengths(self, max_positions: int | None) -> tuple[int, ...]:
        """Lengths of the shared text passes on a model that supports `max_positions` (None: no limit):
        `context_lengths` clipped to it, or the model's full context when `full_context`."""
        limit = max_positions or max(self.context_lengths)
        if self.full_context:
            return (int(limit),)
        return tuple(sorted({min(n, limit) for n in self.context_lengths}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "context_lengths": list(self.context_lengths), "n_texts": self.n_texts,
                "max_queries": self.max_queries, "level": self.level,
                "probes": {probe: dict(knobs) for probe, knobs in self.probes.items()},
                **({"full_context": True} if self.full_context else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        """A Budget from `to_dict()` output, or from the meta["budget"] of a posprobe 0.1 scan (legacy fields)."""
        known = {"name", "context_lengths", "n_texts", "max_queries", "level", "probes", "full_context",
                 *LEGACY_BUDGET_FIELDS,
                 "implicit_mlp"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProbeError(f"A budget record has unknown fields {unknown}; known: {sorted(known)}. It was not "
                             f"written by this posprobe; build the Budget by hand.")
        fields: dict[str, Any] = {k: tuple(v) if k == "context_lengths" else v for k, v in data.items()}
        return cls(**fields)


BUDGETS: dict[str, Budget] = {
    b.name: b
    for b in (
        Budget("quick", context_lengths=(256, 512), n_texts=2, max_queries=128),
        Budget("standard", context_lengths=(512, 1024, 2048), n_texts=4, max_queries=256),
        Budget("full", context_lengths=(512, 1024, 2048, 4096), n_texts=8, max_queries=512),
        # One text at the model's full context (32768 tokens on Gemma 3 270M) for the streaming probes; needles at
        # 8k / 16k / 32k (clipped to the model) and the attention-level U-curve at 16k. Quick-level sample counts:
        # a 32k pass costs minutes on a CPU. Memory stays bounded: query chunks follow the memory estimate
        # (`posprobe.devices.query_chunk_size`) and task probes read attention at their answer / last rows only.
        Budget("long", context_lengths=(8192, 16384, 32768), n_texts=1, max_queries=256, level="quick",
               full_context=True, probes={"retrieval": {"n_trials": 6},
                                          "position_bias": {"context_length": 16384, "n_contexts": 2}}),
    )
}


def get_budget(budget: str | Budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if budget not in BUDGETS:
        raise UnknownNameError("budget", budget, BUDGETS)
    return BUDGETS[budget]


def resolve_budget(probe: str, config: Any, budget: Budget) -> Any:
    """`config` with each budget knob that is None set from `budget` (explicit config values always win)."""
    knobs = budget_knobs(type(config))
    unknown = sorted(set(budget.probes.get(probe, {})) - set(knobs))
    if unknown:
        raise ProbeError(f"Budget {budget.name!r} overrides {unknown} of probe {probe!r}, which has budget knobs "
                         f"{sorted(knobs) or 'none'}. Fix the Budget's probes= entry.")
    changes = {knob: budget.knob(probe, type(config), knob) for knob in knobs if getattr(config, knob) is None}
    return dataclasses.replace(config, **changes) if changes else config


@dataclass
class ProbeResult:
    """A probe's output: head metrics (one row per layer x head), curves (long format), extra tables, summary."""

    heads: pd.DataFrame | None = None  # columns: layer, head, <metric columns>
    curves: pd.DataFrame | None = None  # columns: CURVE_COLUMNS
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def curve_frame(rows: Iterable[dict[str, Any]] | pd.DataFrame, probe: str) -> pd.DataFrame:
    """Normalise curve rows to CURVE_COLUMNS (series defaults to "", layer/head to MODEL_LEVEL)."""
    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows.copy()
    df["probe"] = probe
    for col, default in (("series", ""), ("layer", MODEL_LEVEL), ("head", MODEL_LEVEL)):
        df[col] = df[col].fillna(default) if col in df else default  # rows that omit a key get the default too
    df = df[CURVE_COLUMNS]
    return df.astype({"probe": str, "curve": str, "series": str, "layer": "int64", "head": "int64",
                      "x": "float64", "y": "float64"})


@dataclass(frozen=True)
class TextSample:
    """One shared text pass: token ids [b, n] (b consecutive samples of one length when `scan(batch_size=b)`), the
    context length and the index of its first sample among samples of that length (`indices`: all of them).

    Reducers treat every row as its own sample (sums over rows, counts of rows x queries), so results do not depend
    on the batch size."""

    input_ids: Tensor
    context_length: int
    index: int

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(range(self.index, self.index + int(self.input_ids.shape[0])))


@dataclass
class ScanContext:
    """What `scan()` hands every probe."""

    access: ModelAccess
    budget: Budget
    seed: int
    texts: Sequence[TextSample] = ()
    text_source: str = ""
    progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda it, desc: it
    batch_size: int = 1  # sequences per forward pass (scan(batch_size=)); task probes left-pad prompts to batch them

    @property
    def info(self) -> ModelInfo:
        return self.access.info

    def budgeted(self, probe: str, config: Any) -> Any:
        """The probe's config with its budget knobs resolved under this scan's budget (see `resolve_budget`)."""
        return resolve_budget(probe, config, self.budget)

    def query_sample(self, n_tokens: int) -> Tensor:
        """Evenly spaced query positions 1..n-1 (at most budget.max_queries), always including the last one."""
        m = min(self.budget.max_queries, n_tokens - 1)
        idx = torch.linspace(1, n_tokens - 1, m).round().long().unique()
        return idx


@runtime_checkable
class Reducer(Protocol):
    """Per-scan state of a streaming probe: sees each shared text pass layer by layer, then summarises."""

    taps: frozenset[Tap]

    def begin(self, sample: TextSample) -> None: ...

    def on_layer(self, capture: LayerCapture) -> None: ...

    def finish(self) -> ProbeResult: ...


@runtime_checkable
class Probe(Protocol):
    """A registered probe. `Config` is a frozen dataclass; exactly one of `reducer` / `run` is implemented."""

    name: ClassVar[str]
    Config: ClassVar[type]
    description: ClassVar[str]
    streaming: ClassVar[bool]

    def skip_reason(self, info: ModelInfo, config: Any) -> str | None: ...

    def reducer(self, ctx: ScanContext, config: Any) -> Reducer: ...

    def run(self, ctx: ScanContext, config: Any) -> ProbeResult: ...


@dataclass(frozen=True)
class _ProbeShell:
    name: str
    Config: type
    description: str
    # why the probe does not apply to a model (None when it applies); None: it always applies
    skip: Callable[[ModelInfo, Any], str | None] | None = field(default=None, kw_only=True)

    def skip_reason(self, info: ModelInfo, config: Any) -> str | None:
        return self.skip(info, config) if self.skip is not None else None


@dataclass(frozen=True)
class StreamingProbe(_ProbeShell):
    """The whole registration object of a streaming probe: its name, Config, description and reducer factory.

    `PROBE = StreamingProbe("head_basics", HeadBasicsConfig, "sink mass, ...", _Reducer)`. `make_reducer(ctx,
    config)` builds the per-scan reducer and receives the config with its budget knobs resolved; `skip=(info,
    config) -> reason | None` says why the probe does not apply to a model (default: it always applies).
    """

    make_reducer: Callable[[ScanContext, Any], Reducer]
    streaming: ClassVar[bool] = True

    def reducer(self, ctx: ScanContext, config: Any) -> Reducer:
        return self.make_reducer(ctx, ctx.budgeted(self.name, config))


@dataclass(frozen=True)
class TaskProbe(_ProbeShell):
    """The whole registration object of a task probe: its name, Config, description and run function.

    `PROBE = TaskProbe("retrieval", RetrievalConfig, "retrieval heads ...", run_retrieval)`. `run_fn(ctx, config)`
    builds its own inputs, runs its own passes and returns a ProbeResult; it receives the config with its budget
    knobs resolved. `skip=` as for `StreamingProbe`.
    """

    run_fn: Callable[[ScanContext, Any], ProbeResult]
    streaming: ClassVar[bool] = False

    def run(self, ctx: ScanContext, config: Any) -> ProbeResult:
        return self.run_fn(ctx, ctx.budgeted(self.name, config))


PROBE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def probe_problems(probe: Any) -> list[str]:
    """What keeps `probe` from being a valid probe (empty when it is one): checked by `register()`."""
    problems = []
    name = getattr(probe, "name", None)
    if not isinstance(name, str) or not PROBE_NAME.fullmatch(name):
        problems.append(f"`name` must be a lower-case identifier such as 'my_probe' (it prefixes table names and "
                        f"appears on the command line); got {name!r}")
    if not isinstance(getattr(probe, "description", None), str) or not probe.description.strip():
        problems.append("`description` must be a non-empty string (one line for `posprobe probes`)")
    config_cls = getattr(probe, "Config", None)
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        problems.append(f"`Config` must be a dataclass class; got {config_cls!r}")
    else:
        params = getattr(config_cls, "__dataclass_params__", None)  # typeshed's dataclass type does not declare it
        if params is not None and not params.frozen:
            problems.append(f"`Config` ({config_cls.__name__}) must be frozen: @dataclass(frozen=True)")
        defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
        required = [f.name for f in dataclasses.fields(config_cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if required:
            problems.append(f"every `Config` field needs a default (scan() builds Config() when none is given); "
                            f"{required} have none")
        for knob, values in budget_knobs(config_cls).items():
            if knob not in defaults:
                problems.append(f"budget knob {knob!r} is not a field of {config_cls.__name__}")
            elif defaults[knob] is not None:
                problems.append(f"budget knob {knob!r} must default to None (None = take it from the budget); "
                                f"its default is {defaults[knob]!r}")
            missing = [level for level in BUDGET_LEVELS if level not in (values or {})]
            if missing:
                problems.append(f"budget knob {knob!r} has no value for levels {missing}; write "
                                f"BUDGET_KNOBS = {{{knob!r}: per_level(quick, standard, full)}}")
    streaming = getattr(probe, "streaming", None)
    if not isinstance(streaming, bool):
        problems.append(f"`streaming` must be True (a reducer over the shared text passes) or False (a run "
                        f"function); got {streaming!r}")
    else:
        method = "reducer" if streaming else "run"
        if not callable(getattr(probe, method, None)):
            problems.append(f"a {'streaming' if streaming else 'task'} probe needs a `{method}(ctx, config)` method")
    if not callable(getattr(probe, "skip_reason", None)):
        problems.append("`skip_reason(info, config)` must be a method returning None or the reason to skip")
    return problems


def head_frame(info: ModelInfo, columns: dict[str, Any]) -> pd.DataFrame:
    """A heads table from [n_layers, n_heads] arrays (NaN where a layer was skipped)."""
    df = pd.DataFrame(
        [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)], columns=HEAD_KEYS
    )
    for name, values in columns.items():
        df[name] = torch.as_tensor(values, dtype=torch.float64).reshape(-1).numpy()
    return df
