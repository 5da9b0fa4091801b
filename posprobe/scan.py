"""`posprobe.scan(model)` and the `Scan` it returns: tidy tables plus provenance, saved as Parquet + JSON.

Owns the orchestration of probes (streaming probes fused into one pass per shared text; task probes run after),
the heads table (one row per layer x head: `layer`, `head`, `kv_head`, `layer_type`, then one column per metric),
the long-format curves table (`probe, curve, series, layer, head, x, y`; layer/head -1 = model or layer level),
extra per-trial tables, and `meta` (model id and weights hash, ModelInfo, every probe config, budget, seed,
versions, timings, skipped probes with reasons). A saved scan is data only: loading validates the manifest and
never executes anything from the directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from posprobe._io import check_output_dir, replace_dir
from posprobe.access import LayerCapture, ModelAccess, ModelInfo
from posprobe.errors import InputError, ProbeError, ScanFormatError, UnknownNameError
from posprobe.probes import get_probe, list_probes
from posprobe.probes.base import (
    CURVE_COLUMNS,
    Budget,
    ProbeResult,
    ScanContext,
    TextSample,
    get_budget,
    resolve_budget,
)
from posprobe.tasks.text import SOURCE_NAME as TEXT_SOURCE

# Extra tables are named `<probe>.<table>`. posprobe 0.1 named three of them differently; old scans load under the
# new names, and `scan.tables[old_name]` still finds the table (with a DeprecationWarning).
LEGACY_TABLE_NAMES = {"retrieval_trials": "retrieval.trials", "retrieval_copies": "retrieval.copies",
                      "position_bias_documents": "position_bias.documents"}


def table_name(probe: str, table: str) -> str:
    """The scan-wide name of a probe's extra table: `<probe>.<table>` (a name already so qualified is kept)."""
    return table if table.startswith(f"{probe}.") else f"{probe}.{table}"


class Tables(dict):
    """`scan.tables`: name -> DataFrame; a posprobe 0.1 name finds its renamed table, with a DeprecationWarning."""

    def __missing__(self, key: str) -> pd.DataFrame:
        new = LEGACY_TABLE_NAMES.get(key)
        if new is None or new not in self:
            raise KeyError(key)
        warnings.warn(f"scan.tables[{key!r}] is now scan.tables[{new!r}] (extra tables are named <probe>.<table>); "
                      f"the old name will stop working.", DeprecationWarning, stacklevel=2)
        return self[new]


FORMAT = "posprobe-scan"
FORMAT_VERSION = 1
HEAD_ID_COLUMNS = ["layer", "head", "kv_head", "layer_type"]


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if hasattr(obj, "value") and isinstance(obj.value, str):  # enums
        return obj.value
    return obj


@functools.lru_cache(maxsize=1)
def _installed_versions() -> tuple[tuple[str, str], ...]:
    """The package versions of this process, read once: `importlib.metadata` scans the environment (~13 ms a call),
    and a package upgraded after import would not be the code that runs anyway."""
    out = {}
    for package in ("posprobe", "torch", "transformers", "numpy", "pandas", "scikit-learn", "scipy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    out["python"] = sys.version.split()[0]
    return tuple(out.items())


def _versions() -> dict[str, str]:
    return dict(_installed_versions())


class Scan:
    """The result of a scan: `heads`, `curves`, `tables` (name -> DataFrame) and `meta` (provenance)."""

    def __init__(self, heads: pd.DataFrame, curves: pd.DataFrame, meta: dict[str, Any],
                 tables: dict[str, pd.DataFrame] | None = None) -> None:
        self.heads = heads
        self.curves = curves
        self.meta = meta
        self.tables = Tables({LEGACY_TABLE_NAMES.get(k, k): v for k, v in (tables or {}).items()})

    # --- inspection ---------------------------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return ModelInfo.from_dict(self.meta["model_info"])

    @property
    def metrics(self) -> list[str]:
        """The head-metric columns present (everything except the identifying columns)."""
        return [c for c in self.heads.columns if c not in HEAD_ID_COLUMNS]

    def rank(self, metric: str, top: int | None = 20, ascending: bool = False) -> pd.DataFrame:
        """Heads sorted by `metric` (descending by default), NaNs last, with a 1-based `rank` column."""
        if metric not in self.metrics:
            raise UnknownNameError("metric", metric, self.metrics)
        ranked = self.heads.sort_values(metric, ascending=ascending, na_position="last", kind="stable")
        ranked = ranked[HEAD_ID_COLUMNS + [metric] + [m for m in self.metrics if m != metric]]
        if top is not None:
            ranked = ranked.head(top)
        ranked = ranked.reset_index(drop=True)
        ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
        return ranked

    def curve(self, curve: str, layer: int | None = None, head: int | None = None) -> pd.DataFrame:
        """Rows of one curve, optionally for one layer / head."""
        df = self.curves[self.curves["curve"] == curve]
        if layer is not None:
            df = df[df["layer"] == layer]
        if head is not None:
            df = df[df["head"] == head]
        return df.reset_index(drop=True)

    def figure(self, kind: str = "atlas", **kwargs: Any) -> Any:
        """A plotly Figure from `posprobe.render` (kinds: see `posprobe.render.FIGURES`)."""
        from posprobe.render import figure

        return figure(self, kind, **kwargs)

    def explore(self, **kwargs: Any) -> Any:
        """Open this scan in the Dash explorer (inline in Jupyter when possible); needs the `app` extra (Dash)."""
        from posprobe._explorer import load_explorer

        return load_explorer().run_explorer([self], **kwargs)

    def __repr__(self) -> str:
        return (f"Scan(model={self.meta.get('model')!r}, heads={len(self.heads)}, metrics={self.metrics}, "
                f"curves={self.curves['curve'].nunique() if len(self.curves) else 0}, tables={list(self.tables)})")

    def _repr_html_(self) -> str:
        meta = self.meta
        lines = [f"<b>posprobe scan</b> of <code>{meta.get('model')}</code> (budget "
                 f"{meta.get('budget', {}).get('name')}, seed {meta.get('seed')}, {len(self.heads)} heads)"]
        skipped = meta.get("skipped", {})
        if skipped:
            lines.append("<br>skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
        for metric in self.metrics[:4]:
            top = self.rank(metric, top=3)
            best = ", ".join(f"L{r.layer}H{r.head}={getattr(r, metric):.3g}" for r in top.itertuples())
            lines.append(f"<br>top <code>{metric}</code>: {best}")
        return "".join(lines) + "<br>" + self.heads.head(8).to_html(float_format=lambda v: f"{v:.3g}")

    def equals(self, other: Scan) -> bool:
        return (self.heads.equals(other.heads) and self.curves.equals(other.curves)
                and self.meta == other.meta and self.tables.keys() == other.tables.keys()
                and all(self.tables[k].equals(other.tables[k]) for k in self.tables))

    # --- persistence --------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write heads/curves/tables as Parquet and `manifest.json` (format, version, files, meta), atomically.

        Everything is written into a temporary sibling directory that then replaces `directory` in one step, so an
        exception or a kill during the save leaves a previous scan there loadable and unchanged. `directory` must be
        new, empty, or an existing scan (which is replaced); anything else raises `OutputPathError` before writing.
        """
        out = Path(directory)
        check_output_dir(out, marker="manifest.json")
        with replace_dir(out) as tmp:
            (tmp / "tables").mkdir()
            files: dict[str, Any] = {"heads": "heads.parquet", "curves": "curves.parquet", "tables": {}}
            self.heads.to_parquet(tmp / files["heads"], index=False)
            self.curves.to_parquet(tmp / files["curves"], index=False)
            for name, table in self.tables.items():
                rel = f"tables/{name}.parquet"
                table.to_parquet(tmp / rel, index=False)
                files["tables"][name] = rel
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files,
                        "meta": _jsonable(self.meta)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Scan:
        """Read a saved scan, validating the manifest and required columns first."""
        folder = Path(directory)
        manifest_path = folder / "manifest.json"
        if not folder.is_dir():
            raise ScanFormatError(f"No scan directory at {folder}: it does not exist. Create one with "
                                  f"`posprobe scan --out {folder}` or scan.save('{folder}').")
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise ScanFormatError(f"{folder} is not a posprobe scan: it has no manifest.json.") from None
        except (OSError, ValueError) as exc:
            raise ScanFormatError(f"The manifest of {folder} is unreadable or not valid JSON ({exc}); the scan is "
                                  f"corrupted. Re-run the scan.") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ScanFormatError(f"{manifest_path} is not a posprobe scan manifest (format != {FORMAT!r}).")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ScanFormatError(f"{folder} has scan format version {version}; this posprobe reads version "
                                  f"{FORMAT_VERSION}. Re-run the scan with this version or install the matching one.")
        files = manifest.get("files", {})

        def read(rel: Any, required: Sequence[str]) -> pd.DataFrame:
            if not isinstance(rel, str) or ".." in Path(rel).parts or Path(rel).is_absolute():
                raise ScanFormatError(f"The manifest of {folder} names an invalid file {rel!r}.")
            try:
                df = pd.read_parquet(folder / rel)
            except Exception as exc:  # pyarrow raises several types for truncated / garbage files
                raise ScanFormatError(f"Cannot read {folder / rel}: {type(exc).__name__}: {exc}. The scan is "
                                      f"corrupted or incomplete; re-run it.") from None
            missing = [c for c in required if c not in df.columns]
            if missing:
                raise ScanFormatError(f"{folder / rel} lacks required columns {missing}; the scan is incompatible.")
            return df

        heads = read(files.get("heads"), HEAD_ID_COLUMNS)
        curves = read(files.get("curves"), CURVE_COLUMNS)
        tables = {name: read(rel, []) for name, rel in (files.get("tables") or {}).items()}
        meta = manifest.get("meta")
        if not isinstance(meta, dict) or "model_info" not in meta:
            raise ScanFormatError(f"The manifest of {folder} has no model provenance (meta.model_info).")
        return cls(heads, curves, meta, tables)


def load(directory: str | Path) -> Scan:
    """Load a scan saved with `Scan.save` / `posprobe scan --out`."""
    return Scan.load(directory)


def head_ids(info: ModelInfo) -> pd.DataFrame:
    """The identifying columns of a heads table, one row per layer x head: `layer, head, kv_head, layer_type`."""
    rows = [(layer, head, info.kv_head(head), info.layers[layer].layer_type) for layer in range(info.n_layers)
            for head in range(info.n_heads)]
    return pd.DataFrame(rows, columns=HEAD_ID_COLUMNS)


def empty_curves() -> pd.DataFrame:
    """A curves table with no rows and the column types of a saved one."""
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("x", "y") else ("int64" if c in ("layer", "head")
                         else "object")) for c in CURVE_COLUMNS})


def provenance(access: ModelAccess) -> dict[str, Any]:
    """The model part of a scan's meta: model id, backend, weights hash, ModelInfo, package versions, time."""
    return {"model": access.info.name, "backend": access.backend, "weights_hash": access.weights_hash(),
            "model_info": access.info.to_dict(), "versions": _versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def results_scan(access: ModelAccess, *, curves: pd.DataFrame | None = None,
                 tables: dict[str, pd.DataFrame] | None = None, heads: pd.DataFrame | None = None,
                 **meta: Any) -> Scan:
    """A Scan of results computed outside `scan()` (a position sweep, an analysis), for `save` and the explorer.

    heads: extra head columns keyed by `layer, head` (merged onto `head_ids`); curves: rows with CURVE_COLUMNS;
    meta: anything else to record (e.g. `summaries=`, `analysis=`), next to the model's `provenance`.
    """
    table = head_ids(access.info)
    if heads is not None:
        table = table.merge(heads.drop(columns=[c for c in ("kv_head", "layer_type") if c in heads]),
                            on=["layer", "head"], how="left")
    record = {**provenance(access), "probes": {}, "skipped": {}, "summaries": {}, **meta}
    return Scan(table, empty_curves() if curves is None else curves, _jsonable(record), tables)


# ---------------------------------------------------------------------------------------------------------------


def _progress(enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled

    def wrap(iterable: Iterable[Any], desc: str) -> Iterable[Any]:
        return tqdm(iterable, desc=desc, disable=not show, file=sys.stderr, leave=False)

    return wrap


def shared_texts(access: ModelAccess, budget: Budget, seed: int) -> list[TextSample]:
    """The seeded generated-text samples the streaming probes read (lengths clipped to the model's maximum)."""
    import torch

    from posprobe.tasks.text import text_ids

    samples = []
    for length in budget.shared_lengths(access.info.max_positions):  # the model's full context under `long`
        for index in range(budget.n_texts):
            ids = text_ids(access, length, seed=seed * 100_003 + length * 101 + index)
            samples.append(TextSample(torch.tensor([ids]), length, index))
    return samples


class _InfoOnly(ModelAccess):
    """What a reducer's `ctx.access` is while it runs on a remote server: the model facts, nothing local."""

    backend = "remote"

    def __init__(self, info: ModelInfo) -> None:
        super().__init__()
        self.info = info

    def _forward(self, *args: Any, **kwargs: Any) -> None:
        raise ProbeError("A streaming reducer tried to run a pass of its own inside a remote pass; reducers only "
                         "reduce the layer they are handed there. Run that probe without remote=.")


class Dispatch:
    """The `on_layer` of the shared text passes: every streaming reducer in turn.

    It can also run on the server of a remote pass (nnsight / NDIF). `shipped()` swaps each reducer's context for one
    that holds no local objects (no model, no progress bar) and its list accumulators (lists, also as dict values:
    head_basics' Spearman pairs) for empty ones, so a request carries the fixed-size sums and nothing that grows
    with the texts already seen. `state()` is what the pass brings back (the per-head sums, this pass's list items)
    and `adopt(state)` puts it into the local reducers: sums replace theirs, list items are appended. The contract of
    a remotely runnable reducer is thus: lists are append-only accumulators; everything else it may update in place.
    """

    ships_to_remote = True
    _LOCAL = ("ctx", "config", "sample")  # attributes that stay local (not shipped back)

    def __init__(self, reducers: Sequence[Any]) -> None:
        self.reducers = list(reducers)

    def __call__(self, capture: LayerCapture) -> None:
        for reducer in self.reducers:
            reducer.on_layer(capture)

    @staticmethod
    def _empty_lists(value: Any) -> Any:
        if isinstance(value, list):
            return []
        if isinstance(value, dict) and any(isinstance(v, list) for v in value.values()):
            return {k: [] if isinstance(v, list) else v for k, v in value.items()}
        return value

    @contextlib.contextmanager
    def shipped(self) -> Iterator[None]:
        saved = [dict(vars(r)) for r in self.reducers]
        try:
            for reducer, original in zip(self.reducers, saved):
                for name, value in original.items():
                    emptied = self._empty_lists(value)
                    if emptied is not value:
                        setattr(reducer, name, emptied)
                ctx = original.get("ctx")
                if ctx is not None:
                    reducer.ctx = dataclasses.replace(ctx, access=_InfoOnly(ctx.info), progress=_no_progress)
            yield
        finally:
            for reducer, original in zip(self.reducers, saved):
                for name, value in original.items():
                    if self._empty_lists(value) is not value or name == "ctx":
                        setattr(reducer, name, value)

    def state(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in vars(r).items() if k not in self._LOCAL} for r in self.reducers]

    def adopt(self, state: Sequence[dict[str, Any]]) -> None:
        if len(state) != len(self.reducers):
            raise ProbeError(f"A remote pass returned the state of {len(state)} reducers for {len(self.reducers)}; "
                             f"the request and the result do not match.")
        for reducer, values in zip(self.reducers, state):
            for name, value in values.items():
                mine = getattr(reducer, name, None)
                if isinstance(mine, list) and isinstance(value, list):
                    mine.extend(value)
                elif isinstance(mine, dict) and isinstance(value, dict) and self._empty_lists(mine) is not mine:
                    for key, item in value.items():
                        if isinstance(mine.get(key), list) and isinstance(item, list):
                            mine[key].extend(item)
                        else:
                            mine[key] = item
                else:
                    setattr(reducer, name, value)


def _no_progress(iterable: Iterable[Any], desc: str) -> Iterable[Any]:
    return iterable


def _remote_access(access: ModelAccess, remote: bool | str) -> ModelAccess:
    """The nnsight access whose passes run remotely (True: NDIF; "local": nnsight's serialising dry run)."""
    if access.backend != "nnsight":
        raise InputError(f"remote={remote!r} runs passes through nnsight's remote execution (NDIF), but the model "
                         f"was wrapped by the {access.backend!r} adapter. Pass an nnsight model (nnsight."
                         f"TransformersModel / LanguageModel of the hub id NDIF serves) or backend='nnsight'.")
    return cast(Any, access).remote_view(remote)  # an NNsightAccess (its backend was checked above)


def batch_texts(texts: Sequence[TextSample], batch_size: int) -> list[TextSample]:
    """Consecutive samples of equal length stacked `batch_size` at a time into one [b, n] sample (its `index` is
    the first sample's; `indices` lists them all). Equal lengths need no padding, so a batch is exact."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer (sequences per forward pass); got {batch_size!r}.")
    import torch

    batches: list[TextSample] = []
    group: list[TextSample] = []
    for sample in [*texts, None]:
        if group and (sample is None or len(group) == batch_size or sample.context_length != group[0].context_length
                      or sample.index != group[-1].index + 1):
            batches.append(TextSample(torch.cat([s.input_ids for s in group]), group[0].context_length,
                                      group[0].index))
            group = []
        if sample is not None:
            group.append(sample)
    return batches


def _resolve(names: str | Sequence[str] | None, info: ModelInfo, configs: dict[str, Any],
             budget: Budget) -> tuple[list, dict]:
    chosen = list_probes() if names is None else ([names] if isinstance(names, str) else list(names))
    probes, skipped = [], {}
    for name in chosen:
        probe = get_probe(name)
        config = configs.get(name) or probe.Config()
        if not isinstance(config, probe.Config):
            raise ProbeError(f"The config for probe {name!r} must be a {probe.Config.__name__}, got "
                             f"{type(config).__name__}. Build it with posprobe.probes.get_probe({name!r}).Config(...).")
        config = resolve_budget(name, config, budget)  # budget knobs left at None take the budget's values
        reason = probe.skip_reason(info, config)
        if reason:
            skipped[name] = reason
        else:
            probes.append((probe, config))
    return probes, skipped


def scan(
    model: Any = None,
    probes: str | Sequence[str] | None = None,
    budget: str | Budget = "standard",
    seed: int = 0,
    *,
    configs: dict[str, Any] | None = None,
    tokenizer: Any = None,
    backend: str | None = None,
    progress: bool | None = None,
    device: Any = None,
    dtype: Any = None,
    batch_size: int = 1,
    remote: bool | str = False,
    intervention: Any = None,
) -> Scan:
    """Run probes over a model and return a `Scan`.

    model: anything `posprobe.load_model` accepts (None = the embedded Gemma 3 270M). probes: registered names
    (default: every probe that applies; a probe that does not apply, e.g. a RoPE probe on a NoPE model, is
    skipped with its reason recorded in `meta["skipped"]`). budget: "quick", "standard", "full" or a `Budget`.
    configs: probe name -> that probe's Config instance, to override defaults.
    device / dtype: for models loaded by name or path (see `load_model`); a model object stays where it is.
    batch_size: sequences per forward pass for the shared text passes (equal lengths, exact) and the task probes
    (left-padded); results equal batch_size=1. remote: an nnsight model's passes run on NDIF (True) or through
    nnsight's serialising dry run ("local"); each shared pass then returns per-head reductions only.
    Provenance: `meta["hardware"]` (devices, dtype, accelerate device map, batch size, remote).
    intervention: an intervention spec (`posprobe.interventions`; e.g. `DisableRope()` or the text
    "mask_heads:heads=L5H1"), applied to the access this scan runs, for every pass; a spec bound to another access
    raises before anything is loaded. Recorded in `meta["intervention"]` (settings, resolved values, calibrations).
    """
    from posprobe.models import load_model

    started = time.time()
    budget = get_budget(budget)  # the budget and the configs are checked before the model is loaded
    configs = dict(configs or {})
    unknown = [name for name in configs if name not in list_probes()]
    if unknown:
        raise UnknownNameError("probe", unknown[0], list_probes())
    unknown = [name for name in budget.probes if name not in list_probes()]
    if unknown:
        raise UnknownNameError("probe", unknown[0], list_probes(), hint=f"(in Budget {budget.name!r}'s probes=)")
    for name in budget.probes:
        resolve_budget(name, configs.get(name) or get_probe(name).Config(), budget)  # unknown knobs raise here
    texts_batch = batch_texts([], batch_size)  # batch_size is checked before the model is loaded
    if intervention is not None:
        return _scan_with(intervention, model, probes=probes, budget=budget, seed=seed, configs=configs,
                          tokenizer=tokenizer, backend=backend, progress=progress, device=device, dtype=dtype,
                          batch_size=batch_size, remote=remote)
    if remote and isinstance(model, str) and remote != "local":
        from posprobe.adapters.nnsight import remote_model

        model = remote_model(model)  # a hub id NDIF serves: meta weights here, no download of the weights
    access = load_model(model, tokenizer=tokenizer, backend=backend, device=device, dtype=dtype)
    if remote:
        access = _remote_access(access, remote)
    chosen, skipped = _resolve(probes, access.info, configs, budget)
    bar = _progress(progress)
    timings: dict[str, float] = {}
    results: dict[str, ProbeResult] = {}

    streaming = [(p, c) for p, c in chosen if p.streaming]
    texts: list[TextSample] = shared_texts(access, budget, seed) if streaming else []
    ctx = ScanContext(access=access, budget=budget, seed=seed, texts=texts, text_source=TEXT_SOURCE, progress=bar)
    ctx.batch_size = batch_size
    if streaming:
        t0 = time.time()
        reducers = [(p, p.reducer(ctx, c)) for p, c in streaming]
        taps = frozenset().union(*(r.taps for _, r in reducers))
        texts_batch = batch_texts(texts, batch_size)
        longest = max(texts_batch, key=lambda s: s.input_ids.numel())
        access.check_memory(longest.input_ids.shape[1], longest.input_ids.shape[0], taps=taps)  # before any pass

        dispatch = Dispatch([reducer for _, reducer in reducers])

        for sample in bar(texts_batch, "shared text passes"):
            for _, reducer in reducers:
                reducer.begin(sample)
            access.run(sample.input_ids, taps=taps, on_layer=dispatch)
        for probe, reducer in reducers:
            results[probe.name] = reducer.finish()
        timings["shared_passes"] = time.time() - t0
    for probe, config in chosen:
        if probe.streaming:
            continue
        t0 = time.time()
        results[probe.name] = probe.run(ctx, config)
        timings[probe.name] = time.time() - t0

    heads = _heads_table(access.info, results)
    curves = pd.concat([r.curves for r in results.values() if r.curves is not None and len(r.curves)],
                       ignore_index=True) if any(r.curves is not None and len(r.curves) for r in results.values()) \
        else empty_curves()
    tables: dict[str, pd.DataFrame] = {}
    for name, result in results.items():
        for table_key, table in result.tables.items():
            tables[table_name(name, table_key)] = table
    timings["total"] = time.time() - started
    meta = {
        **provenance(access),  # model, backend, weights_hash, model_info, versions, created
        "probes": {p.name: dataclasses.asdict(c) for p, c in chosen},
        "skipped": skipped,
        "summaries": {name: r.summary for name, r in results.items() if r.summary},
        "budget": budget.to_dict(),
        "seed": seed,
        "text_source": ctx.text_source if streaming else None,
        "hardware": {**access.placement(), "batch_size": batch_size, "shared_passes": len(texts_batch),
                     "remote": remote},
        "timings_s": timings,
    }
    return Scan(heads, curves, _jsonable(meta), tables)


def _scan_with(intervention: Any, model: Any, *, remote: bool | str, **options: Any) -> Scan:
    """`scan(...)` of the model with `intervention` applied to the very access that is scanned."""
    from posprobe.interventions.spec import resolve, runner_contexts
    from posprobe.models import load_model

    resolve(intervention, model, prompts_available=False, runner="scan")  # bad text, a spec bound to another
    # access, a per-prompt spec: raise before loading
    if remote:
        raise InputError("scan(intervention=...) runs on a local access: interventions edit the model's attention "
                         "in this process, which remote passes cannot carry. Drop remote= or the intervention.")
    access = load_model(model, tokenizer=options.pop("tokenizer"), backend=options.pop("backend"),
                        device=options.pop("device"), dtype=options.pop("dtype"))
    outer, _, spec = runner_contexts(intervention, access, prompts_available=False, runner="scan")
    with outer:
        result = scan(access, **options)
    result.meta["intervention"] = _jsonable(spec.describe(access) if spec is not None else repr(intervention))
    return result


def _heads_table(info: ModelInfo, results: dict[str, ProbeResult]) -> pd.DataFrame:
    heads = head_ids(info)
    for name, result in results.items():
        if result.heads is None:
            continue
        clash = [c for c in result.heads.columns if c in heads.columns and c not in ("layer", "head")]
        if clash:
            raise ProbeError(f"Probe {name!r} reports head columns {clash} that another probe already reported.")
        heads = heads.merge(result.heads, on=["layer", "head"], how="left")
    return heads
