"""Context extension past the native window: passkey and key-value retrieval at 1x / 1.5x / 2x, plain RoPE vs the
training-free what-ifs (posprobe.what_if), and a rescan of retrieval heads, sink mass and entropy under each at 2x.

Every method runs with its paper's setting, scaled to a 2x extension and never tuned here (so the evaluation seed
is held out by construction; --seed picks it, default 1): PI / NTK / dynamic NTK / YaRN factor 2; STRING shift
L/3, window 128 (L = native length); Self-Extend group 4, neighbour window L/4; StreamingLLM 4 sinks + a cache of
L; LM-Infinite 10 global tokens, local window L, distances capped at L; log-n temperature; Ms-PoE ratios 1.2-1.8;
Attention Buckets the authors' six bases for Llama 2 (10000, 17500, 18000, 19000, 20000, 25000 at theta 10000) as
ratios of the model's theta, logits combined by softmax(max logit) as their code (six passes per call; the rescan
skips it: it combines outputs of six models, scan one pass with `rope_theta:ratio=R`).
"plain" is RoPE as trained, extrapolated (`extrapolate`: only the access's length limit is lifted).

Tasks: `passkey` with the needle at depths 0, 25, 50, 75, 100 % of a haystack filling the length, and a key-value
task filling the length (`kv_words` while its 159 words suffice, else `kv_uuid`), the gold pair at the same five
depths; greedy exact match; Wilson 95 % intervals (`evaluate_positions`). The rescan at 2x: `head_basics`
(sink mass), `attention_entropy`, `retrieval` (Wu et al. retrieval score), compared with the plain model scanned at
1x: mean sink mass, mean normalised entropy, retrieval heads (score > 0.1), overlap of the top-10 retrieval heads
with the 1x baseline (kept count and Jaccard), the heads that lose the most retrieval score, and how many needle
trials the model answered. Its size: --rescan-texts / --rescan-queries (sink and entropy passes), --rescan-trials
(retrieval needles), --rescan-include-wrong (score copying on failed trials too, teacher forced; Wu et al. score
answered ones only). `--no-accuracy` without `--no-rescan` runs the rescan alone, e.g. on a CPU:
`--variant full --no-accuracy --rescan-texts 1 --rescan-queries 64 --rescan-trials 2 --methods plain ntk yarn pi`.

Variants:
- `--variant quick` (CI, a few minutes on 2 cores): a seeded random tiny Llama (3 layers, native window 256;
  lengths 256 / 384 / 512), 3 depths (0, 50, 100 %), 2 trials per cell; passkey only at the lengths its prompt fits
  (>= 303 tokens with the byte tokenizer). Its accuracies are ~0 by construction (random weights): it checks the
  pipeline, the table and that every method runs past the window, not the methods.
- `--variant full`: SmolLM2-135M (native 8192; lengths 8192 / 12288 / 16384), 20 trials per cell, 5 depths. The
  what-ifs at the logits run the layer's attention eagerly in query chunks (memory O(chunk x n) per layer, not the
  [9, n, n] float32 logits of ~10 GB at 16k), but slowly on a CPU: a GPU (--device cuda) is the place for it. The
  grid is configurable for a reduced real run: --ratios / --lengths, --depths, --trials, --methods, e.g.
  `--variant full --ratios 1 1.5 --depths 3 --trials 5 --methods plain yarn self_extend buckets --no-rescan`.
  The full grid has not been run yet (no GPU so far). `--loss --no-accuracy` measures next-token loss by position
  instead: one pass per text and method, a real reading on a small model whose exact-match accuracy is 0 past a
  few thousand tokens (README: SmolLM2-135M at 16k under plain / yarn / ntk / dynamic / pi).

Writes `accuracy.csv`, `accuracy_by_depth.csv`, `rescan.csv`, `summary.json` and `report.md` to --out (with
`--loss`: `loss_by_position.csv`, `loss_by_band.csv`), each file atomically; the accuracy and rescan tables are
rewritten after every method, so a long run stopped midway keeps the methods it finished.
Command: `python analyses/context_extension.py --variant quick --out outputs/context_extension_quick`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import posprobe
from posprobe._io import write_text_atomic
from posprobe.errors import InputError
from posprobe.probes import Budget, get_probe
from posprobe.tasks import get_task
from posprobe.tasks.evaluate import wilson_interval
from posprobe.what_if import (
    STRING,
    AttentionBuckets,
    DynamicNTK,
    Extrapolate,
    LMInfinite,
    LogNTemperature,
    MsPoE,
    NTKAware,
    PositionInterpolation,
    SelfExtend,
    StreamingLLM,
    YaRN,
)

RATIOS = (1.0, 1.5, 2.0)
DEPTHS = {"quick": 3, "full": 5}  # default evenly spaced gold slots: 0 / 50 / 100 %, or 0 / 25 / 50 / 75 / 100 %
FACTOR = 2.0  # every method is set up for a 2x extension and evaluated at 1x, 1.5x and 2x


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=("quick", "full"), default="quick")
    parser.add_argument("--out", default=None, help="output folder (default outputs/context_extension_<variant>)")
    parser.add_argument("--trials", type=int, default=None, help="trials per (method, task, length, depth)")
    parser.add_argument("--ratios", type=float, nargs="+", default=None,
                        help="lengths as multiples of the native window (default 1 1.5 2)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="lengths in tokens (instead of --ratios)")
    parser.add_argument("--depths", type=int, default=None, help="evenly spaced gold depths from 0 to 100 %% "
                        "(default 3 quick, 5 full)")
    parser.add_argument("--seed", type=int, default=1, help="evaluation seed (held out: nothing is tuned here)")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the methods, run in the order given "
                        "(default all)")
    parser.add_argument("--no-rescan", action="store_true", help="skip the probe rescan at 2x")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the passkey / key-value accuracy")
    parser.add_argument("--rescan-texts", type=int, default=None, help="texts per length for the rescan's sink / "
                        "entropy passes (default 2 quick, 4 full)")
    parser.add_argument("--rescan-queries", type=int, default=None, help="query positions sampled per text for "
                        "the rescan's attention statistics (default 32 quick, 64 full)")
    parser.add_argument("--rescan-trials", type=int, default=None, help="retrieval needle trials per rescanned "
                        "method (default 4 quick, 20 full)")
    parser.add_argument("--rescan-include-wrong", action="store_true", help="score retrieval copying on needle "
                        "trials the model got wrong too (teacher forced; always on in quick: its random model "
                        "answers nothing). Default full: answered trials only (Wu et al.)")
    parser.add_argument("--tasks", nargs="+", choices=("passkey", "kv"), default=["passkey", "kv"],
                        help="which accuracy tasks to run (default both)")
    parser.add_argument("--filler", choices=("generated", "repeat"), default="generated",
                        help="passkey haystack: seeded varied sentences, or the paper's five sentences repeated")
    parser.add_argument("--loss", action="store_true", help="also measure the next-token loss by position on "
                        "generated text at each length (one pass per text and method: cheap next to the tasks)")
    parser.add_argument("--loss-texts", type=int, default=2, help="texts per length for --loss")
    parser.add_argument("--loss-stride", type=int, default=8, help="score every STRIDE-th position for --loss")
    parser.add_argument("--device", default=None, help="device for the full variant (e.g. cuda)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per greedy call (default: all depths "
                        "in quick, 1 in full: one long prompt at a time)")
    return parser.parse_args()


def save_csv(frame: pd.DataFrame, path: Path, index: bool = False) -> None:
    """Write a table through a temporary sibling renamed into place (a stopped run never leaves half a file)."""
    write_text_atomic(path, frame.to_csv(index=index))


def depth_table(by_depth: pd.DataFrame) -> pd.DataFrame:
    """The per-depth accuracy rows without the object columns that do not belong in a csv (per-trial lists)."""
    return by_depth.drop(columns=[c for c in by_depth.columns if by_depth[c].dtype == object and c not in
                                  ("task", "method", "intervention")], errors="ignore")


def methods(native: int) -> dict[str, Any]:
    """Each method with its paper's setting for a 2x extension of a model trained on `native` tokens."""
    return {
        "plain": Extrapolate(),
        "pi": PositionInterpolation(factor=FACTOR),
        "ntk": NTKAware(factor=FACTOR),
        "dynamic": DynamicNTK(factor=FACTOR),
        "yarn": YaRN(factor=FACTOR),
        "string": STRING(window=min(128, native // 8)),
        # not the paper's: the shift sized so that every distance at 2x maps inside the window (2L - 1 - S + W < L)
        "string_fit": STRING(shift=native + min(128, native // 8), window=min(128, native // 8)),
        "self_extend": SelfExtend(group=4, window=native // 4),
        "streaming_llm": StreamingLLM(n_sink=4),
        "lm_infinite": LMInfinite(n_global=10),
        "logn": LogNTemperature(),
        "ms_poe": MsPoE(),
        "buckets": AttentionBuckets(),  # the authors' six bases as ratios of the model's theta, their combination
    }


def load(variant: str, device: str | None) -> Any:
    if variant == "quick":
        from posprobe.models import tiny_model

        model, tokenizer = tiny_model("rope", n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, max_positions=256)
        return posprobe.load_model(model, tokenizer=tokenizer)
    return posprobe.load_model("smollm2-135m", device=device)  # device None: cuda when available (bfloat16)


def kv_task(access: Any, tokens: int, seed: int) -> tuple[Any, int]:
    """The key-value task and item count whose prompt fills `tokens` (kv_words while its words suffice)."""
    for name in ("kv_words", "kv_uuid"):
        task = get_task(name)
        budget = tokens - task.max_new_tokens
        low, high = 2, 159 if name == "kv_words" else 4096
        if len(task.make(access, low, 0, seed).input_ids) > budget:
            continue
        while low < high:  # largest n whose prompt fits
            mid = (low + high + 1) // 2
            try:
                fits = len(task.make(access, mid, 0, seed).input_ids) <= budget
            except Exception:  # noqa: BLE001 - more items than the task can make
                fits = False
            low, high = (mid, high) if fits else (low, mid - 1)
        if name == "kv_uuid" or low < 159:
            return task, low
    raise RuntimeError(f"No key-value prompt fits {tokens} tokens.")


def evaluate(access: Any, name: str, spec: Any, lengths: list[int], trials: int, seed: int,
             depths: int, batch_size: int | None, filler: str = "generated",
             tasks: tuple[str, ...] = ("passkey", "kv")) -> list[pd.DataFrame]:
    rows = []
    for length in lengths:
        cells = []
        passkey = get_task("passkey", context_length=length - 24, filler=filler)
        try:
            if "passkey" in tasks:
                passkey.make(access, depths, 0, seed)
                cells.append((passkey, depths))
        except InputError as exc:  # the prompt does not fit this length (tiny byte-tokenizer model)
            print(f"  passkey skipped at {length} tokens: {exc}", flush=True)
        if "kv" in tasks:
            cells.append(kv_task(access, length, seed))
        for task, n_items in cells:
            start = time.perf_counter()
            table = posprobe.evaluate_positions(access, task, n_items=n_items, gold_positions=depths,
                                                n_trials=trials, intervention=spec, seed=seed, progress=False,
                                                batch_size=batch_size)
            table = table.assign(method=name, length=length, ratio=length / access.info.max_positions,
                                 seconds=time.perf_counter() - start,
                                 prompt_tokens=table.attrs.get("prompt_tokens"))
            rows.append(table)
    return rows


def loss_by_position(access: Any, name: str, spec: Any, lengths: list[int], n_texts: int, seed: int,
                     stride: int) -> pd.DataFrame:
    """Next-token negative log-likelihood at every `stride`-th position of seeded generated text (posprobe.tasks.text,
    the scan's text source) filling each length, under `spec`. Past the native window a method that keeps positions
    in distribution keeps this flat; plain RoPE extrapolation shows where it breaks. Logits are read only at the
    scored positions."""
    import torch

    from posprobe.tasks.text import text_ids

    rows = []
    for length in lengths:
        positions = list(range(0, length - 1, stride))
        for index in range(n_texts):
            ids = torch.tensor([text_ids(access, length, seed=seed * 100_003 + length * 101 + index)])
            start = time.perf_counter()
            with spec.applied(access):
                logits = access.run(ids, logits=positions).logits
            seconds = time.perf_counter() - start
            logp = torch.log_softmax(logits[0].double(), -1)
            nll = -logp.gather(-1, ids[0, [p + 1 for p in positions]][:, None])[:, 0]
            rows += [{"method": name, "length": length, "text": index, "position": p, "nll": v, "seconds": seconds}
                     for p, v in zip(positions, nll.tolist())]
            print(f"    loss {name} {length} text {index}: {seconds:.0f} s", flush=True)
    return pd.DataFrame(rows)


def loss_table(loss: pd.DataFrame, native: int) -> pd.DataFrame:
    """Mean NLL per method in position bands of native / 4 (rows: method; columns: band start..stop)."""
    band = max(1, native // 4)
    frame = loss.assign(band=(loss["position"] // band) * band)
    table = frame.groupby(["method", "band"], sort=False)["nll"].mean().unstack("band")
    table.columns = [f"{int(c)}-{int(c) + band}" for c in table.columns]
    return table


def pooled(by_depth: pd.DataFrame) -> pd.DataFrame:
    """Accuracy over all depths per (method, task, length) with a Wilson interval on the pooled trials."""
    out = []
    for (method, task, length), group in by_depth.groupby(["method", "task", "length"], sort=False):
        n, k = int(group["n"].sum()), int(group["n_correct"].sum())
        low, high = wilson_interval(k, n) if n else (float("nan"), float("nan"))
        out.append({"method": method, "task": task, "length": length, "ratio": float(group["ratio"].iloc[0]),
                    "n": n, "accuracy": k / n if n else float("nan"), "ci_low": low, "ci_high": high,
                    "n_errors": int(group["n_errors"].sum()), "seconds": float(group["seconds"].iloc[0])})
    return pd.DataFrame(out)


RESCAN_SIZES = {"quick": (2, 32, 4), "full": (4, 64, 20)}  # texts, queries per text, retrieval trials


def rescan(access: Any, specs: dict[str, Any], native: int, variant: str, n_texts: int | None = None,
           queries: int | None = None, trials: int | None = None, include_wrong: bool = False,
           partial: Path | None = None) -> pd.DataFrame:
    """Sink mass, entropy and retrieval heads under each method at 2x vs the plain model at 1x. Sizes left at
    None take the variant's defaults (RESCAN_SIZES). `partial`: a csv rewritten after each method (a long run
    stopped midway keeps the methods it finished)."""
    defaults = RESCAN_SIZES[variant]
    n_texts, queries, trials = (n_texts or defaults[0], queries or defaults[1], trials or defaults[2])
    # the random quick model answers nothing: score copying on every trial there (Wu et al. use answered ones)
    include_wrong = include_wrong or variant == "quick"
    retrieval = get_probe("retrieval").Config

    def one(spec: Any, length: int) -> tuple[pd.DataFrame, str]:
        budget = Budget(f"ctx{length}", (length,), n_texts, queries, level="quick")
        # teacher forcing appends the answer to the needle prompt: leave it room inside the length
        config = {"retrieval": retrieval(context_lengths=(length - 16,), n_trials=trials,
                                         include_wrong=include_wrong)}
        result = posprobe.scan(access, probes=["head_basics", "attention_entropy", "retrieval"], budget=budget,
                               configs=config, intervention=spec, progress=False)
        needle = result.meta.get("summaries", {}).get("retrieval", {})
        answered = f"{needle.get('n_correct', '?')}/{needle.get('n_trials', '?')}"
        return result.heads.set_index(["layer", "head"]), answered

    start = time.perf_counter()
    baseline, answered = one(Extrapolate(), native)
    top = set(baseline["retrieval_score"].nlargest(10).index)
    rows = [{"method": "plain @1x", "length": native, "needles_answered": answered,
             **summary(baseline, baseline, top), "seconds": time.perf_counter() - start}]
    print(f"  rescan plain @1x: {rows[0]['seconds']:.0f} s", flush=True)
    if partial is not None:
        save_csv(pd.DataFrame(rows), partial)
    for name, spec in specs.items():
        if isinstance(spec, AttentionBuckets):  # N passes are N models: no single set of heads to rescan
            print(f"  rescan skips {name}: it combines the outputs of {len(spec.passes())} passes; scan one with "
                  f"rope_theta:ratio=R", flush=True)
            rows.append({"method": name, "length": 2 * native, "largest_drops": f"not rescanned ({len(spec.passes())} "
                         f"passes combined; scan one with rope_theta)", "seconds": float("nan")})
            continue
        start = time.perf_counter()
        heads, answered = one(spec, 2 * native)
        rows.append({"method": name, "length": 2 * native, "needles_answered": answered,
                     **summary(heads, baseline, top), "seconds": time.perf_counter() - start})
        print(f"  rescan {name} @2x: {rows[-1]['seconds']:.0f} s", flush=True)
        if partial is not None:
            save_csv(pd.DataFrame(rows), partial)
    return pd.DataFrame(rows)


def summary(heads: pd.DataFrame, baseline: pd.DataFrame, top: set) -> dict[str, Any]:
    score = heads["retrieval_score"].fillna(0.0)
    mine = set(score.nlargest(10).index)
    drop = (baseline["retrieval_score"].fillna(0.0) - score).sort_values(ascending=False)
    return {"sink_mass": float(heads["sink_mass"].mean()), "entropy_norm": float(heads["entropy_norm"].mean()),
            "retrieval_heads": int((score > 0.1).sum()),
            "top10_kept": len(mine & top),
            "top10_jaccard_vs_1x": len(mine & top) / len(mine | top) if mine | top else float("nan"),
            "largest_drops": ", ".join(f"L{layer}H{head} {value:+.2f}" for (layer, head), value in
                                       drop.head(3).items() if value > 0) or "-"}


def report(args: argparse.Namespace, access: Any, acc: pd.DataFrame | None, depth: pd.DataFrame | None,
           scan: pd.DataFrame | None, wall: float) -> str:
    lines = [
        f"# Context extension past the native window ({args.variant})", "",
        f"Command: `{' '.join(['python'] + sys.argv)}`", "",
    ]
    if acc is None or depth is None:
        lines += [(f"Model: {access.info.name} (native window {access.info.max_positions} tokens); accuracy not "
                   f"run (--no-accuracy); evaluation seed {args.seed}; wall time {wall / 60:.1f} min."), ""]
    else:
        table = acc.assign(cell=[f"{a:.2f} [{lo:.2f}, {hi:.2f}]" for a, lo, hi in
                                 zip(acc["accuracy"], acc["ci_low"], acc["ci_high"])])
        wide = table.pivot_table(index=["task", "method"], columns="ratio", values="cell", aggfunc="first",
                                 sort=False)
        wide.columns = [f"{c:g}x" for c in wide.columns]
        lines += [
            (f"Model: {access.info.name} (native window {access.info.max_positions} tokens); {args.trials} trials "
             f"per (method, task, length, depth) x {args.depths} depths; passkey filler {args.filler}; evaluation "
             f"seed {args.seed} (settings are the papers', not tuned); wall time {wall / 60:.1f} min."), "",
            "Greedy exact-match accuracy over all depths, Wilson 95 % interval:", "",
            wide.reset_index().to_markdown(index=False), "",
        ]
        if args.variant == "quick":
            lines += [("The quick variant's model has random weights: accuracies near 0 are expected; this table "
                       "checks that every method runs past the native window and that the report is produced."), ""]
        slots = max(args.depths - 1, 1)  # relative positions binned to the nearest requested depth
        binned = (depth["relative_position"] * slots).round() / slots
        by_depth = depth.assign(depth=(100 * binned).round().astype(int).astype(str) + "%")
        lines += ["Per depth (relative position of the gold item, 0 % = start of the context):", "",
                  by_depth.pivot_table(index=["task", "method", "length"], columns="depth", values="accuracy",
                                       sort=False).reset_index().to_markdown(index=False, floatfmt=".2f"), ""]
    if scan is not None:
        texts, queries, trials = rescan_sizes(args)
        lines += [(f"Rescan at 2x (plain @1x = the baseline the overlaps and drops refer to); {texts} text(s) x "
                   f"{queries} queries for sink / entropy, {trials} retrieval needle trials per method, scored on "
                   f"{'every trial' if args.rescan_include_wrong or args.variant == 'quick' else 'answered trials'}"
                   f" (needles_answered: correct / trials):"), "",
                  scan.to_markdown(index=False, floatfmt=".3f"), ""]
    return "\n".join(lines)


def rescan_sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    """(texts, queries, retrieval trials) of the rescan: the CLI's, else the variant's defaults."""
    defaults = RESCAN_SIZES[args.variant]
    return (args.rescan_texts or defaults[0], args.rescan_queries or defaults[1], args.rescan_trials or defaults[2])


def main() -> None:
    args = parse_args()
    args.trials = args.trials or (2 if args.variant == "quick" else 20)
    args.depths = args.depths or DEPTHS[args.variant]
    out = Path(args.out or f"outputs/context_extension_{args.variant}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    access = load(args.variant, args.device)
    native = access.info.max_positions
    specs = methods(native)
    if args.methods:
        unknown = sorted(set(args.methods) - set(specs))
        if unknown:
            raise SystemExit(f"Unknown method(s) {unknown}; choose from {sorted(specs)}.")
        specs = {k: specs[k] for k in dict.fromkeys(args.methods)}  # in the order given (the slow ones last)
    lengths = args.lengths or [int(native * r) for r in (args.ratios or RATIOS)]
    frames, losses = [], []
    for name, spec in specs.items():
        print(f"[{time.perf_counter() - started:7.1f}s] {name}", flush=True)
        if args.loss:
            losses.append(loss_by_position(access, name, spec, lengths, args.loss_texts, args.seed,
                                           args.loss_stride))
        if not args.no_accuracy:
            frames += evaluate(access, name, spec, lengths, args.trials, args.seed, args.depths,
                               args.batch_size or (None if args.variant == "quick" else 1), args.filler,
                               tuple(args.tasks))
            if frames:  # rewritten after each method: a long run stopped midway keeps the methods it finished
                done = pd.concat(frames, ignore_index=True)
                save_csv(depth_table(done), out / "accuracy_by_depth.csv")
                save_csv(pooled(done), out / "accuracy.csv")
    if losses:
        loss = pd.concat(losses, ignore_index=True)
        save_csv(loss, out / "loss_by_position.csv")
        bands = loss_table(loss, native)
        save_csv(bands, out / "loss_by_band.csv", index=True)
        print("next-token NLL by position band (nats):\n" + bands.to_markdown(floatfmt=".2f"), flush=True)
    by_depth = pd.concat(frames, ignore_index=True) if frames else None
    acc = pooled(by_depth) if by_depth is not None else None
    scan = None
    if not args.no_rescan:
        texts, queries, trials = rescan_sizes(args)
        print(f"[{time.perf_counter() - started:7.1f}s] rescan", flush=True)
        scan = rescan(access, specs, native, args.variant, texts, queries, trials, args.rescan_include_wrong,
                      partial=out / "rescan.csv")
    wall = time.perf_counter() - started
    if by_depth is not None and acc is not None:
        save_csv(depth_table(by_depth), out / "accuracy_by_depth.csv")
        save_csv(acc, out / "accuracy.csv")
    if scan is not None:
        save_csv(scan, out / "rescan.csv")
    write_text_atomic(out / "summary.json", json.dumps({
        "variant": args.variant, "model": access.info.name, "native": native, "lengths": lengths,
        "filler": args.filler, "trials": args.trials, "seed": args.seed, "wall_seconds": wall,
        "rescan": None if scan is None else dict(zip(("texts", "queries", "trials"), rescan_sizes(args)),
                                                 include_wrong=args.rescan_include_wrong or args.variant == "quick"),
        "methods": {k: v.describe(access) for k, v in specs.items()},
        "accuracy": None if acc is None else acc.replace({np.nan: None}).to_dict(orient="records")},
        indent=2, default=str))
    if acc is None and scan is None:
        return
    text = report(args, access, acc, by_depth, scan, wall)
    write_text_atomic(out / "report.md", text)
    print(text)


if __name__ == "__main__":
    main()
