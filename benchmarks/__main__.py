"""`python -m benchmarks`: run the speed/memory cases one process at a time and write a markdown table.

Owns the benchmark entry point: for each context length, every case of `benchmarks.attention_stats` in its own
subprocess, then the table (wall time, ratio to the bare forward pass, peak memory over the loaded model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.attention_stats import CASES, run_isolated


def write_report(path: Path, text: str) -> int:
    """Write a benchmark's markdown to `path` (parents created) and print it; the exit status 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    return 0


def table(rows: list[dict]) -> str:
    floor = {(r["tokens"], r.get("batch", 1)): r["seconds"] for r in rows if r.get("case") == "forward"
             and "seconds" in r}
    lines = ["| tokens | batch | case | wall s | x forward | peak MB over loaded model | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["tokens"], r.get("batch", 1))
        if "error" in r:
            lines.append(f"| {key[0]} | {key[1]} | {r['case']} | error: {r['error']} | | | |")
            continue
        ratio = r["seconds"] / floor[key] if key in floor else float("nan")
        lines.append(f"| {key[0]} | {key[1]} | {r['case']} | {r['seconds']:.2f} | {ratio:.2f} | "
                     f"{r['extra_peak_mb']:.0f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="posprobe speed and memory benchmarks (run alone)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks.md"))
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: per device)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="sequences per pass (one row each)")
    args = parser.parse_args(argv)
    rows = []
    for n in args.tokens:
        for batch in args.batch:
            for case in args.cases:
                row = run_isolated(case, n, args.model, device=args.device, dtype=args.dtype, batch=batch)
                print(row, file=sys.stderr, flush=True)
                rows.append(row)
    where = ", ".join(sorted({f"{r['device']} {r['dtype']}" for r in rows if "device" in r})) or "?"
    text = f"# posprobe benchmarks ({args.model}; {where})\n\n{table(rows)}\n"
    return write_report(args.out, text)


if __name__ == "__main__":
    sys.exit(main())
