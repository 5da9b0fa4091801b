"""Random-init baselines of a given shape: what position looks like before any training
(docs/probes/implicit_position.md).

Owns `random_init_like(model, kind)`: a seeded random-init HF model with the same layer count, model width, heads,
KV heads and head dimension as a given model (or `ModelInfo`), built with `posprobe.models.tiny_model` from configs
(no download). kind "nope" is a SmolLM3 config with every layer in `no_rope_layers` set to 0 (no positional signal
at all, Chi et al. 2023's setting); "rope" is a Llama config (RoPE in every layer, one theta: the most common theta
of the reference model's RoPE layers). The vocabulary is the byte tokenizer's, not the reference model's: a random
model's embeddings carry no meaning, and 260 rows instead of 262k keep a Gemma-shaped baseline cheap on CPU.
Everything else (MLP width, norms, sliding windows, softcaps) follows the tiny Llama / SmolLM3 template.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from posprobe.access import ModelAccess, ModelInfo
from posprobe.errors import UnknownNameError

BASELINE_KINDS = ("nope", "rope")


def _reference_info(model: Any) -> ModelInfo:
    if isinstance(model, ModelInfo):
        return model
    from posprobe.models import load_model

    return load_model(model).info


def _typical_theta(info: ModelInfo) -> float:
    thetas = [layer.rope_theta for layer in info.layers if layer.has_rope and layer.rope_theta]
    if not thetas:
        return 10000.0
    return float(Counter(thetas).most_common(1)[0][0])


def random_init_like(model: Any, kind: str = "nope", *, seed: int = 0, max_positions: int | None = None) -> ModelAccess:
    """A seeded random-init model with the shape of `model` (a ModelInfo, a ModelAccess or anything load_model takes).

    kind: "nope" (no positional encoding in any layer) or "rope" (RoPE in every layer). max_positions defaults to
    the reference model's (4096 when it has none). The returned access is named e.g. "random-nope(gemma-3-270m)".
    """
    if kind not in BASELINE_KINDS:
        raise UnknownNameError("baseline kind", kind, BASELINE_KINDS)
    from posprobe.models import tiny_model, wrap

    info = _reference_info(model)
    hf_model, tokenizer = tiny_model(
        kind,
        n_layers=info.n_layers,
        d_model=info.d_model,
        n_heads=info.n_heads,
        n_kv_heads=info.n_kv_heads,
        head_dim=info.head_dim,
        max_positions=max_positions or info.max_positions or 4096,
        rope_theta=_typical_theta(info),
        seed=seed,
    )
    return wrap(hf_model, tokenizer=tokenizer, name=f"random-{kind}({info.name})")


__all__ = ["BASELINE_KINDS", "random_init_like"]
