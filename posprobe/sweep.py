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
    [ray]                                        # `posprobe sweep FILE --ray ADDRESS`: each cell's Ray task asks for
    num_cpus = 1                                 # these resources (the device request)
    num_gpus = 0

Each cell writes `<out>/<model>__<budget>__seed<seed>[__<intervention>][__<what-if>]/` (a plain scan directory,
`posprobe.load` reads it) with the cell's settings in `meta["sweep"]`, and `<out>/sweep.json` records the sweep and
the last run's summary. Every input is checked (names, budgets, intervention texts, output paths) before any model
is loaded; cells run in order, and a failing cell is reported in the summary without stopping the others.

With `ray_address` (CLI `--ray ADDRESS`, the optional `posprobe[ray]` extra) the unfinished cells are submitted to an
existing Ray cluster instead, one task each with the `[ray]` resource request; a task scans in its worker and hands
back the saved scan's files (Parquet + JSON bytes, the same files `Scan.save` writes), which the driver writes into
the cell's directory atomically, so a Ray sweep and a local one leave the same scans.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import tomllib

from posprobe.errors import InputError, MissingDependencyError, PosprobeError, ScanFormatError
from posprobe.probes.base import BUDGETS, Budget, get_budget

SWEEP_MARKER = "sweep.json"
CONDITION_COLUMNS = ["model", "scan", "budget", "seed", "intervention", "what_if"]
_KEYS = {"models", "budgets", "seeds", "probes", "interventions", "what_ifs", "backend", "out", "ray"}
_RAY_INSTALL = 'pip install "posprobe[ray]"  (or: pip install ray)'


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
    spec.check_runner("scan")  # every cell is a scan: a spec scan() refuses (buckets) is refused here, as scan words it
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
class RayRequest:
    """The resources each cell's Ray task asks for (Ray's own num_cpus / num_gpus)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @classmethod
    def build(cls, table: Any) -> RayRequest:
        if isinstance(table, RayRequest):
            return table
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(table, dict) or set(table) - set(names) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in table.values()):
            raise InputError(f"[ray] must be a table of non-negative numbers with keys {names}; got {table!r}.")
        return cls(**{k: float(v) for k, v in table.items()})


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
    ray: RayRequest = RayRequest()

    @classmethod
    def build(cls, *, models: Sequence[str], budgets: Sequence[Any] = ("standard",), seeds: Sequence[int] = (0,),
              probes: Sequence[str] | None = None, interventions: Sequence[Any] = (None,),
              what_ifs: Sequence[Any] = (None,), backend: str | None = None, out: str | None = None,
              model_only_names: bool = False, ray: Any = None) -> SweepSpec:
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
                   backend=backend, out=out, model_only_names=model_only_names,
                   ray=RayRequest.build(ray if ray is not None else {}))
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
        lists: dict[str, Any] = {k: (data[k] if isinstance(data[k], list) else [data[k]]) for k in
                 ("models", "budgets", "seeds", "probes", "interventions", "what_ifs") if k in data}
        return cls.build(**lists, backend=data.get("backend"), out=data.get("out"), ray=data.get("ray"))

    def cells(self) -> list[Cell]:
        return [Cell(m, b, s, i, w, self.probes, self.backend) for m in self.models for b in self.budgets
                for s in self.seeds for i in self.interventions for w in self.what_ifs]

    def to_dict(self) -> dict[str, Any]:
        return {"models": list(self.models), "budgets": [b.to_dict() for b in self.budgets],
                "seeds": list(self.seeds), "probes": list(self.probes) if self.probes else None,
                "interventions": list(self.interventions), "what_ifs": list(self.what_ifs),
                "backend": self.backend, "ray": dataclasses.asdict(self.ray)}


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


def scan_files(cell: Cell) -> dict[str, bytes]:
    """Scan `cell` here and return its saved files (relative path -> bytes): the body of a sweep's Ray task."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="posprobe-cell-") as tmp:
        folder = Path(tmp) / "scan"
        run_cell(cell, folder, progress=False)
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_files(files: dict[str, bytes], directory: Path) -> None:
    from posprobe._io import replace_dir

    with replace_dir(directory) as tmp:
        for rel, data in files.items():
            target = tmp / rel
            if ".." in Path(rel).parts or Path(rel).is_absolute():
                raise ScanFormatError(f"A Ray task returned an invalid scan file name {rel!r}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


def _run_local(todo: list[tuple[str, Cell]], root: Path, progress: bool | None,
               log: Callable[[str], None]) -> dict[str, tuple[str, str, float]]:
    outcomes = {}
    for number, (name, cell) in enumerate(todo, 1):
        log(f"[{number}/{len(todo)}] {name}: scanning")
        started = time.time()
        try:
            run_cell(cell, root / name, progress=progress)
            outcomes[name] = ("done", "", time.time() - started)
        except PosprobeError as exc:
            outcomes[name] = ("failed", f"{type(exc).__name__}: {exc}", time.time() - started)
            log(f"[{number}/{len(todo)}] {name}: failed: {exc}")
    return outcomes


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("A Ray sweep (--ray)", _RAY_INSTALL) from None
    return ray


def _run_on_ray(todo: list[tuple[str, Cell]], root: Path, address: str, request: RayRequest,
                log: Callable[[str], None]) -> dict[str, tuple[str, str, float]]:
    """Submit every cell as a Ray task (its resource request), write each scan as its task finishes."""
    ray = _import_ray()
    connected = False
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
        connected = True
    try:
        task = ray.remote(num_cpus=request.num_cpus, num_gpus=request.num_gpus)(scan_files)
        started = time.time()
        refs = {task.remote(cell): name for name, cell in todo}
        log(f"submitted {len(refs)} scans to the Ray cluster at {address}")
        outcomes: dict[str, tuple[str, str, float]] = {}
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            name = refs[ready[0]]
            try:
                _write_files(ray.get(ready[0]), root / name)
                outcomes[name] = ("done", "", time.time() - started)
                log(f"{name}: done on Ray")
            except Exception as exc:  # a task's error arrives wrapped (RayTaskError); report it, keep the others
                message = str(getattr(exc, "cause", None) or exc).strip().splitlines()
                outcomes[name] = ("failed", f"{type(exc).__name__}: {message[-1] if message else ''}",
                                  time.time() - started)
                log(f"{name}: failed on Ray: {outcomes[name][1]}")
        return outcomes
    finally:
        if connected:
            ray.shutdown()


def run_sweep(spec: SweepSpec, out: str | Path | None = None, *, progress: bool | None = None,
              log: Callable[[str], None] = lambda message: None, ray_address: str | None = None) -> pd.DataFrame:
    """Run every cell not finished yet; return the summary (one row per cell: scan, status, seconds, error).

    status: "done" (scanned now), "skipped" (its directory already held this cell's scan) or "failed" (the error
    is in the `error` column; the other cells still run). Output paths are checked before anything runs.
    ray_address: submit the unfinished cells to that Ray cluster ("auto", "HOST:PORT", "ray://HOST:PORT").
    """
    from posprobe._io import check_output_dir

    target = out if out is not None else spec.out
    if not target:
        raise InputError("The sweep has no output directory: pass --out DIR (or set out = \"DIR\" in the file).")
    root = Path(target)
    check_output_dir(root, marker=SWEEP_MARKER, what="sweep")
    cells = [(cell.dirname(spec.model_only_names), cell) for cell in spec.cells()]
    for name, _ in cells:
        check_output_dir(root / name, marker="manifest.json")
    if ray_address is not None:
        _import_ray()  # a missing extra fails before any work
    root.mkdir(parents=True, exist_ok=True)
    record = {"format": "posprobe-sweep", "spec": spec.to_dict(), "last_run": None}
    (root / SWEEP_MARKER).write_text(json.dumps(record, indent=1))  # the directory is a sweep's from now on
    todo = []
    for number, (name, cell) in enumerate(cells, 1):
        if _finished(root / name, cell):
            log(f"[{number}/{len(cells)}] {name}: finished before, skipped")
        else:
            todo.append((name, cell))
    outcomes = (_run_on_ray(todo, root, ray_address, spec.ray, log) if ray_address is not None and todo
                else _run_local(todo, root, progress, log))
    rows = []
    for name, cell in cells:
        status, error, seconds = outcomes.get(name, ("skipped", "", 0.0))
        rows.append({"scan": name, "model": cell.model, "budget": cell.budget.name, "seed": cell.seed,
                     "intervention": cell.intervention or "", "what_if": cell.what_if or "", "status": status,
                     "seconds": round(seconds, 2), "error": error})
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


__all__ = ["CONDITION_COLUMNS", "Cell", "RayRequest", "SweepSpec", "combined_ranking", "combined_table",
           "conditions", "run_cell", "run_sweep", "scan_dirs", "scan_files", "slug"]
