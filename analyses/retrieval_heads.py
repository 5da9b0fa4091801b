"""Retrieval heads on Gemma 3 270M (and SmolLM2-135M when installed), with the causal check of Wu et al. 2024.

Reproduces docs/probes/retrieval.md through the public API only:
1. retrieval scores of every head from the `retrieval` probe (teacher-forced, magic-number needle over context
   lengths x depths), the share of heads above 0.1, the top heads, and scores broken down by depth and length;
2. the causal check: needle accuracy (teacher-forced exact match, a fresh set of trials with another seed) with
   the top-k retrieval heads masked (uniform attention, `posprobe.interventions.mask_heads`) vs k random
   non-retrieval heads masked (several seeded draws), for a few k. Also the mean answer log-probability, which
   moves before accuracy does.

Writes HTML figures, CSV tables, the saved scans, `summary.json` and `report.md` to --out (default
outputs/retrieval_heads). Run it under the shared lock:
`flock /tmp/posprobe-gemma.lock nice -n 5 python analyses/retrieval_heads.py`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import posprobe
from posprobe.interventions.mask_heads import mask_heads
from posprobe.probes import Budget
from posprobe.probes.retrieval import RetrievalConfig
from posprobe.tasks.needle import check_answers, make_needle_trials


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/retrieval_heads", help="output folder")
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m"],
                        help="models to run (those not installed are skipped with a note)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="context lengths (tokens)")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--trials", type=int, default=30, help="scoring trials (spread over lengths x depths)")
    parser.add_argument("--causal-trials-per-cell", type=int, default=2,
                        help="causal-check trials per (length, depth) cell")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of heads masked")
    parser.add_argument("--draws", type=int, default=4, help="random draws of non-retrieval heads per k")
    parser.add_argument("--threshold", type=float, default=0.1, help="retrieval-head threshold (Wu et al.)")
    parser.add_argument("--include-wrong", action="store_true",
                        help="score copying on wrongly answered trials too (default: answered trials only)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def fmt_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    return df.to_markdown(index=False, floatfmt=floatfmt)


def heatmap(heads: pd.DataFrame, title: str) -> go.Figure:
    grid = heads.pivot(index="layer", columns="head", values="retrieval_score")
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[f"H{h}" for h in grid.columns],
                               y=[f"L{l}" for l in grid.index], colorscale="Viridis", zmin=0, zmax=1,
                               colorbar={"title": "retrieval score"}))
    fig.update_layout(title=title, yaxis={"autorange": "reversed"}, height=300 + 18 * len(grid))
    return fig


def breakdown_figure(scan: Any, top: list[tuple[int, int]], title: str) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("by needle depth", "by context length"))
    for col, curve in ((1, "by_depth"), (2, "by_length")):
        for layer, head in top:
            c = scan.curve(f"retrieval_{curve}", layer=layer, head=head).sort_values("x")
            fig.add_trace(go.Scatter(x=c["x"], y=c["y"], mode="lines+markers", name=f"L{layer}H{head}",
                                     legendgroup=f"L{layer}H{head}", showlegend=col == 1), row=1, col=col)
        acc = scan.curve(f"needle_accuracy_{curve}").sort_values("x")
        fig.add_trace(go.Scatter(x=acc["x"], y=acc["y"], mode="lines", name="needle accuracy",
                                 line={"dash": "dash", "color": "black"}, legendgroup="acc", showlegend=col == 1),
                      row=1, col=col)
    fig.update_yaxes(range=[0, 1.05], title_text="retrieval score / accuracy")
    fig.update_layout(title=title)
    return fig


def causal_figure(causal: pd.DataFrame, title: str) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("needle accuracy", "mean answer log-probability"))
    for col, metric in ((1, "accuracy"), (2, "answer_logprob")):
        for condition, color in (("top", "crimson"), ("random", "steelblue")):
            part = causal[causal["condition"] == condition]
            mean = part.groupby("k")[metric].agg(["mean", "std"]).reset_index()
            fig.add_trace(go.Scatter(x=mean["k"], y=mean["mean"], mode="lines+markers", name=f"{condition} k heads",
                                     error_y={"type": "data", "array": mean["std"].fillna(0)},
                                     line={"color": color}, legendgroup=condition, showlegend=col == 1),
                          row=1, col=col)
            if condition == "random":
                fig.add_trace(go.Scatter(x=part["k"], y=part[metric], mode="markers", marker={"color": color,
                                         "opacity": 0.35}, name="random draws", legendgroup=condition,
                                         showlegend=False), row=1, col=col)
        base = causal[causal["condition"] == "none"][metric].iloc[0]
        fig.add_hline(y=base, line={"dash": "dot", "color": "gray"}, row=1, col=col)
    fig.update_xaxes(title_text="heads masked (k)", type="log")
    fig.update_layout(title=title)
    return fig


def run_model(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    started = time.time()
    access = posprobe.load_model(name)
    budget = Budget("retrieval_analysis", context_lengths=tuple(args.lengths), n_texts=1, max_queries=1,
                    retrieval_trials=args.trials, bias_trials=1, implicit_sequences=1)
    config = RetrievalConfig(depths=tuple(args.depths), threshold=args.threshold, include_wrong=args.include_wrong)
    scan = posprobe.scan(access, probes=["retrieval"], budget=budget, configs={"retrieval": config},
                         seed=args.seed, progress=True)
    scan.save(out / name / "scan")
    summary = scan.meta["summaries"]["retrieval"]
    heads = scan.heads[["layer", "head", "layer_type", "retrieval_score", "retrieval_activation"]]
    ranked = heads.dropna(subset=["retrieval_score"]).sort_values("retrieval_score", ascending=False)
    ranked.to_csv(out / name / "heads.csv", index=False)
    trials_table = scan.tables["retrieval.trials"]
    trials_table.to_csv(out / name / "trials.csv", index=False)
    result: dict[str, Any] = {
        "model": name, "n_heads": int(len(heads)), "scoring": {k: summary[k] for k in (
            "n_trials", "n_correct", "n_scored", "accuracy", "context_lengths", "depths") if k in summary},
        "n_retrieval_heads": summary.get("n_retrieval_heads"),
        "share_retrieval_heads": summary.get("share_retrieval_heads"),
        "top_heads": [{"layer": int(r.layer), "head": int(r.head), "layer_type": r.layer_type,
                       "retrieval_score": float(r.retrieval_score), "activation": float(r.retrieval_activation)}
                      for r in ranked.head(10).itertuples()],
        "scan_seconds": scan.meta["timings_s"].get("retrieval"),
    }
    if "warning" in summary:
        result["warning"] = summary["warning"]
        return result
    top = [(int(r.layer), int(r.head)) for r in ranked.head(5).itertuples()]
    heatmap(heads, f"{name}: retrieval score per head ({summary['n_scored']} answered needle trials)").write_html(
        out / name / "retrieval_scores.html")
    breakdown_figure(scan, top, f"{name}: top retrieval heads by needle depth and context length").write_html(
        out / name / "retrieval_breakdown.html")
    by_depth = pd.concat([scan.curve("retrieval_by_depth", layer=l, head=h).assign(head_id=f"L{l}H{h}")
                          for l, h in top])
    result["top_by_depth"] = {hid: dict(zip(g["x"].round(2), g["y"].round(3)))
                              for hid, g in by_depth.groupby("head_id")}
    by_len = pd.concat([scan.curve("retrieval_by_length", layer=l, head=h).assign(head_id=f"L{l}H{h}")
                        for l, h in top])
    result["top_by_length"] = {hid: dict(zip(g["x"].astype(int), g["y"].round(3)))
                               for hid, g in by_len.groupby("head_id")}

    # --- causal check on fresh trials ---------------------------------------------------------------------------
    t0 = time.time()
    trials = make_needle_trials(access, args.lengths, args.depths, seed=args.seed + 7919,
                                n_per_cell=args.causal_trials_per_cell)
    retrieval = ranked[ranked["retrieval_score"] > args.threshold]
    # random heads: non-retrieval heads that are also never among the top-k masked, so the two sets are disjoint
    pool = ranked.iloc[max(args.ks):]
    pool = pool[pool["retrieval_score"] <= args.threshold]
    pool_heads = [(int(r.layer), int(r.head)) for r in pool.itertuples()]
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []

    def evaluate(condition: str, k: int, draw: int, masked: list[tuple[int, int]]) -> None:
        with mask_heads(access, masked):
            table = check_answers(access, trials)
        rows.append({"condition": condition, "k": k, "draw": draw, "accuracy": float(table["correct"].mean()),
                     "token_accuracy": float(table["token_accuracy"].mean()),
                     "answer_logprob": float(table["answer_logprob"].mean()),
                     "heads": " ".join(f"L{l}H{h}" for l, h in masked)})
        print(f"[{name}] {condition:6s} k={k} draw={draw} acc={rows[-1]['accuracy']:.3f} "
              f"logp={rows[-1]['answer_logprob']:.2f} ({time.time() - t0:.0f} s)", flush=True)

    evaluate("none", 0, 0, [])
    ks = [k for k in args.ks if k <= len(pool_heads)]
    for k in ks:
        evaluate("top", k, 0, [(int(r.layer), int(r.head)) for r in ranked.head(k).itertuples()])
        for draw in range(args.draws):
            pick = rng.choice(len(pool_heads), size=k, replace=False)
            evaluate("random", k, draw, [pool_heads[i] for i in sorted(pick)])
    causal = pd.DataFrame(rows)
    causal.to_csv(out / name / "causal_check.csv", index=False)
    causal_figure(causal, f"{name}: masking top-k retrieval heads vs k random non-retrieval heads "
                          f"({len(trials)} needle trials)").write_html(out / name / "causal_check.html")
    agg = causal.groupby(["condition", "k"]).agg(accuracy=("accuracy", "mean"), accuracy_sd=("accuracy", "std"),
                                                 accuracy_median=("accuracy", "median"),
                                                 accuracy_min=("accuracy", "min"),
                                                 answer_logprob=("answer_logprob", "mean")).reset_index()
    result["causal"] = {
        "n_trials": len(trials), "n_retrieval_heads": int(len(retrieval)), "n_pool": len(pool_heads),
        "baseline_accuracy": float(causal.loc[causal["condition"] == "none", "accuracy"].iloc[0]),
        "table": agg.to_dict(orient="records"),
        # a single non-retrieval head can matter a lot when made uniform, so the median draw is reported too
        "top_below_random_median_at_every_k": bool(all(
            agg[(agg.condition == "top") & (agg.k == k)]["accuracy"].iloc[0]
            < agg[(agg.condition == "random") & (agg.k == k)]["accuracy_median"].iloc[0] for k in ks)),
        "top_hurts_more_at_every_k": bool(all(
            agg[(agg.condition == "top") & (agg.k == k)]["accuracy"].iloc[0]
            < agg[(agg.condition == "random") & (agg.k == k)]["accuracy"].iloc[0] for k in ks)),
        "seconds": time.time() - t0,
    }
    result["total_seconds"] = time.time() - started
    return result


def report(results: list[dict[str, Any]], skipped: dict[str, str], args: argparse.Namespace) -> str:
    lines = ["# Retrieval heads (docs/probes/retrieval.md; Wu et al. 2024)", "",
             f"Magic-number needle (7 digits), context lengths {args.lengths}, depths {args.depths}; teacher-forced "
             f"scoring over {args.trials} trials (answered trials only, as the paper); retrieval head = score > "
             f"{args.threshold}. Causal check on fresh trials (another seed): needle accuracy = teacher-forced exact "
             f"match with heads masked to uniform attention.", ""]
    for name, why in skipped.items():
        lines += [f"*{name} skipped: {why}*", ""]
    for r in results:
        lines += [f"## {r['model']}", ""]
        s = r["scoring"]
        lines.append(f"- scoring trials: {s.get('n_trials')} ({s.get('n_correct')} answered correctly, accuracy "
                     f"{s.get('accuracy', float('nan')):.2f})")
        if "warning" in r:
            lines += [f"- **{r['warning']}**", ""]
            continue
        lines.append(f"- retrieval heads (score > {args.threshold}): {r['n_retrieval_heads']} of {r['n_heads']} "
                     f"= {100 * r['share_retrieval_heads']:.1f}%")
        lines += ["", fmt_table(pd.DataFrame(r["top_heads"])), ""]
        lines.append("Top heads by depth: " + "; ".join(f"{h}: {v}" for h, v in r["top_by_depth"].items()))
        lines.append("")
        lines.append("Top heads by length: " + "; ".join(f"{h}: {v}" for h, v in r["top_by_length"].items()))
        c = r["causal"]
        lines += ["", f"Causal check ({c['n_trials']} trials, baseline accuracy {c['baseline_accuracy']:.3f}; random "
                      f"heads drawn from the {c['n_pool']} heads with score <= {args.threshold} outside the top "
                      f"{max(args.ks)}, {args.draws} draws):",
                  "", fmt_table(pd.DataFrame(c["table"])), "",
                  f"Masking the top-k retrieval heads hurts accuracy more than k random heads at every k: "
                  f"**{c['top_hurts_more_at_every_k']}** (mean of the random draws), "
                  f"**{c['top_below_random_median_at_every_k']}** (median draw)", ""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    available = posprobe.list_models()
    results, skipped = [], {}
    for name in args.models:
        if not available.get(name, True):
            skipped[name] = "not installed"
            continue
        (out / name).mkdir(parents=True, exist_ok=True)
        results.append(run_model(name, args, out))
        (out / "summary.json").write_text(json.dumps({"results": results, "skipped": skipped}, indent=1,
                                                     default=str))
    (out / "summary.json").write_text(json.dumps({"results": results, "skipped": skipped}, indent=1, default=str))
    text = report(results, skipped, args)
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
