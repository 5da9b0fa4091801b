"""RoPE rescaling what-ifs through transformers' own rope functions: PI, NTK-aware, dynamic NTK, YaRN, LongRoPE,
Llama 3, proportional (p-RoPE), and a plain new base (`rope_theta`, the passes of Attention Buckets).

Owns one mechanism for all of them: while applied, a second rotary-embedding module of the model's own class is
built from a copy of the model's config whose `rope_parameters` (of the touched layer types) carry the what-if's
settings, so the inverse frequencies and the attention factor come from `transformers.modeling_rope_utils.
ROPE_INIT_FUNCTIONS` exactly as if the model had been loaded with that `rope_parameters`; a forward pre-hook on each
touched attention module replaces its `position_embeddings` (cos, sin) by that module's output at the pass's
position ids. The model's own rotary module, buffers and config are never written. Parity (tests/what_if): logits
equal to the same weights loaded with that `rope_parameters` (atol 1e-5).

Layers: the model's convention by default: every RoPE layer, except for families with per-layer-type rope
parameters (Gemma 3), where rope scaling belongs to the global `full_attention` layers (as in Gemma 3's released
configs, whose sliding layers keep theta 10k); `layers="0:"` touches every RoPE layer, any LayerRange a block.
`dynamic` changes nothing while the sequence is shorter than `max_position_embeddings` (transformers recomputes
the base only beyond it) and, like transformers, keeps the longest length it has seen while applied.

Formulas (r = rotary width, w_k = theta^(-2k/r), L = native length = `max_position_embeddings`, s = factor):
PI (Chen et al. 2023): w_k / s.  NTK-aware (bloc97 2023): theta' = theta * s^(r / (r - 2)).  Dynamic NTK: theta' =
theta * (s * n / L - (s - 1))^(r / (r - 2)) for n > L.  YaRN (Peng et al. 2023): ramp between w_k / s and w_k over
the dims whose wavelength lies between L / beta_fast and L / beta_slow rotations, cos/sin times 0.1 ln s + 1.
Llama 3: w_k / s for wavelengths > L / low_freq_factor, w_k below L / high_freq_factor, smooth in between.
LongRoPE: w_k / lambda_k with per-dim factors (long above L), cos/sin times sqrt(1 + ln s / ln L).
Proportional (p-RoPE): only the first partial_rotary_factor of the frequencies rotate, the rest are 0.
rope_theta: theta' = `theta`, or `ratio` x theta (rope_type unchanged).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import nn

from posprobe.access import ROTARY_OVERRIDES, ModelAccess
from posprobe.errors import InterventionError
from posprobe.interventions.spec import register
from posprobe.what_if.base import (
    PositionRecorder,
    WhatIf,
    hf_parts,
    layer_type_of,
    native_length,
    rotary_module,
    takes_layer_type,
)


@runtime_checkable
class _AttentionModules(Protocol):
    """An access that hands out each layer's attention module (the HF adapter's `attention_module`)."""

    def attention_module(self, layer: int) -> nn.Module: ...


def _rotary_dim(access: ModelAccess, layer: int, what: str) -> int:
    """The rotary width r of a RoPE layer, or the error saying the model's facts lack it."""
    rotary_dim = access.info.layers[layer].rotary_dim
    if rotary_dim is None:
        raise InterventionError(f"{what}: layer {layer} of {access.info.name} reports no rotary_dim, so its "
                                f"frequencies cannot be rescaled; the adapter must read it from the model's config.")
    return rotary_dim


@dataclass(frozen=True)
class RopeParameters(WhatIf):
    """Base of the what-ifs that give the touched layer types new `rope_parameters` (RoPE rescaling, a new base):
    a rotary module built by transformers from a copy of the config supplies (cos, sin) to those layers. No settings
    of its own; subclasses implement `rope_parameters(old, access, layer) -> new`."""

    def rope_parameters(self, old: dict[str, Any], access: ModelAccess, layer: int) -> dict[str, Any]:
        """The rope_parameters of the touched layer type under this what-if (from the model's own `old`)."""
        raise NotImplementedError

    def default_layers(self, access: ModelAccess) -> list[int]:
        rope = [x.index for x in access.info.layers if x.has_rope]
        rotary = rotary_module(access, self.name)
        if takes_layer_type(rotary):  # per-layer-type rope parameters (Gemma 3): scaling goes to global layers
            full = [i for i in rope if access.info.layers[i].layer_type == "full_attention"]
            return full or rope
        return rope

    def scaled_config(self, access: ModelAccess, layers: list[int]) -> Any:
        """A copy of the model's config with this what-if's rope_parameters for the touched layers' types.

        This is also the config the parity tests load the reference model with (Gemma 3: only the layer types of
        the touched layers change; other families: the one rope_parameters dict).
        """
        model, _ = hf_parts(access, self.name)
        config = copy.deepcopy(model.config)
        params = copy.deepcopy(config.rope_parameters)
        rotary = rotary_module(access, self.name)
        if takes_layer_type(rotary):
            for layer in layers:
                layer_type = access.info.layers[layer].layer_type
                params[layer_type] = self.rope_parameters(dict(model.config.rope_parameters[layer_type]), access,
                                                          layer)
        else:
            params = self.rope_parameters(dict(model.config.rope_parameters), access, layers[0])
        config.rope_parameters = params
        return config

    # --- applying -----------------------------------------------------------------------------------------------
    def install(self, access: ModelAccess, layers: list[int]) -> list[Any]:
        rotary = rotary_module(access, self.name)
        if not isinstance(access, _AttentionModules):  # rotary_module has checked it is an HF access, which is one
            raise InterventionError(f"{self.name}: this {type(access).__name__} does not hand out attention modules "
                                    f"(attention_module(layer)); the RoPE what-ifs run on the HF backend.")
        if takes_layer_type(rotary):
            kinds = {access.info.layers[i].layer_type for i in layers}
            others = [x.index for x in access.info.layers if x.has_rope and x.layer_type in kinds
                      and x.index not in layers]
            if others:
                raise InterventionError(
                    f"{self.name}: {access.info.name} has one set of rope parameters per layer type; layers {others} "
                    f"share a type with the chosen ones. Choose whole layer types (the default: full_attention).")
        config = self.scaled_config(access, layers)
        device = next((b.device for b in rotary.buffers()), None)
        try:
            scaled = type(rotary)(config)
        except (TypeError, ValueError, KeyError) as exc:
            raise InterventionError(f"{self.name}: transformers could not build {type(rotary).__name__} with "
                                    f"rope_parameters {config.rope_parameters}: {exc}") from exc
        if device is not None:
            scaled = scaled.to(device)
        recorder = PositionRecorder(rotary)
        handles: list[Any] = [recorder]
        overrides = vars(access).setdefault(ROTARY_OVERRIDES, {})
        for layer in layers:
            layer_type = layer_type_of(access, layer, rotary)
            overrides[layer] = (scaled, layer_type)
            handles.append(access.attention_module(layer).register_forward_pre_hook(
                _replace_position_embeddings(scaled, layer_type, recorder, self.name), with_kwargs=True))
        return handles

    def to_rope_parameters(self, access: ModelAccess) -> dict[str, Any]:
        """The `rope_parameters` a model would be loaded with to behave as under this what-if (provenance)."""
        return copy.deepcopy(self.scaled_config(access, self.target_layers(access)).rope_parameters)

    def resolved(self, access: ModelAccess) -> dict[str, Any]:
        return {**super().resolved(access), "rope_parameters": self.to_rope_parameters(access)}


@dataclass(frozen=True)
class RopeRescaling(RopeParameters):
    """Base of the RoPE rescaling what-ifs: a context extension factor and a named transformers rope type."""

    factor: float | int = field(default=4.0, metadata={"help": "context extension factor s (target / native length)"})
    max_length: int | None = field(default=None, metadata={"help": "longest sequence accepted while applied; "
                                                                   "none = factor x native"})

    rope_type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor) and self.factor > 0):
            raise InterventionError(f"{self.name}: factor must be a positive number; got {self.factor!r}.")

    def rope_parameters(self, old: dict[str, Any], access: ModelAccess, layer: int) -> dict[str, Any]:
        return {**old, "rope_type": self.rope_type, "factor": float(self.factor)}

    def context_limit(self, access: ModelAccess) -> int | None:
        if self.max_length is not None:
            return int(self.max_length)
        native = native_length(access)
        return None if native is None else math.ceil(native * float(self.factor))


def _replace_position_embeddings(scaled: nn.Module, layer_type: str | None, recorder: PositionRecorder,
                                 name: str) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        pos = recorder.position_ids
        if pos is None or "position_embeddings" not in kwargs:
            raise InterventionError(f"{name}: the attention module got no position ids / position_embeddings from "
                                    f"the model's rotary module in this pass; this family computes RoPE elsewhere.")
        key = layer_type
        if key not in recorder.memo:
            hidden = args[0] if args else kwargs["hidden_states"]
            extra = (layer_type,) if layer_type is not None else ()
            recorder.memo[key] = scaled(hidden, pos, *extra)
        kwargs = dict(kwargs)
        kwargs["position_embeddings"] = recorder.memo[key]
        return args, kwargs

    return hook


# ---------------------------------------------------------------------------------------------------------------
# The methods


@register
@dataclass(frozen=True)
class PositionInterpolation(RopeRescaling):
    """PI (Chen et al. 2023): positions divided by `factor` (transformers rope_type "linear")."""

    name: ClassVar[str] = "pi"
    summary: ClassVar[str] = "position interpolation: every frequency / factor (rope_type linear)"
    rope_type: ClassVar[str] = "linear"


@register
@dataclass(frozen=True)
class NTKAware(RopeRescaling):
    """NTK-aware static scaling (bloc97 2023): a new base theta * factor^(r / (r - 2)), no named rope type."""

    name: ClassVar[str] = "ntk"
    summary: ClassVar[str] = "NTK-aware scaling: theta * factor^(r/(r-2)) (rope_type default, new theta)"

    def rope_parameters(self, old: dict[str, Any], access: ModelAccess, layer: int) -> dict[str, Any]:
        r = _rotary_dim(access, layer, self.name)
        return {**old, "rope_theta": float(old["rope_theta"]) * float(self.factor) ** (r / (r - 2))}


@register
@dataclass(frozen=True)
class RopeTheta(RopeParameters):
    """A new RoPE base for the touched layer types (rope_type unchanged): `theta` absolute, or `ratio` times the
    layer type's own theta. One pass of Attention Buckets (`buckets`); scan a bucket with it."""

    name: ClassVar[str] = "rope_theta"
    summary: ClassVar[str] = "a new RoPE base: theta, or ratio x the model's theta (one Attention Buckets pass)"

    theta: float | int | None = field(default=None, metadata={"help": "new base; none = ratio x the model's "
                                                                     "theta"})
    ratio: float | int = field(default=1.0, metadata={"help": "multiplier of the model's theta (when theta is none)"})
    max_length: int | None = field(default=None, metadata={"help": "longest sequence accepted; none = no limit"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for label in ("theta", "ratio"):
            value = getattr(self, label)
            if value is None and label == "theta":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                       and value > 0):
                raise InterventionError(f"rope_theta: {label} must be a positive number; got {value!r}.")

    def rope_parameters(self, old: dict[str, Any], access: ModelAccess, layer: int) -> dict[str, Any]:
        base = float(self.theta) if self.theta is not None else float(old["rope_theta"]) * float(self.ratio)
        return {**old, "rope_theta": base}

    def context_limit(self, access: ModelAccess) -> int | None:
        return self.max_length


@register
@dataclass(frozen=True)
class DynamicNTK(RopeRescaling):
    """Dynamic NTK (emozilla 2023; transformers rope_type "dynamic"): base grows with the sequence beyond L."""

    name: ClassVar[str] = "dynamic"
    summary: ClassVar[str] = "dynamic NTK: base recomputed from the length beyond the native window (no-op below)"
    rope_type: ClassVar[str] = "dynamic"


@register
@dataclass(frozen=True)
class YaRN(RopeRescaling):
    """YaRN (Peng et al. 2023; rope_type "yarn"); paper defaults beta_fast 32, beta_slow 1, 0.1 ln s + 1."""

    name: ClassVar[str] = "yarn"
    summary: ClassVar[str] = "YaRN: NTK-by-parts ramp + attention temperature 0.1 ln(factor) + 1"
    rope_type: ClassVar[str] = "yarn"

    beta_fast: float | int = field(default=32.0, metadata={"help": "rotations above which dims extrapolate"})
    beta_slow: float | int = field(default=1.0, metadata={"help": "rotations below which dims interpolate"})
    attention_factor: float | int | None = field(default=None, metadata={"help": "cos/sin scale; none = 0.1 ln s + 1"})
    original_max_position_embeddings: int | None = field(default=None, metadata={"help": "trained length; none "
                                                                                         "= the model's"})

    def rope_parameters(self, old: dict[str, Any], access: ModelAccess, layer: int) -> dict[str, Any]:
        new = {**super().rope_parameters(old, access, layer), "beta_fast": float(self.beta_fast),
               "beta_slow": float(self.beta_slow),
               "original_max_position_embeddings": self.original_max_position_embeddings or native_length(access)}
        if self.attention_factor is not None:
            new["attention_factor"] = float(self.attention_factor)
        return new


@register
@dataclass(frozen=True)
class Llama3(RopeRescaling):
    """Llama 3.1's frequency-dependent scaling (rope_type "llama3"); Meta's defaults 8 / 1 / 4."""

    name: ClassVar[str] = "llama3"
    summary: ClassVar[str] = "Llama 3.1 scaling: low frequencies / factor, high kept, smooth in between"
    rope_type: ClassVar[str] = "llama3"

    factor: float | int = field(default=8.0, metadata={"help": "scale of the low frequencies"})
    low_freq_factor: float | int = field(default=1.0, metadata={"help": "wavelengths above L / this are divided"})
    high_freq_factor: float | int = field(default=4.0, metadata={"help": "wavelengths below L / this are kept"})
    original_max_position_embeddings: int | None = field(default=None, metadata={"help": "trained length; none "
                                                                                         "= the model's"})

    def rope_parameters(self, old: dict[str, Any], access: ModelAccess, layer: int) -> dict[str, Any]:
        return {**super().rope_parameters(old, access, layer), "low_freq_factor": float(self.low_freq_factor),
                "high_freq_factor": float(self.high_freq_factor),
                "original_max_position_embeddings": self.original_max_position_embeddings or native_length(access)}


@register
@dataclass(frozen=True)
class LongRoPE(RopeRescaling):
    """LongRoPE (Ding et al. 2024; rope_type "longrope"): per-dimension factors, long set beyond L.

    The paper's factors come from an evolutionary search per model; without them (None) the long factors are all
    `factor` (uniform, i.e. PI beyond L) and the short ones all 1, with LongRoPE's attention factor.
    """

    name: ClassVar[str] = "longrope"
    summary: ClassVar[str] = "LongRoPE: per-dim rescale factors (long beyond the native length), sqrt attention factor"
    rope_type: ClassVar[str] = "longrope"

    # text form: long_factor=1,1.5,2,... (one value per frequency)
    long_factor: tuple[float | int, ...] | list | str | None = field(default=None, metadata={
        "help": "r/2 factors used beyond L; none = all `factor`"})
    short_factor: tuple[float | int, ...] | list | str | None = field(default=None, metadata={
        "help": "r/2 factors used up to L; none = all 1"})
    original_max_position_embeddings: int | None = field(default=None, metadata={"help": "trained length; none "
                                                                                         "= the model's"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for label in ("long_factor", "short_factor"):
            value = getattr(self, label)
            if value is None:
                continue
            try:
                values = tuple(float(v) for v in (value.split(",") if isinstance(value, str) else value))
            except (TypeError, ValueError):
                raise InterventionError(f"longrope: {label} must be numbers (text: 1,1.5,2,...); got {value!r}.") \
                    from None
            object.__setattr__(self, label, values)

    def rope_parameters(self, old: dict[str, Any], access: ModelAccess, layer: int) -> dict[str, Any]:
        half = _rotary_dim(access, layer, self.name) // 2
        long = list(self.long_factor) if self.long_factor is not None else [float(self.factor)] * half
        short = list(self.short_factor) if self.short_factor is not None else [1.0] * half
        for label, values in (("long_factor", long), ("short_factor", short)):
            if len(values) != half:
                raise InterventionError(f"longrope: {label} needs r/2 = {half} values (one per frequency of layer "
                                        f"{layer}); got {len(values)}.")
        return {**super().rope_parameters(old, access, layer), "long_factor": long, "short_factor": short,
                "original_max_position_embeddings": self.original_max_position_embeddings or native_length(access)}


@register
@dataclass(frozen=True)
class ProportionalRoPE(RopeRescaling):
    """p-RoPE (rope_type "proportional"): only the first `partial_rotary_factor` of the frequencies rotate."""

    name: ClassVar[str] = "proportional"
    summary: ClassVar[str] = "p-RoPE: keep the fastest fraction of the frequencies, the rest position-free"
    rope_type: ClassVar[str] = "proportional"

    factor: float | int = field(default=1.0, metadata={"help": "frequency divisor of the rotating part"})
    partial_rotary_factor: float | int = field(default=0.75, metadata={"help": "fraction of the frequencies that "
                                                                               "rotate"})

    def rope_parameters(self, old: dict[str, Any], access: ModelAccess, layer: int) -> dict[str, Any]:
        if not 0.0 <= float(self.partial_rotary_factor) <= 1.0:
            raise InterventionError(f"proportional: partial_rotary_factor must lie in [0, 1]; got "
                                    f"{self.partial_rotary_factor!r}.")
        return {**super().rope_parameters(old, access, layer),
                "partial_rotary_factor": float(self.partial_rotary_factor)}

    def context_limit(self, access: ModelAccess) -> int | None:
        return self.max_length if self.max_length is not None else native_length(access)
