"""Speed and memory of reading attention statistics: posprobe's streaming path vs the naive ways.

Owns one benchmark case per subprocess (so peak memory is the case's own): the bare SDPA forward pass (the floor),
the streaming head-statistics pass posprobe's scan runs (sampled queries as in a budget, and all queries; and
every streaming probe together, RoPE chunk decompositions included, as one scan pass of a text sample), eager
attention with `output_attentions=True` reducing the full patterns afterwards, and TransformerLens
`run_with_cache` with a names filter on `hook_pattern`. Peak memory is the process high-water mark (VmHWM) reset
after the model is loaded, so it is the pass's own peak on top of the weights (the one-time weights hash that
`scan()` records is computed before the reset and reported separately; so is a 64-token warm-up scan of the
streaming cases, which takes the first scan's one-time costs, as a warm-up pass does for the forward case). Run
alone: two torch processes fight over two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = ("forward", "stream_sampled", "stream_all", "stream_scan", "eager", "tl_cache")
STAT_PROBES = ["head_basics", "attention_entropy"]  # the statistics every naive case computes too
SCAN_PROBES = ["head_basics", "attention_entropy", "rope_frequency", "positional_heads"]  # every streaming probe


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(case: str, n_tokens: int, model_name: str, device: str | None = None, dtype: str | None = None,
             batch: int = 1, access: object = None) -> dict:
    """Run one case in this process and return its measurements. device / dtype: as `posprobe.load_model`
    (defaults: cuda + bfloat16 when available, else cpu + float32); batch: sequences per pass. On CUDA the peak is
    `torch.cuda.max_memory_allocated` over what the loaded model holds. `access`: reuse a loaded model."""
    import torch

    import posprobe
    from posprobe.probes.base import Budget
    from posprobe.tasks.text import text_ids

    torch.set_num_threads(os.cpu_count() or 2)
    access = access or posprobe.load_model(model_name, device=device, dtype=dtype)
    where = str(access.input_device)
    cuda = where.startswith("cuda")
    ids = torch.tensor([text_ids(access, n_tokens, seed=b) for b in range(batch)])
    access.run(ids[:1, :64])  # warm-up
    # scan() records a weights hash once per loaded model (provenance). Hashing reads every weight, paging in the
    # mmapped embedding / LM head a logits-free pass never touches (~640 MB file-backed RSS on Gemma 3 270M), so
    # it is done, and reported, before the measured region: the other cases never hash.
    loaded = _rss_mb()
    _reset_peak()
    start = time.perf_counter()
    access.weights_hash()
    hash_s, hash_peak = time.perf_counter() - start, _peak_mb() - loaded
    warmup_s = 0.0
    if case.startswith("stream"):
        # The first scan in a process also pays one-time costs no later pass repeats (lazy imports of the probe
        # modules, scipy and pandas code paths, the memory probe): a 64-token scan with the same probes takes
        # them outside the measured region, as the forward case's warm-up pass does; `warmup_s` reports them.
        start = time.perf_counter()
        posprobe.scan(access, probes=SCAN_PROBES if case == "stream_scan" else STAT_PROBES,
                      budget=Budget("warmup", context_lengths=(64,), n_texts=1, max_queries=64), progress=False)
        warmup_s = time.perf_counter() - start
    loaded = _rss_mb()
    _reset_peak()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        loaded_cuda = torch.cuda.memory_allocated()
    _sync(where)
    start = time.perf_counter()
    if case == "forward":
        access.run(ids)
    elif case in ("stream_sampled", "stream_all", "stream_scan"):
        queries = n_tokens if case == "stream_all" else 256
        budget = Budget("bench", context_lengths=(n_tokens,), n_texts=batch, max_queries=queries)
        probes = SCAN_PROBES if case == "stream_scan" else STAT_PROBES
        posprobe.scan(access, probes=probes, budget=budget, progress=False, batch_size=batch)
    elif case == "eager":
        model = access.model
        model.set_attn_implementation("eager")
        with torch.inference_mode():
            out = access.base(input_ids=ids.to(where), output_attentions=True, use_cache=False)
            for pattern in out.attentions:  # the same reductions, on the full cached patterns
                torch.special.entr(pattern).sum(-1).mean()
                pattern[..., 0].mean()
                torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1).mean()
        model.set_attn_implementation("sdpa")
    elif case == "tl_cache":
        bridge = posprobe.load_model(model_name, backend="transformer_lens").bridge
        del access
        loaded = _rss_mb()
        _reset_peak()
        start = time.perf_counter()
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_pattern"))
            for name in cache:
                pattern = cache[name]
                torch.special.entr(pattern).sum(-1).mean()
    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    _sync(where)
    seconds = time.perf_counter() - start
    extra = (torch.cuda.max_memory_allocated() - loaded_cuda) / 2**20 if cuda else _peak_mb() - loaded
    return {"case": case, "tokens": n_tokens, "batch": batch, "device": where,
            "dtype": str(next(access.model.parameters()).dtype).removeprefix("torch."), "seconds": seconds,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_mb(), "loaded_mb": loaded,
            "extra_peak_mb": extra, "weights_hash_s": hash_s, "weights_hash_peak_mb": hash_peak,
            "warmup_s": warmup_s}


def run_isolated(case: str, n_tokens: int, model_name: str, timeout: float = 1800, device: str | None = None,
                 dtype: str | None = None, batch: int = 1) -> dict:
    """Run one case in a fresh interpreter (one at a time) and parse its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.attention_stats", "--case", case, "--tokens", str(n_tokens),
           "--model", model_name, "--batch", str(batch)]
    cmd += ["--device", device] if device else []
    cmd += ["--dtype", dtype] if dtype else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "tokens": n_tokens, "batch": batch, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"case": case, "tokens": n_tokens, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", choices=CASES, required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--device", default=None, help="cpu | cuda | ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: per device)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per pass")
    args = parser.parse_args(argv)
    print(json.dumps(run_case(args.case, args.tokens, args.model, args.device, args.dtype, args.batch)))


if __name__ == "__main__":
    main()
