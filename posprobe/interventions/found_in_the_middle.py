"""Found-in-the-Middle calibration of positional attention bias (Hsieh et al. 2024; docs/interventions.md, with
the document-level Attn(doc_k) of docs/probes/position_bias.md).

Owns the `FoundInTheMiddle` intervention spec (registered as "found_in_the_middle"; `found_in_the_middle(...)` builds
it and binds it to an access and user spans), the slot-bias estimate
(`estimate_slot_bias`: attention a dummy document receives at each slot) and the probs-stage edit that rescales
attention to documents (`DocumentCalibration`). Definitions (choices that the paper leaves open are config fields):

- Attn(doc_k) = mean attention per token from a query to the tokens of document k, per layer and query head.
- bias_k = Attn(dummy at slot k): the dummy text replaces document k of a calibration prompt (once per slot, averaged
  over `calibration_trials` prompts of the task, measured at the answer-predicting query, unedited model).
- rel_k = Attn(doc_k) - bias_k; alpha = softmax(rel / t); in the calibrated layers (a LayerRange; default: last half)
  every key of document k is multiplied by c * alpha_k / Attn(doc_k), with c chosen so the total attention to
  documents is unchanged (so document k's share of that total is n_k alpha_k / sum_k' n_k' alpha_k'); keys outside
  documents are untouched and rows still sum to 1.
- Which queries are calibrated: `queries="answer"` (default) the answer-predicting query (the last prompt token) and
  every generated token, so the edit applies at every decoding step of KV-cached greedy decoding exactly as in a
  full recompute; `"after_documents"` every query after the last document (the question tokens too).
- `relative_temperature=True` (default) divides rel by t times the query's mean Attn(doc_k) over documents, so one
  t fits heads whose attention to documents differs by orders of magnitude; False uses t in raw attention units.
- `granularity="layer"` pools Attn(doc_k) and the bias over the heads of a layer and rescales all heads alike.

Document spans come from structured task prompts (`posprobe.tasks.Prompt.spans`, handed over per generation batch by
`evaluate_positions(..., intervention=fitm)` through `prompt_context`), or from the user: token spans with
`input_ids`, or character spans of a text. The slot bias is estimated once per access and settings it depends on
(cached on the access, recorded in provenance). Leaving a block removes the edits, so logits are bit-for-bit what
they were before.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from posprobe.access import (
    AttentionEdit,
    EditContext,
    LayerCapture,
    ModelAccess,
    ModelInfo,
    Tap,
)
from posprobe.errors import InterventionError, UnknownNameError
from posprobe.interventions.spec import (
    Bound,
    Intervention,
    LayerRange,
    calibrated,
    check_access,
    layer_range_of,
    register,
)
from posprobe.tasks.base import Prompt, Task

# ---------------------------------------------------------------------------------------------------------------
# Layers, spans and document membership


def calibrated_layers(info: ModelInfo, config: FoundInTheMiddle) -> list[int]:
    """The layers whose attention is rescaled: config.layers (a LayerRange), default the last half."""
    n = info.n_layers
    chosen = LayerRange.coerce(config.layers, "found_in_the_middle layers")
    return list(range(n // 2, n)) if chosen is None else chosen.indices(n, info.name)


def check_spans(spans: Any, n_tokens: int, what: str = "spans") -> tuple[tuple[int, int], ...]:
    """Validate document token spans [(start, stop), ...] against a sequence of n_tokens (stop exclusive)."""
    if spans is None or isinstance(spans, (str, bytes)):
        raise InterventionError(f"{what} must be a list of (start, stop) token ranges, one per document; "
                                f"got {spans!r}.")
    out: list[tuple[int, int]] = []
    for span in spans:
        try:
            start, stop = (int(x) for x in span)
        except (TypeError, ValueError):
            raise InterventionError(f"Each entry of {what} must be a (start, stop) pair of token indices; got "
                                    f"{span!r}.") from None
        if not 0 <= start < stop <= n_tokens:
            raise InterventionError(f"Document span ({start}, {stop}) is empty or outside the {n_tokens}-token prompt; "
                                    f"spans are [start, stop) token indices with 0 <= start < stop <= {n_tokens}.")
        out.append((start, stop))
    if len(out) < 2:
        raise InterventionError(f"Found-in-the-Middle needs at least two documents to redistribute attention between; "
                                f"got {len(out)} span(s).")
    ordered = sorted(out)
    for (a0, b0), (a1, _) in zip(ordered, ordered[1:]):
        if a1 < b0:
            raise InterventionError(f"Document spans overlap: ({a0}, {b0}) and ({a1}, ...). Each token may belong to "
                                    f"one document only.")
    return tuple(out)


def membership(prompts: Sequence[Prompt]) -> tuple[Tensor, Tensor]:
    """One-hot document membership [b, n_prompt, K] (float64) and token counts per document [b, K]."""
    n = prompts[0].n_tokens
    k = prompts[0].n_items
    member = torch.zeros(len(prompts), n, k, dtype=torch.float64)
    for row, prompt in enumerate(prompts):
        for slot, (start, stop) in enumerate(prompt.spans):
            member[row, start:stop, slot] = 1.0
    return member, member.sum(1)


def _check_batch(prompts: Sequence[Prompt]) -> None:
    if not prompts:
        raise InterventionError("Found-in-the-Middle got an empty batch of prompts.")
    lengths = {p.n_tokens for p in prompts}
    slots = {p.n_items for p in prompts}
    if len(lengths) != 1 or len(slots) != 1:
        raise InterventionError(f"The prompts of one batch must have the same length and number of documents (got "
                                f"lengths {sorted(lengths)}, documents {sorted(slots)}); run them in separate batches.")
    for prompt in prompts:
        check_spans(prompt.spans, prompt.n_tokens, what=f"the spans of a {prompt.task or 'user'} prompt")


# ---------------------------------------------------------------------------------------------------------------
# The edit


class DocumentCalibration:
    """The probs-stage edit of one layer: rescale attention to documents of the calibrated queries (see module doc).

    member: [b or 1, n_prompt, K] one-hot document membership; bias: [H, K] dummy attention per slot (this layer);
    q_start: the first calibrated query index. `sink`, when set to a dict, receives {layer: (before, after)} attention
    rows [b, H, n_keys] of query q_start (the answer-predicting query) whenever a pass computes that query.
    """

    # a call must reach the end of the documents (a shorter one is refused as another prompt), so KV-cached greedy
    # decoding prefills the prompt in one pass, never in chunks (HFAccess._prefill_blocker)
    prefill_chunks = False

    def __init__(self, layer: int, member: Tensor, bias: Tensor, q_start: int, temperature: float,
                 relative: bool = True, granularity: str = "head") -> None:
        self.layer, self.member, self.bias, self.q_start = layer, member, bias, q_start
        self.temperature, self.relative, self.granularity = temperature, relative, granularity
        self.counts = member.sum(1)  # [b, K]
        self.doc_end = int(torch.nonzero(member.sum((0, 2))).max()) + 1
        self.sink: dict[int, tuple[Tensor, Tensor]] | None = None

    def __repr__(self) -> str:
        return (f"DocumentCalibration(layer={self.layer}, documents={self.member.shape[-1]}, q_start={self.q_start}, "
                f"temperature={self.temperature}, relative={self.relative}, granularity={self.granularity!r})")

    def factors(self, rows: Tensor) -> Tensor:
        """Per-document multipliers [b, H, s, K] for attention rows [b, H, s, nk] (float64)."""
        member = self._member(rows.shape[0], rows.shape[-1])
        counts = member.sum(1)  # [b, K]
        mass = torch.einsum("bhsn,bnk->bhsk", rows, member)  # attention to each document
        if self.granularity == "layer":
            mass = mass.mean(1, keepdim=True)
        visible = mass > 0
        attn = mass / counts[:, None, None, :]  # Attn(doc_k): mean attention per token
        bias = self.bias.mean(0, keepdim=True) if self.granularity == "layer" else self.bias
        rel = attn - bias.to(attn)[None, :, None, :]
        scale = torch.full_like(attn[..., :1], self.temperature)
        if self.relative:
            mean_attn = (attn * visible).sum(-1, keepdim=True) / visible.sum(-1, keepdim=True).clamp(min=1)
            scale = scale * mean_attn
        usable = visible.any(-1, keepdim=True) & (scale > 0)
        logits = torch.where(visible, rel / torch.where(usable, scale, torch.ones_like(scale)),
                             torch.full_like(rel, -math.inf))
        logits = torch.where(usable, logits, torch.zeros_like(logits))
        alpha = torch.softmax(logits, dim=-1)
        weight = alpha * counts[:, None, None, :]
        total = mass.sum(-1, keepdim=True)
        new_mass = total * weight / weight.sum(-1, keepdim=True).clamp(min=torch.finfo(weight.dtype).tiny)
        factor = torch.where(visible & usable, new_mass / torch.where(visible, mass, torch.ones_like(mass)),
                             torch.ones_like(mass))
        if self.granularity == "layer":
            factor = factor.expand(-1, rows.shape[1], -1, -1)
        return factor

    def _member(self, batch: int, n_keys: int) -> Tensor:
        member = self.member
        if member.shape[0] not in (1, batch):
            raise InterventionError(f"Found-in-the-Middle was set up for {member.shape[0]} prompt(s) but the pass "
                                    f"has a batch of {batch}. Use one prompt_context per batch (evaluate_positions "
                                    f"does).")
        if n_keys < self.doc_end:
            raise InterventionError(f"This pass has {n_keys} tokens but the documents Found-in-the-Middle was set up "
                                    f"for reach token {self.doc_end}. Run the prompt the spans describe (and its "
                                    f"continuation) inside the block.")
        if member.shape[0] != batch:
            member = member.expand(batch, -1, -1)
        n_prompt = member.shape[1]
        if n_keys > n_prompt:  # generated tokens belong to no document
            member = torch.cat([member, member.new_zeros(batch, n_keys - n_prompt, member.shape[2])], 1)
        elif n_keys < n_prompt:
            member = member[:, :n_keys]
        return member

    def __call__(self, probs: Tensor, ctx: EditContext) -> Tensor:
        if ctx.n_keys < self.doc_end:
            self._member(probs.shape[0], ctx.n_keys)  # raises: this pass is not the prompt the spans describe
        query_index = ctx.query_index.to(probs.device)
        selected = torch.nonzero(query_index >= self.q_start).flatten()
        if len(selected) == 0:
            return probs
        rows = probs[:, :, selected].double()
        factor = self.factors(rows)  # [b, H, s, K]
        member = self._member(rows.shape[0], rows.shape[-1])
        in_doc = member.sum(-1)  # [b, nk] 1 on document tokens
        per_key = torch.einsum("bhsk,bnk->bhsn", factor, member) + (1.0 - in_doc)[:, None, None, :]
        edited = (rows * per_key).to(probs.dtype)
        out = probs.clone()
        out[:, :, selected] = edited
        if self.sink is not None:
            at = torch.nonzero(query_index[selected] == self.q_start).flatten()
            if len(at):
                i = int(at[0])
                self.sink[self.layer] = (probs[:, :, selected[i]].detach().clone(), edited[:, :, i].detach().clone())
        return out


# ---------------------------------------------------------------------------------------------------------------
# The slot bias


def substitute(prompt: Prompt, slot: int, dummy_ids: Sequence[int]) -> tuple[list[int], int, int]:
    """The prompt with document `slot` replaced by `dummy_ids`: (ids, dummy start, dummy stop)."""
    start, stop = prompt.spans[slot]
    ids = [*prompt.input_ids[:start], *dummy_ids, *prompt.input_ids[stop:]]
    return ids, start, start + len(dummy_ids)


def estimate_slot_bias(access: ModelAccess, prompts: Sequence[Prompt], dummy_text: str, *,
                       batch_rows: int = 8) -> np.ndarray:
    """bias[l, h, k] = mean attention per token that the dummy receives at slot k from the answer-predicting query.

    For every prompt and slot k the dummy replaces document k (other documents unchanged); the attention row of the
    last prompt token is read in every layer, averaged over the prompts. All prompts need the same number of slots.
    """
    dummy_ids = list(access.encode(dummy_text, add_bos=False))
    if not dummy_ids:
        raise InterventionError(f"The dummy text {dummy_text!r} tokenizes to nothing; give a non-empty dummy_text.")
    n_slots = {p.n_items for p in prompts}
    if len(n_slots) != 1:
        raise InterventionError(f"Calibration prompts must all have the same number of documents; "
                                f"got {sorted(n_slots)}.")
    k_slots = n_slots.pop()
    jobs: dict[int, list[tuple[list[int], int, int, int]]] = {}
    for prompt in prompts:
        check_spans(prompt.spans, prompt.n_tokens, what="calibration prompt spans")
        for slot in range(k_slots):
            ids, start, stop = substitute(prompt, slot, dummy_ids)
            jobs.setdefault(len(ids), []).append((ids, slot, start, stop))
    info = access.info
    sums = np.zeros((info.n_layers, info.n_heads, k_slots))
    counts = np.zeros(k_slots)
    for _, group in sorted(jobs.items()):
        for at in range(0, len(group), max(1, batch_rows)):
            rows = group[at : at + max(1, batch_rows)]
            ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
            query = torch.tensor([ids.shape[1] - 1])

            def on_layer(cap: LayerCapture, rows: list[tuple[list[int], int, int, int]] = rows,
                         query: Tensor = query) -> None:
                probs = cap.pattern(query)[:, :, 0].double()  # [b, H, n]
                for r, (_, slot, start, stop) in enumerate(rows):
                    sums[cap.layer, :, slot] += probs[r, :, start:stop].mean(-1).numpy()

            access.run(ids, taps={Tap.PATTERN}, on_layer=on_layer)
            for _, slot, _, _ in rows:
                counts[slot] += 1
    return sums / np.maximum(counts, 1)[None, None, :]


# ---------------------------------------------------------------------------------------------------------------
# The intervention


def _resolve_task(task: str | Task | None) -> Task | None:
    if task is None:
        return None
    from posprobe.tasks import get_task

    return get_task(task)


def _prompts_key(prompts: Sequence[Prompt]) -> str:
    """A fingerprint of calibration prompts (ids and spans), for the calibration cache."""
    import hashlib

    digest = hashlib.sha1()
    for p in prompts:
        digest.update(repr((p.input_ids, p.spans)).encode())
    return f"prompts:{len(prompts)}:{digest.hexdigest()[:16]}"


@register
@dataclass(frozen=True)
class FoundInTheMiddle(Intervention):
    """Found-in-the-Middle calibration as an intervention spec (see the module docstring for the definitions).

    It edits each prompt by its document spans (`per_prompt`), so it is applied per generation batch:
    - `evaluate_positions(access, "kv_words", intervention=FoundInTheMiddle())`: every batch is calibrated with its
      own prompts' spans; the slot bias comes from task prompts of calibration seeds, estimated once per access
      (cached on it, recorded in the table's provenance).
    - `with fitm.prompt_context(access, prompts): access.run(...)` for any structured prompts of one length.
    - `with found_in_the_middle(access, spans, input_ids=ids) as model: model.greedy(ids, 8)` for user spans.
    """

    name: ClassVar[str] = "found_in_the_middle"
    summary: ClassVar[str] = "rescale attention to documents by their slot's positional bias (Hsieh et al. 2024)"
    per_prompt: ClassVar[bool] = True

    # t of alpha = softmax(rel / t). Tuned on Gemma 3 270M, kv_words 20 pairs, tuning seeds (1 * 1_000_003 + t,
    # 12 trials x 7 gold positions), lowest teacher-forced answer loss; with the last half of the layers:
    # t = 0.1 / 0.3 / 1 / 3 / 10 -> loss 0.441 / 0.376 / 0.408 / 0.496 / 1.072 (no calibration: 0.501),
    # answer accuracy 0.48 / 0.58 / 0.46 / 0.39 / 0.14 (0.35); analyses/calibration.py records the sweep
    temperature: float | int = field(default=0.3, metadata={"help": "t of alpha = softmax(rel / t)"})
    # calibrated layers; None = the last half (Gemma 3 270M: 9:18), best in the same sweep (layers 13:18:
    # loss 0.550 at t = 0.3, barely changed; layers 5:18: 0.407)
    layers: LayerRange | str | range | None = field(default=None, metadata={
        "help": "START:STOP (stop exclusive); none = the last half"})
    # "head": per (layer, head) Attn(doc_k) and bias; "layer": pooled over the heads of a layer (tuning: 0.411)
    granularity: Literal["head", "layer"] = field(default="head", metadata={"help": "head | layer"})
    # rel is divided by t * mean_k Attn(doc_k) of the query (scale-free t); False: t in raw attention units
    relative_temperature: bool = field(default=True, metadata={"help": "t relative to the mean document attention"})
    # "answer": the answer-predicting query and every generated token; "after_documents": also the question tokens
    queries: Literal["answer", "after_documents"] = field(default="answer", metadata={
        "help": "answer | after_documents: which queries are calibrated"})
    # the dummy document whose attention at each slot is the positional bias; shaped like a kv_words item so the
    # bias measures position, not an odd-looking line (pass a sentence for document tasks such as multidoc)
    dummy_text: str = field(default="dummy: 0000", metadata={"help": "the document whose attention is the bias"})
    # task prompts the slot bias is averaged over (one pass per prompt and slot, unedited model)
    calibration_trials: int = field(default=8, metadata={"help": "task prompts the slot bias is averaged over"})
    # base seed of the calibration prompts: task seeds 977 * 1_000_003 + t, disjoint from evaluation seeds 0..100
    calibration_seed: int = field(default=977, metadata={"help": "base seed of the calibration prompts"})
    # rows per forward pass while estimating the bias
    batch_rows: int = field(default=8, metadata={"help": "rows per pass while estimating the bias"})
    # task of the calibration prompts: None = the task of the prompts being calibrated (user prompts without a
    # task: those prompts themselves)
    task: str | Task | None = field(default=None, metadata={
        "help": "calibration task; none = the evaluated prompts' task"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", LayerRange.coerce(self.layers, "found_in_the_middle layers"))
        c = self
        if isinstance(c.temperature, bool) or not (isinstance(c.temperature, (int, float)) and c.temperature > 0
                                                   and math.isfinite(c.temperature)):
            raise InterventionError(f"found_in_the_middle temperature must be a positive number; got "
                                    f"{c.temperature!r}.")
        object.__setattr__(self, "temperature", float(c.temperature))
        if c.granularity not in ("head", "layer"):
            raise UnknownNameError("granularity", str(c.granularity), ["head", "layer"])
        if c.queries not in ("answer", "after_documents"):
            raise UnknownNameError("queries mode", str(c.queries), ["answer", "after_documents"])
        for name in ("calibration_trials", "batch_rows"):
            value = getattr(c, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InterventionError(f"found_in_the_middle {name} must be an integer >= 1; got {value!r}.")

    @property
    def config(self) -> FoundInTheMiddle:
        """The settings (this object itself; FoundInTheMiddleConfig was merged into the spec)."""
        return self

    def layers_of(self, info: ModelInfo) -> list[int]:
        return calibrated_layers(info, self)

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        return {"layers": layer_range_of(self.layers_of(access.info))}

    # --- the slot bias -------------------------------------------------------------------------------------------
    def calibration_set(self, access: ModelAccess, n_slots: int, task: str | Task | None = None) -> list[Prompt]:
        """The task prompts the slot bias for `n_slots` documents is estimated on (calibration seeds)."""
        from posprobe.tasks.evaluate import trial_seed

        task_obj = _resolve_task(task if task is not None else self.task)
        if task_obj is None:
            raise InterventionError(
                f"Found-in-the-Middle has no task to build calibration prompts for {n_slots} documents from. Pass "
                f"task='kv_words' (FoundInTheMiddle(task=...)), or calibrate on structured task prompts.")
        return [task_obj.make(access, n_slots, (7 * t) % n_slots, trial_seed(self.calibration_seed, t))
                for t in range(self.calibration_trials)]

    def slot_bias(self, access: ModelAccess, n_slots: int, *, task: str | Task | None = None,
                  prompts: Sequence[Prompt] | None = None) -> np.ndarray:
        """The slot bias [L, H, K] for prompts of `n_slots` documents on `access`, estimated once and cached there.

        Calibration prompts: the spec's `task`, else `task`, else `prompts` themselves (user prompts)."""
        check_access(access, "Found-in-the-Middle")
        chosen = self.task if self.task is not None else task
        source = repr(_resolve_task(chosen)) if chosen is not None else None
        if source is None:
            if not prompts:
                self.calibration_set(access, n_slots)  # raises the explanatory error
            source = _prompts_key(prompts or ())
        key = (self.name, "slot_bias", self.dummy_text, self.calibration_trials, self.calibration_seed, source, n_slots)

        def compute() -> np.ndarray:
            calibration = self.calibration_set(access, n_slots, chosen) if chosen is not None else list(prompts or ())
            return estimate_slot_bias(access, calibration, self.dummy_text, batch_rows=self.batch_rows)

        def record(bias: np.ndarray) -> dict[str, Any]:
            return {"n_slots": n_slots, "calibration": str(chosen) if chosen is not None else source,
                    "calibration_trials": self.calibration_trials, "calibration_seed": self.calibration_seed,
                    "dummy_text": self.dummy_text, "bias_by_slot": [float(x) for x in bias.mean((0, 1))]}

        return calibrated(access, key, compute, record)

    # --- edits -----------------------------------------------------------------------------------------------------
    def prompt_edits(self, access: ModelAccess, prompts: Sequence[Prompt],
                     sink: dict[int, tuple[Tensor, Tensor]] | None = None) -> list[AttentionEdit]:
        """The `AttentionEdit`s that calibrate a batch of equal-length prompts (row r = prompts[r]); `sink`: a dict
        that receives {layer: (before, after)} attention rows of the answer-predicting query."""
        prompts = list(prompts)
        _check_batch(prompts)
        inferred = prompts[0].task if prompts[0].task not in ("", "user") else None
        bias = self.slot_bias(access, prompts[0].n_items, task=inferred, prompts=prompts)
        member, _ = membership(prompts)
        if self.queries == "answer":
            q_start = prompts[0].n_tokens - 1
        else:
            q_start = max(stop for p in prompts for _, stop in p.spans)
        edits = []
        for layer in self.layers_of(access.info):
            fn = DocumentCalibration(layer, member, torch.as_tensor(bias[layer]), q_start, self.temperature,
                                     self.relative_temperature, self.granularity)
            fn.sink = sink
            edits.append(AttentionEdit(layer, fn, stage="probs"))
        return edits

    @contextlib.contextmanager
    def prompt_context(self, access: ModelAccess, prompts: Sequence[Prompt]) -> Iterator[ModelAccess]:
        """Calibrate every pass inside the block for these prompts (the evaluate_positions per-batch protocol)."""
        with access.editing(self.prompt_edits(access, prompts)):
            yield access

    def answer_attention(self, access: ModelAccess, prompts: Sequence[Prompt]) -> np.ndarray:
        """Attention rows [b, L, H, n] of the answer-predicting query as the calibrated model uses them: edited rows
        in the calibrated layers, the (unedited) pattern elsewhere. One forward pass."""
        prompts = list(prompts)
        info = access.info
        n = prompts[0].n_tokens
        out = np.zeros((len(prompts), info.n_layers, info.n_heads, n))
        query = torch.tensor([n - 1])

        def on_layer(cap: LayerCapture) -> None:
            out[:, cap.layer] = cap.pattern(query)[:, :, 0].double().numpy()

        ids = torch.tensor([p.input_ids for p in prompts], dtype=torch.long)
        sink: dict[int, tuple[Tensor, Tensor]] = {}
        with access.editing(self.prompt_edits(access, prompts, sink=sink)):
            access.run(ids, taps={Tap.PATTERN}, on_layer=on_layer)
        for layer, (_, after) in sink.items():
            out[:, layer] = after.double().numpy()
        return out


FoundInTheMiddleConfig = FoundInTheMiddle  # the settings' name before specs (issue 16): one class now


# ---------------------------------------------------------------------------------------------------------------
# Construction from user input


def _user_prompt(access: ModelAccess, spans: Any, input_ids: Any, text: str | None, char_spans: Any) -> Prompt:
    if char_spans is not None:
        if text is None:
            raise InterventionError("char_spans are character ranges of a text: pass text=... with them.")
        ids, spans = char_to_token_spans(access, text, char_spans)
    elif input_ids is not None:
        ids = [int(i) for i in (input_ids.flatten().tolist() if isinstance(input_ids, Tensor) else input_ids)]
    elif text is not None:
        ids = list(access.encode(text))
    else:
        raise InterventionError("Token spans index into a prompt: pass input_ids=... (or text=...) with spans.")
    spans = check_spans(spans, len(ids))
    return Prompt(input_ids=tuple(ids), answer="", answer_ids=(), spans=spans, gold_index=0, text=text or "",
                  task="user")


def char_to_token_spans(access: ModelAccess, text: str, char_spans: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (as access.encode gives them) and the token span of every character span [a, b)."""
    try:
        enc = access.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (TypeError, NotImplementedError, ValueError) as exc:
        raise InterventionError(f"The tokenizer cannot map characters to tokens ({exc}); give token spans with "
                                f"input_ids instead.") from None
    plain, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    ids = list(access.encode(text))
    shift = len(ids) - len(plain)
    if ids[shift:] != plain:
        raise InterventionError("access.encode(text) and the tokenizer disagree on this text; give token spans with "
                                "input_ids instead of character spans.")
    out = []
    for span in char_spans:
        try:
            a, b = (int(x) for x in span)
        except (TypeError, ValueError):
            raise InterventionError(f"Each character span must be a (start, stop) pair; got {span!r}.") from None
        if not 0 <= a < b <= len(text):
            raise InterventionError(f"Character span ({a}, {b}) is empty or outside the {len(text)}-character text.")
        tokens = [t for t, (s, e) in enumerate(offsets) if s < b and e > a]
        if not tokens:
            raise InterventionError(f"Character span ({a}, {b}) covers no token of the text.")
        out.append((tokens[0] + shift, tokens[-1] + 1 + shift))
    return ids, out


def found_in_the_middle(model: Any = None, spans: Any = None, *, input_ids: Any = None, text: str | None = None,
                        char_spans: Any = None, prompt: Prompt | None = None, config: FoundInTheMiddle | None = None,
                        **settings: Any) -> FoundInTheMiddle | Bound:
    """Found-in-the-Middle: the spec (model None), or the spec bound to a ModelAccess (and to user spans).

    Structured prompts: `evaluate_positions(access, "kv_words", intervention=found_in_the_middle(task="kv_words"))`.
    User spans: `spans` (token ranges) with `input_ids` or `text`, or `char_spans` of `text`, or a `prompt`; then
    `with found_in_the_middle(access, spans, input_ids=ids) as model: model.greedy(ids, n)` (the slot bias is then
    measured on that prompt itself unless `task` is given). Keyword settings replace fields of the spec
    (temperature=..., layers=LayerRange(9, 18) or "9:18", task=...). A model name raises: the intervention never loads
    a model of its own.
    """
    if "layers" in settings:
        settings["layers"] = LayerRange.coerce(settings["layers"], "found_in_the_middle layers")
    spec = (config or FoundInTheMiddle()).replace(**settings) if settings else (config or FoundInTheMiddle())
    wants_prompt = prompt is not None or spans is not None or char_spans is not None
    if model is None and not wants_prompt:
        if input_ids is not None or text is not None:
            raise InterventionError("input_ids / text were given without document spans: pass spans=[(start, stop), "
                                    "...] (token ranges) or char_spans=[...] (character ranges of text).")
        return spec
    access = check_access(model, "found_in_the_middle")
    if prompt is not None:
        check_spans(prompt.spans, prompt.n_tokens)
        return spec.bind(access, [prompt])
    if wants_prompt:
        return spec.bind(access, [_user_prompt(access, spans, input_ids, text, char_spans)])
    if input_ids is not None or text is not None:
        raise InterventionError("input_ids / text were given without document spans: pass spans=[(start, stop), ...] "
                                "(token ranges) or char_spans=[...] (character ranges of text).")
    return spec.bind(access)


__all__ = ["DocumentCalibration", "FoundInTheMiddle", "FoundInTheMiddleConfig", "calibrated_layers",
           "char_to_token_spans", "check_spans", "estimate_slot_bias", "found_in_the_middle", "membership"]
