"""The base of every context-extension what-if and the model plumbing they share (HF backend).

Owns `WhatIf` (an `Intervention` from `posprobe.interventions.spec` that also installs hooks on the HF model for
the block and lifts the access's context limit while applied), the choice of the layers a what-if touches (the
model's own convention by default, a `LayerRange` when the user chooses), and the rotary plumbing: finding the
model's rotary-embedding module, recording the position ids of the pass, and which inverse frequencies a layer
uses right now (the model's own buffers, or those of a RoPE-rescaling what-if applied on top).

Every what-if leaves the model as it found it: hooks are removed and `access.info` is put back in `finally`, and
no parameter or buffer of the model is ever written (tests check logits bit for bit after exit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from posprobe.access import ROTARY_OVERRIDES, ChunkLayout, Edit, EditContext, ModelAccess
from posprobe.errors import InterventionError
from posprobe.interventions.spec import (
    Intervention,
    LayerRange,
    check_access,
    layer_range_of,
    register,
)


def hf_parts(access: ModelAccess, what: str) -> tuple[nn.Module, nn.Module]:
    """(causal LM, base model) of an HF access, or the error saying which backend the what-if needs."""
    model = getattr(access, "model", None)
    base = getattr(access, "base", None)
    if getattr(access, "backend", None) != "hf" or model is None or base is None:
        raise InterventionError(
            f"{what} edits the rotary embedding / attention of a transformers model and runs on the HF backend "
            f"only; this access is backend {getattr(access, 'backend', '?')!r}. Load the model with "
            f"posprobe.load_model(name_or_model) (backend='hf', the default).")
    return model, base


def native_length(access: ModelAccess) -> int | None:
    """The model's trained length (its config's max_position_embeddings), also while a what-if lifts the access's
    limit (`access.info.max_positions` is then the lifted one)."""
    model, _ = hf_parts(access, "native_length")
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def rotary_module(access: ModelAccess, what: str) -> nn.Module:
    """The model's rotary-embedding module (computes (cos, sin) once per pass from the position ids)."""
    _, base = hf_parts(access, what)
    found = getattr(base, "rotary_emb", None)
    if found is None:
        found = next((m for name, m in base.named_children() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if found is None or not hasattr(found, "forward"):
        raise InterventionError(
            f"{what}: {access.info.architecture} has no model-level rotary-embedding module (looked for "
            f"`rotary_emb` or a child named *RotaryEmbedding in {type(base).__name__}). The what-ifs need a family "
            f"that computes (cos, sin) once per pass and hands them to every attention module as "
            f"`position_embeddings` (Llama, Mistral, Qwen, Gemma, SmolLM, OLMo ...).")
    return found


def takes_layer_type(rotary: nn.Module) -> bool:
    """True for rotary modules with one set of frequencies per layer type (Gemma 3: forward(x, pos, layer_type))."""
    return "layer_type" in inspect.signature(type(rotary).forward).parameters


def layer_type_of(access: ModelAccess, layer: int, rotary: nn.Module) -> str | None:
    return access.info.layers[layer].layer_type if takes_layer_type(rotary) else None


def current_inv_freq(access: ModelAccess, layer: int) -> Tensor:
    """The inverse frequencies layer `layer` rotates with in the current pass, [r / 2] float32.

    A RoPE-rescaling what-if applied to this access takes precedence; otherwise the model's own rotary buffer
    (`inv_freq`, or `{layer_type}_inv_freq` for per-layer-type rotaries), read after the model has updated it for
    this pass (dynamic / longrope rotaries recompute it from the sequence length).
    """
    override = vars(access).get(ROTARY_OVERRIDES, {}).get(layer)
    if override is not None:
        module, layer_type = override
    else:
        module = rotary_module(access, "current_inv_freq")
        layer_type = layer_type_of(access, layer, module)
    name = f"{layer_type}_inv_freq" if layer_type is not None else "inv_freq"
    inv_freq = getattr(module, name, None)
    if inv_freq is None:
        raise InterventionError(f"The rotary module {type(module).__name__} has no buffer {name!r}; cannot tell "
                                f"which frequencies layer {layer} uses.")
    return inv_freq.float()


def rotate(x: Tensor, angle: Tensor, offset: int = 0) -> Tensor:
    """Rotate the RoPE coordinates of x [..., d] by `angle` [..., r/2] (HF half-split layout, dims offset..offset+r).

    The same formula as transformers' `apply_rotary_pos_emb`: x * cos + rotate_half(x) * sin on cos = [c, c].
    Coordinates outside the rotary block (partial rotary; MLA's non-rotary part before it) pass through.
    """
    r = 2 * angle.shape[-1]
    cos = torch.cat((angle.cos(), angle.cos()), dim=-1).to(x.dtype)
    sin = torch.cat((angle.sin(), angle.sin()), dim=-1).to(x.dtype)
    xr = x[..., offset:offset + r]
    half = r // 2
    rotated = xr * cos + torch.cat((-xr[..., half:], xr[..., :half]), dim=-1) * sin
    if offset == 0 and r == x.shape[-1]:
        return rotated
    return torch.cat((x[..., :offset], rotated, x[..., offset + r:]), dim=-1)


def key_positions(ctx: EditContext, batch: int, device: torch.device) -> Tensor:
    """Positions of an attention call's keys [b, nk]: the pass's position ids when they cover every key, else
    0..nk-1 (KV-cached generation and chunked prefill, where posprobe's positions are contiguous)."""
    pos = ctx.position_ids
    if pos is not None and pos.shape[-1] == ctx.n_keys:
        return pos.to(device).expand(batch, -1)
    return torch.arange(ctx.n_keys, device=device)[None].expand(batch, -1)


def rotary_offset(access: ModelAccess, layer: int) -> int:
    """First rotated dim of a q/k head of `layer` (MLA heads are cat(nope, rope))."""
    return int(getattr(access.info.layers[layer], "rotary_offset", 0) or 0)


# ---------------------------------------------------------------------------------------------------------------
# The base spec


@dataclass(frozen=True)
class WhatIf(Intervention):
    """An inference-time change of how the model sees positions, applied to an access for a `with` block.

    `layers`: a `LayerRange` (start inclusive, stop exclusive; text "9:18"), or None for the what-if's default
    (`default_layers`). Layers without RoPE inside the range are left alone by the positional what-ifs.
    Subclasses implement `install(access, layers) -> hooks` and/or `layer_edits(access, layers) -> edits`, and
    `context_limit(access)` (the longest sequence the access accepts while applied; None: no limit).
    """

    layers: LayerRange | None = field(default=None, metadata={"help": "layers START:STOP (stop exclusive); "
                                                               "none = the method's default"})

    needs_rope: ClassVar[bool] = True
    backend_note: ClassVar[str] = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", LayerRange.coerce(self.layers, f"{self.name} layers"))

    # --- what subclasses implement ------------------------------------------------------------------------------
    def default_layers(self, access: ModelAccess) -> list[int]:
        """Default: the RoPE layers with global attention; all RoPE layers when every layer is windowed."""
        rope = [x.index for x in access.info.layers if x.has_rope or not self.needs_rope]
        full = [i for i in rope if access.info.layers[i].sliding_window is None]
        return full or rope

    def install(self, access: ModelAccess, layers: list[int]) -> list[Any]:
        """Hooks on the model for the block (removed on exit)."""
        return []

    def layer_edits(self, access: ModelAccess, layers: list[int]) -> list[Edit]:
        """Attention edits active for the block."""
        return []

    def context_limit(self, access: ModelAccess) -> int | None:
        """The longest sequence the access accepts while this what-if is applied (None: no limit)."""
        return native_length(access)

    # --- resolution ---------------------------------------------------------------------------------------------
    def target_layers(self, access: ModelAccess) -> list[int]:
        """The layers this what-if touches on `access` (checked against the model)."""
        info = access.info
        if self.layers is None:
            chosen = self.default_layers(access)
        else:
            chosen = self.layers.indices(info.n_layers, info.name)
            if self.needs_rope:
                chosen = [i for i in chosen if info.layers[i].has_rope]
        if not chosen:
            raise InterventionError(
                f"{self.name}: no layer of {info.name} to apply it to (layers {self.layers or 'default'}; the model's "
                f"RoPE layers are {layer_range_of([x.index for x in info.layers if x.has_rope]) or 'none'}).")
        if self.needs_rope:
            bad = [i for i in chosen if info.layers[i].chunk_layout is not ChunkLayout.HALF_SPLIT]
            if bad:
                raise InterventionError(f"{self.name}: layers {bad} of {info.name} use the interleaved RoPE layout, "
                                        f"which the what-ifs do not implement (half-split families only).")
        return chosen

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        return {"layers": layer_range_of(self.target_layers(access)), "context_limit": self.context_limit(access)}

    def edits(self, access: ModelAccess) -> list[Edit]:
        return self.layer_edits(access, self.target_layers(access))

    # --- applying -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def applied(self, access: ModelAccess) -> Iterator[ModelAccess]:
        """Apply to `access` for the block; on exit hooks, edits and the context limit are restored exactly."""
        access = check_access(access, type(self).__name__)
        hf_parts(access, type(self).__name__)
        layers = self.target_layers(access)
        edits = self.layer_edits(access, layers)
        original_info = access.info
        handles: list[Any] = []
        overrides_before = dict(vars(access).get(ROTARY_OVERRIDES, {}))
        try:
            handles = self.install(access, layers)
            limit, current = self.context_limit(access), original_info.max_positions
            limit = None if limit is None or current is None else max(limit, current)  # nested: most permissive
            if limit != current:
                access.info = dataclasses.replace(original_info, max_positions=limit)
            with access.editing(edits):
                yield access
        finally:
            for handle in reversed(handles):
                handle.remove()
            access.info = original_info
            if overrides_before:
                vars(access)[ROTARY_OVERRIDES] = overrides_before
            else:
                vars(access).pop(ROTARY_OVERRIDES, None)


class PositionRecorder:
    """Records the position ids of every pass from the model's rotary module (a forward hook), so attention hooks
    can compute (cos, sin) for other settings at the same positions."""

    def __init__(self, rotary: nn.Module) -> None:
        self.position_ids: Tensor | None = None
        self.memo: dict[Any, tuple[Tensor, Tensor]] = {}
        self.handle = rotary.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if pos is not self.position_ids:
            self.memo.clear()
        self.position_ids = pos

    def remove(self) -> None:
        self.handle.remove()
        self.memo.clear()


@register
@dataclass(frozen=True)
class Extrapolate(WhatIf):
    """Plain RoPE past the native window: nothing changes but the access's length limit (the baseline of every
    context-extension comparison). `max_length` None: no limit."""

    max_length: int | None = field(default=None, metadata={"help": "longest sequence accepted; none = no limit"})

    name: ClassVar[str] = "extrapolate"
    summary: ClassVar[str] = "plain RoPE beyond the native window (only the access's length limit is lifted)"
    needs_rope: ClassVar[bool] = False

    def default_layers(self, access: ModelAccess) -> list[int]:
        return list(range(access.info.n_layers))

    def context_limit(self, access: ModelAccess) -> int | None:
        return self.max_length


@dataclass(frozen=True)
class Stack(Intervention):
    """Several interventions / what-ifs applied together, in order (e.g. YaRN then Self-Extend); exit undoes them in
    reverse. What `posprobe scan --what-if A --what-if B` applies. Not registered (no text form of its own)."""

    parts: tuple[Intervention, ...] = ()

    name: ClassVar[str] = "stack"
    summary: ClassVar[str] = "several interventions applied together"

    @contextlib.contextmanager
    def applied(self, access: ModelAccess) -> Iterator[ModelAccess]:
        with contextlib.ExitStack() as stack:
            for part in self.parts:
                stack.enter_context(part.applied(access))
            yield access

    def check_runner(self, runner: str) -> None:
        for part in self.parts:
            part.check_runner(runner)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "parts": [part.to_dict() for part in self.parts]}

    def describe(self, access: ModelAccess | None = None) -> dict[str, Any]:
        return {"name": self.name, "parts": [part.describe(access) for part in self.parts]}

    def __str__(self) -> str:
        return " + ".join(str(part) for part in self.parts)
