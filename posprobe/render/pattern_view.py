"""The attention-pattern viewer: one head's stored pattern on one example input, and the top keys of one query.

Owns pure functions over the tables of the `pattern_examples` probe (layout: docs/probes/pattern_examples.md):
`example_names`, `example_tokens`, `pattern_matrix` (the stored [query, key] weights, NaN where nothing is stored),
`top_keys` (one query's heaviest stored keys with their tokens and distances), and the figures `pattern` (a
heatmap with token labels on both axes; hover: query token, key token, weight, distance = query - key) and
`pattern_top_keys` (a bar strip of one query row). Reads the scan's tables only; computes nothing beyond
reshaping them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from posprobe.errors import InputError, UnknownNameError

PROBE = "pattern_examples"
PATTERNS = f"{PROBE}.patterns"
TOKENS = f"{PROBE}.tokens"
EXAMPLES = f"{PROBE}.examples"
TOP_KEYS = 10  # bars of the top-keys strip
# how whitespace and empty tokens are written in labels (a label must be visible and unique)
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def has_examples(scan: Any) -> bool:
    """True when the scan stores example patterns (a scan without the probe, or an old scan, has none)."""
    return all(name in scan.tables for name in (PATTERNS, TOKENS, EXAMPLES)) and len(scan.tables[EXAMPLES]) > 0


def no_examples_why(scan: Any) -> str:
    """Why the scan stores no example patterns, from its provenance: the probe was skipped (and the reason, e.g. the
    size budget), it ran but dropped every example, or it did not run (not asked for, or an older scan)."""
    skipped = (scan.meta.get("skipped") or {}).get(PROBE)
    dropped = ((scan.meta.get("summaries") or {}).get(PROBE) or {}).get("dropped")
    if skipped:
        return f"the {PROBE} probe was skipped: {skipped}"
    if dropped:
        return f"the {PROBE} probe ran but could store none of its examples: " + "; ".join(
            f"{name}: {reason}" for name, reason in dropped.items())
    return f"the {PROBE} probe did not run in this scan"


def no_examples_reason(scan: Any) -> str:
    """A sentence saying why the scan has no example patterns and how to get them."""
    return (f"This scan stores no example attention patterns ({no_examples_why(scan)}). Scan again with the probe, "
            f"e.g. posprobe.scan(model, probes=[..., '{PROBE}']) or posprobe scan --probes {PROBE}.")


def _require(scan: Any) -> None:
    if not has_examples(scan):
        raise InputError(no_examples_reason(scan))


def examples_table(scan: Any) -> pd.DataFrame:
    """The stored examples: `example` (index), `name`, `description`, `n_tokens`, `keys_per_query`, `layout`."""
    _require(scan)
    return scan.tables[EXAMPLES].sort_values("example").reset_index(drop=True)


def example_names(scan: Any) -> list[str]:
    """Names of the stored examples in order ([] when the scan has none)."""
    return [str(n) for n in examples_table(scan)["name"]] if has_examples(scan) else []


def resolve_example(scan: Any, example: str | int | None) -> int:
    """The index of an example given by name or index (None: the first)."""
    table = examples_table(scan)
    names = [str(n) for n in table["name"]]
    if example is None:
        return int(table["example"].iloc[0])
    if isinstance(example, str) and example in names:
        return int(table["example"].iloc[names.index(example)])
    if isinstance(example, (int, np.integer)) and not isinstance(example, bool) and int(example) in set(
            table["example"].astype(int)):
        return int(example)
    raise UnknownNameError("stored example", str(example), names)


def _example_row(scan: Any, index: int) -> pd.Series:
    table = examples_table(scan)
    return table[table["example"] == index].iloc[0]


def visible_token(token: str) -> str:
    """A token's text with whitespace made visible ("␣the"), "∅" for an empty one."""
    return "".join(_VISIBLE.get(ch, ch) for ch in str(token)) or "∅"


def example_tokens(scan: Any, example: str | int | None = None) -> list[str]:
    """The example's token texts by position (as decoded, whitespace kept)."""
    index = resolve_example(scan, example)
    tokens = scan.tables[TOKENS]
    rows = tokens[tokens["example"] == index].sort_values("position")
    return [str(t) for t in rows["token"]]


def token_labels(tokens: list[str]) -> list[str]:
    """Axis labels "position:token" (unique, so repeated tokens keep their own row and column)."""
    return [f"{pos}:{visible_token(tok)}" for pos, tok in enumerate(tokens)]


def parse_label(label: Any) -> int | None:
    """The position of an axis label "position:token" (None for anything else)."""
    head, _, _ = str(label).partition(":")
    return int(head) if head.isdigit() else None


def _check_head(scan: Any, layer: int, head: int) -> None:
    heads = scan.heads
    if not ((heads["layer"] == layer) & (heads["head"] == head)).any():
        raise UnknownNameError("head", f"L{layer}H{head}", [f"L{r.layer}H{r.head}" for r in
                                                            heads[["layer", "head"]].head(20).itertuples()])


def _entries(scan: Any, layer: int, head: int, index: int) -> pd.DataFrame:
    table = scan.tables[PATTERNS]
    return table[(table["example"] == index) & (table["layer"] == layer) & (table["head"] == head)]


def pattern_matrix(scan: Any, layer: int, head: int, example: str | int | None = None) -> np.ndarray:
    """The stored weights [query, key] of one head on one example (float64), NaN where nothing is stored: keys a
    query cannot see and, in the top-k layout, keys outside its top k."""
    _require(scan)
    _check_head(scan, layer, head)
    index = resolve_example(scan, example)
    n = int(_example_row(scan, index)["n_tokens"])
    z = np.full((n, n), np.nan)
    rows = _entries(scan, layer, head, index)
    z[rows["query"].to_numpy(dtype=int), rows["key"].to_numpy(dtype=int)] = rows["weight"].to_numpy(dtype=float)
    return z


def top_keys(scan: Any, layer: int, head: int, example: str | int | None = None, query: int | None = None,
             k: int = TOP_KEYS) -> pd.DataFrame:
    """The `k` heaviest stored keys of one query (default: the last): `key`, `token`, `weight`, `distance`
    (query - key), heaviest first."""
    _require(scan)
    _check_head(scan, layer, head)
    index = resolve_example(scan, example)
    tokens = example_tokens(scan, index)
    query = len(tokens) - 1 if query is None else int(query)
    if not 0 <= query < len(tokens):
        raise InputError(f"query {query} is not a position of example {index} ({len(tokens)} tokens: 0 to "
                         f"{len(tokens) - 1}).")
    rows = _entries(scan, layer, head, index)
    rows = rows[rows["query"] == query]
    rows = rows.assign(weight=rows["weight"].astype(float)).sort_values(["weight", "key"], ascending=[False, True],
                                                                          kind="stable").head(k)
    keys = rows["key"].to_numpy(dtype=int)
    return pd.DataFrame({"key": keys, "token": [tokens[j] for j in keys], "weight": rows["weight"].to_numpy(),
                         "distance": query - keys})


def pattern(scan: Any, layer: int, head: int, example: str | int | None = None,
            query: int | None = None) -> go.Figure:
    """Heatmap of one head's attention on a stored example: queries top to bottom, keys left to right, token labels
    on both axes; hover gives the query token, key token, weight and distance (query - key). `query` outlines one
    row (the one the top-keys strip shows)."""
    index = resolve_example(scan, example)
    z = pattern_matrix(scan, layer, head, index)
    row = _example_row(scan, index)
    labels = token_labels(example_tokens(scan, index))
    n = len(labels)
    distance = (np.arange(n)[:, None] - np.arange(n)[None, :]).astype(np.int16)  # half the bytes of int32
    stored = z[np.isfinite(z)]
    fig = go.Figure(go.Heatmap(
        z=z.astype(np.float32), x=labels, y=labels, customdata=distance, colorscale="Blues", zmin=0,
        zmax=float(stored.max()) if stored.size else 1.0, hoverongaps=False, name="attention",
        colorbar={"title": "weight", "thickness": 12},
        hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.4f}<br>distance %{customdata}<extra></extra>"))
    layout = str(row["layout"])
    kept = "full rows" if layout == "full" else f"top {int(row['keys_per_query'])} keys per query (blank: not stored)"
    tick = {"tickfont": {"size": 8 if n <= 160 else 6}, "tickangle": -90}
    fig.update_layout(
        title={"text": f"{row['name']}: L{layer} H{head}<br><sup>{row['description']} · {kept}</sup>",
               "font": {"size": 15}},
        height=max(480, min(900, 260 + 4 * n)), margin={"l": 90, "r": 20, "t": 80, "b": 90},
        xaxis={"title": "key", "type": "category", "side": "bottom", **tick},
        yaxis={"title": "query", "type": "category", "autorange": "reversed", **{**tick, "tickangle": 0}},
        plot_bgcolor="white")
    if query is not None and 0 <= int(query) < n:
        fig.add_shape(query_shape(int(query)))
    return fig


def query_shape(query: int, color: str = "#e4572e") -> dict[str, Any]:
    """A rectangle shape outlining one query row of the pattern heatmap."""
    return {"type": "rect", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": query - 0.5, "y1": query + 0.5,
            "line": {"color": color, "width": 2}, "fillcolor": "rgba(0,0,0,0)"}


def pattern_top_keys(scan: Any, layer: int, head: int, example: str | int | None = None, query: int | None = None,
                     k: int = TOP_KEYS) -> go.Figure:
    """A bar strip of one query's heaviest stored keys (default query: the last token), heaviest on top; hover
    gives the key token, weight and distance. The subtitle says how much of the row's mass the bars hold."""
    index = resolve_example(scan, example)
    tokens = example_tokens(scan, index)
    query = len(tokens) - 1 if query is None else int(query)
    table = top_keys(scan, layer, head, index, query, k)
    labels = [f"{j}:{visible_token(t)}" for j, t in zip(table["key"], table["token"])]
    entries = _entries(scan, layer, head, index)
    row_mass = float(entries.loc[entries["query"] == query, "weight"].astype(float).sum())
    fig = go.Figure(go.Bar(
        x=table["weight"], y=labels, orientation="h", customdata=table["distance"], marker={"color": "#3b6fb6"},
        name="weight", hovertemplate="key %{y}<br>weight %{x:.4f}<br>distance %{customdata}<extra></extra>"))
    shown = float(table["weight"].sum())
    fig.update_layout(
        title={"text": f"top keys of query {query}:{visible_token(tokens[query])} · L{layer} H{head}<br><sup>the "
                       f"{len(table)} bars hold {shown:.3f} of the row's attention (stored: {row_mass:.3f})</sup>",
               "font": {"size": 14}},
        height=max(260, 90 + 24 * len(table)), margin={"l": 110, "r": 20, "t": 70, "b": 40},
        xaxis={"title": "weight", "range": [0, max(1e-6, float(table["weight"].max() if len(table) else 1)) * 1.05]},
        yaxis={"type": "category", "autorange": "reversed"})
    return fig


__all__ = ["EXAMPLES", "PATTERNS", "TOKENS", "example_names", "example_tokens", "examples_table", "has_examples",
           "no_examples_reason", "no_examples_why", "parse_label", "pattern", "pattern_matrix", "pattern_top_keys",
           "query_shape", "resolve_example", "token_labels", "top_keys", "visible_token"]
