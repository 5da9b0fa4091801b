"""`python -m benchmarks`: run the speed/memory cases one process at a time and write a markdown table.

Owns the benchmark entry point: for each context length, every case of `benchmarks.attention_stats` in its own
subprocess, then the table (wall time, ratio to the bare forward pass, peak memory over the loaded model).
A subset runs alone with `--only CASE:N,N,...` (repeatable) or a named `--suite` (`--list` shows them):

    python -m benchmarks --suite stream                      # forward vs stream_scan at 512 ... 4096
    python -m benchmarks --suite stream_long --repeat 1      # forward vs stream_scan at 8192, 16384, 32768
    python -m benchmarks --only forward:512,1024 --only stream_scan:512,1024 --repeat 3
    python -m benchmarks --suite retrieval_long long_scan    # benchmarks.retrieval_modes at 4k / 16k, the long scan
    python -m benchmarks --suite passkey_long                # a passkey sweep at the model's full context

`--repeat R` runs every case R times (fresh process each) and keeps the fastest (best of R: the box is shared).
The last three suites are the reports of `benchmarks.retrieval_modes`, `benchmarks.long_scan` and
`benchmarks.passkey_long`, written next to `--out`.
"""

from __future__ import annotations

import argparse
import subprocess
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


SHORT, LONG = (512, 1024, 2048, 4096), (8192, 16384, 32768)
# named subsets: (case, tokens) pairs of attention_stats, or another benchmark module run as its own command
SUITES: dict[str, list[tuple[str, int]] | list[str]] = {
    "stream": [(case, n) for n in SHORT for case in ("forward", "stream_scan")],
    "stream_long": [(case, n) for n in LONG for case in ("forward", "stream_scan")],
    "retrieval_long": ["benchmarks.retrieval_modes", "--lengths", "4096", "16384"],
    "long_scan": ["benchmarks.long_scan"],
    "passkey_long": ["benchmarks.passkey_long"],
}


def parse_only(items: list[str]) -> list[tuple[str, int]]:
    """`CASE:N,N,...` items -> (case, tokens) pairs, in the order given."""
    pairs = []
    for item in items:
        case, _, lengths = item.partition(":")
        if case not in CASES or not lengths:
            raise SystemExit(f"--only takes CASE:N[,N...] with CASE one of {', '.join(CASES)}; got {item!r}")
        pairs += [(case, int(n)) for n in lengths.split(",") if n]
    return pairs


def best_of(rows: list[dict]) -> dict:
    """The fastest of repeated runs of one case (an error only when every run failed)."""
    good = [r for r in rows if "error" not in r]
    return min(good, key=lambda r: r["seconds"]) if good else rows[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="posprobe speed and memory benchmarks (run alone)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(SHORT))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--only", action="append", default=[], metavar="CASE:N,N",
                        help="run just these cases at these lengths (repeatable), instead of --tokens x --cases")
    parser.add_argument("--suite", nargs="+", default=[], choices=list(SUITES), help="named subsets (see --list)")
    parser.add_argument("--list", action="store_true", help="print the suites and exit")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (fresh process each); the fastest "
                        "is reported")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks.md"))
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: per device)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="sequences per pass (one row each)")
    args = parser.parse_args(argv)
    if args.list:
        for name, items in SUITES.items():
            shown = [f"{c}:{n}" for c, n in items] if isinstance(items[0], tuple) else items
            print(f"{name}: {' '.join(str(x) for x in shown)}")
        return 0
    pairs = parse_only(args.only)
    commands = []
    for name in args.suite:
        items = SUITES[name]
        if isinstance(items[0], tuple):
            pairs += items  # type: ignore[arg-type]
        else:
            commands.append([str(x) for x in items])
    if not pairs and not commands:
        pairs = [(case, n) for n in args.tokens for case in args.cases]
    for command in commands:  # the other benchmark modules, one after the other, each its own process
        module = command[0].rsplit(".", 1)[-1]
        out = args.out.with_name(f"{module}.md")
        subprocess.run([sys.executable, "-m", *command, "--model", args.model, "--out", str(out)], check=False)
    if not pairs:
        return 0
    rows = []
    for case, n in pairs:
        for batch in args.batch:
            runs = [run_isolated(case, n, args.model, device=args.device, dtype=args.dtype, batch=batch)
                    for _ in range(max(1, args.repeat))]
            row = best_of(runs)
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    where = ", ".join(sorted({f"{r['device']} {r['dtype']}" for r in rows if "device" in r})) or "?"
    text = f"# posprobe benchmarks ({args.model}; {where})\n\n{table(rows)}\n"
    return write_report(args.out, text)


if __name__ == "__main__":
    sys.exit(main())
