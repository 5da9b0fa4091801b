"""Template heads: score every head against any lower-triangular attention template, streaming
(docs/probes/induction.md).

Owns the `Template` convention, TransformerLens' three named templates (`TEMPLATES`: previous-token, duplicate-token,
induction; the definitions of `transformer_lens.head_detector`), `TemplateScores` (a per-layer accumulator fed with
pattern chunks, so no [n, n] pattern is ever held) and `template_scores(model, input_ids, template)`, one streaming
forward pass that scores every head.

A template is a function `template(i, j, tokens)` of the query index `i` [cq, 1], the key index `j` [1, n] and the
sequence's token ids `tokens` [n] that returns (broadcast to [cq, n]) the template rows T[i, :], bool or float. One
line defines a head type, e.g. a previous-token head `lambda i, j, tok: j == i - 1` or a "same token as two back"
head `lambda i, j, tok: (j < i) & (tok[j] == tok[(i - 2).clamp(min=0)])`. T must be lower-triangular (T[i, j] = 0
for j > i): a template that looks into the future is refused before the forward pass.

Measures (identical to TransformerLens' `compute_head_attention_similarity_score`, so scores are comparable):
- `mul` = sum_ij T_ij a'_ij / sum_ij a'_ij, with a' the attention after the optional exclusions (BOS column j = 0,
  current token j = i set to 0). Rows without any template mass still count in the denominator, so on BOS + a
  block of L tokens repeated the maximum is L / (2L + 1).
- `abs` = 1 - sum_ij |T_ij - a'_ij| / n_rows (excluded entries count 0): TransformerLens writes it as
  1 - mean(|T - a|) * n over the [n, n] matrix, i.e. one minus the mean per-row L1 distance; range [-1, 1].
  TransformerLens rounds the sum to 3 decimals; posprobe does not.
- `row_mean` = mean over rows i with sum_j T_ij > 0 of sum_j T_ij a_ij (no exclusions): the docs' form of
  `induction_score` / `duplicate_token_score` (on a repeated block, the mean over second-copy queries of a[i, i-L+1]).
Summed over every scored row of every sequence (and batch row) given; with all queries scored and one sequence,
`mul` and `abs` equal `detect_head(model, seq, T, error_measure=...)` on the same weights and tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from posprobe.access import LayerCapture, ModelAccess, Tap
from posprobe.errors import InputError, UnknownNameError
from posprobe.types import Pattern, QueryIndex

Template = Callable[[Tensor, Tensor, Tensor], Any]  # (i [cq, 1], j [1, n], tokens [n]) -> rows [cq, n]


def previous_token_template(i: Tensor, j: Tensor, tokens: Tensor) -> Tensor:
    """T[i, i-1] = 1 (TransformerLens `previous_token_head`)."""
    return j == i - 1


def duplicate_token_template(i: Tensor, j: Tensor, tokens: Tensor) -> Tensor:
    """T[i, j] = 1 for every earlier j holding the same token (TransformerLens `duplicate_token_head`)."""
    return (j < i) & (tokens[j] == tokens[i])


def induction_template(i: Tensor, j: Tensor, tokens: Tensor) -> Tensor:
    """T[i, j] = 1 where token j-1 is an earlier copy of token i (TransformerLens `induction_head`: the duplicate
    template shifted one key to the right, first column 0)."""
    return (j >= 1) & (j - 1 < i) & (tokens[(j - 1).clamp(min=0)] == tokens[i])


TEMPLATES: dict[str, Template] = {
    "previous_token_head": previous_token_template,
    "duplicate_token_head": duplicate_token_template,
    "induction_head": induction_template,
}


def resolve_template(template: str | Template) -> Template:
    """A template by TransformerLens name or a callable (returned as is)."""
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise UnknownNameError("template", template, TEMPLATES)
        return TEMPLATES[template]
    if not callable(template):
        raise InputError(f"A template must be a name ({', '.join(TEMPLATES)}) or a function (i, j, tokens) -> rows; "
                         f"got {type(template).__name__}.")
    return template


def template_rows(template: Template, query_index: QueryIndex, tokens: Tensor) -> Tensor:
    """The template rows T[query_index, :] as float32 [cq, n], checked to be lower-triangular."""
    n = tokens.shape[-1]
    i = query_index.to(tokens.device)[:, None]
    j = torch.arange(n, device=tokens.device)[None, :]
    rows = torch.as_tensor(template(i, j, tokens))
    rows = torch.broadcast_to(rows.to(torch.float32), (len(query_index), n))
    future = (j > i) & (rows != 0)
    if bool(future.any()):
        q, k = (int(x) for x in future.nonzero()[0])
        raise InputError(
            f"The template gives weight {float(rows[q, k]):g} to key {k} for query {int(query_index[q])}: a "
            f"template must be lower-triangular (no weight on keys after the query), since causal attention never "
            f"looks ahead. Mask it, e.g. `(j <= i) & (...)`."
        )
    return rows


class TemplateScores:
    """Streaming sums of one template's measures per (layer, head); see the module docstring for the formulas."""

    def __init__(self, n_layers: int, n_heads: int, *, exclude_bos: bool = False,
                 exclude_current_token: bool = False) -> None:
        self.exclude_bos, self.exclude_current_token = exclude_bos, exclude_current_token
        shape = (n_layers, n_heads)
        self.hit = torch.zeros(shape, dtype=torch.float64)  # sum T a'
        self.mass = torch.zeros(shape, dtype=torch.float64)  # sum a'
        self.l1 = torch.zeros(shape, dtype=torch.float64)  # sum |T' - a'|
        self.rows = torch.zeros(n_layers, dtype=torch.float64)  # scored rows
        self.row_hit = torch.zeros(shape, dtype=torch.float64)  # sum over rows with template mass of sum_j T a
        self.row_n = torch.zeros(n_layers, dtype=torch.float64)  # rows with template mass

    def add(self, layer: int, query_index: QueryIndex, probs: Pattern, rows: Tensor) -> None:
        """Add one chunk: probs [b, H, cq, n] of queries `query_index`, template rows [b, cq, n] (or [cq, n])."""
        if probs.dtype in (torch.float16, torch.bfloat16):  # products in float32 at least (a chunk-sized copy)
            probs = probs.float()
        rows = rows.to(probs.device, probs.dtype)
        if rows.dim() == 2:
            rows = rows.expand(probs.shape[0], -1, -1)
        t = rows[:, None]  # [b, 1, cq, n]
        has = rows.sum(-1) > 0  # [b, cq]
        raw_hit = (probs * t).sum(-1, dtype=torch.float64)  # [b, H, cq]
        self.row_hit[layer] += (raw_hit * has[:, None]).sum((0, 2)).cpu()
        self.row_n[layer] += float(has.sum())
        self.rows[layer] += probs.shape[0] * probs.shape[2]
        if self.exclude_bos or self.exclude_current_token:
            keep = torch.ones(probs.shape[-2:], dtype=probs.dtype, device=probs.device)
            if self.exclude_bos:
                keep[:, 0] = 0
            if self.exclude_current_token:
                keep[torch.arange(len(query_index), device=probs.device), query_index.to(probs.device)] = 0
            probs, t = probs * keep, t * keep
            hit = (probs * t).sum(-1, dtype=torch.float64)
        else:
            hit = raw_hit
        self.hit[layer] += hit.sum((0, 2)).cpu()
        self.mass[layer] += probs.sum((-1, -2), dtype=torch.float64).sum(0).cpu()
        self.l1[layer] += (t - probs).abs().sum((-1, -2), dtype=torch.float64).sum(0).cpu()

    def _per_layer(self, num: Tensor, den: Tensor) -> np.ndarray:
        out = (num / den.clamp(min=1e-300)).numpy()
        out[(den <= 0).numpy()] = np.nan
        return out

    def mul(self) -> np.ndarray:
        return self._per_layer(self.hit, self.mass)

    def abs(self) -> np.ndarray:
        return 1.0 - self._per_layer(self.l1, self.rows[:, None].expand_as(self.l1))

    def row_mean(self) -> np.ndarray:
        return self._per_layer(self.row_hit, self.row_n[:, None].expand_as(self.row_hit))


def _as_batch(access: ModelAccess, input_ids: Any) -> Tensor:
    if isinstance(input_ids, str):
        return torch.tensor([access.encode(input_ids)])
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    return ids[None] if ids.dim() == 1 else ids


def template_scores(
    model: Any,
    input_ids: Any,
    template: str | Template,
    *,
    queries: Sequence[int] | Tensor | None = None,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    chunk_size: int = 256,
    tokenizer: Any = None,
) -> pd.DataFrame:
    """Score every head against `template` in one streaming pass: columns layer, head, kv_head, mul, abs, row_mean.

    model: anything `posprobe.load_model` accepts. input_ids: a string (tokenized with BOS), token ids [n] or a batch
    [b, n] of equal-length sequences (the template is evaluated per sequence). template: a name from `TEMPLATES` or a
    function (i, j, tokens) -> rows. queries: the query rows scored (default: all, which reproduces TransformerLens'
    `detect_head`). Patterns are read `chunk_size` queries at a time.
    """
    from posprobe.models import load_model

    access = load_model(model, tokenizer=tokenizer)
    fn = resolve_template(template)
    ids = access._check_ids(_as_batch(access, input_ids))
    n = ids.shape[1]
    qidx = torch.arange(n) if queries is None else torch.as_tensor(queries, dtype=torch.long).flatten()
    if len(qidx) == 0 or int(qidx.min()) < 0 or int(qidx.max()) >= n:
        raise InputError(f"queries must be positions in [0, {n}) of the {n}-token input; got "
                         f"{qidx.tolist()[:8]}{'...' if len(qidx) > 8 else ''}.")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1 query, got {chunk_size}.")
    for b in range(ids.shape[0]):  # refuse a template that looks ahead before the forward pass (chunk-wise)
        for start in range(0, len(qidx), chunk_size):
            template_rows(fn, qidx[start : start + chunk_size], ids[b])
    info = access.info
    acc = TemplateScores(info.n_layers, info.n_heads, exclude_bos=exclude_bos,
                         exclude_current_token=exclude_current_token)

    def on_layer(cap: LayerCapture) -> None:
        for chunk, probs in cap.pattern_chunks(chunk_size, qidx):
            rows = torch.stack([template_rows(fn, chunk, ids[b]) for b in range(ids.shape[0])])
            acc.add(cap.layer, chunk, probs, rows)

    access.run(ids, taps=[Tap.PATTERN], on_layer=on_layer)
    frame = pd.DataFrame([(l, h, info.kv_head(h)) for l in range(info.n_layers) for h in range(info.n_heads)],
                         columns=["layer", "head", "kv_head"])
    for name, values in (("mul", acc.mul()), ("abs", acc.abs()), ("row_mean", acc.row_mean())):
        frame[name] = values.reshape(-1)
    return frame


__all__ = ["TEMPLATES", "Template", "TemplateScores", "duplicate_token_template", "induction_template",
           "previous_token_template", "resolve_template", "template_rows", "template_scores"]
