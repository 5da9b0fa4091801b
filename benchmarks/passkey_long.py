"""A passkey sweep at the model's full context through `evaluate_positions`: accuracy per depth, wall time, peak RSS.

Owns the long-context passkey benchmark of issue 20 (item 3): `posprobe.evaluate_positions(model, "passkey", ...)`
with the prompt filling the model's whole window (32768 tokens on Gemma 3 270M, less the answer's tokens), the needle
at `--depths` evenly spaced depths, `--trials` seeded trials per depth, greedy exact match with Wilson 95 %
intervals (docs/tasks.md). Memory is bounded by the KV-cached greedy decode: the prompt's prefill through the
model's own attention, in chunks when one pass's scores would exceed the budget (`--prefill-chunk`: auto, the
default; none, the whole prompt in one pass as before issue 20's chunked prefill; or tokens per pass), then one token
at a time. Peak memory is the process high-water mark (VmHWM) reset after the model is loaded and its weights
hashed. Minutes per prompt on a CPU: run it alone, under the shared lock:

    flock /tmp/team/heavy.lock python -m benchmarks.passkey_long --out outputs/passkey_long.md
    python -m benchmarks.passkey_long --model smollm2-135m --length 8192 --filler repeat   # another model / filler
    python -m benchmarks.passkey_long --length 16384 --depths 1 --prefill-chunk none     # the one-pass prefill
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.__main__ import write_report
from benchmarks.attention_stats import _peak_mb, _reset_peak, _rss_mb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a passkey sweep at full context: accuracy, wall time, peak RSS")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--length", type=int, default=None, help="prompt tokens (default: the model's window less "
                        "the answer's tokens)")
    parser.add_argument("--depths", type=int, default=3, help="evenly spaced needle depths, 0 and 100 %% included")
    parser.add_argument("--trials", type=int, default=1, help="seeded trials per depth")
    parser.add_argument("--filler", choices=("generated", "repeat"), default="generated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefill-chunk", default="auto", help="prompt tokens per prefill pass: auto (chunks only "
                        "when one pass's attention scores exceed the memory budget), none (one pass) or a number")
    parser.add_argument("--out", type=Path, default=Path("outputs/passkey_long.md"))
    args = parser.parse_args(argv)
    if args.depths < 1 or args.trials < 1:
        parser.error("--depths and --trials must be at least 1")
    prefill_chunk: int | str | None = {"auto": "auto", "none": None}.get(args.prefill_chunk.lower(), args.prefill_chunk)
    if isinstance(prefill_chunk, str) and prefill_chunk != "auto":
        if not prefill_chunk.isdigit() or int(prefill_chunk) < 1:
            parser.error(f"--prefill-chunk must be auto, none or a positive number; got {args.prefill_chunk!r}")
        prefill_chunk = int(prefill_chunk)

    import torch

    import posprobe
    from posprobe.tasks import get_task

    torch.set_num_threads(os.cpu_count() or 2)
    access = posprobe.load_model(args.model)
    steps = get_task("passkey").max_new_tokens
    window = access.info.max_positions
    length = args.length or ((window - steps) if window else 8192)
    if window and length + steps > window:
        parser.error(f"--length {length} + {steps} answer tokens exceeds {access.info.name}'s window of {window}")
    # the task's context_length is the prompt budget: the prompt is at most that long (cut at a sentence boundary)
    task = get_task("passkey", context_length=length, filler=args.filler)
    task.make(access, args.depths, 0, args.seed)  # a prompt that does not fit fails here, before any pass
    access.weights_hash()
    loaded = _rss_mb()
    _reset_peak()
    start = time.perf_counter()
    table = posprobe.evaluate_positions(access, task, n_items=args.depths, gold_positions=args.depths,
                                        n_trials=args.trials, seed=args.seed, progress=False,
                                        prefill_chunk=prefill_chunk)
    wall, peak = time.perf_counter() - start, _peak_mb()
    trials = table.attrs["trials"]
    tokens = sorted({int(t["n_tokens"]) for t in trials})
    from posprobe.devices import input_device, prefill_chunk_size

    rows = args.depths  # one greedy call per trial: its depths are the rows
    chunk = prefill_chunk_size(access.info, tokens[-1], rows, device=input_device(access.model)) \
        if prefill_chunk == "auto" else prefill_chunk
    prefill = "one pass" if chunk is None or chunk >= tokens[-1] else f"chunks of {chunk} tokens"
    lines = [f"# Passkey at full context: {access.info.name} (window {window}, torch threads "
             f"{torch.get_num_threads()})", "",
             f"Command: `{' '.join(['python -m benchmarks.passkey_long', *(argv or sys.argv[1:])])}`", "",
             f"Prompt tokens {tokens[0]}..{tokens[-1]}; filler {args.filler}; {args.trials} trial(s) per depth; "
             f"seed {args.seed}; {table.attrs['n_errors']} trial(s) raised; prefill: {prefill} "
             f"(--prefill-chunk {args.prefill_chunk}).", "",
             "| wall s | s per prompt | peak RSS MB | peak MB over loaded model | tokens/s (prompt + generated) |",
             "|---|---|---|---|---|",
             f"| {wall:.0f} | {wall / max(1, len(trials)):.0f} | {peak:.0f} | {peak - loaded:.0f} | "
             f"{table.attrs['tokens_per_second']:.0f} |", "",
             "| depth | n | correct | accuracy | Wilson 95 % | completions |", "|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        said = [repr(t["completion"]).replace("|", "\\|") for t in trials  # a "|" would split the table cell
                if t["gold_position"] == row["gold_position"]]
        lines.append(f"| {row['relative_position']:.0%} | {row['n']} | {row['n_correct']} | {row['accuracy']:.2f} | "
                     f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}] | {', '.join(said)} |")
    answers = sorted({t["answer"] for t in trials})
    lines += ["", f"Answers: {', '.join(answers)}."]
    return write_report(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
