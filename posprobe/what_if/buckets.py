"""Attention Buckets (Chen et al. 2023, "Fortify the Shortest Stave in Attention", arXiv 2312.04455): the same
context run in N passes, each with its own RoPE base, and the passes' next-token outputs combined by confidence.

Owns `AttentionBuckets` (text form `buckets:bases=10000/17500/18000`). What the authors' code does, and what this
module does on every position whose logits are asked for (their code decodes, so it combines the last position):
pass j runs the whole model with rope base b_j on the touched layers (every layer of their Llama 2), giving logits
z_j; its confidence is its largest logit c_j = max_v z_j[v]; the weights are w = softmax_j(c_j); the output logits
are z = sum_j w_j z_j (`combine="logits"`, the authors' code). `combine="probs"` mixes the distributions instead,
p = sum_j w_j softmax(z_j), returned as log p (the paper's prose can be read either way). Bases: the authors'
tool-use set for Llama 2 (theta 10000) is 10000, 17500, 18000, 19000, 20000, 25000; `bases=None` uses those as
ratios of the model's own theta (x1, x1.75, x1.8, x1.9, x2, x2.5), explicit `bases` are absolute.

Each pass's base goes through transformers' rope machinery (`rope_theta` what-if: a rotary module of the model's
class built from a config copy with the new theta). Composition:
- `access.run(..., logits=...)` (teacher-forced scoring, `evaluate_positions`' scoring) returns the combined
  logits; `access.greedy` decodes from the combined distribution, the passes in lockstep with a KV cache each
  (as the authors' code keeps one per batch of bases).
- Reading activations (`scan`, any probe tap) is refused: N passes are N different models and posprobe does not
  choose one silently. Scan one bucket with `rope_theta:theta=B`. `scan(intervention=...)` refuses it when it
  resolves the spec (`check_runner`), before the model is loaded; a tap inside `applied` is refused at the pass.
- `weights(access, ids, logits=...)`: each pass's weight w_j at the requested positions (which base carries a
  prediction), one forward per pass, outside `applied`.
- Score-level what-ifs (STRING, Self-Extend, ...) stack with it (each pass runs them with its own frequencies);
  RoPE rescaling what-ifs do not (the paper defines no bucket over a rescaled RoPE): refused.
Cost: N forward passes per call. Formulas in docs/interventions.md ("Attention Buckets").
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from posprobe.access import ROTARY_OVERRIDES, ModelAccess
from posprobe.errors import InterventionError
from posprobe.interventions.spec import check_access, register
from posprobe.what_if.base import WhatIf, hf_parts, rotary_module, takes_layer_type
from posprobe.what_if.rope_scaling import RopeParameters, RopeTheta

# The authors' tool-use bases for Llama 2 (theta 10000), as ratios of the model's theta (their inference config).
PAPER_RATIOS = (1.0, 1.75, 1.8, 1.9, 2.0, 2.5)


def pass_weights(logits: Tensor) -> Tensor:
    """[P, ..., V] logits of P passes -> [P, ...] float32 (or wider) weights: softmax over the passes of each pass's
    largest logit, the confidence weights `combine_passes` mixes the passes with."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.softmax(z.amax(dim=-1), dim=0)


def combine_passes(logits: Tensor, combine: str = "logits") -> Tensor:
    """[P, ..., V] logits of P passes -> [..., V]: weights softmax over passes of each pass's max logit, then the
    weighted sum of the logits ("logits") or log of the weighted mixture of the distributions ("probs")."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    weights = pass_weights(z)[..., None]  # [P, ..., 1]
    if combine == "logits":
        out = (weights * z).sum(dim=0)
    elif combine == "probs":
        out = torch.log((weights * torch.softmax(z, dim=-1)).sum(dim=0))
    else:
        raise InterventionError(f"buckets: combine must be 'logits' or 'probs'; got {combine!r}.")
    return out.to(logits.dtype)


@register
@dataclass(frozen=True)
class AttentionBuckets(RopeParameters):
    """N passes with different RoPE bases, next-token logits combined by confidence (Chen et al. 2023). A
    `RopeParameters` for its choice of layers (the model's convention); the passes are `RopeTheta` specs."""

    name: ClassVar[str] = "buckets"
    summary: ClassVar[str] = ("Attention Buckets: passes with different RoPE bases, logits weighted by "
                              "softmax(max logit)")

    # text form: bases=10000/17500/18000 (or commas)
    bases: tuple[float | int, ...] | list | str | float | int | None = field(default=None, metadata={
        "help": "RoPE bases of the passes; none = the paper's 1, 1.75, 1.8, 1.9, 2, 2.5 x the model's theta"})
    combine: str = field(default="logits", metadata={
        "help": "logits: sum_j w_j z_j (authors' code); probs: log sum_j w_j softmax(z_j)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bases is not None:
            value = self.bases
            pieces = re.split(r"[/,]", value) if isinstance(value, str) else (
                [value] if isinstance(value, (int, float)) else value)
            try:
                bases = tuple(float(v) for v in pieces)
            except (TypeError, ValueError):
                raise InterventionError(f"buckets: bases must be numbers (text: bases=10000/17500/18000); got "
                                        f"{value!r}.") from None
            if not bases or not all(math.isfinite(b) and b > 0 for b in bases):
                raise InterventionError(f"buckets: bases must be positive numbers; got {value!r}.")
            object.__setattr__(self, "bases", bases)
        if self.combine not in ("logits", "probs"):
            raise InterventionError(f"buckets: combine must be 'logits' or 'probs'; got {self.combine!r}.")

    def context_limit(self, access: ModelAccess) -> int | None:
        return None  # the method is the experiment: no length limit while applied

    def check_runner(self, runner: str) -> None:
        if runner == "scan":  # every scan reads activations: refused before the model is loaded or run
            raise InterventionError(self._reads_refused(f"scan(intervention={str(self)!r}) is refused before the "
                                                        f"model is loaded or run: "))

    def _reads_refused(self, prefix: str = "") -> str:
        passes = self.passes()
        return (f"{prefix}buckets combines the output distributions of {len(passes)} passes with different RoPE "
                f"bases ({', '.join(str(p) for p in passes)}); a probe reading activations (attention patterns, "
                f"q / k) would see {len(passes)} different models, and posprobe does not pick one silently. Scan "
                f"one pass instead: intervention=RopeTheta(theta=B) / --what-if rope_theta:theta=B (or ratio=R), "
                f"and evaluate the combined outputs with evaluate_positions or access.run(ids, logits=...).")

    def passes(self) -> list[RopeTheta]:
        """One `rope_theta` what-if per pass, on this spec's layers."""
        if self.bases is None:
            return [RopeTheta(ratio=r, layers=self.layers) for r in PAPER_RATIOS]
        bases = cast(tuple[float, ...], self.bases)  # __post_init__ made it a tuple of floats
        return [RopeTheta(theta=b, layers=self.layers) for b in bases]

    def pass_bases(self, access: ModelAccess) -> list[dict[int, float]]:
        """The base every touched layer uses in each pass ({layer: theta} per pass)."""
        per_type = takes_layer_type(rotary_module(access, self.name))
        out = []
        for spec in self.passes():
            params = spec.to_rope_parameters(access)
            out.append({layer: float((params[access.info.layers[layer].layer_type] if per_type else params)
                                     ["rope_theta"]) for layer in spec.target_layers(access)})
        return out

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        bases = self.pass_bases(access)
        return {**WhatIf.resolved(self, access), "passes": [str(spec) for spec in self.passes()],
                "bases": [sorted(set(b.values())) for b in bases], "combine": self.combine}

    def _checked(self, access: ModelAccess, wrapped: str) -> tuple[ModelAccess, list[RopeTheta]]:
        """The access and the passes, after every check that needs no pass: an HF access not already wrapped by
        buckets (`wrapped`: the message if it is), no RoPE rescaling on it, valid layers and bases."""
        access = check_access(access, type(self).__name__)
        hf_parts(access, type(self).__name__)
        if "_forward" in vars(access) or "greedy" in vars(access):
            raise InterventionError(wrapped)
        self._refuse_rescaling(access)
        passes = self.passes()
        for spec in passes:  # bad layers / bases raise here, before any pass
            spec.target_layers(access)
        return access, passes

    def weights(self, access: ModelAccess, input_ids: Any, *, logits: Any = "last") -> Tensor:
        """Which pass carries the prediction: each pass's weight in the combination, [P, b, n_kept] in the order
        of `passes()`, at the positions `logits` picks ("last": the next token a greedy decode starts with; "all";
        or sequence indices, as `access.run`). One forward per pass, run without this spec applied; the weights
        are those `access.run(ids, logits=...)` combines under it (`pass_weights`)."""
        access, passes = self._checked(access, "buckets.weights runs each pass itself: call it outside `with "
                                       "AttentionBuckets(...).applied(access)` (inside, a run already combines them).")
        if isinstance(logits, str) and logits == "none":
            raise InterventionError("buckets.weights: logits='none' asks for no position; give 'last', 'all' or "
                                    "sequence indices.")
        outs = []
        for spec in passes:
            with spec.applied(access):
                outs.append(access.run(input_ids, logits=logits).requested_logits())
        return pass_weights(torch.stack(outs))

    @contextlib.contextmanager
    def applied(self, access: ModelAccess) -> Iterator[ModelAccess]:
        """While applied, `access.run` returns the combined logits and `access.greedy` decodes from them; exit
        puts the access's own methods back (nothing of the model is written)."""
        access, passes = self._checked(access, "buckets: this access already runs wrapped passes (Attention "
                                       "Buckets applied twice?); apply one AttentionBuckets at a time.")
        original = access._forward
        spec_self = self

        def forward(input_ids: Tensor, position_ids: Tensor, taps: frozenset, on_layer: Any,
                    logit_positions: Tensor | None, edits: Any, **extra: Any) -> Tensor | None:
            if taps or on_layer is not None:
                raise InterventionError(spec_self._reads_refused())
            if logit_positions is None:  # nothing observable leaves the pass
                return None
            outs = []
            for spec in passes:
                spec_self._refuse_rescaling(access)
                with spec.applied(access):
                    outs.append(original(input_ids, position_ids, taps, on_layer, logit_positions, edits, **extra))
            return combine_passes(torch.stack(outs), spec_self.combine)

        def greedy(input_ids: Any, max_new_tokens: int, *, stop_ids: Any = (), edits: Any = (),
                   prefill_chunk: Any = "auto") -> Tensor:
            spec_self._refuse_rescaling(access)
            return _lockstep_greedy(access, passes, spec_self.combine, input_ids, max_new_tokens, stop_ids, edits,
                                    prefill_chunk)

        original_info = access.info
        vars(access)["_forward"] = forward
        vars(access)["greedy"] = greedy
        try:
            with WhatIf.applied(self, access):  # the length limit (lifted) and its restore
                yield access
        finally:
            vars(access).pop("_forward", None)
            vars(access).pop("greedy", None)
            access.info = original_info

    def install(self, access: ModelAccess, layers: list[int]) -> list[Any]:
        return []  # the passes install their own rotary modules, one pass at a time

    @staticmethod
    def _refuse_rescaling(access: ModelAccess) -> None:
        if vars(access).get(ROTARY_OVERRIDES):
            raise InterventionError(
                "buckets: a RoPE rescaling what-if (pi, ntk, yarn, ...) is applied to this access too; each bucket "
                "pass sets its own RoPE base, which would silently replace it. Attention Buckets is defined on "
                "the model's RoPE: apply it alone or with score-level what-ifs (string, self_extend, ...).")


def _lockstep_greedy(access: Any, passes: list[RopeTheta], combine: str, input_ids: Any, max_new_tokens: int,
                     stop_ids: Any, edits: Any, prefill_chunk: Any = "auto") -> Tensor:
    """Greedy decoding from the combined distribution: each pass keeps its own KV cache, every step runs each pass
    on the new token under its base and picks the argmax of the combined logits. Each pass prefills the prompt in
    chunks as `HFAccess.greedy` does (`prefill_chunk`; the passes' RoPE differs from the model's by its base only,
    so whether chunks apply is decided once, on the model). Edits that scale only the last query
    (positional_dimension) define a token's states by whether it is last: the prefix is recomputed instead."""
    from posprobe.access import ProjectionInputEdit
    from posprobe.adapters._compat import cache_kwargs
    from posprobe.devices import check_prefill_chunk

    check_prefill_chunk(prefill_chunk)
    all_edits = [*access._edits, *edits]
    if any(isinstance(e, ProjectionInputEdit) and e.queries == "last" for e in all_edits):
        return ModelAccess.greedy(access, input_ids, max_new_tokens, stop_ids=stop_ids, edits=edits)
    ids = access._check_ids(input_ids)
    access._validate_edits(all_edits)
    model = access.model
    caches = [access.new_kv_cache(all_edits) for _ in passes]
    chunk = access._prefill_chunk(ids, all_edits, caches[0], prefill_chunk)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=ids.device)
    step_ids = ids
    pos = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    new: list[Tensor] = []
    with torch.inference_mode():
        for step in range(max_new_tokens):
            outs = []
            for spec, cache in zip(passes, caches):
                with spec.applied(access), access._session(pos, frozenset(), None, all_edits):
                    if step == 0:
                        logits = access._prefill(ids, cache, chunk)
                    else:
                        logits = model(input_ids=step_ids, position_ids=pos, **cache_kwargs(model, cache),
                                       use_cache=True, logits_to_keep=1).logits[:, -1]
                outs.append(logits)
            nxt = combine_passes(torch.stack(outs), combine).argmax(-1, keepdim=True)
            new.append(nxt)
            if len(stop) and bool(torch.isin(nxt, stop).all()):
                break
            step_ids, pos = nxt, pos[:, -1:] + 1
    return torch.cat(new, dim=1)
