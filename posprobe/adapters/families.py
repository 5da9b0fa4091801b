"""The family registry: one tiny random-init config per decoder family posprobe supports.

Owns `FAMILIES` (family name -> HF `model_type` plus the few config fields that make the config tiny and exercise the
family's positional features: sliding windows, attention chunks, NoPE layers, partial rotary, ALiBi, softcap, sinks,
MLA, MoE) and `build_family(name)`, which returns a seeded random-init causal LM and the byte tokenizer. No
download: every model is built from its config with `AutoModelForCausalLM.from_config`. The conformance suite
(`tests/conformance/`) is parametrised over this registry, and the README support matrix / `posprobe models
--families` are generated from it, so "supported" means "passes the conformance suite on this tiny model".

Sizes are kept tiny (2-4 layers, hidden 32-64, byte vocabulary) and windows / chunks small (8 tokens), so a sequence
longer than any window stays short.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from posprobe.errors import UnknownNameError

WINDOW = 8  # sliding window / attention chunk of the tiny configs: the conformance lengths exceed it


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    # What posprobe must report for this config, written down from the family's HF implementation (not from
    # posprobe): per-layer positional scheme as one letter each (r = RoPE, n = NoPE, a = absolute, l = ALiBi),
    # rotary width and first rotated dim, and the chunk layout. The conformance suite checks ModelInfo against it.
    expect: dict[str, Any] = field(default_factory=dict)
    # Backends besides HF whose parity the conformance suite checks (and the support matrix shows).
    backends: tuple[str, ...] = ("transformer_lens", "nnsight")


_COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 1024}

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "llama", "Llama 2/3 (RoPE, GQA)", dict(_COMMON, head_dim=16),
           expect={"positional": "rr", "rotary_dim": 16}),
    Family("mistral", "mistral", "Mistral (RoPE, sliding window)", dict(_COMMON, head_dim=16, sliding_window=WINDOW),
           expect={"positional": "rr", "rotary_dim": 16, "windows": [WINDOW, WINDOW]}),
    Family("qwen2", "qwen2", "Qwen 2 / 2.5 (RoPE, q/k/v bias; window on upper layers)",
           dict(_COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
           expect={"positional": "rr", "rotary_dim": 16, "windows": [None, WINDOW]}),
    Family("qwen3", "qwen3", "Qwen 3 (RoPE, q/k RMSNorm per head before the rotation)", dict(_COMMON, head_dim=16),
           expect={"positional": "rr", "rotary_dim": 16}),
    Family("gemma", "gemma", "Gemma (RoPE, head_dim independent of hidden)", dict(_COMMON, head_dim=16),
           expect={"positional": "rr", "rotary_dim": 16}),
    Family("gemma2", "gemma2", "Gemma 2 (RoPE, logit softcap, query_pre_attn_scalar, alternating window)",
           dict(_COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                final_logit_softcapping=30.0),
           expect={"positional": "rr", "rotary_dim": 16, "windows": [WINDOW, None], "softcap": 5.0,
                   "scale": 24 ** -0.5}),
    Family("gemma3_text", "gemma3_text", "Gemma 3 (RoPE 10k local / 1M global, window, q/k norm)",
           dict(_COMMON, num_hidden_layers=3, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
           expect={"positional": "rrr", "rotary_dim": 16, "windows": [WINDOW, WINDOW, None], "theta": [1e4, 1e4, 1e6]}),
    Family("smollm3", "smollm3", "SmolLM3 (RoPE with NoPE every 4th layer)",
           dict(_COMMON, num_hidden_layers=4, head_dim=16, no_rope_layers=[1, 1, 1, 0]),
           expect={"positional": "rrrn", "rotary_dim": 16}),
    Family("mixtral", "mixtral", "Mixtral (RoPE, sparse MoE MLP)",
           dict(_COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
           expect={"positional": "rr", "rotary_dim": 16, "moe": True}),
    Family("qwen2_moe", "qwen2_moe", "Qwen 2 MoE (RoPE, shared + routed experts)",
           dict(_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=32),
           expect={"positional": "rr", "rotary_dim": 16, "moe": True}),
    Family("qwen3_moe", "qwen3_moe", "Qwen 3 MoE (RoPE, q/k norm, MoE MLP)",
           dict(_COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
           expect={"positional": "rr", "rotary_dim": 16, "moe": True}),
    Family("phi3", "phi3", "Phi-3 (RoPE, fused qkv projection)", dict(_COMMON),
           expect={"positional": "rr", "rotary_dim": 16}),
    Family("phi", "phi", "Phi-2 (partial rotary 0.5, q/k/v bias)", dict(_COMMON, partial_rotary_factor=0.5),
           expect={"positional": "rr", "rotary_dim": 8}),
    Family("gpt_neox", "gpt_neox", "GPT-NeoX / Pythia (partial rotary, fused qkv)",
           dict(_COMMON, hidden_size=128, rotary_pct=0.25, num_key_value_heads=None),
           expect={"positional": "rr", "rotary_dim": 8}),
    Family("gptj", "gptj", "GPT-J (interleaved partial rotary)",
           {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 1024},
           expect={"positional": "rr", "rotary_dim": 8, "layout": "interleaved"}),
    Family("olmo", "olmo", "OLMo (RoPE, non-parametric layer norm)", dict(_COMMON),
           expect={"positional": "rr", "rotary_dim": 16}),
    Family("olmo2", "olmo2", "OLMo 2 (RoPE, q/k norm over all heads)", dict(_COMMON),
           expect={"positional": "rr", "rotary_dim": 16}),
    Family("stablelm", "stablelm", "StableLM (partial rotary 0.25)",
           dict(_COMMON, hidden_size=128, partial_rotary_factor=0.25),
           expect={"positional": "rr", "rotary_dim": 8}),
    Family("starcoder2", "starcoder2", "StarCoder 2 (RoPE, sliding window)",
           dict(_COMMON, sliding_window=WINDOW),
           expect={"positional": "rr", "rotary_dim": 16, "windows": [WINDOW, WINDOW]}),
    Family("granite", "granite", "Granite (RoPE, attention_multiplier as the scale)",
           dict(_COMMON, attention_multiplier=0.2),
           expect={"positional": "rr", "rotary_dim": 16, "scale": 0.2}),
    Family("cohere", "cohere", "Cohere Command-R (interleaved rotary, parallel block)", dict(_COMMON),
           expect={"positional": "rr", "rotary_dim": 16, "layout": "interleaved"}),
    Family("falcon", "falcon", "Falcon (RoPE, multi-query; attention outside the interface)",
           {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "multi_query": True, "alibi": False,
            "max_position_embeddings": 1024},
           expect={"positional": "rr", "rotary_dim": 16, "kv_heads": 1},
           backends=("transformer_lens",)),  # nnsight: Falcon on SDPA returns no attention weights
    Family("falcon_alibi", "falcon", "Falcon with ALiBi (attention outside the interface)",
           {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "multi_query": False, "alibi": True,
            "max_position_embeddings": 1024},
           expect={"positional": "ll"}, backends=("transformer_lens",)),
    Family("gpt_oss", "gpt_oss", "gpt-oss (RoPE yarn, learned attention sinks, window, MoE)",
           dict(_COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                 "beta_slow": 1.0, "original_max_position_embeddings": 256, "truncate": False}),
           expect={"positional": "rr", "rotary_dim": 16, "windows": [WINDOW, None], "sinks": True, "moe": True}),
    Family("llama4_text", "llama4_text", "Llama 4 (chunked attention on RoPE layers, NoPE layers, MoE)",
           dict(_COMMON, num_hidden_layers=4, head_dim=16, attention_chunk_size=WINDOW, no_rope_layers=[1, 1, 1, 0],
                num_local_experts=2, interleave_moe_layer_step=2, intermediate_size_mlp=96),
           expect={"positional": "rrrn", "rotary_dim": 16, "chunks": [WINDOW, WINDOW, WINDOW, None],
                       "layout": "interleaved", "moe": True}),
    Family("deepseek_v3", "deepseek_v3", "DeepSeek-V3 (MLA: only qk_rope_head_dim rotates, interleaved, MoE)",
           dict(_COMMON, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                first_k_dense_replace=1, n_group=1, topk_group=1),
           expect={"positional": "rr", "rotary_dim": 8, "offset": 8, "moe": True}),
    Family("exaone4", "exaone4", "EXAONE 4 (RoPE on sliding layers, NoPE on global ones, q/k norm)",
           dict(_COMMON, num_hidden_layers=4, head_dim=16, sliding_window=WINDOW,
                layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
           expect={"positional": "rrrn", "rotary_dim": 16, "windows": [WINDOW, WINDOW, WINDOW, None]}),
    Family("gpt2", "gpt2", "GPT-2 (learned absolute positions, fused qkv)",
           {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024},
           expect={"positional": "aa"}),
    Family("opt", "opt", "OPT (learned absolute positions, offset 2)",
           {"hidden_size": 64, "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 64, "max_position_embeddings": 1024},
           expect={"positional": "aa"}),
    Family("bloom", "bloom", "BLOOM (ALiBi; attention outside the interface)",
           {"hidden_size": 64, "n_layer": 2, "n_head": 4},
           expect={"positional": "ll"}),
)}


def supported_model_types() -> list[str]:
    """Model types with a conformance entry; other model types are tried generically by the HF adapter."""
    return sorted({f.model_type for f in FAMILIES.values()})


def family_names() -> list[str]:
    return list(FAMILIES)


def family_config(name: str, vocab_size: int) -> Any:
    """The tiny HF config of family `name` (AutoConfig.for_model with the registry's fields)."""
    from transformers import AutoConfig

    if name not in FAMILIES:
        raise UnknownNameError("model family", name, family_names())
    fam = FAMILIES[name]
    kwargs = dict(fam.config)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return AutoConfig.for_model(fam.model_type, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0, tie_word_embeddings=False, **kwargs)


def build_family(name: str, *, seed: int = 0, attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, Any]:
    """A seeded random-init tiny model of family `name` and the byte tokenizer (no download)."""
    from transformers import AutoModelForCausalLM

    from posprobe.adapters.loading import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = family_config(name, len(tokenizer))
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except ValueError:  # families without SDPA support (softcap, sinks, ALiBi in the module) load eager, as HF does
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------------
# The support matrix (README section, `posprobe models --families`)

INTERVENTIONS = ("mask_heads", "found_in_the_middle", "positional_dimension", "disable_rope")
MATRIX_COLUMNS = ("family", "model", "positional", "attention", "probes", "interventions", "backends")


def _positional_summary(info: Any) -> str:
    layers = info.layers
    kinds = [layer.positional.value for layer in layers]
    rope = [layer for layer in layers if layer.has_rope]
    if not rope:
        word = {"absolute": "learned absolute", "alibi": "ALiBi", "none": "NoPE"}[kinds[0]]
        return word
    parts = ["RoPE"]
    partial = {layer.rotary_dim for layer in rope if layer.rotary_dim < info.head_dim}
    if partial:
        parts.append(f"partial {max(partial)}/{info.head_dim} dims")
    if any(layer.rotary_offset for layer in rope):
        parts.append("MLA: rope part last")
    if rope[0].chunk_layout.value == "interleaved":
        parts.append("interleaved pairs")
    if len({layer.rope_theta for layer in rope}) > 1:
        parts.append("theta per layer type")
    nope = kinds.count("none")
    if nope:
        parts.append(f"NoPE in {nope}/{len(layers)} layers")
    return ", ".join(parts)


def _attention_summary(info: Any, outside: bool) -> str:
    layers = info.layers
    parts = [f"GQA {info.n_heads}/{info.n_kv_heads}" if info.n_kv_heads not in (info.n_heads, 1)
             else ("MQA" if info.n_kv_heads == 1 else "MHA")]
    if any(layer.sliding_window for layer in layers):
        parts.append("sliding window")
    if any(layer.attention_chunk for layer in layers):
        parts.append("chunked")
    if any(layer.attn_softcap for layer in layers):
        parts.append("softcap")
    if any(layer.learned_sinks for layer in layers):
        parts.append("learned sinks")
    if info.moe:
        parts.append("MoE MLP")
    if outside:
        parts.append("eager weights (no attention interface)")
    return ", ".join(parts)


def support_row(name: str) -> dict[str, str]:
    """One row of the support matrix, derived from what posprobe finds in the family's tiny model."""
    from posprobe.adapters.hf import HFAccess
    from posprobe.probes import get_probe, list_probes

    model, tokenizer = build_family(name)
    access = HFAccess(model, tokenizer, name=name)
    info = access.info
    skipped = []
    for probe_name in list_probes():
        probe = get_probe(probe_name)
        skip = getattr(probe, "skip_reason", None)
        if skip is not None and skip(info, probe.Config()) is not None:
            skipped.append(probe_name)
    probes = "all" if not skipped else f"all but {', '.join(skipped)} (no RoPE)"
    applies = {"mask_heads": not access.outside_interface, "found_in_the_middle": not access.outside_interface,
               "positional_dimension": access.paths.q_proj is not None and access.paths.k_proj is not None,
               "disable_rope": info.has_rope}
    fam = FAMILIES[name]
    return {"family": name, "model": fam.description, "positional": _positional_summary(info),
            "attention": _attention_summary(info, access.outside_interface), "probes": probes,
            "interventions": ", ".join(k for k in INTERVENTIONS if applies[k]) or "none",
            "backends": ", ".join(("hf", *fam.backends))}


def support_matrix() -> list[dict[str, str]]:
    """The support matrix over the whole registry (builds each tiny model once; a few seconds)."""
    return [support_row(name) for name in FAMILIES]


def support_matrix_markdown(rows: list[dict[str, str]] | None = None) -> str:
    rows = support_matrix() if rows is None else rows
    lines = ["| " + " | ".join(MATRIX_COLUMNS) + " |", "|" + "---|" * len(MATRIX_COLUMNS)]
    lines += ["| " + " | ".join(row[c] for c in MATRIX_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)
