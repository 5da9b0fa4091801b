"""Per-architecture facts: where the layers and attention projections live, and the positional scheme per layer.

Owns the translation from an HF config (never TransformerLens' cfg, which is wrong for Gemma 3 / SmolLM2) to
`ModelInfo`, implementing METRICS.md "RoPE layout": per-layer theta, rotary width, chunk layout, scaling, window.
Used by every adapter so that all backends report identical facts for identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from posprobe.access import ChunkLayout, LayerInfo, ModelInfo, Positional
from posprobe.errors import UnsupportedModelError


@dataclass(frozen=True)
class ModulePaths:
    """Attribute names inside an HF causal LM; `None` when the architecture has no such module."""

    layers: str  # dotted path from the causal LM to the ModuleList of decoder blocks
    attention: str  # attribute of a block holding the attention module
    q_proj: str | None
    k_proj: str | None
    q_norm: str | None  # per-head norm applied before the rotation (Gemma 3, Qwen 3, SmolLM3 do not all have it)
    k_norm: str | None


_LLAMA_LIKE = ModulePaths("model.layers", "self_attn", "q_proj", "k_proj", None, None)
_QK_NORM = ModulePaths("model.layers", "self_attn", "q_proj", "k_proj", "q_norm", "k_norm")
_GPT2 = ModulePaths("transformer.h", "attn", None, None, None, None)

# model_type -> module paths; extend here to support a new architecture family.
_PATHS: dict[str, ModulePaths] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _QK_NORM,
    "qwen3": _QK_NORM,
    "olmo2": _LLAMA_LIKE,
    "gpt2": _GPT2,
}
_INTERLEAVED = {"gptj"}  # HF models whose rotary uses rotate_every_two
_ABSOLUTE = {"gpt2", "gpt_neo", "opt", "bloom"}  # bloom is ALiBi; treated as no RoPE


def supported_model_types() -> list[str]:
    return sorted(_PATHS)


def module_paths(config: Any) -> ModulePaths:
    model_type = getattr(config, "model_type", None)
    if model_type not in _PATHS:
        raise UnsupportedModelError(
            f"posprobe does not know where the attention modules of model_type {model_type!r} live. "
            f"Supported: {', '.join(supported_model_types())}. Add an entry to posprobe/adapters/architectures.py."
        )
    return _PATHS[model_type]


def get_path(root: nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _rope_parameters(config: Any, layer_type: str) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and layer_type in params and isinstance(params[layer_type], dict):
        return dict(params[layer_type])
    if isinstance(params, dict) and params:
        return dict(params)
    legacy: dict[str, Any] = {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    if getattr(config, "rope_scaling", None):
        legacy.update(config.rope_scaling)
    return legacy


def _layer_types(config: Any, n_layers: int) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return ["sliding_attention"] * n_layers
    return ["full_attention"] * n_layers


def layer_infos(config: Any) -> tuple[LayerInfo, ...]:
    """Per-layer positional facts from an HF config."""
    model_type = getattr(config, "model_type", "")
    n_layers = config.num_hidden_layers
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    types = _layer_types(config, n_layers)
    no_rope = getattr(config, "no_rope_layers", None)  # SmolLM3: 1 = RoPE, 0 = NoPE
    infos = []
    for index, layer_type in enumerate(types):
        window = getattr(config, "sliding_window", None) if layer_type == "sliding_attention" else None
        if model_type in _ABSOLUTE:
            positional = Positional.ABSOLUTE
        elif no_rope is not None and not no_rope[index]:
            positional = Positional.NONE
        else:
            positional = Positional.ROPE
        if positional is not Positional.ROPE:
            infos.append(LayerInfo(index, layer_type, positional, sliding_window=window))
            continue
        params = _rope_parameters(config, layer_type)
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        rotary_dim = int(head_dim * partial)
        rotary_dim -= rotary_dim % 2
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
            scaling = None
        infos.append(
            LayerInfo(
                index=index,
                layer_type=layer_type,
                positional=positional,
                rope_theta=float(params.get("rope_theta", 10000.0)),
                rotary_dim=rotary_dim,
                chunk_layout=ChunkLayout.INTERLEAVED if model_type in _INTERLEAVED else ChunkLayout.HALF_SPLIT,
                rope_scaling=scaling,
                sliding_window=window,
            )
        )
    return tuple(infos)


def model_info(model: nn.Module, name: str, tokenizer: Any | None) -> ModelInfo:
    """ModelInfo of an HF causal LM: shapes from its config, the attention scale from its own modules."""
    config = model.config
    paths = module_paths(config)
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    first_attn = getattr(get_path(model, paths.layers)[0], paths.attention)
    scale = float(getattr(first_attn, "scaling", head_dim**-0.5))
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    adds_bos = False
    if tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is not None:
        probe = tokenizer("a")["input_ids"]
        adds_bos = bool(probe) and probe[0] == tokenizer.bos_token_id
    return ModelInfo(
        name=name,
        architecture=type(model).__name__,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        d_model=config.hidden_size,
        vocab_size=config.vocab_size,
        max_positions=max_positions,
        attn_scale=scale,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        adds_bos=adds_bos,
        layers=layer_infos(config),
    )
