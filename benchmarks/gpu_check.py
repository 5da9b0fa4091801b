"""`python -m benchmarks.gpu_check`: the one-GPU check of issue 15, unattended, in under 8 minutes on one GPU.

Owns the GPU table: Gemma 3 270M in bfloat16, the bare forward pass (the floor) vs posprobe's streaming head
statistics (sampled queries, the scan's path) vs eager attention with `output_attentions=True` at 2k / 8k / 32k
tokens, batch 1 vs 8 (wall seconds, CUDA peak over the loaded model; out-of-memory is a row, not a crash), then the
bf16-vs-fp32 agreement of a quick scan of the streaming probes (Spearman over heads per head metric). Writes
markdown with the date, the GPU and the versions to stdout and `--out`. A time guard skips what would not finish.

    python -m benchmarks.gpu_check                       # on a CUDA machine
    python -m benchmarks.gpu_check --device cpu --model tiny-rope --tokens 64 128 --batch 1 2   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

CASES = ("forward", "stream_sampled", "eager")
AGREEMENT_PROBES = ["head_basics", "attention_entropy", "positional_heads", "rope_frequency"]


def _gpu_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return "CPU (no GPU)"


def _speed_rows(model: str, device: str, tokens: list[int], batches: list[int], deadline: float) -> list[dict]:
    import torch

    import posprobe
    from benchmarks.attention_stats import run_case
    from posprobe.errors import MemoryBudgetError

    access = posprobe.load_model(model, device=device, dtype="bfloat16")
    limit = access.info.max_positions or max(tokens)
    rows = []
    for n in tokens:
        n = min(n, limit)
        for batch in batches:
            for case in CASES:
                if time.monotonic() > deadline:
                    rows.append({"case": case, "tokens": n, "batch": batch, "error": "skipped (time guard)"})
                    continue
                try:
                    rows.append(run_case(case, n, model, access=access, batch=batch))
                except torch.cuda.OutOfMemoryError:
                    rows.append({"case": case, "tokens": n, "batch": batch, "error": "out of memory"})
                except MemoryBudgetError as exc:  # posprobe's own estimate said no, before running
                    rows.append({"case": case, "tokens": n, "batch": batch,
                                 "error": "refused by the memory estimate: " + str(exc).split(" Nothing")[0]})
                finally:
                    if access.model.config._attn_implementation != "sdpa":
                        access.model.set_attn_implementation("sdpa")
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _agreement(model: str, device: str, budget: str) -> tuple[list[tuple[str, float, float]], dict]:
    """Spearman over heads, bf16 vs fp32, of every head metric of the streaming probes' quick scan."""
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    import posprobe

    scans, seconds = {}, {}
    for dtype in ("float32", "bfloat16"):
        access = posprobe.load_model(model, device=device, dtype=dtype)
        start = time.perf_counter()
        scans[dtype] = posprobe.scan(access, probes=AGREEMENT_PROBES, budget=budget, progress=False)
        seconds[dtype] = time.perf_counter() - start
        del access
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    a, b = scans["float32"], scans["bfloat16"]
    rows = []
    for metric in a.metrics:
        x, y = a.heads[metric].to_numpy(float), b.heads[metric].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        flat = ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0
        rows.append((metric, float("nan") if flat else float(spearmanr(x[ok], y[ok]).statistic),
                     float(np.nanmax(np.abs(x - y)))))
    return rows, seconds


def render(speed: list[dict], agreement: list[tuple[str, float, float]], seconds: dict, header: str) -> str:
    from benchmarks.__main__ import table

    fp32, bf16 = seconds.get("float32", float("nan")), seconds.get("bfloat16", float("nan"))
    lines = [header, "", table(speed), "", "bf16 vs fp32, quick scan of the streaming probes "
             f"(fp32 {fp32:.1f} s, bf16 {bf16:.1f} s):",
             "", "| metric | Spearman over heads | max abs diff |", "|---|---|---|"]
    lines += [f"| {m} | {r:.4f} | {d:.3g} |" for m, r, d in agreement]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    import posprobe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget", default="quick", help="budget of the bf16-vs-fp32 agreement scans")
    parser.add_argument("--minutes", type=float, default=6.0, help="time guard for the speed cases")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check.md"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks.gpu_check: no CUDA device is visible (torch "
              f"{torch.__version__}); run it on a GPU machine, or pass --device cpu for a smoke run.", file=sys.stderr)
        return 2
    started = time.monotonic()
    speed = _speed_rows(args.model, args.device, args.tokens, args.batch, started + 60 * args.minutes)
    agreement, seconds = _agreement(args.model, args.device, args.budget)
    header = (f"# posprobe GPU check: {args.model}, bfloat16, {_gpu_name(args.device)}\n\n"
              f"{dt.date.today().isoformat()}; posprobe {getattr(posprobe, '__version__', '?')}, torch "
              f"{torch.__version__}; total {time.monotonic() - started:.0f} s")
    text = render(speed, agreement, seconds, header)
    from benchmarks.__main__ import write_report

    return write_report(args.out, text)


if __name__ == "__main__":
    sys.exit(main())
