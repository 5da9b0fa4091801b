"""Architecture facts of an HF causal LM, found generically, with one declarative entry per family exception.

Owns the translation from an HF model (its modules and config; never TransformerLens' cfg, which is wrong for
Gemma 3 / SmolLM2) to `ModulePaths` and `ModelInfo`, implementing the "RoPE layout" of docs/probes/index.md:
per-layer positional scheme (RoPE / NoPE / absolute / ALiBi), theta, rotary width and offset, chunk layout, scaling,
sliding window, attention chunk, softcap, learned sinks and the attention scale. Used by every adapter, so that all
backends report identical facts for identical weights.

What is found generically (no per-family table):
- decoder blocks: the ModuleList under the model whose children each hold a submodule with `layer_idx` whose
  class name contains "Attention"; that submodule is the attention module;
- RoPE: a rotary-embedding module (class name contains "Rotary"); its `inv_freq` buffer (per layer type where the
  model has several) gives the rotary width r = 2 * len(inv_freq); theta and scaling come from `rope_parameters`;
- NoPE layers: an attention module whose `use_rope` is false (SmolLM3, Llama 4);
- absolute positions: a position-embedding module in the base model (`wpe`, `embed_positions`, ...);
- window / chunk / scale / softcap / sinks: `layer_types`, `sliding_window`, `attention_chunk_size`, the module's
  `scaling` and `attn_logit_softcapping` and `sinks` parameter.
What cannot be found generically is an entry of `EXCEPTIONS`, each with its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from posprobe.access import ChunkLayout, LayerInfo, ModelInfo, Positional
from posprobe.errors import UnsupportedModelError


@dataclass(frozen=True)
class ModulePaths:
    """Attribute names inside an HF causal LM; `None` when the architecture has no such module."""

    layers: str  # dotted path from the causal LM to the ModuleList of decoder blocks
    attention: str  # dotted path inside a block to the attention module
    q_proj: str | None  # separate query / key projections (None when fused, e.g. GPT-2 c_attn, NeoX qkv)
    k_proj: str | None
    q_norm: str | None  # a norm applied to q / k before the rotation (Gemma 3, Qwen 3, OLMo 2)
    k_norm: str | None


@dataclass(frozen=True)
class FamilyException:
    """What generic discovery cannot see for one `model_type`, and why."""

    reason: str
    layout: ChunkLayout | None = None  # coordinate layout of the post-rotary q/k when it is not rotate_half
    rotary_at_end: bool = False  # the rotated dims are the last r of the q/k head (MLA: cat(q_nope, q_rope))
    nope_on_full_layers: bool = False  # full-attention layers skip the rotation when the model has a window
    alibi_flag: str | None = None  # config field that switches ALiBi on; "" = always ALiBi
    outside_interface: bool = False  # attention computed inside the module, not through ALL_ATTENTION_FUNCTIONS


EXCEPTIONS: dict[str, FamilyException] = {
    "gptj": FamilyException("GPT-J rotates with rotate_every_two: chunk k is the pair (2k, 2k + 1)",
                            layout=ChunkLayout.INTERLEAVED),
    "cohere": FamilyException("Cohere's rotate_half pairs even and odd coordinates (repeat_interleave'd cos/sin)",
                              layout=ChunkLayout.INTERLEAVED),
    "llama4_text": FamilyException("Llama 4 rotates consecutive pairs as complex numbers (view_as_complex)",
                                   layout=ChunkLayout.INTERLEAVED),
    "deepseek_v3": FamilyException("MLA: q/k heads are cat(nope part, rope part); only the last qk_rope_head_dim "
                                   "dims rotate (rope_interleave permutes them into rotate_half order first)",
                                   rotary_at_end=True),
    "exaone4": FamilyException("EXAONE 4 applies RoPE only on sliding layers when the model has a window (global "
                               "layers are NoPE); nothing on the module says so", nope_on_full_layers=True),
    "falcon": FamilyException("Falcon computes attention inside FalconAttention (no AttentionInterface call): "
                              "patterns come from its eager attention weights; ALiBi when config.alibi",
                              alibi_flag="alibi", outside_interface=True),
    "bloom": FamilyException("BLOOM computes ALiBi attention inside BloomAttention (no AttentionInterface call): "
                             "patterns come from its eager attention weights", alibi_flag="", outside_interface=True),
}


def exception_for(config: Any) -> FamilyException | None:
    return EXCEPTIONS.get(str(getattr(config, "model_type", "")))


def get_path(root: nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Structure


def _attention_in(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The shallowest submodule of a block that carries `layer_idx` and is an attention module."""
    best = None
    for name, mod in block.named_modules():
        if not name or not hasattr(mod, "layer_idx") or "attention" not in type(mod).__name__.lower():
            continue
        if best is None or name.count(".") < best[0].count("."):
            best = (name, mod)
    return best


def _skeleton(config: Any) -> nn.Module:
    """The model of `config` built on the meta device (no memory, no weights): for structure discovery only."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _child_named(module: nn.Module, names: tuple[str, ...]) -> str | None:
    for name in names:
        if isinstance(getattr(module, name, None), nn.Module):
            return name
    return None


def module_paths(model: Any) -> ModulePaths:
    """Where the decoder blocks, the attention modules and (when separate) the q/k projections live.

    `model` is an HF causal LM (or its config: the structure is then read from a meta-device skeleton).
    """
    if not isinstance(model, nn.Module):
        model = _skeleton(model)
    config: Any = model.config
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or (n_layers and len(mod) != n_layers):
            continue
        found = [_attention_in(block) for block in mod]
        named = [f for f in found if f is not None]
        if len(named) == len(found) and len({f[0] for f in named}) == 1:
            candidates.append((name, named[0]))
    if not candidates:
        raise UnsupportedModelError(
            f"posprobe found no decoder blocks in {type(model).__name__}: it looks for a ModuleList of "
            f"{n_layers} blocks, each holding an attention module with a `layer_idx` attribute (every decoder of "
            f"transformers 5 has one). Is this a causal LM from transformers? If it is, add a FamilyException for "
            f"model_type {getattr(model.config, 'model_type', None)!r} in posprobe/adapters/architectures.py."
        )
    layers, (attention, attn) = min(candidates, key=lambda c: c[0].count("."))
    return ModulePaths(
        layers=layers, attention=attention,
        q_proj=_child_named(attn, ("q_proj", "query")), k_proj=_child_named(attn, ("k_proj", "key")),
        q_norm=_child_named(attn, ("q_norm", "q_layernorm")), k_norm=_child_named(attn, ("k_norm", "k_layernorm")),
    )


# ---------------------------------------------------------------------------------------------------------------
# Positional facts


def _rope_parameters(config: Any, layer_type: str) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and layer_type in params and isinstance(params[layer_type], dict):
        return dict(params[layer_type])
    if isinstance(params, dict) and params and not any(isinstance(v, dict) for v in params.values()):
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


def _rotary_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "rotary" in type(m).__name__.lower()]


def _inv_freq(rotary: list[nn.Module], layer_type: str) -> tuple[torch.Tensor | None, float]:
    """The inverse frequencies the model's rotary module uses for `layer_type` and its cos/sin multiplier."""
    for mod in rotary:
        for name in (f"{layer_type}_inv_freq", "inv_freq"):
            buf = getattr(mod, name, None)
            if isinstance(buf, torch.Tensor) and buf.device.type != "meta":
                scaling = getattr(mod, f"{layer_type}_attention_scaling", getattr(mod, "attention_scaling", 1.0))
                return buf.detach().float().cpu(), float(scaling or 1.0)
    return None, 1.0


def _has_absolute_positions(model: nn.Module) -> bool:
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for name, mod in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        named = leaf in ("wpe", "embed_positions") or "position" in leaf
        if named and any(isinstance(m, nn.Embedding) for m in mod.modules()):  # also inside wrappers (TL bridge)
            return True
    return False


def alibi_slopes(n_heads: int) -> tuple[float, ...]:
    """ALiBi head slopes (Press et al. 2022), as BLOOM / Falcon build them: 2^(-8h/n) for the closest power of two n,
    the remaining heads interleaved from the next power of two."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (i + 1) for i in range(1, 2 * (n_heads - closest), 2)]
    return tuple(float(s) for s in slopes)


def _attr(objs: tuple[Any, ...], names: tuple[str, ...]) -> Any:
    for obj in objs:
        for name in names:
            value = getattr(obj, name, None)
            if value is not None and not isinstance(value, nn.Module):
                return value
    return None


def _head_shapes(model: nn.Module, attn: nn.Module) -> tuple[int, int, int]:
    config: Any = model.config
    n_heads = int(_attr((attn, config), ("num_heads", "num_attention_heads", "n_head")))
    kv = _attr((attn, config), ("num_key_value_heads", "num_kv_heads"))
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv = 1  # Falcon multi-query
    head_dim = _attr((attn, config), ("qk_head_dim", "head_dim", "head_size"))
    if head_dim is None:
        head_dim = config.hidden_size // n_heads
    return n_heads, int(kv or n_heads), int(head_dim)


def layer_infos(model: Any, paths: ModulePaths | None = None) -> tuple[LayerInfo, ...]:
    """Per-layer positional facts of an HF causal LM (its config and its modules; given a config alone, its modules
    are read from a meta-device skeleton and the rotary width from the config)."""
    if not isinstance(model, nn.Module):
        model = _skeleton(model)
    config: Any = model.config
    paths = paths or module_paths(model)
    blocks = get_path(model, paths.layers)
    exc = exception_for(config)
    n_layers = len(blocks)
    n_heads, _, head_dim = _head_shapes(model, get_path(blocks[0], paths.attention))
    types = _layer_types(config, n_layers)
    rotary = _rotary_modules(model)
    alibi = exc is not None and exc.alibi_flag is not None and (exc.alibi_flag == "" or
                                                                 bool(getattr(config, exc.alibi_flag, False)))
    absolute = _has_absolute_positions(model)
    window_cfg = getattr(config, "sliding_window", None)
    chunk_cfg = getattr(config, "attention_chunk_size", None)
    infos = []
    for index, (block, layer_type) in enumerate(zip(blocks, types)):
        attn = get_path(block, paths.attention)
        window = window_cfg if layer_type == "sliding_attention" else None
        if window is None and hasattr(attn, "sliding_window") and not isinstance(attn.sliding_window, nn.Module):
            window = attn.sliding_window if layer_type != "full_attention" else None
        chunk = chunk_cfg if layer_type == "chunked_attention" else None
        softcap = getattr(attn, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None)
        sinks = isinstance(getattr(attn, "sinks", None), torch.Tensor)
        scale = _attr((attn,), ("scaling", "inv_norm_factor"))
        common: dict[str, Any] = {"index": index, "layer_type": layer_type, "sliding_window": window,
                                  "attention_chunk": chunk, "attn_softcap": float(softcap) if softcap else None,
                                  "learned_sinks": sinks,
                                  "attn_scale": float(scale) if scale is not None else head_dim**-0.5}
        nope = (getattr(attn, "use_rope", True) in (0, False)) or (
            exc is not None and exc.nope_on_full_layers and window_cfg and layer_type != "sliding_attention")
        if alibi:
            infos.append(LayerInfo(positional=Positional.ALIBI, alibi_slopes=alibi_slopes(n_heads), **common))
            continue
        if not rotary or nope:
            positional = Positional.ABSOLUTE if absolute and not rotary else Positional.NONE
            infos.append(LayerInfo(positional=positional, **common))
            continue
        params = _rope_parameters(config, layer_type)
        inv_freq, cos_scale = _inv_freq(rotary, layer_type)
        if inv_freq is not None:
            rotary_dim = 2 * len(inv_freq)
        else:  # GPT-J keeps a sin/cos table instead of inv_freq
            rotary_dim = int(_attr((attn, config), ("rotary_dim", "qk_rope_head_dim")) or head_dim)
            partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
            if partial and not _attr((attn, config), ("rotary_dim",)):
                rotary_dim = int(head_dim * partial)
        rotary_dim -= rotary_dim % 2
        scaling: dict[str, Any] | None = {k: v for k, v in params.items()
                                          if k not in ("rope_theta", "partial_rotary_factor")}
        if scaling is not None and scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
            scaling = None
        infos.append(LayerInfo(
            positional=Positional.ROPE, rope_theta=float(params.get("rope_theta", 10000.0)), rotary_dim=rotary_dim,
            chunk_layout=(exc.layout if exc and exc.layout else ChunkLayout.HALF_SPLIT), rope_scaling=scaling,
            rotary_offset=head_dim - rotary_dim if exc and exc.rotary_at_end else 0,
            rotary_cos_scale=cos_scale, **common))
    return tuple(infos)


def model_info(model: nn.Module, name: str, tokenizer: Any | None, paths: ModulePaths | None = None) -> ModelInfo:
    """ModelInfo of an HF causal LM: shapes and positional facts from its config and its own modules."""
    config: Any = model.config
    paths = paths or module_paths(model)
    blocks = get_path(model, paths.layers)
    attn = get_path(blocks[0], paths.attention)
    n_heads, n_kv, head_dim = _head_shapes(model, attn)
    layers = layer_infos(model, paths)
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    adds_bos = False
    if tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is not None:
        probe = tokenizer("a")["input_ids"]
        adds_bos = bool(probe) and probe[0] == tokenizer.bos_token_id
    moe = any("expert" in n.lower() or "moe" in type(m).__name__.lower() for n, m in blocks[0].named_modules())
    return ModelInfo(
        name=name,
        architecture=type(model).__name__,
        n_layers=len(blocks),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_model=config.hidden_size,
        vocab_size=config.vocab_size,
        max_positions=max_positions,
        attn_scale=float(layers[0].attn_scale or head_dim**-0.5),
        attn_softcap=layers[0].attn_softcap,
        adds_bos=adds_bos,
        layers=layers,
        family=getattr(config, "model_type", None),
        moe=moe or any("expert" in n.lower() for n, _ in blocks[-1].named_modules()),
    )
