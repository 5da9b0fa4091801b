"""Implicit position on Gemma 3 270M: the model, the model with RoPE disabled, and random-init models of its shape.

Reproduces docs/probes/implicit_position.md (Haviv et al. 2022; Chi et al. 2023; Zuo et al. 2024) through the public
API only.
For each input kind (generated text, uniform random tokens; BOS at position 0 as the tokenizer does) it scans with
the `implicit_position` probe:
1. the model itself;
2. the same model with the identity rotation in every layer (`posprobe.interventions.disable_rope`, NoPE ablation);
3. a random-init NoPE model of the same shape (`posprobe.baselines.random_init_like(..., "nope")`);
4. a random-init RoPE model of the same shape (`random_init_like(..., "rope")`);
and, on random tokens, 5. the random-init NoPE model without BOS (Chi et al.'s setting: no token marks the start).
Per layer: ridge / MLP probe R^2, Spearman, MAD on held-out sequences for every feature set (hidden state, its
direction, scale features) and target (position, log-position), the shuffled-label control, the log-log slope of
Var_d(attention output) vs position, and the cosine similarity of hidden states vs offset.

Writes one HTML page of figures per input, each scan (Parquet + JSON), CSV tables, `summary.json` and `report.md`
to --out (default outputs/implicit_position). The probe streams: per layer it keeps only sampled positions' features.
Run under the shared lock: `flock /tmp/posprobe-gemma.lock nice -n 5 python analyses/implicit_position.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import posprobe
from posprobe.baselines import random_init_like
from posprobe.interventions import disable_rope
from posprobe.probes import get_budget
from posprobe.probes.implicit_position import ImplicitPositionConfig
from posprobe.render.implicit import (
    implicit_comparison,
    implicit_similarity,
    implicit_variance,
    variance_slope_comparison,
)

PROBE_SERIES = [  # (regressor, features, target) shown in the figures and the report
    ("ridge", "hidden", "position"),
    ("ridge", "hidden", "log_position"),
    ("ridge", "direction", "log_position"),
    ("ridge", "scale", "log_position"),
    ("mlp", "hidden", "position"),
    ("mlp", "scale", "log_position"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/implicit_position", help="output folder")
    parser.add_argument("--model", default="gemma-3-270m", help="a RoPE model: anything posprobe.load_model accepts")
    parser.add_argument("--budget", default="standard", help="budget preset: implicit_sequences sequences per scan")
    parser.add_argument("--sequences", type=int, default=None, help="override the number of sequences per scan")
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--positions", type=int, default=64, help="sampled positions per sequence")
    parser.add_argument("--inputs", nargs="+", default=["text", "random"], choices=["text", "random"])
    parser.add_argument("--no-mlp", action="store_true", help="ridge probes only (faster)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def fmt_table(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    return df.to_markdown(index=False, floatfmt=floatfmt)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def variants(model: Any, kind: str, seed: int) -> list[tuple[str, str, Any]]:
    """(label, slug, factory) for every model variant; a factory is a context manager yielding (access, bos)."""
    @contextlib.contextmanager
    def plain() -> Iterator[tuple[Any, bool]]:
        yield model, True

    @contextlib.contextmanager
    def no_rope() -> Iterator[tuple[Any, bool]]:
        with disable_rope(model) as ablated:
            yield ablated, True

    def random_init(which: str, bos: bool) -> Any:
        @contextlib.contextmanager
        def build() -> Iterator[tuple[Any, bool]]:
            yield random_init_like(model.info, which, seed=seed), bos

        return build

    out = [(f"{model.info.name}", "model", plain), (f"{model.info.name}, RoPE disabled", "rope_disabled", no_rope),
           ("random-init NoPE (same shape)", "random_nope", random_init("nope", True)),
           ("random-init RoPE (same shape)", "random_rope", random_init("rope", True))]
    if kind == "random":
        out.append(("random-init NoPE, no BOS", "random_nope_no_bos", random_init("nope", False)))
    return out


def layer_table(scan: posprobe.Scan) -> pd.DataFrame:
    """One row per layer: the report's probe series, the ridge MAD, its baseline, variance slopes, similarity."""
    probes = scan.tables["implicit_position.probes"]
    true = probes[probes["labels"] == "true"]
    table = scan.tables["implicit_position.layers"][["layer"]].copy()
    for regressor, features, target in PROBE_SERIES:
        rows = true[(true.regressor == regressor) & (true.features == features) & (true.target == target)]
        if len(rows):
            short = {"position": "pos", "log_position": "log"}[target]
            table[f"R2 {regressor} {features} {short}"] = rows.set_index("layer")["r2"].reindex(table.layer).values
    ridge = true[(true.regressor == "ridge") & (true.features == "hidden") & (true.target == "position")]
    ridge = ridge.set_index("layer").reindex(table.layer)
    table["MAD ridge hidden pos"] = ridge["mad"].values
    table["MAD baseline"] = ridge["mad_baseline"].values
    layers = scan.tables["implicit_position.layers"].set_index("layer").reindex(table.layer)
    table["attn var slope"] = layers["attn_var_slope"].values
    table["resid var slope"] = layers["resid_var_slope"].values
    table["cos d=1"] = layers["similarity_offset_1"].values
    table[f"cos d={int(layers['far_offset'].iloc[0])}"] = layers["similarity_offset_far"].values
    return table


def headline(scan: posprobe.Scan) -> dict[str, Any]:
    """A few numbers per scan for the comparison table."""
    summary = scan.meta["summaries"]["implicit_position"]
    probes = scan.tables["implicit_position.probes"]
    true = probes[probes["labels"] == "true"]
    n_layers = int(probes["layer"].max()) + 1
    middle = range(n_layers // 3, 2 * n_layers // 3 + 1)

    def series(regressor: str, features: str, target: str) -> pd.Series:
        rows = true[(true.regressor == regressor) & (true.features == features) & (true.target == target)]
        return rows.set_index("layer")["r2"]

    hidden_pos, hidden_log = series("ridge", "hidden", "position"), series("ridge", "hidden", "log_position")
    scale_log = series("ridge", "scale", "log_position")
    ridge_rows = true[(true.regressor == "ridge") & (true.features == "hidden") & (true.target == "position")]
    best = ridge_rows.loc[ridge_rows["r2"].idxmax()]
    slopes = summary["attn_var_slope"]
    return {
        "ridge hidden pos R2 (mid-layer mean)": float(hidden_pos.reindex(list(middle)).mean()),
        "ridge hidden pos R2 (max)": float(hidden_pos.max()),
        "best layer": int(best["layer"]),
        "MAD at best": float(best["mad"]),
        "MAD baseline": float(best["mad_baseline"]),
        "ridge hidden log R2 (max)": float(hidden_log.max()),
        "ridge scale log R2 (max)": float(scale_log.max()),
        "attn slope L0": float(slopes[0]),
        "attn slope L1": float(slopes[1]) if len(slopes) > 1 else float("nan"),
        "attn slope min": float(np.nanmin(slopes)),
        "control max R2": float(summary["control_max_r2"]),
        "control min MAD ratio": float(summary["control_min_mad_ratio"]),
        "disjoint": bool(summary["train_test_disjoint"]),
    }


def write_page(path: Path, title: str, figures: list[Any]) -> None:
    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title></head><body><h2>{title}</h2>"]
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    (out / "scans").mkdir(parents=True, exist_ok=True)
    started = time.time()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = posprobe.load_model(args.model)
    load_s = time.time() - started
    budget = get_budget(args.budget)
    n_sequences = args.sequences or budget.knob("implicit_position", ImplicitPositionConfig, "n_sequences")
    regressors = ("ridge",) if args.no_mlp else ("ridge", "mlp")
    numbers: dict[str, Any] = {
        "model": model.info.name, "budget": budget.name, "n_sequences": n_sequences,
        "context_length": args.context_length, "positions_per_sequence": args.positions, "seed": args.seed,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_s": round(load_s, 1),
        "scans": {},
    }
    report = [f"# Implicit position: {model.info.name}, RoPE-disabled, random-init baselines", "",
              f"docs/probes/implicit_position.md. {n_sequences} sequences x {args.context_length} tokens per scan "
              f"({args.positions} sampled positions per sequence, train/test split by sequence, seed {args.seed}); "
              f"regressors: {', '.join(regressors)}. R^2 is on held-out sequences; MAD in token positions; "
              f"slopes are log Var_d vs log(position + 1). Controls: the same probes on shuffled training labels.", ""]
    intro_length = len(report)
    comparison_rows = []
    for kind in args.inputs:
        scans: dict[str, posprobe.Scan] = {}
        for label, slug, factory in variants(model, kind, args.seed):
            t0 = time.time()
            with factory() as (access, bos):
                config = ImplicitPositionConfig(context_length=args.context_length, n_sequences=n_sequences,
                                                input=kind, bos=bos, positions_per_sequence=args.positions,
                                                regressors=regressors, shuffled_control=regressors)
                scan = posprobe.scan(access, probes=["implicit_position"], budget=budget, seed=args.seed,
                                     configs={"implicit_position": config}, progress=False)
            seconds = time.time() - t0
            scan.save(out / "scans" / kind / slug)
            scans[label] = scan
            summary = scan.meta["summaries"]["implicit_position"]
            numbers["scans"][f"{kind}/{slug}"] = {"label": label, "seconds": round(seconds, 1),
                                                  "probe_seconds": summary["seconds"], **headline(scan),
                                                  "layers": layer_table(scan).to_dict(orient="list")}
            comparison_rows.append({"input": kind, "variant": label, **headline(scan), "seconds": seconds})
            layer_table(scan).to_csv(out / f"layers_{kind}_{slug}.csv", index=False)
            scan.tables["implicit_position.probes"].to_csv(out / f"probes_{kind}_{slug}.csv", index=False)
            print(f"[{time.time() - started:7.1f}s] {kind:6s} {label}: {seconds:.0f}s "
                  f"(passes {summary['seconds']['passes']:.0f}s, fits {summary['seconds']['fits']:.0f}s)", flush=True)
        figures = []
        for regressor, features, target in PROBE_SERIES:
            if regressor in regressors:
                figures.append(implicit_comparison(scans, "r2", regressor, features, target))
        figures.append(implicit_comparison(scans, "mad", "ridge", "hidden", "position"))
        figures.append(implicit_comparison(scans, "spearman", "ridge", "hidden", "log_position", control=False))
        figures.append(variance_slope_comparison(scans, "attn_out"))
        figures.append(variance_slope_comparison(scans, "resid_post"))
        for label, scan in scans.items():
            n_layers = scan.info.n_layers
            shown = sorted({0, 1, 2, n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers - 1})
            figures.append(implicit_variance(scan, "attn_out", layers=shown).update_layout(
                title=f"Var_d(attention output) vs position — {label}"))
            figures.append(implicit_similarity(scan, layers=shown).update_layout(
                title=f"cosine similarity vs offset — {label}"))
        write_page(out / f"implicit_position_{kind}.html", f"Implicit position ({kind} input)", figures)

        report += [f"## Input: {'generated text' if kind == 'text' else 'uniform random tokens'}", ""]
        labels = list(scans)
        normal, ablated = (layer_table(scans[labels[0]]), layer_table(scans[labels[1]]))
        n_layers = len(normal)
        early = list(range(min(3, n_layers)))
        middle = list(range(n_layers // 3, min(n_layers, 2 * n_layers // 3 + 1)))
        for name, rows in ((f"early layers 0-{early[-1]}", early), (f"middle layers {middle[0]}-{middle[-1]}", middle)):
            a = float(normal.loc[rows, "R2 ridge hidden pos"].mean())
            b = float(ablated.loc[rows, "R2 ridge hidden pos"].mean())
            report.append(f"- {name}: ridge hidden-state R^2 for absolute position {a:.2f} with RoPE, {b:.2f} "
                          f"with RoPE disabled ({labels[0]}).")
            numbers.setdefault("survival", {})[f"{kind}/{name}"] = {"rope": a, "rope_disabled": b}
        report.append("")
        for label, scan in scans.items():
            report += [f"### {label}", "", fmt_table(layer_table(scan)), ""]
    comparison = pd.DataFrame(comparison_rows)
    comparison.to_csv(out / "comparison.csv", index=False)
    total = time.time() - started
    numbers["total_s"] = round(total, 1)
    numbers["peak_rss_mb"] = round(peak_rss_mb(), 0)
    head = ["## Comparison", "", fmt_table(comparison.drop(columns=["seconds"])), "",
            f"Runtime: {total / 60:.1f} min on {os.cpu_count()} CPU cores (torch threads {torch.get_num_threads()}), "
            f"model load {load_s:.0f} s, peak RSS {numbers['peak_rss_mb']:.0f} MB. Per scan: "
            + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in numbers["scans"].items()) + ".", ""]
    report[intro_length:intro_length] = head
    (out / "report.md").write_text("\n".join(report) + "\n")
    (out / "summary.json").write_text(json.dumps(numbers, indent=1, default=float))
    print(f"done in {total / 60:.1f} min; report at {out / 'report.md'}", flush=True)


if __name__ == "__main__":
    main()
