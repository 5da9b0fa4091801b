"""Teacher-forced vs generate mode of the retrieval probe: time and agreement on the same trials, in one run.

Owns the benchmark of METRICS.md section 5's two modes. For each needle trial (lengths x depths), both modes score
every head; the run reports wall time per mode, where it goes (generate: KV-cached greedy decoding + the scoring
pass that reads attention at the generated positions; teacher-forced: the scoring pass alone, against a bare
forward pass with logits at the answer positions as the floor), the ratio, and the Spearman correlation of the
head scores over the trials both modes answered correctly (with the answer span and with the whole-needle span).

Run alone, under the shared lock (two torch processes fight over two cores):
`flock /tmp/posprobe-gemma.lock nice -n 5 python -m benchmarks.retrieval_modes --out outputs/retrieval_modes.md`
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.__main__ import write_report


class _Timers:
    """Wall time of `access.run` / `access.greedy` calls, outermost call only (greedy may call run)."""

    def __init__(self, access: Any) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth = 0
        for name in ("run", "greedy"):
            setattr(access, name, self._wrap(name, getattr(access, name)))

    def _wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds[name] += time.perf_counter() - start
                    self.calls[name] += 1

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="retrieval probe: teacher-forced vs generate mode")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/retrieval_modes.md"))
    args = parser.parse_args(argv)

    import torch

    import posprobe
    from posprobe.probes.retrieval import RetrievalConfig, mode_agreement, score_trials
    from posprobe.tasks.needle import make_needle_trials

    torch.set_num_threads(os.cpu_count() or 2)
    access = posprobe.load_model(args.model)
    trials = make_needle_trials(access, args.lengths, args.depths, seed=args.seed)
    access.run(trials[0].ids()[:, :64], logits="last")  # warm-up
    timers = _Timers(access)

    floor = time.perf_counter()
    for trial in trials:  # the floor: one bare pass per trial, logits only at the answer positions
        access.run(trial.teacher_forced_ids(), logits=list(trial.answer_positions))
    floor = time.perf_counter() - floor
    timers.reset()

    results: dict[str, Any] = {}
    timing: dict[str, dict[str, float]] = {}
    for mode in ("teacher_forced", "generate"):
        for span in ("answer", "needle"):
            timers.reset()
            start = time.perf_counter()
            results[mode, span] = score_trials(access, trials, RetrievalConfig(mode=mode, span=span))
            if span == "answer":  # time once per mode (the span changes nothing but the counting)
                timing[mode] = {"total": time.perf_counter() - start,
                                **{f"{k}_s": v for k, v in timers.seconds.items()},
                                **{f"{k}_calls": v for k, v in timers.calls.items()}}
    tf, gen = timing["teacher_forced"], timing["generate"]
    n = len(trials)
    lines = [f"# Retrieval probe modes on {access.info.name} ({n} trials: lengths {args.lengths} x depths "
             f"{args.depths}, torch threads {torch.get_num_threads()})", "",
             "| | total s | s / trial | x teacher-forced | greedy decoding s | scoring passes s | rest s |",
             "|---|---|---|---|---|---|---|"]
    lines.append(f"| bare forward pass (floor) | {floor:.1f} | {floor / n:.2f} | {floor / tf['total']:.2f} | - | "
                 f"{floor:.1f} | - |")
    for name, t in (("teacher_forced", tf), ("generate", gen)):
        greedy = t.get("greedy_s", 0.0)
        passes = t.get("run_s", 0.0)
        lines.append(f"| {name} | {t['total']:.1f} | {t['total'] / n:.2f} | {t['total'] / tf['total']:.2f} | "
                     f"{greedy:.1f} | {passes:.1f} | {t['total'] - greedy - passes:.1f} |")
    lines += ["", f"generate / teacher-forced time ratio: **{gen['total'] / tf['total']:.2f}**; the scoring pass "
                  f"costs {tf.get('run_s', 0) / floor:.2f}x a bare pass (attention argmax at the answer positions "
                  f"only).", ""]
    lines += ["| span | trials correct (tf / gen) | common correct | Spearman over heads | max abs diff |",
              "|---|---|---|---|---|"]
    for span in ("answer", "needle"):
        a, b = results["teacher_forced", span], results["generate", span]
        agreement = mode_agreement(a, b)
        lines.append(f"| {span} | {a.summary['n_correct']} / {b.summary['n_correct']} | "
                     f"{agreement['n_common_correct']} | {agreement['spearman']:.4f} | "
                     f"{agreement['max_abs_diff']:.4f} |")
    top = results["teacher_forced", "answer"].summary.get("top_heads", [])[:5]
    lines += ["", "Top heads (teacher-forced, answer span): " + ", ".join(
        f"L{h['layer']}H{h['head']} {h['retrieval_score']:.2f}" for h in top), ""]
    generated = results["generate", "answer"].tables["trials"]["output"].tolist()
    lines.append("Generated continuations: " + "; ".join(repr(g) for g in generated))
    text = "\n".join(lines) + "\n"
    return write_report(args.out, text)


if __name__ == "__main__":
    sys.exit(main())
