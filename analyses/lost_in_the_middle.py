"""Lost in the middle on Gemma 3 270M: behavioural, attention-level and document-level U-curves side by side.

Reproduces docs/probes/position_bias.md (after Liu et al. 2023 and Hsieh et al. 2024) through the public API only:
1. the behavioural U-curve: greedy exact-match accuracy of word -> number key-value retrieval (`kv_words`) for 10,
   20 and 40 pairs, gold pair moved through evenly spaced positions, Wilson 95% intervals (`evaluate_positions`);
2. the attention-level curve: attention by relative key position of the last queries of generated filler, per
   head and model mean, `u_score` (the `position_bias` probe);
3. the document-level curve: attention from the answer-predicting query to a fixed document moved through all
   slots, on synthetic multi-document QA (the probe) and on the kv_words items themselves, with the same task seeds
   as the behavioural run so the prompts are identical; its correlation with the behavioural curve, at the
   position level and trial by trial.

Writes HTML figures, CSV tables, `summary.json` and `report.md` to --out (default outputs/lost_in_the_middle).
Run it under the shared lock: `flock /tmp/posprobe-gemma.lock nice -n 5 python analyses/lost_in_the_middle.py`.
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
from scipy.stats import pearsonr, pointbiserialr, spearmanr

import posprobe
from posprobe.probes import Budget
from posprobe.probes.position_bias import PositionBiasConfig, bootstrap_u, document_attention, u_parts, u_score
from posprobe.render.bias import accuracy_curve, document_bias, lost_in_the_middle, position_bias
from posprobe.tasks import get_task


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/lost_in_the_middle", help="output folder")
    parser.add_argument("--model", default="gemma-3-270m", help="anything posprobe.load_model accepts")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40], help="key-value pairs per prompt")
    parser.add_argument("--positions", type=int, default=5, help="evenly spaced gold positions per size")
    parser.add_argument("--trials", type=int, default=40, help="trials per (size, gold position)")
    parser.add_argument("--focus", type=int, default=20, help="size used for the correlation with attention")
    parser.add_argument("--bias-trials", type=int, default=12, help="filler contexts / document trials of the probe")
    parser.add_argument("--doc-slot-trials", type=int, default=12, help="trials of the all-slot kv_words doc curve")
    parser.add_argument("--multidoc-trials", type=int, default=20, help="behavioural multidoc trials (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def fmt_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    return df.to_markdown(index=False, floatfmt=floatfmt)


def correlation(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return {"pearson": float("nan"), "pearson_p": float("nan"), "spearman": float("nan"),
                "spearman_p": float("nan")}
    p = pearsonr(x, y)
    s = spearmanr(x, y)
    return {"pearson": float(p.statistic), "pearson_p": float(p.pvalue), "spearman": float(s.statistic),
            "spearman_p": float(s.pvalue)}


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    access = posprobe.load_model(args.model)
    info = access.info
    numbers: dict[str, Any] = {"model": info.name, "seed": args.seed, "trials": args.trials}

    # 1. behavioural U-curve --------------------------------------------------------------------------------------
    tables, trial_tables, speed = [], [], {}
    for size in args.sizes:
        t0 = time.time()
        table = posprobe.evaluate_positions(access, "kv_words", size, args.positions, args.trials, seed=args.seed)
        speed[size] = {"tokens_per_second": table.attrs["tokens_per_second"], "seconds": time.time() - t0,
                       "prompt_tokens": table.attrs["prompt_tokens"], "n_errors": table.attrs["n_errors"],
                       "prompt_length": int(pd.DataFrame(table.attrs["trials"])["n_tokens"].median())}
        trial_tables.append(pd.DataFrame(table.attrs["trials"]))
        table.attrs = {}
        tables.append(table)
        print(f"kv_words {size} pairs: {speed[size]['seconds']:.0f} s, "
              f"{speed[size]['tokens_per_second']:.0f} tokens/s", flush=True)
    behaviour = pd.concat(tables, ignore_index=True)
    behaviour.attrs["model"] = info.name
    trials = pd.concat(trial_tables, ignore_index=True)
    behaviour.to_csv(out / "accuracy_by_position.csv", index=False)
    trials.to_csv(out / "trials.csv", index=False)
    accuracy_curve(behaviour).write_html(out / "accuracy_by_position.html", include_plotlyjs="cdn")
    numbers["speed"] = speed

    # determinism: the same seed gives the same prompts and the same table
    task = get_task("kv_words")
    same_prompts = task.make(access, args.focus, 3, 123) == task.make(access, args.focus, 3, 123)
    rerun = [posprobe.evaluate_positions(access, "kv_words", args.focus, 3, 3, seed=args.seed, progress=False)
             for _ in range(2)]
    for r in rerun:
        r.attrs = {}
    numbers["determinism"] = {"same_prompts": bool(same_prompts), "same_table": bool(rerun[0].equals(rerun[1]))}

    # 2. attention-level and multidoc document-level curves (the position_bias probe) ---------------------------
    budget = Budget("analysis", context_lengths=(512,), n_texts=1, max_queries=256, retrieval_trials=1,
                    bias_trials=args.bias_trials, implicit_sequences=1)
    t0 = time.time()
    scan = posprobe.scan(access, probes=["position_bias"], budget=budget, seed=args.seed,
                         configs={"position_bias": PositionBiasConfig(doc_task="multidoc", doc_items=10)})
    scan.save(out / "scan_position_bias")
    numbers["probe_seconds"] = time.time() - t0
    position_bias(scan).write_html(out / "attention_by_relative_position.html", include_plotlyjs="cdn")
    document_bias(scan).write_html(out / "document_attention_multidoc.html", include_plotlyjs="cdn")
    lost_in_the_middle(behaviour, scan).write_html(out / "lost_in_the_middle.html", include_plotlyjs="cdn")
    summary = scan.meta["summaries"]["position_bias"]
    numbers["position_bias"] = summary
    attn_curve = scan.curve("attention_by_relative_position", layer=-1, head=-1)[["x", "y"]]
    doc_curve = scan.curve("document_attention", layer=-1, head=-1)[["x", "y"]]
    slot_curve = scan.curve("slot_attention", layer=-1, head=-1)[["x", "y"]]
    layer_doc_u = {int(layer): float(u_score(g.sort_values("x")["y"].to_numpy()))
                   for layer, g in scan.curves[(scan.curves["curve"] == "document_attention")
                                               & (scan.curves["layer"] >= 0) & (scan.curves["head"] == -1)]
                   .groupby("layer")}
    _, first, middle, last = u_parts(attn_curve.sort_values("x")["y"].to_numpy())
    heads = scan.heads
    numbers["attention_ends"] = {
        "first_over_middle": float(first / middle), "last_over_middle": float(last / middle),
        "heads_first_above_middle": int((heads["u_first"] > heads["u_middle"]).sum()),
        "heads_both_ends_above_middle": int(((heads["u_first"] > heads["u_middle"])
                                             & (heads["u_last"] > heads["u_middle"])).sum()),
        "n_heads": int(len(heads))}
    top_heads = scan.rank("u_score", top=8)[["layer", "head", "layer_type", "u_score", "u_first", "u_middle",
                                             "u_last", "u_sink"]]

    # 3. document level on the kv_words prompts themselves, same seeds as the behavioural run -----------------------
    focus = behaviour[behaviour["n_items"] == args.focus].sort_values("gold_position")
    positions = focus["gold_position"].tolist()
    same = document_attention(access, "kv_words", args.focus, args.trials, seed=args.seed, positions=positions)
    gold = same.gold  # [trials, positions, L, H]
    model_gold = gold.mean((2, 3))  # [trials, positions]
    per_position = model_gold.mean(0)
    numbers["kv_doc_attention_at_behaviour_positions"] = dict(zip(map(int, positions), per_position.tolist()))
    acc = focus["accuracy"].to_numpy()
    numbers["correlation_position_level"] = correlation(per_position, acc)
    layer_corr = {layer: correlation(gold[:, :, layer].mean((0, 2)), acc)["pearson"] for layer in range(info.n_layers)}
    numbers["correlation_position_level_by_layer"] = layer_corr
    focus_trials = trials[trials["n_items"] == args.focus].copy()
    focus_trials["slot_index"] = focus_trials["gold_position"].map({p: i for i, p in enumerate(positions)})
    focus_trials["gold_attention"] = model_gold[focus_trials["trial"].to_numpy(), focus_trials["slot_index"].to_numpy()]
    ok = focus_trials[focus_trials["error"] == ""]
    if ok["correct"].nunique() > 1:
        pb = pointbiserialr(ok["correct"].astype(int), ok["gold_attention"])
        numbers["correlation_trial_level"] = {"point_biserial": float(pb.statistic), "p": float(pb.pvalue),
                                              "n": int(len(ok))}
        numbers["gold_attention_correct_vs_wrong"] = {
            "correct": float(ok.loc[ok["correct"], "gold_attention"].mean()),
            "wrong": float(ok.loc[~ok["correct"], "gold_attention"].mean())}
    focus_trials.to_csv(out / "trials_with_gold_attention.csv", index=False)

    full = document_attention(access, "kv_words", args.focus, args.doc_slot_trials, seed=args.seed)
    kv_curve = full.gold.mean((0, 2, 3))  # [slots]
    kv_layers = full.gold.mean((0, 3))  # [slots, L]
    numbers["kv_doc_curve"] = kv_curve.tolist()
    numbers["kv_doc_u_score"] = float(u_score(kv_curve))
    numbers["kv_doc_u_score_ci"] = bootstrap_u(full.gold.mean((2, 3)), 1000, args.seed)
    numbers["behaviour_u_score"] = {int(size): float(u_score(g.sort_values("gold_position")["accuracy"].to_numpy()))
                                    for size, g in behaviour.groupby("n_items")}
    fig = go.Figure()
    for layer in range(info.n_layers):
        fig.add_trace(go.Scatter(x=list(range(args.focus)), y=kv_layers[:, layer], mode="lines", name=f"L{layer}",
                                 line={"width": 1}, opacity=0.6))
    fig.add_trace(go.Scatter(x=list(range(args.focus)), y=kv_curve, mode="lines+markers", name="model mean",
                             line={"width": 4, "color": "black"}))
    fig.update_layout(title=f"Attention to the gold key-value line by slot ({args.focus} pairs) — {info.name}",
                      xaxis_title="slot of the gold line", yaxis_title="mean attention per token")
    fig.write_html(out / "document_attention_kv_words.html", include_plotlyjs="cdn")

    # 4. multidoc behaviour, for the multidoc document-level curve -------------------------------------------------
    if args.multidoc_trials:
        md = posprobe.evaluate_positions(access, "multidoc", 10, args.positions, args.multidoc_trials,
                                         seed=args.seed)
        pd.DataFrame(md.attrs["trials"]).to_csv(out / "multidoc_trials.csv", index=False)
        md.attrs = {}
        md.to_csv(out / "multidoc_accuracy_by_position.csv", index=False)
        md_doc = doc_curve.set_index("x")["y"].reindex(md["gold_position"].astype(float)).to_numpy()
        numbers["multidoc_correlation_position_level"] = correlation(md_doc, md["accuracy"].to_numpy())
    else:
        md = None

    numbers["seconds_total"] = time.time() - started
    (out / "summary.json").write_text(json.dumps(numbers, indent=1, default=float))
    write_report(out, args, numbers, behaviour, attn_curve, doc_curve, slot_curve, top_heads, layer_doc_u, md,
                 focus, per_position)
    print(f"done in {numbers['seconds_total']:.0f} s -> {out}")


def write_report(out: Path, args: argparse.Namespace, n: dict[str, Any], behaviour: pd.DataFrame,
                 attn: pd.DataFrame, doc: pd.DataFrame, slots: pd.DataFrame, top_heads: pd.DataFrame,
                 layer_doc_u: dict[int, float], md: pd.DataFrame | None, focus: pd.DataFrame,
                 per_position: np.ndarray) -> None:
    pb = n["position_bias"]
    ends = n["attention_ends"]
    acc = behaviour[["n_items", "gold_position", "n", "n_correct", "n_errors", "accuracy", "ci_low", "ci_high"]]
    speed = pd.DataFrame([{"pairs": k, **v} for k, v in n["speed"].items()])
    corr = n["correlation_position_level"]
    lines = [
        f"# Lost in the middle — {n['model']}",
        "",
        f"Seed {args.seed}; {args.trials} trials per gold position; greedy decoding, exact match on the first number; "
        "Wilson 95% intervals. Figures: `lost_in_the_middle.html` (side by side), `accuracy_by_position.html`, "
        "`attention_by_relative_position.html`, `document_attention_multidoc.html`, "
        "`document_attention_kv_words.html`.",
        "",
        "## 1. Behavioural U-curve (kv_words: word -> 4-digit number)",
        "",
        fmt_table(acc),
        "",
        "Behavioural u_score (mean of first and last accuracy / middle third): "
        + ", ".join(f"{k} pairs {v:.2f}" for k, v in n["behaviour_u_score"].items()) + ".",
        "",
        "Speed (each trial's gold positions run as one equal-length greedy batch; tokens/s = prompt + generated "
        "tokens over generation time):",
        "",
        fmt_table(speed, ".1f"),
        "",
        f"Determinism: same seed -> same prompts: {n['determinism']['same_prompts']}; same table: "
        f"{n['determinism']['same_table']}.",
        "",
        "## 2. Attention-level curve (generated filler, last 16 queries, 12 bins of j/i, sink excluded)",
        "",
        f"Model-mean u_score = {pb['u_score']:.3f} (U-shaped: {pb['attention_u_shaped']}); mean sink attention "
        f"{pb['sink']:.3f}; context {pb['context_length']} tokens x {pb['n_contexts']} contexts.",
        "",
        fmt_table(attn.rename(columns={"x": "j/i (bin centre)", "y": "attention / uniform"})),
        "",
        f"The two ends separately (model mean): first bin / middle third = {ends['first_over_middle']:.2f}, last bin "
        f"/ middle third = {ends['last_over_middle']:.2f}. Heads whose first bin exceeds their middle: "
        f"{ends['heads_first_above_middle']} of {ends['n_heads']}; both ends above the middle: "
        f"{ends['heads_both_ends_above_middle']}. With the sink column excluded, u_score > 1 can come from recency "
        "alone; read the first-bin ratio and `u_sink` for primacy.",
        "",
        "Most U-shaped heads:",
        "",
        fmt_table(top_heads),
        "",
        "## 3. Document-level curve (Hsieh et al.: a fixed document moved through every slot)",
        "",
        f"Multi-document QA ({pb['doc_items']} synthetic documents, {pb['doc_trials']} trials): model-mean "
        f"doc_u_score = {pb['doc_u_score']:.3f} (bootstrap 95% CI {pb['doc_u_score_ci_low']:.3f}-"
        f"{pb['doc_u_score_ci_high']:.3f}; U-shaped, i.e. > 1.05: {pb['document_u_shaped']}).",
        "",
        fmt_table(pd.DataFrame({"slot": doc["x"].astype(int), "gold document": doc["y"],
                                "any document (slot bias)": slots["y"].to_numpy()}), ".5f"),
        "",
        "doc_u_score per layer: " + ", ".join(f"L{k} {v:.2f}" for k, v in layer_doc_u.items()),
        "",
        f"On the kv_words prompts ({args.focus} pairs, {args.doc_slot_trials} trials, every slot): doc_u_score = "
        f"{n['kv_doc_u_score']:.3f} (bootstrap 95% CI {n['kv_doc_u_score_ci'][0]:.3f}-"
        f"{n['kv_doc_u_score_ci'][1]:.3f}); curve (slot 0..{args.focus - 1}): "
        + ", ".join(f"{v:.4f}" for v in n["kv_doc_curve"]),
        "",
        "## 4. Correlation of the document-level curve with the behavioural curve",
        "",
        f"kv_words, {args.focus} pairs, the same {args.trials} prompts per position for both measurements:",
        "",
        fmt_table(pd.DataFrame({"gold_position": focus["gold_position"], "accuracy": focus["accuracy"],
                                "attention to gold line": per_position}), ".4f"),
        "",
        f"Position level (model-mean attention vs accuracy over {len(per_position)} positions): Pearson "
        f"{corr['pearson']:.3f} (p {corr['pearson_p']:.3g}), Spearman {corr['spearman']:.3f} "
        f"(p {corr['spearman_p']:.3g}).",
    ]
    if "correlation_trial_level" in n:
        t = n["correlation_trial_level"]
        g = n["gold_attention_correct_vs_wrong"]
        lines += ["", f"Trial level: point-biserial r = {t['point_biserial']:.3f} (p {t['p']:.3g}, n {t['n']}); mean "
                      f"attention to the gold line {g['correct']:.4f} when correct vs {g['wrong']:.4f} when wrong."]
    best = max(n["correlation_position_level_by_layer"].items(), key=lambda kv: -np.inf if np.isnan(kv[1]) else kv[1])
    lines += ["", f"Per layer, the strongest position-level Pearson correlation is layer {best[0]} ({best[1]:.3f})."]
    if md is not None:
        c = n["multidoc_correlation_position_level"]
        lines += ["", "Multi-document QA behaviour (10 documents):", "",
                  fmt_table(md[["gold_position", "n", "accuracy", "ci_low", "ci_high"]]), "",
                  f"Correlation with the multidoc document-level curve: Pearson {c['pearson']:.3f}, Spearman "
                  f"{c['spearman']:.3f}."]
    lines += ["", f"Total time {n['seconds_total'] / 60:.1f} min."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
