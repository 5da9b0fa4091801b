"""A saved scan's stored attention patterns as one HTML page (`posprobe patterns DIR --out patterns.html`).

Owns choosing what to export and writing it. `select` checks everything before a byte is written: that the scan
stores example patterns (the `pattern_examples` probe's tables, docs/probes/pattern_examples.md), the heads
(`parse_heads`: "L3H1,L5H0"; default `default_heads`: the top head of each of a few head metrics, previous-token,
induction, duplicate-token, sink and retrieval, those the scan has), the examples (by name or index) and the query
row. `patterns_html` / `write_patterns` render, per head and example, the `pattern` heatmap and the
`pattern_top_keys` strip of `posprobe.render.pattern_view`, with plotly.js inlined once (the page opens offline) or
loaded from its CDN; the file is written atomically. Computes nothing beyond ranking heads by a stored metric.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posprobe.errors import InputError, UnknownNameError

# metrics whose top head is shown when no heads are given, in this order (those the scan has)
DEFAULT_METRICS = ("previous_token_score", "induction_score", "duplicate_token_score", "sink_mass",
                   "retrieval_score")
_HEAD = re.compile(r"[Ll](\d+)[Hh](\d+)")
_STYLE = ("body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; } "
          "h2 { border-top: 1px solid #ccc; padding-top: 0.8em; } .why { color: #555; }")


@dataclass(frozen=True)
class PatternSelection:
    """What a page shows: heads with why each is there, the stored examples (indices) and the query row."""

    heads: tuple[tuple[int, int], ...]
    reasons: tuple[str, ...]  # one per head: "top previous_token_score = 0.98", or "asked for"
    examples: tuple[int, ...]
    query: int | None = None  # the row outlined and shown as top keys; negative from the end; None: the last token
    top_keys: bool = True  # also the top-keys strip of that row


def parse_heads(text: str) -> list[tuple[int, int]]:
    """Comma-separated "L<layer>H<head>" -> (layer, head) pairs, in order, repeats dropped."""
    pairs = []
    for item in (x.strip() for x in str(text).split(",") if x.strip()):
        match = _HEAD.fullmatch(item)
        if match is None:
            raise InputError(f"Cannot read head {item!r}: write heads as L<layer>H<head>, comma-separated, e.g. "
                             f"--heads L3H1,L5H0.")
        pairs.append((int(match[1]), int(match[2])))
    if not pairs:
        raise InputError(f"--heads {text!r} names no head; write e.g. --heads L3H1,L5H0, or leave it out for the "
                         f"top head of each of {', '.join(DEFAULT_METRICS)}.")
    return list(dict.fromkeys(pairs))


def require_examples(scan: Any, source: str | Path | None = None) -> None:
    """Raise InputError, saying why and how to get them, unless the scan stores example patterns."""
    from posprobe.render.pattern_view import has_examples, no_examples_why

    if has_examples(scan):
        return
    where = f"The scan {source}" if source is not None else "This scan"
    model = scan.meta.get("model") or "MODEL"
    raise InputError(
        f"{where} stores no example attention patterns, so there are no pattern figures to export: "
        f"{no_examples_why(scan)} (a scan made before posprobe stored example patterns has none either). Scan again "
        f"with them: posprobe scan --model {model} --examples on --out NEW_DIR (with this scan's --probes, --budget "
        f"and --what-if).")


def check_heads(scan: Any, heads: Sequence[tuple[int, int]]) -> None:
    """Raise InputError for a head the scan does not have, naming the model's range of heads."""
    have = set(zip(scan.heads["layer"].astype(int), scan.heads["head"].astype(int)))
    missing = [f"L{layer}H{head}" for layer, head in heads if (layer, head) not in have]
    if missing:
        info = scan.info
        raise InputError(
            f"Head {', '.join(missing)} is not in this scan: {scan.meta.get('model')} has {info.n_layers} layers x "
            f"{info.n_heads} heads (L0H0 to L{info.n_layers - 1}H{info.n_heads - 1}). Give heads in that range.")


def default_heads(scan: Any, metrics: Sequence[str] | None = None) -> list[tuple[tuple[int, int], str]]:
    """((layer, head), why) for the top head of each metric (default: those of DEFAULT_METRICS the scan has); a head
    that tops several metrics appears once, with all of them."""
    from posprobe.render.heads import numeric_metrics

    available = numeric_metrics(scan)
    if metrics is None:
        chosen_metrics = [m for m in DEFAULT_METRICS if m in available]
    else:
        chosen_metrics = list(dict.fromkeys(metrics))
        unknown = [m for m in chosen_metrics if m not in available]
        if unknown:
            raise UnknownNameError("head metric", unknown[0], available)
    tops: dict[tuple[int, int], list[str]] = {}
    for metric in chosen_metrics:
        ranked = scan.rank(metric, top=1).dropna(subset=[metric])
        if len(ranked):
            best = ranked.iloc[0]
            tops.setdefault((int(best["layer"]), int(best["head"])), []).append(
                f"top {metric} = {float(best[metric]):.3g}")
    if not tops:
        raise InputError(
            f"No head to show by default: this scan has no values of {', '.join(chosen_metrics or DEFAULT_METRICS)}"
            f" (its head metrics: {', '.join(available) or 'none'}). Name the heads, e.g. --heads L0H0,L1H2, or "
            f"pick metrics it has with --metrics.")
    return [(head, "; ".join(why)) for head, why in tops.items()]


def resolve_examples(scan: Any, examples: Sequence[str | int] | None) -> list[int]:
    """Stored example indices from names or indices (None / empty: every stored example), in the order given."""
    from posprobe.render.pattern_view import examples_table

    table = examples_table(scan)
    indices = [int(i) for i in table["example"]]
    names = [str(n) for n in table["name"]]
    if not examples:
        return indices
    out = []
    for item in examples:
        text = str(item).strip()
        if text in names:
            out.append(indices[names.index(text)])
        elif re.fullmatch(r"-?\d+", text):
            if int(text) not in indices:
                stored = ", ".join(f"{i} {n}" for i, n in zip(indices, names))
                raise InputError(f"Example {text} is out of range: this scan stores {len(indices)} examples "
                                 f"({stored}). Give --example as one of those indices or names.")
            out.append(int(text))
        else:
            raise UnknownNameError("stored example", text, names)
    return list(dict.fromkeys(out))


def query_row(scan: Any, example: int, query: int | None) -> int:
    """The query position on one example: None -> the last token, negative -> from the end; checked."""
    from posprobe.render.pattern_view import examples_table

    table = examples_table(scan)
    row = table[table["example"] == example].iloc[0]
    n = int(row["n_tokens"])
    if query is None:
        return n - 1
    position = query + n if query < 0 else query
    if not 0 <= position < n:
        raise InputError(f"--query {query} is not a position of example {example} ({row['name']}, {n} tokens: 0 to "
                         f"{n - 1}, or -{n} to -1 from the end). Give a query every chosen example has, or fewer "
                         f"--example.")
    return position


def select(scan: Any, heads: str | Sequence[tuple[int, int]] | None = None, examples: Sequence[str | int] | None = None,
           query: int | None = None, metrics: Sequence[str] | None = None, top_keys: bool = True,
           source: str | Path | None = None) -> PatternSelection:
    """Check and resolve what to export; every problem raises here (InputError / UnknownNameError)."""
    require_examples(scan, source)
    if heads is None:
        chosen = default_heads(scan, metrics)
    else:
        pairs = parse_heads(heads) if isinstance(heads, str) else list(dict.fromkeys(map(tuple, heads)))
        chosen = [((int(layer), int(head)), "asked for") for layer, head in pairs]
    check_heads(scan, [head for head, _ in chosen])
    indices = resolve_examples(scan, examples)
    for example in indices:
        query_row(scan, example, query)
    return PatternSelection(tuple(head for head, _ in chosen), tuple(why for _, why in chosen), tuple(indices),
                            query, top_keys)


def figures(scan: Any, selection: PatternSelection) -> list[tuple[tuple[int, int], str, list[Any]]]:
    """(head, why, [figure, ...]) per head: per example its `pattern` heatmap (the query row outlined) and, with
    `top_keys`, the `pattern_top_keys` strip of that row."""
    from posprobe.render.pattern_view import pattern, pattern_top_keys

    out = []
    for (layer, head), why in zip(selection.heads, selection.reasons):
        figs = []
        for example in selection.examples:
            row = query_row(scan, example, selection.query)
            figs.append(pattern(scan, layer, head, example, query=row))
            if selection.top_keys:
                figs.append(pattern_top_keys(scan, layer, head, example, query=row))
        out.append(((layer, head), why, figs))
    return out


def patterns_html(scan: Any, selection: PatternSelection, *, plotlyjs: str = "inline") -> str:
    """The page as one string. plotlyjs: "inline" (plotly.js in the page, opens offline) or "cdn" (loaded from the
    network; a much smaller file)."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    from posprobe.render.compare import scan_condition
    from posprobe.render.pattern_view import examples_table

    if plotlyjs not in ("inline", "cdn"):
        raise InputError(f"plotlyjs is 'inline' or 'cdn'; got {plotlyjs!r}.")
    meta = scan.meta
    condition = scan_condition(scan)
    title = f"attention patterns of {meta.get('model')}" + (f" · {condition}" if condition else "")
    table = examples_table(scan)
    names = {int(i): str(n) for i, n in zip(table["example"], table["name"])}
    shown = ", ".join(names.get(i, str(i)) for i in selection.examples)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class=\"why\">budget {html.escape(str((meta.get('budget') or {}).get('name')))}, seed "
             f"{html.escape(str(meta.get('seed')))}, created {html.escape(str(meta.get('created')))}; examples: "
             f"{html.escape(shown)}. Blank cells: keys a query cannot see, or keys outside its stored top k.</p>"]
    config = {"displaylogo": False, "responsive": True}
    first = True
    for (layer, head), why, figs in figures(scan, selection):
        parts.append(f"<h2>L{layer} H{head}</h2><p class=\"why\">{html.escape(why)}</p>")
        for fig in figs:
            script: bool | str = "cdn" if plotlyjs == "cdn" and first else False
            parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=script, include_mathjax=False,
                                     config=config))
            first = False
    head_script = f"<script type=\"text/javascript\">{get_plotlyjs()}</script>" if plotlyjs == "inline" else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style>{head_script}</head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_patterns(scan: Any, path: str | Path, selection: PatternSelection, *, plotlyjs: str = "inline") -> Path:
    """Write `patterns_html(scan, selection)` to `path` atomically (the page is built before the file is opened)."""
    from posprobe._io import check_output_file, write_text_atomic

    check_output_file(path)
    text = patterns_html(scan, selection, plotlyjs=plotlyjs)
    return write_text_atomic(path, text)


__all__ = ["DEFAULT_METRICS", "PatternSelection", "check_heads", "default_heads", "figures", "parse_heads",
           "patterns_html", "query_row", "require_examples", "resolve_examples", "select", "write_patterns"]
