"""What a probe is: a frozen config, a result of tidy tables, and either a streaming reducer or a run function.

Owns `ProbeResult`, `Budget` (named presets of context lengths / sample counts; every value is recorded in the
scan), `ScanContext` (what `scan()` hands a probe: the access, budget, seed, shared text samples) and the two probe
shapes. Streaming probes (`StreamingProbe`) see the shared text passes layer by layer and are fused into one pass
with every other streaming probe; task probes (`TaskProbe`) build their own inputs and run their own passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import pandas as pd
import torch
from torch import Tensor

from posprobe.access import LayerCapture, ModelAccess, ModelInfo, Tap
from posprobe.errors import UnknownNameError

HEAD_KEYS = ["layer", "head"]
CURVE_COLUMNS = ["probe", "curve", "series", "layer", "head", "x", "y"]
MODEL_LEVEL = -1  # layer / head value of a curve row that describes the whole model (or a whole layer)


@dataclass(frozen=True)
class Budget:
    """How much work a scan does. Every field is recorded in `scan.meta["budget"]`."""

    name: str
    context_lengths: tuple[int, ...]  # lengths of the shared text passes
    n_texts: int  # text samples per context length
    max_queries: int  # query positions sampled per sequence for attention statistics (evenly spaced)
    retrieval_trials: int  # needle trials (lengths x depths) for the retrieval probe
    bias_trials: int  # prompts per slot / gold position for position-bias probes
    implicit_sequences: int  # sequences for the implicit-position probes (train + test)
    implicit_mlp: bool = True  # fit the MLP position probe too (the slow fit; with the few sequences of "quick" it
    # trails ridge: R^2 0.80 vs 0.97 on Gemma 3 270M, while taking ~2/3 of the probe's time)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


BUDGETS: dict[str, Budget] = {
    b.name: b
    for b in (
        Budget("quick", context_lengths=(256, 512), n_texts=2, max_queries=128, retrieval_trials=6,
               bias_trials=4, implicit_sequences=16, implicit_mlp=False),
        Budget("standard", context_lengths=(512, 1024, 2048), n_texts=4, max_queries=256, retrieval_trials=20,
               bias_trials=12, implicit_sequences=48),
        Budget("full", context_lengths=(512, 1024, 2048, 4096), n_texts=8, max_queries=512, retrieval_trials=60,
               bias_trials=40, implicit_sequences=128),
    )
}


def get_budget(budget: str | Budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if budget not in BUDGETS:
        raise UnknownNameError("budget", budget, BUDGETS)
    return BUDGETS[budget]


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


def head_frame(info: ModelInfo, columns: dict[str, Any]) -> pd.DataFrame:
    """A heads table from [n_layers, n_heads] arrays (NaN where a layer was skipped)."""
    df = pd.DataFrame(
        [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)], columns=HEAD_KEYS
    )
    for name, values in columns.items():
        df[name] = torch.as_tensor(values, dtype=torch.float64).reshape(-1).numpy()
    return df
