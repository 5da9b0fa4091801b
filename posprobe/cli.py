"""The `posprobe` command line: scan, sweep, rank, export, report, patterns, models, probes, app.

Owns argument parsing (typer) and turning posprobe errors into one-line messages with exit code 2. The commands are
thin: they call the public API (`scan`, `load`, `Scan.rank`) and write tables with pandas.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from posprobe.errors import PosprobeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="posprobe: probe how transformer language models use position.")


class Format(str, Enum):
    csv = "csv"
    json = "json"
    md = "md"
    parquet = "parquet"


def _fail(message: str) -> NoReturn:
    typer.echo(f"posprobe: error: {message}", err=True)
    raise typer.Exit(code=2)


def _check_table_out(fmt: Format, out: Path | None) -> None:
    """Refuse an unusable --out before the scan is read."""
    if fmt is Format.parquet and out is None:
        _fail("--format parquet needs --out FILE (Parquet is binary and cannot go to the terminal).")
    if out is not None:
        from posprobe._io import check_output_file

        check_output_file(out)


def _write_table(df, fmt: Format, out: Path | None) -> None:
    if fmt is Format.parquet:
        if out is None:
            _fail("--format parquet needs --out FILE (Parquet is binary and cannot go to the terminal).")
        df.to_parquet(out, index=False)
        typer.echo(f"wrote {len(df)} rows to {out}", err=True)
        return
    if fmt is Format.csv:
        text = df.to_csv(index=False)
    elif fmt is Format.json:
        text = df.to_json(orient="records", indent=1)
    else:
        text = df.to_markdown(index=False, floatfmt=".4g")  # tabulate is a dependency
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        out.write_text(text)
        typer.echo(f"wrote {len(df)} rows to {out}", err=True)


def _load(scan_dir: Path):
    from posprobe.scan import load

    return load(scan_dir)


@app.command()
def scan(
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to write the scan to (with several --model: "
                                      "the directory that receives one scan per model)")],
    model: Annotated[list[str] | None, typer.Option(help="model name or path (default: embedded gemma-3-270m); "
                                                       "repeat for one scan per model under OUT")] = None,
    probes: Annotated[str | None, typer.Option(help="comma-separated probe names (default: all that apply)")] = None,
    budget: Annotated[str, typer.Option(help="quick | standard | full | long (the model's full context)")] = "standard",
    seed: Annotated[int, typer.Option(help="seed of every generated input")] = 0,
    backend: Annotated[str | None, typer.Option(help="hf (default) | transformer_lens | nnsight")] = None,
    rank_metric: Annotated[str | None, typer.Option("--rank", help="also write ranking.csv by this metric")] = None,
    what_if: Annotated[list[str] | None, typer.Option(
        "--what-if", help="a context-extension what-if as NAME:KEY=VAL,... (e.g. yarn:factor=4), applied for the "
                          "whole scan; repeat to apply several together. `posprobe interventions` lists them")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | cuda:1 | mps | auto (accelerate device_map; "
                                                  "default: cuda when available, else cpu)")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                 "bfloat16 on CUDA)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="sequences per forward pass (results do "
                                            "not depend on it)")] = 1,
    remote: Annotated[bool, typer.Option("--remote", help="run the passes on NDIF through nnsight (the model is a "
                                         "hub id NDIF serves; key: NDIF_API_KEY). See docs/hardware.md")] = False,
    examples: Annotated[str, typer.Option("--examples", help="store every head's attention on example inputs for "
                                          "the explorer's pattern viewer: auto (when their size fits the budget; "
                                          "off for big models) | on | off")] = "auto",
) -> None:
    """Scan a model and save the result (Parquet + JSON) to OUT (several --model: OUT/<model>/ each, resumable)."""
    from posprobe._io import check_output_dir
    from posprobe.interventions import parse

    names = [p.strip() for p in probes.split(",") if p.strip()] if probes else None
    if examples not in ("auto", "on", "off"):
        raise typer.BadParameter(f"--examples is auto, on or off; got {examples!r}", param_hint="--examples")
    if examples != "auto" and model and len(model) > 1:
        raise typer.BadParameter("--examples on / off applies to one --model at a time; in a sweep file set a "
                                 "budget's probes = {pattern_examples = {max_megabytes = ...}}",
                                 param_hint="--examples")
    configs = None
    if examples != "auto":  # pattern_examples' size estimate is overridden (docs/probes/pattern_examples.md)
        from posprobe.probes.pattern_examples import PatternExamplesConfig

        configs = {"pattern_examples": PatternExamplesConfig(enabled=examples == "on")}
        if examples == "on" and names is not None and "pattern_examples" not in names:
            names.append("pattern_examples")
    what_ifs = [parse(text) for text in what_if or []]  # a bad spec fails before anything is loaded
    if model and len(model) > 1 and (device or dtype or batch_size != 1 or remote):
        raise typer.BadParameter("--device / --dtype / --batch-size / --remote apply to one --model at a time; "
                                 "run one `posprobe scan` per model", param_hint="--model")
    if model and len(model) > 1:
        from posprobe.sweep import SweepSpec

        if len(what_ifs) > 1:
            raise typer.BadParameter("several --what-if with several --model: write a sweep file (what_ifs = [...])",
                                     param_hint="--what-if")
        spec = SweepSpec.build(models=model, budgets=[budget], seeds=[seed], probes=names, backend=backend,
                               model_only_names=True, what_ifs=what_if or [None])
        _run_sweep(spec, out, rank_metric)
        return
    model_name = model[0] if model else None
    state = check_output_dir(out, marker="manifest.json")  # before any model is loaded: a bad --out costs nothing
    if state == "overwrite":
        typer.echo(f"{out} holds a scan already: it will be replaced when this scan is saved", err=True)
    from posprobe.scan import scan as run_scan

    applied = None
    if what_ifs:
        from posprobe.what_if import Stack

        applied = what_ifs[0] if len(what_ifs) == 1 else Stack(tuple(what_ifs))
    result = run_scan(model_name, probes=names, budget=budget, seed=seed, backend=backend, intervention=applied,
                      configs=configs, device=device, dtype=dtype, batch_size=batch_size, remote=remote)
    result.save(out)
    typer.echo(f"saved scan of {result.meta['model']} ({len(result.heads)} heads, metrics: "
               f"{', '.join(result.metrics)}) to {out} in {result.meta['timings_s']['total']:.0f} s", err=True)
    for name, reason in result.meta.get("skipped", {}).items():
        typer.echo(f"skipped probe {name}: {reason}", err=True)
    if rank_metric:
        ranked = result.rank(rank_metric, top=None)
        ranked.to_csv(out / "ranking.csv", index=False)
        typer.echo(f"wrote head ranking by {rank_metric} to {out / 'ranking.csv'}", err=True)


def _run_sweep(spec, out: Path | None, rank_metric: str | None = None, ray: str | None = None) -> None:
    """Run a sweep, print its summary table (markdown) on stdout; exit 1 when a cell failed."""
    from posprobe.sweep import run_sweep

    summary = run_sweep(spec, out, log=lambda message: typer.echo(message, err=True), ray_address=ray)
    root = Path(out if out is not None else spec.out)
    if rank_metric:
        for name in summary.loc[summary.status != "failed", "scan"]:
            _load(root / name).rank(rank_metric, top=None).to_csv(root / name / "ranking.csv", index=False)
    _write_table(summary, Format.md, None)
    if (summary.status == "failed").any():
        raise typer.Exit(code=1)


@app.command()
def sweep(
    file: Annotated[Path, typer.Argument(help="a sweep file (TOML): models, budgets, seeds, probes, interventions, "
                                              "what_ifs, backend, out")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory (default: the file's out)")]
    = None,
    ray: Annotated[str | None, typer.Option("--ray", help="address of a Ray cluster (auto | HOST:PORT): one Ray "
                                                             "task per scan, with the file's [ray] request")] = None,
) -> None:
    """Run a sweep: one scan per model x budget x seed x intervention x what-if; finished scans are not redone."""
    from posprobe.sweep import SweepSpec

    _run_sweep(SweepSpec.from_toml(file), out, ray=ray)


def _scan_dirs(paths: list[Path]) -> list[Path]:
    from posprobe.sweep import scan_dirs

    return scan_dirs(paths)


@app.command()
def rank(
    scan_dir: Annotated[list[Path], typer.Argument(help="saved scan directories (a sweep directory: its scans); "
                                                        "several: one long table with model / scan / condition "
                                                        "columns")],
    metric: Annotated[str, typer.Option(help="head metric to rank by")],
    top: Annotated[int, typer.Option(help="number of heads (0 = all)")] = 20,
    ascending: Annotated[bool, typer.Option(help="lowest first")] = False,
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.csv,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="file to write (default: stdout)")] = None,
) -> None:
    """Rank heads of saved scans by one metric (several scans: each scan's top heads, stacked)."""
    _check_table_out(format, out)
    dirs = _scan_dirs(scan_dir)
    if len(dirs) == 1:
        _write_table(_load(dirs[0]).rank(metric, top=top or None, ascending=ascending), format, out)
        return
    from posprobe.sweep import combined_ranking

    _write_table(combined_ranking(dirs, metric, top=top or None, ascending=ascending), format, out)


@app.command()
def export(
    scan_dir: Annotated[list[Path], typer.Argument(help="saved scan directories (a sweep directory: its scans); "
                                                        "several: one long table with model / scan / condition "
                                                        "columns")],
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.csv,
    table: Annotated[str, typer.Option(help="heads | curves | <extra table name>")] = "heads",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="file to write (default: stdout)")] = None,
) -> None:
    """Export a whole table of saved scans (default: the heads table; several scans: one long table)."""
    _check_table_out(format, out)
    dirs = _scan_dirs(scan_dir)
    if len(dirs) > 1:
        from posprobe.sweep import combined_table

        _write_table(combined_table(dirs, table), format, out)
        return
    result = _load(dirs[0])
    tables = {"heads": result.heads, "curves": result.curves, **result.tables}
    if table not in tables:
        from posprobe.errors import UnknownNameError

        raise UnknownNameError("table", table, tables)
    _write_table(tables[table], format, out)


@app.command()
def models(
    families: Annotated[bool, typer.Option(
        "--families", help="print the support matrix of model families instead (built from the conformance "
                           "registry's tiny models: positional scheme, attention, probes, interventions, backends)")]
    = False,
) -> None:
    """Known model names and whether they are installed (--families: which model families posprobe supports)."""
    if families:
        from posprobe.adapters.families import support_matrix_markdown

        typer.echo(support_matrix_markdown())
        return
    from posprobe.models import ZOO, list_models

    for name, installed in list_models().items():
        entry = ZOO[name]
        status = "installed" if installed else f"not installed ({entry.install})"
        typer.echo(f"{name:16s} {status:40s} {entry.description}")


@app.command()
def probes() -> None:
    """Registered probes."""
    from posprobe.probes import get_probe, list_probes

    for name in list_probes():
        typer.echo(f"{name:20s} {get_probe(name).description}")


@app.command()
def report(
    scan_dir: Annotated[Path, typer.Argument(help="a saved scan directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the HTML file to write")],
    top: Annotated[int, typer.Option(help="heads listed per metric")] = 5,
) -> None:
    """Write one self-contained HTML page (plotly inlined, opens offline): provenance, top heads, main figures."""
    from posprobe._io import check_output_file
    from posprobe.report import write_report

    check_output_file(out)  # before the scan is read
    written = write_report(_load(scan_dir), out, top=top)
    typer.echo(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB)", err=True)


@app.command()
def patterns(
    scan_dir: Annotated[Path, typer.Argument(help="a saved scan directory with stored example patterns (posprobe "
                                                  "scan --examples on)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the HTML file to write")],
    heads: Annotated[str | None, typer.Option(help="comma-separated heads as L<layer>H<head>, e.g. L3H1,L5H0 "
                                                   "(default: the top head of each of --metrics)")] = None,
    metrics: Annotated[str | None, typer.Option(help="comma-separated head metrics whose top head is shown when "
                                                     "--heads is not given (default: those of previous_token_score, "
                                                     "induction_score, duplicate_token_score, sink_mass, "
                                                     "retrieval_score the scan has)")] = None,
    example: Annotated[list[str] | None, typer.Option(
        "--example", help="a stored example by name or index (text, repeated, needle / 0, 1, 2); repeat for "
                          "several (default: every stored example)")] = None,
    query: Annotated[int | None, typer.Option(help="the query row outlined and shown as top keys (negative: from "
                                                   "the end; default: the last token)")] = None,
    top_keys: Annotated[bool, typer.Option("--top-keys/--no-top-keys", help="also the top-keys strip of the "
                                           "query row")] = True,
    cdn: Annotated[bool, typer.Option("--cdn", help="load plotly.js from its CDN (a much smaller file that needs "
                                      "the network) instead of inlining it")] = False,
) -> None:
    """Write the stored attention patterns of some heads (per example: heatmap + top keys) to one HTML page."""
    from posprobe._io import check_output_file
    from posprobe.pattern_export import select, write_patterns

    check_output_file(out)  # before the scan is read; every other problem is raised by select, before writing
    result = _load(scan_dir)
    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    selection = select(result, heads=heads, examples=example, query=query, metrics=chosen, top_keys=top_keys,
                       source=scan_dir)
    written = write_patterns(result, out, selection, plotlyjs="cdn" if cdn else "inline")
    shown = ", ".join(f"L{layer}H{head}" for layer, head in selection.heads)
    typer.echo(f"wrote {shown} on {len(selection.examples)} example(s) to {written} "
               f"({written.stat().st_size / 1e6:.1f} MB)", err=True)


@app.command(name="app")
def app_command(
    scan_dirs: Annotated[list[Path], typer.Argument(help="saved scan directories to open")],
    host: Annotated[str, typer.Option(help="interface to bind (default: localhost only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8050,
) -> None:
    """Open the Dash explorer over saved scans."""
    from posprobe._explorer import load_explorer

    load_explorer().serve(scan_dirs, host=host, port=port)  # a missing Dash: MissingDependencyError, exit code 2


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{option} takes comma-separated integers (e.g. 0,5,10,15,19); got {text!r}.")


@app.command(name="eval")
def eval_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to write the sweep to (a scan directory)")],
    model: Annotated[str | None, typer.Option(help="model name or path (default: embedded gemma-3-270m)")] = None,
    task: Annotated[str, typer.Option(help="kv_words | multidoc | needle | passkey ...")] = "kv_words",
    items: Annotated[str | None, typer.Option(help="items per prompt, comma-separated for several "
                                                      "(default: the task's)")] = None,
    positions: Annotated[str | None, typer.Option(help="gold positions, comma-separated, 0-based, negative from "
                                                          "the end (default: 5 evenly spaced)")] = None,
    trials: Annotated[int, typer.Option(help="trials per gold position")] = 40,
    intervention: Annotated[list[str] | None, typer.Option(
        help="an intervention as NAME:KEY=VAL,... (repeat for several; each is compared with the baseline). "
             "`posprobe interventions` lists them")] = None,
    what_if: Annotated[list[str] | None, typer.Option(
        "--what-if", help="a context-extension what-if as NAME:KEY=VAL,... (repeat for several; each is compared "
                          "with the baseline, like --intervention)")] = None,
    baseline: Annotated[bool, typer.Option(help="also run without intervention")] = True,
    seed: Annotated[int, typer.Option(help="base seed of the trials")] = 0,
    backend: Annotated[str | None, typer.Option(help="hf (default) | transformer_lens | nnsight")] = None,
) -> None:
    """Accuracy by gold position (the behavioural U-curve), baseline and interventions, saved as a scan to OUT."""
    from posprobe._io import check_output_dir
    from posprobe.interventions import parse

    sizes = _int_list(items, "--items")
    gold = _int_list(positions, "--positions")
    specs = [parse(text) for text in [*(intervention or []), *(what_if or [])]]  # bad specs fail before loading
    state = check_output_dir(out, marker="manifest.json")
    if state == "overwrite":
        typer.echo(f"{out} holds a scan already: it will be replaced when this sweep is saved", err=True)
    from posprobe.tasks.evaluate import position_sweep

    result = position_sweep(model, task, sizes, gold, trials, specs, seed, baseline=baseline, backend=backend)
    result.save(out)
    summary = result.tables[f"evaluate.{result.meta['evaluate']['task']}"]
    shown = summary[["intervention", "n_items", "gold_position", "n", "accuracy", "ci_low", "ci_high", "n_errors"]]
    sys.stdout.write(shown.to_markdown(index=False, floatfmt=".3f") + "\n")
    typer.echo(f"saved the {result.meta['evaluate']['task']} sweep of {result.meta['model']} ({len(summary)} rows) "
               f"to {out} in {result.meta['timings_s']['total']:.0f} s; open it with `posprobe app {out}`", err=True)


@app.command()
def interventions() -> None:
    """Every intervention and what-if, with its settings and defaults (use as NAME:KEY=VAL,KEY=VAL)."""
    from posprobe.interventions import get_class, list_interventions, parameters

    for name in list_interventions():
        typer.echo(f"{name:22s} {get_class(name).summary}")
        for p in parameters(name):
            typer.echo(f"    {p['name']:20s} = {p['default']:<12s} {p['help']}".rstrip())


def main(argv: list[str] | None = None) -> int:
    """Console entry point: posprobe errors become `posprobe: error: ...` and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False)  # click returns a typer.Exit's code here instead of raising
        if isinstance(code, int) and code:
            return code
    except typer.Exit as exc:
        return exc.exit_code
    except PosprobeError as exc:
        typer.echo(f"posprobe: error: {exc}", err=True)
        return 2
    except Exception as exc:  # usage errors of typer's (vendored) click in non-standalone mode
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return 2
        if type(exc).__name__ == "Abort":
            return 1
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
