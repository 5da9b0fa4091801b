"""Test doubles for probes: an access whose attention patterns (and q/k/residuals) are planted by hand.

Owns `PlantedAccess`, a `ModelAccess` that runs no network: each layer hands probes the tensors produced by user
functions of (layer, input_ids), so a probe can be checked against patterns whose answer is known (a perfect
previous-token head must score 1). Also `planted_info` to build a small ModelInfo, and pattern constructors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from posprobe.access import (
    ChunkLayout,
    Edit,
    LayerCallback,
    LayerCapture,
    LayerInfo,
    ModelAccess,
    ModelInfo,
    Positional,
    Tap,
)
from posprobe.errors import InterventionError


def planted_info(n_layers: int = 2, n_heads: int = 4, n_kv_heads: int | None = None, head_dim: int = 16,
                 vocab_size: int = 260, positional: Positional = Positional.ROPE, rope_theta: float = 10000.0,
                 sliding_window: int | None = None, max_positions: int = 8192) -> ModelInfo:
    layers = tuple(
        LayerInfo(l, "sliding_attention" if sliding_window else "full_attention", positional,
                  rope_theta=rope_theta if positional is Positional.ROPE else None,
                  rotary_dim=head_dim if positional is Positional.ROPE else None,
                  chunk_layout=ChunkLayout.HALF_SPLIT if positional is Positional.ROPE else None,
                  sliding_window=sliding_window)
        for l in range(n_layers)
    )
    return ModelInfo(name="planted", architecture="Planted", n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads or n_heads, head_dim=head_dim, d_model=n_heads * head_dim,
                     vocab_size=vocab_size, max_positions=max_positions, attn_scale=head_dim**-0.5,
                     attn_softcap=None, adds_bos=True, layers=layers)


# --- pattern constructors: [n, n] row-stochastic causal matrices ---------------------------------------------------

def previous_token(n: int) -> Tensor:
    p = torch.zeros(n, n)
    p[0, 0] = 1.0
    p[torch.arange(1, n), torch.arange(0, n - 1)] = 1.0
    return p


def sink(n: int) -> Tensor:
    p = torch.zeros(n, n)
    p[:, 0] = 1.0
    return p


def uniform(n: int) -> Tensor:
    return torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]


def diagonal(n: int) -> Tensor:
    return torch.eye(n)


class _Tokenizer:
    """Maps characters to ids 4..259 (like the tiny byte tokenizer) so prompts can be built without a real one."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [4 + (b % 256) for b in text.encode()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes((i - 4) % 256 for i in ids if i >= 4).decode(errors="replace")


PatternFn = Callable[[int, Tensor], Tensor]  # (layer, input_ids [b, n]) -> probs [b, H, n, n]


class PlantedAccess(ModelAccess):
    """A ModelAccess whose layers hand out planted tensors.

    patterns(layer, input_ids) -> [b, H, n, n] attention probabilities; optional tensors(layer, input_ids) ->
    dict of other capture fields (q, k, q_pre, k_pre, resid_pre, resid_post, attn_out, attn_in); optional
    logits(input_ids) -> [b, n, V]. Edits raise `InterventionError`: nothing here is computed from attention, so
    no edit could be honoured.
    """

    backend = "planted"

    def __init__(self, info: ModelInfo, patterns: PatternFn | None = None,
                 tensors: Callable[[int, Tensor], dict[str, Tensor]] | None = None,
                 logits: Callable[[Tensor], Tensor] | None = None, tokenizer: Any = None) -> None:
        super().__init__()
        self.info = info
        self.patterns = patterns
        self.tensors = tensors
        self.logits_fn = logits
        self.tokenizer = tokenizer or _Tokenizer()
        self.calls = 0

    def weights_hash(self) -> str:
        return "planted"

    def _forward(self, input_ids: Tensor, position_ids: Tensor, taps: frozenset[Tap],
                 on_layer: LayerCallback | None, logit_positions: Tensor | None,
                 edits: Sequence[Edit]) -> Tensor | None:
        if edits:
            raise InterventionError(
                f"PlantedAccess cannot apply {type(edits[0]).__name__} (layer {edits[0].layer}): its patterns and "
                f"logits are planted by hand, not computed by attention, so an edit would silently change nothing. "
                f"Test interventions on a tiny random model (AutoModelForCausalLM.from_config) instead.")
        self.calls += 1
        for layer in range(self.info.n_layers):
            cap = LayerCapture(layer=layer, info=self.info.layers[layer], model=self.info, position_ids=position_ids)
            if self.patterns is not None:
                full = self.patterns(layer, input_ids)
                cap.pattern_source = lambda idx, full=full: full[:, :, idx]
            if self.tensors is not None:
                for name, value in self.tensors(layer, input_ids).items():
                    setattr(cap, name, value)
            if on_layer is not None:
                on_layer(cap)
        if logit_positions is None:
            return None
        if self.logits_fn is None:
            return torch.zeros(input_ids.shape[0], len(logit_positions), self.info.vocab_size)
        return self.logits_fn(input_ids)[:, logit_positions]


def per_head(*builders: Callable[[int], Tensor]) -> PatternFn:
    """A PatternFn giving head h the pattern builders[h](n) in every layer."""

    def fn(layer: int, input_ids: Tensor) -> Tensor:
        n = input_ids.shape[1]
        heads = torch.stack([b(n) for b in builders])
        return heads[None].expand(input_ids.shape[0], -1, -1, -1)

    return fn
