"""Stored attention patterns on a few short example inputs, for the pattern viewer (docs/probes/pattern_examples.md).

Owns the example inputs (`build_examples`: seeded natural text, a repeated random-token block, a needle prompt, each
about `n_tokens` long), the storage layout of their patterns and its size estimate (`estimate_bytes`,
`choose_layout`), and three extra tables:

- `pattern_examples.patterns`: one row per stored attention entry, long format, columns `example` (int8, index into
  the examples table), `layer`, `head`, `query`, `key` (int16) and `weight` (float16, the attention probability
  a[query, key]). For each (example, layer, head, query) the stored keys are that query's `keys_per_query`
  heaviest visible keys (causal, and inside the sliding window on sliding-window layers), heaviest first. With
  `keys_per_query >= n_tokens` every visible key is stored: the full rows, in the same layout. Keys that are not
  stored have a smaller weight than every stored key of their row.
- `pattern_examples.tokens`: `example`, `position`, `token_id`, `token` (the token's text, decoded alone, special
  tokens kept: "<bos>", " the").
- `pattern_examples.examples`: `example`, `name`, `description`, `n_tokens`, `keys_per_query`, `layout`
  ("full" or "top_k").

The patterns are read from the scan's own attention capture (`LayerCapture.pattern_chunks`, computed from the
model's attention call, the same source every probe reads), one chunk of queries at a time; no [n, n] pattern is
kept beyond a chunk and no activation cache is built. A task probe: it runs one pass per example after the shared
text passes. Budget: the estimate of the stored bytes (`BYTES_PER_ENTRY` per entry) decides: full rows when they
fit the budget knob `max_megabytes`, else the top `top_k` keys per query, else the probe is skipped (off for big
models) unless `enabled=True` forces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from posprobe.access import ModelAccess, ModelInfo, Tap, causal_key_mask
from posprobe.errors import InputError, ProbeError, UnknownNameError
from posprobe.probes.base import ProbeResult, ScanContext, TaskProbe, per_level

EXAMPLE_KINDS = ("text", "repeated", "needle")
# bytes of one stored entry in memory: example int8 + layer, head, query, key int16 + weight float16 (Parquet
# compresses the repeated example / layer / head / query columns, so a saved scan is smaller)
BYTES_PER_ENTRY = 11


@dataclass(frozen=True)
class PatternExamplesConfig:
    BUDGET_KNOBS: ClassVar[dict[str, dict[str, Any]]] = {"max_megabytes": per_level(24, 48, 128)}
    # None: stored when the size estimate fits max_megabytes; True: always (top_k keys when full rows do not fit);
    # False: never (the probe is skipped)
    enabled: bool | None = None
    examples: tuple[str, ...] = EXAMPLE_KINDS  # which inputs, in this order: "text", "repeated", "needle"
    n_tokens: int = 128  # tokens per example: long enough for a pattern, short enough to label every token
    top_k: int = 16  # keys kept per query when full rows do not fit (16 hold nearly all the mass of a sharp head)
    full_rows: bool | None = None  # None: full rows when their estimate fits the budget; True / False force it
    max_megabytes: int | float | None = None  # MB stored at most; None: the budget's (quick 24, standard 48, full 128)
    needle_depth: float = 0.5  # where the needle goes in its haystack (0 = start, 1 = end)
    # the needle prompt grows past n_tokens only where header + needle + question do not fit (byte tokenizers)
    max_needle_tokens: int = 512
    chunk_size: int = 256  # queries per pattern chunk


@dataclass(frozen=True)
class Example:
    """One example input: its name, a one-line description and the token ids that are run."""

    name: str
    description: str
    input_ids: tuple[int, ...]


def _config_problems(config: PatternExamplesConfig) -> list[str]:
    problems = []
    unknown = [e for e in config.examples if e not in EXAMPLE_KINDS]
    if unknown:
        raise UnknownNameError("pattern example", unknown[0], EXAMPLE_KINDS)
    if not config.examples or len(set(config.examples)) != len(config.examples):
        problems.append(f"examples must name each of {EXAMPLE_KINDS} at most once, and at least one; got "
                        f"{config.examples}")
    if not 8 <= config.n_tokens <= 4096:
        problems.append(f"n_tokens must lie in [8, 4096] (the viewer labels every token); got {config.n_tokens}")
    if config.top_k < 1 or config.chunk_size < 1:
        problems.append(f"top_k and chunk_size must be >= 1; got {config.top_k} and {config.chunk_size}")
    if config.max_megabytes is not None and not config.max_megabytes > 0:
        problems.append(f"max_megabytes must be > 0; got {config.max_megabytes}")
    if not 0.0 <= config.needle_depth <= 1.0:
        problems.append(f"needle_depth must lie in [0, 1]; got {config.needle_depth}")
    return problems


def entries_per_head(info: ModelInfo, layer: int, n_tokens: int, keys_per_query: int) -> int:
    """Stored entries of one head of `layer` on an n-token example: sum over queries q of min(k, keys q sees)."""
    window = info.layers[layer].sliding_window
    visible = np.arange(1, n_tokens + 1)
    if window is not None:
        visible = np.minimum(visible, window)
    return int(np.minimum(visible, keys_per_query).sum())


def estimate_bytes(info: ModelInfo, lengths: list[int], keys_per_query: int) -> int:
    """In-memory bytes of the patterns table for examples of these lengths (BYTES_PER_ENTRY per entry): exact,
    unless some weights are exactly 0 (not stored), so an upper bound."""
    entries = sum(entries_per_head(info, layer, n, keys_per_query) * info.n_heads
                  for n in lengths for layer in range(info.n_layers))
    return entries * BYTES_PER_ENTRY


def choose_layout(info: ModelInfo, config: PatternExamplesConfig, lengths: list[int]) -> tuple[str, int, str | None]:
    """(layout "full" / "top_k", keys per query, why nothing fits or None), from the size estimate.

    Full rows when `full_rows` is True or (None and) their estimate fits max_megabytes; else top_k keys per query.
    The third item says why even that does not fit (None when it does, or when `enabled=True` forces storing).
    """
    # max_megabytes None (a config not resolved against a budget, e.g. the support matrix): the standard level's
    megabytes = (config.max_megabytes if config.max_megabytes is not None
                 else PatternExamplesConfig.BUDGET_KNOBS["max_megabytes"]["standard"])
    budget = megabytes * 2**20
    longest = max(lengths)
    full = estimate_bytes(info, lengths, longest)
    if config.full_rows or (config.full_rows is None and full <= budget):
        return "full", longest, None
    top = estimate_bytes(info, lengths, config.top_k)
    if top <= budget or config.enabled:
        return "top_k", config.top_k, None
    return "top_k", config.top_k, (
        f"the stored patterns would take ~{top / 2**20:.1f} MB ({info.n_layers * info.n_heads} heads x "
        f"{len(lengths)} examples x top {config.top_k} keys per query), over this budget's {megabytes:g} "
        f"MB; store them anyway with configs={{'pattern_examples': PatternExamplesConfig(enabled=True)}} or raise "
        f"max_megabytes (Budget probes={{'pattern_examples': {{'max_megabytes': ...}}}})")


def skip_reason(info: ModelInfo, config: PatternExamplesConfig) -> str | None:
    """Why the examples are not stored for this model (None: they are). Raises ProbeError for a bad config."""
    problems = _config_problems(config)
    if problems:
        raise ProbeError("PatternExamplesConfig is invalid: " + "; ".join(problems) + ". Fix the config, e.g. "
                         "get_probe('pattern_examples').Config(n_tokens=128).")
    if config.enabled is False:
        return "off (PatternExamplesConfig(enabled=False))"
    n = min(config.n_tokens, info.max_positions or config.n_tokens)
    return choose_layout(info, config, [n] * len(config.examples))[2]


# --- example inputs --------------------------------------------------------------------------------------------
def _text_example(access: ModelAccess, n: int, seed: int) -> Example:
    from posprobe.tasks.text import SOURCE_NAME, text_ids

    ids = text_ids(access, n, seed=seed * 7_919 + 101)
    return Example("text", f"seeded generated sentences ({SOURCE_NAME}, seed {seed})", tuple(ids))


def _repeated_example(access: ModelAccess, n: int, seed: int) -> Example:
    from posprobe.probes.induction import bos_prefix, ordinary_token_ids, repeated_random_tokens

    pool = ordinary_token_ids(access)
    prefix = len(bos_prefix(access))
    length = min((n - prefix) // 2, len(pool))
    if length < 2:
        raise InputError(f"A repeated block needs at least 2 distinct ordinary tokens and {prefix + 4} positions; "
                         f"this model allows {len(pool)} tokens and n_tokens is {n}.")
    ids = repeated_random_tokens(access, length, 1, seed, pool)[0]
    return Example("repeated", f"[BOS] + a random block of {length} distinct tokens + the same block (the induction "
                   f"probe's construction, seed {seed}); an induction head attends to key i - {length - 1}",
                   tuple(int(i) for i in ids))


def _needle_example(access: ModelAccess, n: int, seed: int, config: PatternExamplesConfig) -> Example:
    from posprobe.tasks.needle import make_needle_trial

    limit = min(config.max_needle_tokens, access.info.max_positions or config.max_needle_tokens)
    error: Exception | None = None
    length = n
    while length <= limit:
        try:
            trial = make_needle_trial(access, length, config.needle_depth, seed)
            break
        except InputError as exc:  # header + needle + question do not fit: grow the haystack's room
            error, length = exc, length + 64
    else:
        raise InputError(f"The needle prompt does not fit in {limit} tokens with this tokenizer ({error}); raise "
                         f"max_needle_tokens or leave 'needle' out of examples.")
    start, stop = trial.needle_span
    a0, a1 = trial.answer_span
    return Example("needle", f"magic-number needle at depth {trial.actual_depth:.2f} (needle tokens "
                   f"{start}-{stop - 1}, answer tokens {a0}-{a1 - 1}); the last token asks for the number",
                   trial.input_ids)


def build_examples(access: ModelAccess, config: PatternExamplesConfig, seed: int) -> tuple[list[Example],
                                                                                           dict[str, str]]:
    """The configured example inputs (seeded by the scan seed), and {name: reason} for those that cannot be built."""
    n = min(config.n_tokens, access.info.max_positions or config.n_tokens)
    built, dropped = [], {}
    for name in config.examples:
        try:
            if name == "text":
                built.append(_text_example(access, n, seed))
            elif name == "repeated":
                built.append(_repeated_example(access, n, seed))
            else:
                built.append(_needle_example(access, n, seed, config))
        except InputError as exc:
            dropped[name] = str(exc)
    return built, dropped


def token_strings(access: ModelAccess, ids: tuple[int, ...]) -> list[str]:
    """Each token's text decoded alone, special tokens kept (a label for the viewer)."""
    tok = access.tokenizer
    out = []
    for i in ids:
        try:
            text = tok.decode([int(i)], skip_special_tokens=False)
        except TypeError:  # a tokenizer without the keyword
            text = tok.decode([int(i)])
        out.append(text if isinstance(text, str) else str(i))
    return out


# --- the passes ------------------------------------------------------------------------------------------------
def top_entries(probs: Tensor, queries: Tensor, keys_per_query: int, sliding_window: int | None) -> tuple[Tensor, ...]:
    """(head, query, key, weight) of the heaviest `keys_per_query` visible keys of each row of probs [H, cq, n],
    heaviest first within a row; keys a query cannot see (causal mask, sliding window) and weights of exactly 0 are
    never stored."""
    n_heads, _, n = probs.shape
    k = min(keys_per_query, n)
    weight, key = probs.topk(k, dim=-1, sorted=True)  # [H, cq, k]
    allowed = causal_key_mask(queries, n, sliding_window)  # [cq, n]
    keep = allowed[None].expand(n_heads, -1, -1).gather(-1, key) & (weight > 0)
    head = torch.arange(n_heads, device=probs.device)[:, None, None].expand_as(key)
    query = queries.to(probs.device)[None, :, None].expand_as(key)
    return head[keep], query[keep], key[keep], weight[keep]


def run_pattern_examples(ctx: ScanContext, config: PatternExamplesConfig) -> ProbeResult:
    config = ctx.budgeted(PROBE.name, config)
    access, info = ctx.access, ctx.info
    examples, dropped = build_examples(access, config, ctx.seed)
    while examples:  # the needle may have grown past n_tokens: drop examples from the end until the budget holds
        layout, keys_per_query, over = choose_layout(info, config, [len(e.input_ids) for e in examples])
        if over is None:
            break
        dropped[examples[-1].name] = f"not stored: {over}"
        examples.pop()
    if not examples:
        return ProbeResult(summary={"examples": [], "dropped": dropped})
    columns: dict[str, list[np.ndarray]] = {c: [] for c in ("example", "layer", "head", "query", "key", "weight")}

    for index, example in enumerate(ctx.progress(examples, "pattern examples")):
        ids = torch.tensor([example.input_ids], dtype=torch.long)

        def on_layer(cap: Any, index: int = index) -> None:
            parts: list[tuple[Tensor, ...]] = []
            for queries, probs in cap.pattern_chunks(config.chunk_size):
                parts.append(top_entries(probs[0], queries, keys_per_query, cap.info.sliding_window))
            head, query, key, weight = (torch.cat(p).cpu() for p in zip(*parts))
            columns["example"].append(np.full(len(head), index, dtype=np.int8))
            columns["layer"].append(np.full(len(head), cap.layer, dtype=np.int16))
            columns["head"].append(head.numpy().astype(np.int16))
            columns["query"].append(query.numpy().astype(np.int16))
            columns["key"].append(key.numpy().astype(np.int16))
            columns["weight"].append(weight.float().numpy().astype(np.float16))

        access.run(ids, taps={Tap.PATTERN}, on_layer=on_layer)

    patterns = pd.DataFrame({c: np.concatenate(v) for c, v in columns.items()})
    patterns = patterns.sort_values(["example", "layer", "head", "query"], kind="stable").reset_index(drop=True)
    tokens = pd.DataFrame([
        {"example": index, "position": pos, "token_id": int(tid), "token": text}
        for index, example in enumerate(examples)
        for pos, (tid, text) in enumerate(zip(example.input_ids, token_strings(access, example.input_ids)))])
    tokens = tokens.astype({"example": "int8", "position": "int16", "token_id": "int64", "token": str})
    table = pd.DataFrame([{"example": index, "name": e.name, "description": e.description,
                           "n_tokens": len(e.input_ids), "keys_per_query": min(keys_per_query, len(e.input_ids)),
                           "layout": layout} for index, e in enumerate(examples)])
    table = table.astype({"example": "int8", "n_tokens": "int64", "keys_per_query": "int64"})
    summary = {
        "examples": [e.name for e in examples],
        "layout": layout,
        "keys_per_query": keys_per_query,
        "entries": len(patterns),
        "bytes": int(patterns.memory_usage(index=False).sum()),
        "estimated_bytes": estimate_bytes(info, [len(e.input_ids) for e in examples], keys_per_query),
        "max_megabytes": config.max_megabytes,
        "dropped": dropped,
    }
    return ProbeResult(tables={"patterns": patterns, "tokens": tokens, "examples": table}, summary=summary)


PROBE = TaskProbe(
    "pattern_examples", PatternExamplesConfig,
    "attention patterns of every head on a few short example inputs (text, repeated random block, needle), stored "
    "for the pattern viewer: full float16 rows or the top keys per query, as the size budget allows",
    run_pattern_examples, skip=skip_reason)

__all__ = ["BYTES_PER_ENTRY", "EXAMPLE_KINDS", "PROBE", "Example", "PatternExamplesConfig", "build_examples",
           "choose_layout", "estimate_bytes", "run_pattern_examples", "token_strings", "top_entries"]
