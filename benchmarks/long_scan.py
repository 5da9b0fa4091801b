"""A `long`-budget scan of Gemma 3 270M: wall time, peak RSS, and its retrieval heads at 32k next to those at 1k.

Owns the long-context benchmark of issue 20: `posprobe.scan(model, budget="long")` (the streaming probes on one text
at the model's full context, needles at 8k / 16k / 32k, the attention-level U-curve at 16k; see docs/budgets.md),
timed and with the process high-water mark (VmHWM, reset after the model is loaded and its weights hashed), then the
retrieval probe alone on 1024-token needles, and a table of the top retrieval heads per context length (mean
`score` over the scored trials of that length, from the scan's `retrieval.copies`) with the Spearman correlation of
every head's score at each length against 1k. Minutes on a CPU: run it alone, under the shared lock:

    flock /tmp/team/heavy.lock python -m benchmarks.long_scan --out outputs/long_scan.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.__main__ import write_report
from benchmarks.attention_stats import _peak_mb, _reset_peak, _rss_mb


def scores_by_length(scan: Any) -> dict[int, Any]:
    """context length -> retrieval score per (layer, head) over that length's scored trials (a pandas Series)."""
    trials = scan.tables["retrieval.trials"][["trial", "context_length"]]
    copies = scan.tables["retrieval.copies"].merge(trials, on="trial")
    used = copies[copies["scored"]]
    return {int(n): group.groupby(["layer", "head"])["score"].mean() for n, group in used.groupby("context_length")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a long-budget scan: wall time, peak RSS, retrieval heads")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--probes", nargs="+", default=None, help="default: every probe")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--save", type=Path, default=None, help="also save the long scan here")
    parser.add_argument("--out", type=Path, default=Path("outputs/long_scan.md"))
    args = parser.parse_args(argv)

    import torch
    from scipy.stats import spearmanr

    import posprobe
    from posprobe.probes.retrieval import RetrievalConfig

    torch.set_num_threads(os.cpu_count() or 2)
    access = posprobe.load_model(args.model)
    access.weights_hash()  # provenance, once per model: outside the measured region (pages in the whole file)
    loaded = _rss_mb()
    _reset_peak()
    start = time.perf_counter()
    long = posprobe.scan(access, probes=args.probes, budget="long", progress=False)
    wall, peak = time.perf_counter() - start, _peak_mb()
    if args.save:
        long.save(args.save)
    short = posprobe.scan(access, probes=["retrieval"], budget="quick", progress=False,
                          configs={"retrieval": RetrievalConfig(context_lengths=(1024,), n_trials=6)})
    by_length = {**scores_by_length(short), **(scores_by_length(long) if "retrieval.copies" in long.tables else {})}

    timings = long.meta["timings_s"]
    lines = [f"# `long`-budget scan of {access.info.name} (max_positions {access.info.max_positions}, torch threads "
             f"{torch.get_num_threads()})", "",
             "| wall s | shared pass s | peak RSS MB | peak MB over loaded model | probes |", "|---|---|---|---|---|",
             f"| {wall:.0f} | {timings.get('shared_passes', float('nan')):.0f} | {peak:.0f} | {peak - loaded:.0f} | "
             f"{', '.join(long.meta['probes'])} |", "",
             "Per-probe seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    retrieval = long.meta["summaries"].get("retrieval", {})
    if retrieval:
        lines.append(f"Needle accuracy (long scan): {retrieval.get('n_correct')} / {retrieval.get('n_trials')} at "
                     f"lengths {retrieval.get('context_lengths')}.")
    lines += ["", "| context length | trials scored | top retrieval heads (score) | Spearman vs 1k over heads |",
              "|---|---|---|---|"]
    reference = by_length.get(1024)
    for n, scores in sorted(by_length.items()):
        top = scores.sort_values(ascending=False).head(args.top)
        names = ", ".join(f"L{layer}H{head} {value:.2f}" for (layer, head), value in top.items())
        rho = float("nan")
        if reference is not None and n != 1024:
            joined = reference.to_frame("a").join(scores.to_frame("b"), how="inner")
            rho = float(spearmanr(joined["a"], joined["b"]).statistic)
        table = long if n != 1024 else short
        scored = int(table.tables["retrieval.trials"].query("context_length == @n")["scored"].sum())
        lines.append(f"| {n} | {scored} | {names} | {rho:.3f} |")
    return write_report(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
