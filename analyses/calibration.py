"""Calibration interventions on Gemma 3 270M: Found-in-the-Middle and single-dimension scaling, measured on held-out
trials (docs/interventions.md; Hsieh et al. 2024, Yu et al. 2024), through the public API only.

Stages (each resumable; outputs land in --out; run every Gemma stage under the shared lock):
  search     find_positional_dimensions: candidates, evidence curves (validation split: task seeds 4242 * 1_000_003 + t)
  tune-fitm  Found-in-the-Middle temperature x layer-range sweep on the TUNING split (kv_words, 20 pairs, seed 1)
             by teacher-forced answer loss (equal to KV-cached greedy decoding for this edit); picks the config
  tune-dim   scaling-factor sweep (the paper's grid 0.5, 0, -0.5, -1) for the found dimension(s) and a layer-range
             variant on the same tuning split, by stepwise answer loss (equal to greedy with recomputation)
  heldout    evaluate_positions on the HELD-OUT split (seed 2), 40 trials per gold position, 20 and 40 pairs:
             baseline, Found-in-the-Middle (tuned), positional-dimension scaling (tuned)
  heldout-sweep  the temperature and factor sweeps again on the HELD-OUT split (20 pairs, --sweep-trials trials x
             gold positions 0, 7, 10, 12, 19; the trials are the first ones of the heldout stage, so the baseline and
             the tuned settings are reused from it)
  attention  attention of the answer-predicting query on held-out prompts (20 pairs): document-level (gold document
             by gold position, every slot) and by relative key position, per condition
  report     tables with Wilson intervals, paired-bootstrap intervals of the changes, figures, report.md and a Scan
             (tables "interventions.calibration*", curves of probe "calibration") for `posprobe app`

Usage:  flock /tmp/posprobe-gemma.lock nice -n 5 python analyses/calibration.py --stage search   (and so on), or
        --stage all. Task seeds: tuning 1 * 1_000_003 + t, held-out 2 * 1_000_003 + t, Found-in-the-Middle slot-bias
        calibration 977 * 1_000_003 + t, dimension validation 4242 * 1_000_003 + t: four disjoint sets of prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import posprobe
from posprobe.access import Tap
from posprobe.interventions import FoundInTheMiddle, LayerRange, PositionalDimension
from posprobe.interventions.positional_dimension import (
    answer_loss,
    default_layers,
    find_positional_dimensions,
    task_prompts,
)
from posprobe.interventions.spec import layer_range_of
from posprobe.probes.base import curve_frame
from posprobe.probes.position_bias import binned_attention, u_score
from posprobe.tasks import wilson_interval

TUNING_SEED, HELDOUT_SEED = 1, 2
POSITIONS = {20: [0, 3, 7, 10, 12, 16, 19], 40: [0, 13, 20, 26, 39]}


def fitm_grid(n_layers: int) -> list[tuple[float, LayerRange, str]]:
    """(temperature, layers, granularity): t over the last half, the last ~quarter, and ~3/4 of the layers
    (Gemma 3 270M: 9:18, 13:18, 5:18), plus pooled-over-heads calibration."""
    half, quarter, most = (LayerRange(n_layers // 2, n_layers), LayerRange(n_layers - n_layers // 4 - 1, n_layers),
                           LayerRange(n_layers // 4 + 1, n_layers))
    grid = [(t, half, "head") for t in (0.1, 0.3, 1.0, 3.0, 10.0)]
    grid += [(t, quarter, "head") for t in (0.1, 0.3, 1.0)]
    return grid + [(0.3, half, "layer"), (0.3, most, "head")]


FACTORS = [0.5, 0.0, -0.5, -1.0]
STAGES = ["search", "tune-fitm", "tune-dim", "heldout", "heldout-sweep", "attention", "report"]
SWEEP_POSITIONS = [0, 7, 10, 12, 19]  # 20 pairs: both ends and the three middle positions of POSITIONS[20]
SWEEP_TEMPERATURES = [0.1, 0.3, 1.0, 3.0]  # Found-in-the-Middle, on the tuned layer range
SWEEP_FACTORS = [0.5, 0.0, -0.5, -1.0, -2.0]  # positional dimension, on the tuned dimension and layers


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/calibration", help="output folder")
    parser.add_argument("--model", default="gemma-3-270m", help="anything posprobe.load_model accepts")
    parser.add_argument("--stage", default=["all"], nargs="+", choices=["all", *STAGES],
                        help="stages to run, in order (default: all)")
    parser.add_argument("--tune-trials", type=int, default=12, help="tuning-split trials per gold position")
    parser.add_argument("--trials", type=int, default=40, help="held-out trials per gold position")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 40], help="key-value pairs per prompt")
    parser.add_argument("--sweep-trials", type=int, default=20, help="held-out trials per gold position, sweeps")
    parser.add_argument("--attention-trials", type=int, default=8, help="held-out trials for the attention curves")
    parser.add_argument("--search-sequences", type=int, default=24, help="random strings of the dimension search")
    parser.add_argument("--bootstrap", type=int, default=4000, help="bootstrap resamples of the paired changes")
    return parser.parse_args()


# --- small helpers --------------------------------------------------------------------------------------------------


def fmt_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    return df.to_markdown(index=False, floatfmt=floatfmt)


def save_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def write_figure(fig: go.Figure, path: Path) -> None:
    fig.write_html(path.with_suffix(".html"), include_plotlyjs="cdn")


def middle_positions(n_items: int, positions: list[int]) -> list[int]:
    """Gold positions whose relative position g / (n - 1) lies in the middle third [1/3, 2/3]."""
    rel = np.asarray(positions) / max(n_items - 1, 1)
    return [p for p, r in zip(positions, rel) if 1 / 3 - 1e-9 <= r <= 2 / 3 + 1e-9]


def fitm_label(t: float, layers: LayerRange, granularity: str) -> str:
    return f"fitm t={t:g} L{layers}{' per-layer' if granularity == 'layer' else ''}"


def dim_label(dim: int, factor: float, layers: LayerRange) -> str:
    return f"dim {dim} x{factor:g} L{layers}"


def tuned_layers(choice: dict[str, Any]) -> LayerRange:
    """The layer range of a tuned choice: "layer_range" ("9:18"); tuned.json files written before LayerRange hold
    Found-in-the-Middle's [l0, l1) as "layers" with a "temperature", the dimension's inclusive [first, last]."""
    if "layer_range" in choice:
        return LayerRange.parse(choice["layer_range"])
    first, last = (int(x) for x in choice["layers"])
    return LayerRange(first, last if "temperature" in choice else last + 1)


def summarise_losses(df: pd.DataFrame, n_items: int) -> dict[str, float]:
    middle = middle_positions(n_items, sorted(df["gold_position"].unique()))
    mid = df[df["gold_position"].isin(middle)]
    return {"loss": float(df["loss"].mean()), "middle_loss": float(mid["loss"].mean()),
            "accuracy": float(df["correct"].mean()), "middle_accuracy": float(mid["correct"].mean()),
            "first_loss": float(df["first_loss"].mean()), "n": int(len(df))}


def position_table(df: pd.DataFrame, value: str = "correct") -> pd.DataFrame:
    rows = []
    for (cond, size, gold), g in df.groupby(["condition", "n_items", "gold_position"], sort=True):
        k, n = int(g[value].sum()), len(g)
        low, high = wilson_interval(k, n)
        rows.append({"condition": cond, "n_items": int(size), "gold_position": int(gold), "accuracy": k / n,
                     "ci_low": low, "ci_high": high, "n": n, "loss": float(g["loss"].mean())
                     if "loss" in g else np.nan})
    return pd.DataFrame(rows)


# --- stages -----------------------------------------------------------------------------------------------------------


def stage_search(access: Any, out: Path, args: argparse.Namespace) -> None:
    t0 = time.time()
    result = find_positional_dimensions(access, n_sequences=args.search_sequences, progress=True)
    result.candidates.to_csv(out / "search_candidates.csv", index=False)
    top = [int(d) for d in result.candidates["dim"].head(5)]
    result.curves(top, step=2).to_parquet(out / "search_curves.parquet", index=False)
    counts = result.monotonic_counts
    save_json(out / "search.json", {"config": result.config.to_dict(), "baseline": result.baseline,
                                    "best": result.best, "top": top, "seconds": time.time() - t0,
                                    "n_kept": int(len(result.candidates)),
                                    "monotonic_count_histogram": np.bincount(counts).tolist()})
    print(result.candidates.head(10).to_string(), flush=True)


def _tuning_prompts(access: Any, args: argparse.Namespace) -> list:
    return task_prompts(access, "kv_words", 20, POSITIONS[20], args.tune_trials, seed=TUNING_SEED)


def stage_tune_fitm(access: Any, out: Path, args: argparse.Namespace) -> None:
    prompts = _tuning_prompts(access, args)
    path = out / "tune_fitm.parquet"
    done = pd.read_parquet(path) if path.exists() else pd.DataFrame()
    frames = [done] if len(done) else []
    have = set(done["condition"]) if len(done) else set()

    def run(label: str, intervention: Any, **extra: Any) -> None:
        if label in have:
            return
        t0 = time.time()
        df = answer_loss(access, prompts, intervention=intervention)
        df["condition"] = label
        for k, v in extra.items():
            df[k] = v
        frames.append(df)
        pd.concat(frames, ignore_index=True).to_parquet(path, index=False)
        have.add(label)
        s = summarise_losses(df, 20)
        print(f"{label:32s} loss {s['loss']:.3f} middle {s['middle_loss']:.3f} acc {s['accuracy']:.3f} "
              f"middle acc {s['middle_accuracy']:.3f} ({time.time() - t0:.0f} s)", flush=True)

    run("baseline", None)
    base = FoundInTheMiddle(task="kv_words")
    t0 = time.time()
    bias = base.slot_bias(access, 20)  # cached on the access: every replace() below reuses it
    np.save(out / "fitm_slot_bias_20.npy", bias)
    print(f"slot bias (20 slots) estimated in {time.time() - t0:.0f} s", flush=True)
    for t, layers, granularity in fitm_grid(access.info.n_layers):
        fitm = base.replace(temperature=t, layers=layers, granularity=granularity)
        run(fitm_label(t, layers, granularity), fitm, temperature=t, layer_range=str(layers), granularity=granularity)
    choose_fitm(out)


def choose_fitm(out: Path) -> dict[str, Any]:
    df = pd.read_parquet(out / "tune_fitm.parquet")
    rows = []
    for label, g in df.groupby("condition", sort=False):
        rows.append({"condition": label, **summarise_losses(g, 20),
                     **({k: g[k].iloc[0] for k in ("temperature", "layer_range", "granularity")}
                        if label != "baseline" else {})})
    table = pd.DataFrame(rows)
    table.to_csv(out / "tune_fitm_summary.csv", index=False)
    best = table[table["condition"] != "baseline"].sort_values("loss").iloc[0]
    choice = {"condition": best["condition"], "temperature": float(best["temperature"]),
              "layer_range": str(best["layer_range"]), "granularity": str(best["granularity"]),
              "criterion": "lowest mean answer loss on the tuning split (all gold positions)"}
    tuned = _read_tuned(out)
    tuned["fitm"] = choice
    save_json(out / "tuned.json", tuned)
    return choice


def _read_tuned(out: Path) -> dict[str, Any]:
    path = out / "tuned.json"
    return json.loads(path.read_text()) if path.exists() else {}


def stage_tune_dim(access: Any, out: Path, args: argparse.Namespace) -> None:
    prompts = _tuning_prompts(access, args)
    candidates = pd.read_csv(out / "search_candidates.csv")
    dims = [int(d) for d in candidates["dim"].head(2)]
    layers = LayerRange.parse(layer_range_of(default_layers(access.info)))
    path = out / "tune_dim.parquet"
    done = pd.read_parquet(path) if path.exists() else pd.DataFrame()
    frames = [done] if len(done) else []
    have = set(done["condition"]) if len(done) else set()

    def run(dim: int, factor: float, chosen: LayerRange) -> None:
        label = dim_label(dim, factor, chosen)
        if label in have:
            return
        t0 = time.time()
        spec = PositionalDimension(dims=dim, factor=factor, layers=chosen)
        df = answer_loss(access, prompts, intervention=spec, stepwise=True)
        df["condition"], df["dim"], df["factor"], df["layer_range"] = label, dim, factor, str(chosen)
        frames.append(df)
        pd.concat(frames, ignore_index=True).to_parquet(path, index=False)
        have.add(label)
        s = summarise_losses(df, 20)
        print(f"{label:32s} loss {s['loss']:.3f} middle {s['middle_loss']:.3f} acc {s['accuracy']:.3f} "
              f"middle acc {s['middle_accuracy']:.3f} ({time.time() - t0:.0f} s)", flush=True)

    for factor in FACTORS:
        run(dims[0], factor, layers)
    if len(dims) > 1:
        run(dims[1], 0.0, layers)
    best_factor = _dim_choice(out)["factor"]
    n = access.info.n_layers
    run(dims[0], best_factor, LayerRange(n // 2, n))
    best = _dim_choice(out)
    if best["dim"] == dims[0]:  # the factor grid (and one step beyond it) at the best layer range
        chosen = tuned_layers(best)
        for factor in [*FACTORS, 2 * min(FACTORS)]:
            run(dims[0], factor, chosen)
    choice = _dim_choice(out)
    tuned = _read_tuned(out)
    tuned["dim"] = choice
    save_json(out / "tuned.json", tuned)


def _dim_choice(out: Path) -> dict[str, Any]:
    df = pd.read_parquet(out / "tune_dim.parquet")
    rows = []
    for label, g in df.groupby("condition", sort=False):
        rows.append({"condition": label, **summarise_losses(g, 20), "dim": int(g["dim"].iloc[0]),
                     "factor": float(g["factor"].iloc[0]), "layer_range": g["layer_range"].iloc[0]})
    table = pd.DataFrame(rows)
    table.to_csv(out / "tune_dim_summary.csv", index=False)
    best = table.sort_values("loss").iloc[0]
    return {"condition": best["condition"], "dim": int(best["dim"]), "factor": float(best["factor"]),
            "layer_range": str(best["layer_range"]),
            "criterion": "lowest mean stepwise answer loss on the tuning split"}


def conditions(access: Any, out: Path) -> dict[str, Any]:
    tuned = _read_tuned(out)
    if "fitm" not in tuned or "dim" not in tuned:
        raise SystemExit("Run the tune-fitm and tune-dim stages first (tuned.json is incomplete).")
    f, d = tuned["fitm"], tuned["dim"]
    fitm = FoundInTheMiddle(task="kv_words", temperature=f["temperature"], layers=tuned_layers(f),
                            granularity=f["granularity"])
    scaled = PositionalDimension(dims=d["dim"], factor=d["factor"], layers=tuned_layers(d))
    return {"baseline": None, "found_in_the_middle": fitm, "positional_dimension": scaled}


def stage_heldout(access: Any, out: Path, args: argparse.Namespace) -> None:
    folder = out / "heldout"
    folder.mkdir(exist_ok=True)
    for size in args.sizes:
        for name, intervention in conditions(access, out).items():
            path = folder / f"{name}_{size}.parquet"
            if path.exists():
                continue
            t0 = time.time()
            table = posprobe.evaluate_positions(access, "kv_words", size, POSITIONS[size], args.trials,
                                                intervention=intervention, seed=HELDOUT_SEED)
            trials = pd.DataFrame(table.attrs["trials"])
            trials["condition"] = name
            trials.to_parquet(path, index=False)
            acc = table.set_index("gold_position")["accuracy"].round(3).to_dict()
            print(f"{name} {size} pairs: {acc} errors {table.attrs['n_errors']} ({time.time() - t0:.0f} s)",
                  flush=True)


def sweep_conditions(access: Any, out: Path) -> dict[str, tuple[str, float, Any]]:
    """label -> (family, parameter, intervention) of the held-out sweeps; labels match the tuned conditions."""
    tuned = _read_tuned(out)
    f, d = tuned["fitm"], tuned["dim"]
    layers, dim_layers = tuned_layers(f), tuned_layers(d)
    base = FoundInTheMiddle(task="kv_words", layers=layers, granularity=f["granularity"])
    found: dict[str, tuple[str, float, Any]] = {}
    for t in SWEEP_TEMPERATURES:  # the slot bias is cached on the access: calibrated once for the whole sweep
        found[fitm_label(t, layers, f["granularity"])] = ("found_in_the_middle", t, base.replace(temperature=t))
    for factor in SWEEP_FACTORS:
        found[dim_label(d["dim"], factor, dim_layers)] = (
            "positional_dimension", factor, PositionalDimension(dims=d["dim"], factor=factor, layers=dim_layers))
    return found


def stage_heldout_sweep(access: Any, out: Path, args: argparse.Namespace) -> None:
    folder = out / "heldout_sweep"
    folder.mkdir(exist_ok=True)
    tuned = _read_tuned(out)
    for label, (family, value, intervention) in sweep_conditions(access, out).items():
        path = folder / f"{label.replace(' ', '_').replace('=', '')}.parquet"
        if path.exists() or label in (tuned["fitm"]["condition"], tuned["dim"]["condition"]):
            continue  # the tuned settings come from the heldout stage (same prompts)
        t0 = time.time()
        table = posprobe.evaluate_positions(access, "kv_words", 20, SWEEP_POSITIONS, args.sweep_trials,
                                            intervention=intervention, seed=HELDOUT_SEED)
        trials = pd.DataFrame(table.attrs["trials"])
        trials["condition"], trials["family"], trials["parameter"] = label, family, value
        trials.to_parquet(path, index=False)
        acc = table.set_index("gold_position")["accuracy"].round(3).to_dict()
        print(f"sweep {label}: {acc} errors {table.attrs['n_errors']} ({time.time() - t0:.0f} s)", flush=True)


def _answer_rows(access: Any, prompts: list, intervention: Any) -> np.ndarray:
    """Attention rows [b, L, H, n] of the answer-predicting query as the (intervened) model uses them."""
    if isinstance(intervention, FoundInTheMiddle):
        return intervention.answer_attention(access, prompts)
    info = access.info
    n = prompts[0].n_tokens
    rows = np.zeros((len(prompts), info.n_layers, info.n_heads, n))
    query = np.array([n - 1])
    import torch

    def on_layer(cap: Any) -> None:
        rows[:, cap.layer] = cap.pattern(torch.as_tensor(query))[:, :, 0].double().numpy()

    ids = torch.tensor([p.input_ids for p in prompts])
    if intervention is None:
        access.run(ids, taps={Tap.PATTERN}, on_layer=on_layer)
    else:
        with intervention.applied(access):
            access.run(ids, taps={Tap.PATTERN}, on_layer=on_layer)
    return rows


def stage_attention(access: Any, out: Path, args: argparse.Namespace) -> None:
    import torch

    prompts = task_prompts(access, "kv_words", 20, POSITIONS[20], args.attention_trials, seed=HELDOUT_SEED)
    by_trial: dict[int, list] = {}
    for p in prompts:
        by_trial.setdefault(p.seed, []).append(p)
    records, slot_records, rel_records = [], [], []
    n_bins = 12
    for name, intervention in conditions(access, out).items():
        t0 = time.time()
        for batch in by_trial.values():
            rows = _answer_rows(access, batch, intervention)  # [b, L, H, n]
            for r, p in enumerate(batch):
                per_slot = np.stack([rows[r, :, :, a:b].mean(-1) for a, b in p.spans], -1)  # [L, H, K]
                for layer in range(rows.shape[1]):
                    records.append({"condition": name, "seed": p.seed, "gold_position": p.gold_index,
                                    "layer": layer, "attention": float(per_slot[layer, :, p.gold_index].mean())})
                    for slot in range(p.n_items):
                        slot_records.append({"condition": name, "seed": p.seed, "gold_position": p.gold_index,
                                             "layer": layer, "slot": slot,
                                             "attention": float(per_slot[layer, :, slot].mean())})
                for layer in range(rows.shape[1]):  # attention per key relative to uniform, by j / i bin
                    b = binned_attention(torch.as_tensor(rows[r, layer])[None, :, None, :],
                                         torch.tensor([p.n_tokens - 1]), n_bins).mean(0)
                    for k in range(n_bins):
                        rel_records.append({"condition": name, "seed": p.seed, "gold_position": p.gold_index,
                                            "layer": layer, "bin": k, "attention": float(b[k])})
        print(f"attention {name}: {time.time() - t0:.0f} s", flush=True)
    pd.DataFrame(records).to_parquet(out / "attention_gold.parquet", index=False)
    pd.DataFrame(slot_records).to_parquet(out / "attention_slots.parquet", index=False)
    pd.DataFrame(rel_records).to_parquet(out / "attention_relative.parquet", index=False)


# --- report -----------------------------------------------------------------------------------------------------------


def paired_changes(trials: pd.DataFrame, size: int, condition: str, n_boot: int, seed: int = 0,
                   positions: list[int] | None = None) -> dict[str, Any]:
    """Mean and middle accuracy of `condition` vs baseline with Wilson intervals, and the paired changes with
    bootstrap 95% intervals (trials resampled; every trial holds the same prompts in both conditions)."""
    middle = middle_positions(size, positions or POSITIONS[size])
    rows = trials[(trials["n_items"] == size) & (trials["error"] == "")]
    wide = rows.pivot_table(index="trial", columns=["condition", "gold_position"], values="correct", aggfunc="first")
    out: dict[str, Any] = {"n_items": size, "condition": condition, "middle_positions": middle,
                           "n_trials": int(len(wide))}
    for cond in ("baseline", condition):
        sub = rows[rows["condition"] == cond]
        for part, sel in (("mean", sub), ("middle", sub[sub["gold_position"].isin(middle)])):
            k, n = int(sel["correct"].sum()), len(sel)
            low, high = wilson_interval(k, n)
            out[f"{cond}_{part}"] = k / n if n else np.nan
            out[f"{cond}_{part}_ci"] = [low, high]
    base = wide["baseline"].to_numpy(dtype=float)
    treat = wide[condition].to_numpy(dtype=float)
    mid_cols = [list(wide["baseline"].columns).index(p) for p in middle]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(n_boot, len(base)))
    diff_mean = (treat - base).mean(1)
    diff_mid = (treat[:, mid_cols] - base[:, mid_cols]).mean(1)
    for part, d in (("mean", diff_mean), ("middle", diff_mid)):
        boots = d[idx].mean(1)
        out[f"change_{part}"] = float(d.mean())
        out[f"change_{part}_ci"] = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]
    return out


def u_figure(table: pd.DataFrame, size: int) -> go.Figure:
    fig = go.Figure()
    for cond, g in table[table["n_items"] == size].groupby("condition", sort=False):
        g = g.sort_values("gold_position")
        fig.add_trace(go.Scatter(x=g["gold_position"], y=g["accuracy"], mode="lines+markers", name=cond,
                                 error_y={"type": "data", "symmetric": False, "array": g["ci_high"] - g["accuracy"],
                                          "arrayminus": g["accuracy"] - g["ci_low"]}))
    fig.update_layout(title=f"kv_words, {size} pairs: accuracy by gold position, held-out trials (Wilson 95%)",
                      xaxis_title="gold position", yaxis_title="exact-match accuracy", yaxis_range=[-0.05, 1.05])
    return fig


def sweep_figure(summary: pd.DataFrame, x: str, group: str, title: str, baseline: dict[str, float]) -> go.Figure:
    fig = make_subplots(rows=1, cols=3, subplot_titles=("mean answer loss", "accuracy (all positions)",
                                                        "accuracy (middle positions)"))
    for key, g in summary.groupby(group, sort=False):
        g = g.sort_values(x)
        for col, metric in enumerate(("loss", "accuracy", "middle_accuracy"), start=1):
            fig.add_trace(go.Scatter(x=g[x], y=g[metric], mode="lines+markers", name=str(key), legendgroup=str(key),
                                     showlegend=col == 1), row=1, col=col)
    for col, metric in enumerate(("loss", "accuracy", "middle_accuracy"), start=1):
        fig.add_hline(y=baseline[metric], line={"dash": "dot", "color": "grey"}, row=1, col=col)
    fig.update_layout(title=title + " (tuning split; dotted: no intervention)", height=380, width=1250)
    return fig


@dataclass
class _Report:
    """What the report stage's sections share: inputs, and the numbers / tables / curves / markdown they add to."""

    out: Path
    args: argparse.Namespace
    info: Any
    tuned: dict[str, Any]
    numbers: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    curve_rows: list[pd.DataFrame] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    trials: pd.DataFrame | None = None  # held-out trials (set by _report_heldout, read by _report_heldout_sweeps)
    changes: list[dict[str, Any]] = field(default_factory=list)  # paired changes (recorded in the scan's summary)


def _report_search(r: _Report) -> None:
    """The dimension search: the best candidate's curve by layer, the candidates table."""
    out, numbers, tables, curve_rows, md = r.out, r.numbers, r.tables, r.curve_rows, r.md
    search = json.loads((out / "search.json").read_text())
    candidates = pd.read_csv(out / "search_candidates.csv")
    curves = pd.read_parquet(out / "search_curves.parquet")
    numbers["search"] = {k: search[k] for k in ("best", "top", "baseline", "n_kept", "seconds")}
    best = int(search["best"])
    best_row = candidates[candidates["dim"] == best].iloc[0].to_dict()
    numbers["search"]["best_row"] = best_row
    fig = go.Figure()
    for layer, g in curves[curves["dim"] == best].groupby("layer"):
        fig.add_trace(go.Scatter(x=g["position"], y=g["value"], mode="lines", name=f"L{layer}"
                                 + (" (monotonic)" if bool(g["monotonic"].iloc[0]) else ""),
                                 line={"dash": "solid" if bool(g["monotonic"].iloc[0]) else "dot"}))
    fig.update_layout(title=f"Residual dimension {best} averaged over random strings, by position and layer",
                      xaxis_title="position", yaxis_title="mean residual value")
    write_figure(fig, out / "positional_dimension_curve")
    tables["interventions.calibration_dimension_candidates"] = candidates
    curve_rows.append(pd.DataFrame({"curve": "positional_dimension", "series": "dim " + curves["dim"].astype(str),
                                    "layer": curves["layer"], "head": -1, "x": curves["position"].astype(float),
                                    "y": curves["value"].astype(float)}))
    md += ["## Positional dimension (Yu et al. search)", "",
           f"Averaged residual stream over {search['config']['n_sequences']} random-character strings of "
           f"{search['config']['length']} tokens; {search['n_kept']} dimensions are monotonic in more than "
           f"{search['config']['min_layer_share']:.0%} of the layers. Top candidates (validation: stepwise answer "
           f"loss with the dimension zeroed, kv_words 20 pairs, validation seeds; unscaled loss "
           f"{search['baseline'].get('loss', float('nan')):.3f}, accuracy "
           f"{search['baseline'].get('accuracy', float('nan')):.3f}):", "",
           fmt_table(candidates.head(8)[["rank", "dim", "direction", "n_monotonic_layers", "monotonic_layers",
                                          "smoothness", "validation_loss", "validation_accuracy", "loss_change"]],
                     ".4g"), "",
           f"Best: dimension **{best}** ({best_row['direction']}, monotonic in layers {best_row['monotonic_layers']}).",
           "Figure: positional_dimension_curve.html.", ""]


def _report_sweeps(r: _Report) -> None:
    """The tuning-split sweeps of both interventions: figures, tables, the chosen settings."""
    out, args, tuned, tables, md = r.out, r.args, r.tuned, r.tables, r.md
    fitm_sweep = pd.read_parquet(out / "tune_fitm.parquet")
    dim_sweep = pd.read_parquet(out / "tune_dim.parquet")
    fitm_summary = pd.read_csv(out / "tune_fitm_summary.csv")
    dim_summary = pd.read_csv(out / "tune_dim_summary.csv")
    base_summary = fitm_summary[fitm_summary["condition"] == "baseline"].iloc[0].to_dict()
    fs = fitm_summary[fitm_summary["condition"] != "baseline"].copy()
    fs["layers"] = fs["layer_range"].astype(str) + " " + fs["granularity"]
    write_figure(sweep_figure(fs, "temperature", "layers", "Found-in-the-Middle temperature sweep", base_summary),
                 out / "sweep_fitm")
    ds = dim_summary.copy()
    ds["series"] = "dim " + ds["dim"].astype(str) + " L" + ds["layer_range"].astype(str)
    write_figure(sweep_figure(ds, "factor", "series", "Positional-dimension factor sweep", base_summary),
                 out / "sweep_dim")
    sweep_positions = pd.concat([fitm_sweep, dim_sweep[dim_sweep["condition"] != "baseline"]], ignore_index=True)
    sweep_table = position_table(sweep_positions)
    sweep_table["split"] = "tuning"
    tables["interventions.calibration_fitm_sweep"] = sweep_table[sweep_table["condition"].isin(
        set(fitm_sweep["condition"]))].reset_index(drop=True)
    dim_tab = sweep_table[sweep_table["condition"].isin(set(dim_sweep["condition"]) | {"baseline"})]
    tables["interventions.calibration_dim_sweep"] = dim_tab.reset_index(drop=True)
    keep = ["condition", "loss", "middle_loss", "accuracy", "middle_accuracy", "n"]
    md += ["## Sweeps on the tuning split (kv_words 20 pairs, seed 1, "
           f"{args.tune_trials} trials x {len(POSITIONS[20])} gold positions)", "",
           "Found-in-the-Middle (teacher-forced answer loss; accuracy = every answer token is the argmax):", "",
           fmt_table(fitm_summary[keep]), "", f"Chosen: `{tuned['fitm']['condition']}` ({tuned['fitm']['criterion']}).",
           "", "Positional-dimension scaling (stepwise answer loss, as greedy decoding with recomputation):", "",
           fmt_table(pd.concat([fitm_summary[fitm_summary["condition"] == "baseline"][keep], dim_summary[keep]])), "",
           f"Chosen: `{tuned['dim']['condition']}` ({tuned['dim']['criterion']}).", "",
           "Figures: sweep_fitm.html, sweep_dim.html.", ""]


def _report_heldout(r: _Report) -> None:
    """Held-out accuracy before / after by gold position, U-curve figures, paired changes with intervals."""
    out, args, numbers, tables, md = r.out, r.args, r.numbers, r.tables, r.md
    trials = pd.concat([pd.read_parquet(p) for p in sorted((out / "heldout").glob("*.parquet"))], ignore_index=True)
    trials.to_csv(out / "heldout_trials.csv", index=False)
    held = []
    for (cond, size), g in trials.groupby(["condition", "n_items"], sort=False):
        table = posprobe.tasks.summarize_trials(g)
        table["condition"] = cond
        table["pairs"] = f"{size} pairs"
        held.append(table)
    order = {"baseline": 0, "found_in_the_middle": 1, "positional_dimension": 2}
    heldout = pd.concat(held, ignore_index=True)
    heldout = heldout.sort_values(["n_items", "condition", "gold_position"],
                                  key=lambda s: s.map(order) if s.name == "condition" else s).reset_index(drop=True)
    tables["interventions.calibration"] = heldout
    heldout.to_csv(out / "heldout_accuracy.csv", index=False)
    changes = []
    md += ["## Held-out before / after (kv_words, seed 2, greedy exact match, Wilson 95% intervals)", ""]
    for size in sorted(heldout["n_items"].unique()):
        write_figure(u_figure(heldout, int(size)), out / f"u_curve_{size}")
        wide = heldout[heldout["n_items"] == size].pivot_table(index="gold_position", columns="condition",
                                                              values="accuracy")
        md += [f"### {size} pairs (u_curve_{size}.html)", "", fmt_table(wide.reset_index()), ""]
        for cond in ("found_in_the_middle", "positional_dimension"):
            if cond in set(trials["condition"]):
                changes.append(paired_changes(trials, int(size), cond, args.bootstrap))
    numbers["heldout_changes"] = changes
    r.trials, r.changes = trials, changes
    lines = ["| pairs | intervention | middle before | middle after | change (95% CI) | mean before | mean after | "
             "change (95% CI) |", "|---|---|---|---|---|---|---|---|"]
    for c in changes:
        def acc(key: str, c: dict[str, Any] = c) -> str:
            return f"{c[key]:.3f} [{c[key + '_ci'][0]:.3f}, {c[key + '_ci'][1]:.3f}]"

        cond = c["condition"]
        lines.append(f"| {c['n_items']} | {cond} | {acc('baseline_middle')} | {acc(cond + '_middle')} | "
                     f"{c['change_middle']:+.3f} [{c['change_middle_ci'][0]:+.3f}, {c['change_middle_ci'][1]:+.3f}] | "
                     f"{acc('baseline_mean')} | {acc(cond + '_mean')} | {c['change_mean']:+.3f} "
                     f"[{c['change_mean_ci'][0]:+.3f}, {c['change_mean_ci'][1]:+.3f}] |")
    md += ["Middle = gold positions with relative position in [1/3, 2/3] "
           f"({ {s: middle_positions(s, POSITIONS[s]) for s in POSITIONS} }); mean = all gold positions tested. "
           "Accuracies with Wilson intervals (trials pooled over positions); changes are paired (same prompts) with "
           f"bootstrap intervals over trials ({args.bootstrap} resamples).", "", *lines, ""]


def _report_heldout_sweeps(r: _Report) -> None:
    """The held-out temperature / factor sweeps (when the heldout-sweep stage ran)."""
    out, args, tuned, numbers, tables, md = r.out, r.args, r.tuned, r.numbers, r.tables, r.md
    trials = r.trials
    sweep_files = sorted((out / "heldout_sweep").glob("*.parquet")) if (out / "heldout_sweep").exists() else []
    if sweep_files:
        base20 = trials[(trials["n_items"] == 20) & (trials["trial"] < args.sweep_trials)
                        & trials["gold_position"].isin(SWEEP_POSITIONS)].copy()
        tuned_labels = {"found_in_the_middle": tuned["fitm"]["condition"],
                        "positional_dimension": tuned["dim"]["condition"]}
        tuned_values = {"found_in_the_middle": tuned["fitm"]["temperature"],
                        "positional_dimension": tuned["dim"]["factor"]}
        base20["family"] = base20["condition"].map(lambda c: c if c in tuned_labels else "baseline")
        base20["parameter"] = base20["family"].map(tuned_values)
        base20["condition"] = base20["condition"].map(lambda c: tuned_labels.get(c, c))
        sweep = pd.concat([base20, *[pd.read_parquet(p) for p in sweep_files]], ignore_index=True)
        rows = []
        for label, g in sweep[sweep["family"] != "baseline"].groupby("condition", sort=False):
            change = paired_changes(pd.concat([sweep[sweep["family"] == "baseline"], g]), 20, label, args.bootstrap,
                                    positions=SWEEP_POSITIONS)
            rows.append({"family": g["family"].iloc[0], "parameter": float(g["parameter"].iloc[0]),
                         "condition": label, "tuned": label in tuned_labels.values(),
                         "n_trials": change["n_trials"],
                         **{k: change[k] for k in ("baseline_middle", "baseline_mean", "change_middle", "change_mean")},
                         "middle": change[f"{label}_middle"], "middle_ci": change[f"{label}_middle_ci"],
                         "mean": change[f"{label}_mean"], "mean_ci": change[f"{label}_mean_ci"],
                         "change_middle_ci": change["change_middle_ci"], "change_mean_ci": change["change_mean_ci"]})
        sweep_summary = pd.DataFrame(rows).sort_values(["family", "parameter"]).reset_index(drop=True)
        numbers["heldout_sweep"] = sweep_summary.to_dict(orient="records")
        flat = sweep_summary.copy()
        for col in ("middle_ci", "mean_ci", "change_middle_ci", "change_mean_ci"):
            flat[col + "_low"] = flat[col].map(lambda v: v[0])
            flat[col + "_high"] = flat[col].map(lambda v: v[1])
        flat = flat.drop(columns=["middle_ci", "mean_ci", "change_middle_ci", "change_mean_ci"])
        tables["interventions.calibration_heldout_sweep"] = flat
        sweep_positions_table = position_table(sweep)
        sweep_positions_table["split"] = "heldout"
        tables["interventions.calibration_heldout_sweep_positions"] = sweep_positions_table
        fig = make_subplots(rows=1, cols=2, subplot_titles=("Found-in-the-Middle: temperature",
                                                            "positional dimension: factor"))
        for col, family in enumerate(("found_in_the_middle", "positional_dimension"), start=1):
            g = flat[flat["family"] == family].sort_values("parameter")
            for part, colour in (("middle", "#d62728"), ("mean", "#1f77b4")):
                fig.add_trace(go.Scatter(x=g["parameter"], y=g[part], mode="lines+markers", name=f"{part} accuracy",
                                         legendgroup=part, showlegend=col == 1, line={"color": colour},
                                         error_y={"type": "data", "symmetric": False,
                                                  "array": g[f"{part}_ci_high"] - g[part],
                                                  "arrayminus": g[part] - g[f"{part}_ci_low"]}), row=1, col=col)
                fig.add_hline(y=float(flat[f"baseline_{part}"].iloc[0]), line={"dash": "dot", "color": colour},
                              row=1, col=col)
        fig.update_xaxes(type="log", row=1, col=1)
        fig.update_layout(title=f"Held-out sweeps, kv_words 20 pairs, {args.sweep_trials} trials x gold positions "
                                f"{SWEEP_POSITIONS} (Wilson 95%; dotted: no intervention)", height=420, width=1200)
        write_figure(fig, out / "sweep_heldout")
        lines = ["| intervention | parameter | middle acc [95%] | change (95% CI) | mean acc [95%] | change (95% CI) |",
                 "|---|---|---|---|---|---|"]
        for r in sweep_summary.itertuples():
            lines.append(f"| {r.family}{' (tuned)' if r.tuned else ''} | {r.parameter:g} | {r.middle:.3f} "
                         f"[{r.middle_ci[0]:.3f}, {r.middle_ci[1]:.3f}] | {r.change_middle:+.3f} "
                         f"[{r.change_middle_ci[0]:+.3f}, {r.change_middle_ci[1]:+.3f}] | {r.mean:.3f} "
                         f"[{r.mean_ci[0]:.3f}, {r.mean_ci[1]:.3f}] | {r.change_mean:+.3f} "
                         f"[{r.change_mean_ci[0]:+.3f}, {r.change_mean_ci[1]:+.3f}] |")
        md += ["## Sweeps on the held-out split", "",
               f"kv_words 20 pairs, held-out seed {HELDOUT_SEED}, the first {args.sweep_trials} trials at gold "
               f"positions {SWEEP_POSITIONS} (middle: {middle_positions(20, SWEEP_POSITIONS)}); baseline middle "
               f"{flat['baseline_middle'].iloc[0]:.3f}, mean {flat['baseline_mean'].iloc[0]:.3f}. Found-in-the-Middle "
               f"on layers {tuned_layers(tuned['fitm'])}; dimension "
               f"{tuned['dim']['dim']} on layers {tuned_layers(tuned['dim'])} (START:STOP, stop exclusive). "
               "Figure: sweep_heldout.html.", "", *lines, ""]


def _report_attention(r: _Report) -> None:
    """Attention-level U-curves after calibration (the attention stage's tables)."""
    out, args, info, tuned, numbers, curve_rows, md = r.out, r.args, r.info, r.tuned, r.numbers, r.curve_rows, r.md
    gold = pd.read_parquet(out / "attention_gold.parquet")
    slots = pd.read_parquet(out / "attention_slots.parquet")
    rel = pd.read_parquet(out / "attention_relative.parquet")
    calibrated = tuned_layers(tuned["fitm"]).indices(info.n_layers, info.name)
    att_numbers = {}
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "gold document by gold position", "any document by slot", "by relative key position"))
    for col, (df, x, curve) in enumerate(((gold, "gold_position", "document_attention"),
                                          (slots, "slot", "slot_attention"),
                                          (rel.assign(x=(rel["bin"] + 0.5) / 12), "x",
                                           "attention_by_relative_position")), start=1):
        for cond, g in df.groupby("condition", sort=False):
            per_layer = g.groupby(["layer", x])["attention"].mean().reset_index()
            model_mean = per_layer[per_layer["layer"].isin(calibrated)].groupby(x)["attention"].mean()
            rows = [{"curve": curve, "series": cond, "layer": -1, "head": -1, "x": float(k), "y": float(v)}
                    for k, v in model_mean.items()]
            rows += [{"curve": curve, "series": cond, "layer": int(r.layer), "head": -1, "x": float(getattr(r, x)),
                      "y": float(r.attention)} for r in per_layer.itertuples()]
            curve_rows.append(pd.DataFrame(rows))
            fig.add_trace(go.Scatter(x=model_mean.index, y=model_mean.values, mode="lines+markers", name=cond,
                                     legendgroup=cond, showlegend=col == 1), row=1, col=col)
            att_numbers.setdefault(curve, {})[cond] = {"u_score": float(u_score(model_mean.to_numpy())),
                                                       "curve": [round(float(v), 6) for v in model_mean.values]}
    fig.update_layout(title=f"Attention of the answer-predicting query, mean over heads of the calibrated layers "
                            f"{layer_range_of(calibrated)} (kv_words 20 pairs, held-out prompts)",
                      height=420, width=1350)
    write_figure(fig, out / "attention_after_calibration")
    numbers["attention"] = att_numbers
    md += ["## Attention-level U-curves after calibration", "",
           f"Answer-predicting query, mean attention per token over the heads of layers "
           f"{layer_range_of(calibrated)} (the Found-in-the-Middle layers), {args.attention_trials} held-out trials x "
           f"{len(POSITIONS[20])} gold positions; u_score = mean(first, last) / mean(middle third) "
           "(> 1: U-shaped). Figure: attention_after_calibration.html.", "",
           "| curve | " + " | ".join(att_numbers["slot_attention"]) + " |",
           "|---|" + "---|" * len(att_numbers["slot_attention"])]
    for curve, per in att_numbers.items():
        md.append(f"| {curve} u_score | " + " | ".join(f"{v['u_score']:.3f}" for v in per.values()) + " |")
    md.append("")


def stage_report(access: Any, out: Path, args: argparse.Namespace) -> None:
    """Write report.md, summary.json, the figures and a Scan for `posprobe app` from the earlier stages' outputs."""
    info = access.info
    tuned = _read_tuned(out)
    r = _Report(out, args, info, tuned, {"model": info.name, "tuned": tuned, "positions": POSITIONS,
                                         "seeds": {"tuning": TUNING_SEED, "heldout": HELDOUT_SEED}},
                md=[f"# Calibration interventions on {info.name}", ""])
    for section in (_report_search, _report_sweeps, _report_heldout, _report_heldout_sweeps, _report_attention):
        section(r)
    out, tables, curve_rows, md, numbers, changes = r.out, r.tables, r.curve_rows, r.md, r.numbers, r.changes
    from posprobe.scan import results_scan

    curves_df = curve_frame(pd.concat(curve_rows, ignore_index=True), "calibration")
    results_scan(access, curves=curves_df, tables=tables, analysis="analyses/calibration.py",
                 summaries={"calibration": {"tuned": tuned, "heldout_changes": changes}}).save(out / "scan")
    md += ["## Files", "", "scan/ (posprobe app outputs/calibration/scan): tables " + ", ".join(sorted(tables))
           + "; curves of probe `calibration` (series = condition).", ""]
    (out / "report.md").write_text("\n".join(md))
    save_json(out / "summary.json", numbers)
    print("\n".join(md))


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    access = posprobe.load_model(args.model)
    stages = STAGES if "all" in args.stage else [s for s in STAGES if s in args.stage]
    for stage in stages:
        t0 = time.time()
        {"search": stage_search, "tune-fitm": stage_tune_fitm, "tune-dim": stage_tune_dim,
         "heldout": stage_heldout, "heldout-sweep": stage_heldout_sweep, "attention": stage_attention,
         "report": stage_report}[stage](access, out, args)
        print(f"== stage {stage}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
