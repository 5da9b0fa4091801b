"""Batch scans and combined tables: sweeps over models x budgets x seeds x interventions x what-ifs.

Owns `SweepSpec` (a frozen description of a sweep, read from a TOML file or built in code), `Cell` (one scan of a
sweep), `run_sweep` (one scan directory per cell under an output directory; resumable: a cell whose directory
already holds a scan made with the same cell settings is not redone), `scan_dirs` (paths -> scan directories, a
sweep directory expanding to its scans) and `combined_table` / `combined_ranking`: one long table over many scans
with `model`, `scan` and condition columns (`budget`, `seed`, `intervention`, `what_if`), ready for pandas or a
spreadsheet. The CLI's `posprobe scan --model A --model B`, `posprobe sweep FILE`, and multi-scan `rank` / `export`
are thin wrappers over these.

A sweep file (TOML; every key but `models` optional):

    models = ["gemma-3-270m", "smollm2-135m"]   # names, paths or hub ids, as posprobe.load_model takes them
    budgets = ["quick"]                          # preset names, or inline tables: {name = "tiny", context_lengths
                                                 # = [64, 128], n_texts = 1} (missing fields from "quick")
    seeds = [0, 1]
    probes = ["head_basics", "induction"]       # default: every probe that applies
    interventions = ["none", "mask_heads:heads=L5H1"]   # "none" = the plain model
    what_ifs = ["none", "yarn:factor=4"]
    backend = "hf"
    out = "scans"                                # the CLI's --out overrides it

Each cell writes `<out>/<model>__<budget>__seed<seed>[__<intervention>][__<what-if>]/` (a plain scan directory,
`posprobe.load` reads it) with the cell's settings in `meta["sweep"]`, and `<out>/sweep.json` records the sweep and
the last run's summary. Every input is checked (names, budgets, intervention texts, output paths) before any model
is loaded; cells run in order, and a failing cell is reported in the summary without stopping the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from posprobe.errors import InputError, PosprobeError, ScanFormatError
from posprobe.probes.base import BUDGETS, Budget, get_budget

SWEEP_MARKER = "sweep.json"
CONDITION_COLUMNS = ["model", "scan", "budget", "seed", "intervention", "what_if"]
_KEYS = {"models", "budgets", "seeds", "probes", "interventions", "what_ifs", "backend", "out"}


def slug(text: str) -> str:
    """A directory-name form of `text`: [A-Za-z0-9._=-] kept, the rest '-'; a short hash when it had to change."""
    clean = re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-.")[:48]
    return clean if clean == text else f"{clean}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def _budget(entry: Any) -> Budget:
    if isinstance(entry, Budget):
        return entry
    if isinstance(entry, str):
        return get_budget(entry)
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        fields = {f.name for f in dataclasses.fields(Budget)}
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise InputError(f"Budget table {entry} has unknown fields {unknown}; the fields are {sorted(fields)}.")
        values = {**BUDGETS["quick"].to_dict(), **entry}
        values["context_lengths"] = tuple(int(n) for n in values["context_lengths"])
        return Budget(**values)
    raise InputError(f"A budget is a preset name ({', '.join(BUDGETS)}) or a table with at least a name, e.g. "
                     f'{{name = "tiny", context_lengths = [64, 128]}}; got {entry!r}.')


def _condition(text: Any, axis: str) -> str | None:
    """An intervention / what-if text in its canonical `name:key=value` form (None for "none"), checked now."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "none")):
        return None
    from posprobe.interventions.spec import parse

    spec = parse(str(text))
    if getattr(spec, "per_prompt", False):
        raise InputError(f"{axis} {text!r} edits each prompt by its document spans, so it cannot apply to a whole "
                         f"scan. Evaluate it with `posprobe eval` instead, or leave it out of the sweep.")
    return str(spec)


@dataclass(frozen=True)
class Cell:
    """One scan of a sweep."""

    model: str
    budget: Budget
    seed: int
    intervention: str | None = None
    what_if: str | None = None
    probes: tuple[str, ...] | None = None
    backend: str | None = None

    def record(self) -> dict[str, Any]:
        """The cell's settings as JSON (stored in `meta["sweep"]["cell"]`; equal records mean the same scan)."""
        return {"model": self.model, "budget": self.budget.to_dict(), "seed": self.seed,
                "intervention": self.intervention, "what_if": self.what_if,
                "probes": list(self.probes) if self.probes is not None else None, "backend": self.backend}

    def dirname(self, model_only: bool = False) -> str:
        if model_only:
            return slug(self.model)
        parts = [slug(self.model), slug(self.budget.name), f"seed{self.seed}"]
        parts += [slug(c) for c in (self.intervention, self.what_if) if c]
        return "__".join(parts)


@dataclass(frozen=True)
class SweepSpec:
    """Models x budgets x seeds x interventions x what-ifs (see the module docstring for the file format)."""

    models: tuple[str, ...]
    budgets: tuple[Budget, ...] = (BUDGETS["standard"],)
    seeds: tuple[int, ...] = (0,)
    probes: tuple[str, ...] | None = None
    interventions: tuple[str | None, ...] = (None,)
    what_ifs: tuple[str | None, ...] = (None,)
    backend: str | None = None
    out: str | None = None
    model_only_names: bool = False  # `posprobe scan --model A --model B`: one directory per model, named after it

    @classmethod
    def build(cls, *, models: Sequence[str], budgets: Sequence[Any] = ("standard",), seeds: Sequence[int] = (0,),
              probes: Sequence[str] | None = None, interventions: Sequence[Any] = (None,),
              what_ifs: Sequence[Any] = (None,), backend: str | None = None, out: str | None = None,
              model_only_names: bool = False) -> SweepSpec:
        """A checked spec: names, budgets and intervention texts are validated here, before any model is loaded."""
        from posprobe.probes import get_probe

        if isinstance(models, str) or not models or not all(isinstance(m, str) and m for m in models):
            raise InputError(f"models must be a non-empty list of model names or paths; got {models!r}.")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or not seeds:
            raise InputError(f"seeds must be a non-empty list of integers; got {list(seeds)!r}.")
        for name in probes or ():
            get_probe(name)  # UnknownNameError listing the valid names
        spec = cls(models=tuple(dict.fromkeys(models)), budgets=tuple(_budget(b) for b in budgets),
                   seeds=tuple(dict.fromkeys(seeds)), probes=tuple(probes) if probes else None,
                   interventions=tuple(dict.fromkeys(_condition(c, "intervention") for c in interventions or [None])),
                   what_ifs=tuple(dict.fromkeys(_condition(c, "what-if") for c in what_ifs or [None])),
                   backend=backend, out=out, model_only_names=model_only_names)
        if not spec.budgets:
            raise InputError("budgets must name at least one budget.")
        names = [cell.dirname(model_only_names) for cell in spec.cells()]
        clash = next((n for n in names if names.count(n) > 1), None)
        if clash:
            raise InputError(f"Two cells of the sweep would write the same directory {clash!r}: give the budgets "
                             f"different names.")
        return spec

    @classmethod
    def from_toml(cls, path: str | Path) -> SweepSpec:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"No sweep file at {path}.") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InputError(f"Cannot read the sweep file {path}: {exc}. It must be TOML (see `posprobe sweep "
                             f"--help`).") from None
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise InputError(f"The sweep file {path} has unknown keys {unknown}; the keys are {sorted(_KEYS)}.")
        if "models" not in data:
            raise InputError(f"The sweep file {path} names no models: add e.g. models = [\"gemma-3-270m\"].")
        lists = {k: (data[k] if isinstance(data[k], list) else [data[k]]) for k in
                 ("models", "budgets", "seeds", "probes", "interventions", "what_ifs") if k in data}
        return cls.build(**lists, backend=data.get("backend"), out=data.get("out"))

    def cells(self) -> list[Cell]:
        return [Cell(m, b, s, i, w, self.probes, self.backend) for m in self.models for b in self.budgets
                for s in self.seeds for i in self.interventions for w in self.what_ifs]

    def to_dict(self) -> dict[str, Any]:
        return {"models": list(self.models), "budgets": [b.to_dict() for b in self.budgets],
                "seeds": list(self.seeds), "probes": list(self.probes) if self.probes else None,
                "interventions": list(self.interventions), "what_ifs": list(self.what_ifs),
                "backend": self.backend}


def _finished(directory: Path, cell: Cell) -> bool:
    """True when `directory` holds a readable scan made with exactly this cell's settings."""
    from posprobe.scan import load

    if not (directory / "manifest.json").is_file():
        return False
    try:
        meta = load(directory).meta
    except ScanFormatError:
        return False
    return (meta.get("sweep") or {}).get("cell") == json.loads(json.dumps(cell.record()))


def run_cell(cell: Cell, directory: str | Path, *, progress: bool | None = None) -> Any:
    """Scan one cell (its intervention / what-if applied for the whole scan) and save it to `directory`."""
    from posprobe.interventions.spec import parse
    from posprobe.models import load_model
    from posprobe.scan import scan

    access = load_model(cell.model, backend=cell.backend)
    applied = {}
    with contextlib.ExitStack() as stack:
        for axis, text in (("intervention", cell.intervention), ("what_if", cell.what_if)):
            if text:
                spec = parse(text)
                stack.enter_context(spec.applied(access))
                applied[axis] = spec.describe(access)
        result = scan(access, probes=list(cell.probes) if cell.probes else None, budget=cell.budget,
                      seed=cell.seed, progress=progress)
    result.meta["sweep"] = json.loads(json.dumps({"cell": cell.record(), "applied": applied}, default=str))
    result.save(directory)
    return result


def run_sweep(spec: SweepSpec, out: str | Path | None = None, *, progress: bool | None = None,
              log: Callable[[str], None] = lambda message: None) -> pd.DataFrame:
    """Run every cell not finished yet; return the summary (one row per cell: scan, status, seconds, error).

    status: "done" (scanned now), "skipped" (its directory already held this cell's scan) or "failed" (the error
    is in the `error` column; the other cells still run). Output paths are checked before anything runs.
    """
    from posprobe._io import check_output_dir

    root = Path(out if out is not None else (spec.out or ""))
    if not str(out if out is not None else (spec.out or "")):
        raise InputError("The sweep has no output directory: pass --out DIR (or set out = \"DIR\" in the file).")
    check_output_dir(root, marker=SWEEP_MARKER, what="sweep")
    cells = spec.cells()
    for cell in cells:
        check_output_dir(root / cell.dirname(spec.model_only_names), marker="manifest.json")
    root.mkdir(parents=True, exist_ok=True)
    record = {"format": "posprobe-sweep", "spec": spec.to_dict(), "last_run": None}
    (root / SWEEP_MARKER).write_text(json.dumps(record, indent=1))  # the directory is a sweep's from now on
    rows = []
    for number, cell in enumerate(cells, 1):
        name = cell.dirname(spec.model_only_names)
        row = {"scan": name, "model": cell.model, "budget": cell.budget.name, "seed": cell.seed,
               "intervention": cell.intervention or "", "what_if": cell.what_if or "", "status": "", "seconds": 0.0,
               "error": ""}
        started = time.time()
        if _finished(root / name, cell):
            row["status"] = "skipped"
            log(f"[{number}/{len(cells)}] {name}: finished before, skipped")
        else:
            log(f"[{number}/{len(cells)}] {name}: scanning")
            try:
                run_cell(cell, root / name, progress=progress)
                row["status"] = "done"
            except PosprobeError as exc:
                row["status"], row["error"] = "failed", f"{type(exc).__name__}: {exc}"
                log(f"[{number}/{len(cells)}] {name}: failed: {exc}")
        row["seconds"] = round(time.time() - started, 2)
        rows.append(row)
    summary = pd.DataFrame(rows)
    record["last_run"] = summary.to_dict(orient="records")
    (root / SWEEP_MARKER).write_text(json.dumps(record, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Many scans -> one long table


def scan_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Scan directories from paths: a scan directory as is; a sweep (or any) directory -> the scans inside it."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "manifest.json").is_file() or not path.is_dir():
            out.append(path)  # a missing path fails in posprobe.load with its own message
            continue
        inside = sorted(p for p in path.iterdir() if (p / "manifest.json").is_file())
        if not inside:
            raise ScanFormatError(f"{path} is neither a posprobe scan (no manifest.json) nor a directory of scans.")
        out.extend(inside)
    return list(dict.fromkeys(out))


def conditions(scan: Any, directory: Path) -> dict[str, Any]:
    """The condition columns of one scan: model, scan (its directory name), budget, seed, intervention, what_if."""
    meta = scan.meta
    cell = (meta.get("sweep") or {}).get("cell") or {}
    return {"model": meta.get("model", ""), "scan": directory.name, "budget": (meta.get("budget") or {}).get("name"),
            "seed": meta.get("seed"), "intervention": cell.get("intervention") or "",
            "what_if": cell.get("what_if") or ""}


def _with_conditions(df: pd.DataFrame, cond: dict[str, Any]) -> pd.DataFrame:
    clash = [c for c in CONDITION_COLUMNS if c in df.columns]
    df = df.rename(columns={c: f"{c}_" for c in clash})  # a table's own column of that name keeps its values
    for position, (name, value) in enumerate(cond.items()):
        df.insert(position, name, value)
    return df


def combined_table(paths: Iterable[str | Path], table: str = "heads") -> pd.DataFrame:
    """One long table of `table` ("heads", "curves" or an extra table) over every scan, condition columns first."""
    from posprobe.errors import UnknownNameError
    from posprobe.scan import load

    frames = []
    for directory in scan_dirs(paths):
        scan = load(directory)
        tables = {"heads": scan.heads, "curves": scan.curves, **scan.tables}
        if table not in tables:
            raise UnknownNameError("table", table, tables, hint=f"(in the scan {directory}.)")
        frames.append(_with_conditions(tables[table].reset_index(drop=True), conditions(scan, directory)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CONDITION_COLUMNS)


def combined_ranking(paths: Iterable[str | Path], metric: str, top: int | None = 20,
                     ascending: bool = False) -> pd.DataFrame:
    """Each scan's top heads by `metric` (with its 1-based `rank`), stacked, condition columns first."""
    from posprobe.scan import load

    frames = []
    for directory in scan_dirs(paths):
        scan = load(directory)
        frames.append(_with_conditions(scan.rank(metric, top=top, ascending=ascending), conditions(scan, directory)))
    return pd.concat(frames, ignore_index=True)


__all__ = ["CONDITION_COLUMNS", "Cell", "SweepSpec", "combined_ranking", "combined_table", "conditions",
           "run_cell", "run_sweep", "scan_dirs", "slug"]
