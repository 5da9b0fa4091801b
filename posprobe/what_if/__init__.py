"""Context-extension what-ifs: the long-context papers' inference-time position tricks as intervention specs.

Owns the one place these live. Each what-if is a frozen spec (`posprobe.interventions.spec.Intervention`), applied
to a model access as a context manager that restores the model exactly on exit, accepted wherever interventions
are (`scan(model, intervention=...)`, `evaluate_positions(..., intervention=...)`, `"yarn:factor=4"` text):

- `extrapolate`: plain RoPE past the native window (the baseline: only the length limit is lifted).
- RoPE rescaling through transformers' own rope functions (`rope_scaling`): pi, ntk, dynamic, yarn, longrope,
  llama3, proportional, and a plain new base rope_theta.
- Attention Buckets (`buckets`): passes with different RoPE bases, their next-token logits combined by confidence.
- At the attention logits (`remap`): string, self_extend, and the masks streaming_llm (sink + window) and
  lm_infinite (Lambda mask + distance cap).
- On the rotated queries / keys before the model's own kernel (`query_key`): ms_poe (per-head position scaling)
  and logn (query temperature).

Each docstring gives the formula and the paper; `posprobe interventions` lists the settings and defaults. HF
backend only (they change the rotary embedding / attention of a transformers model).
"""

from posprobe.what_if.base import Extrapolate, Stack, WhatIf
from posprobe.what_if.buckets import AttentionBuckets
from posprobe.what_if.query_key import LogNTemperature, MsPoE, QueryKeyWhatIf
from posprobe.what_if.remap import STRING, LMInfinite, PairwiseAttention, SelfExtend, StreamingLLM
from posprobe.what_if.rope_scaling import (
    DynamicNTK,
    Llama3,
    LongRoPE,
    NTKAware,
    PositionInterpolation,
    ProportionalRoPE,
    RopeParameters,
    RopeRescaling,
    RopeTheta,
    YaRN,
)

__all__ = ["STRING", "AttentionBuckets", "DynamicNTK", "Extrapolate", "LMInfinite", "Llama3", "LogNTemperature",
           "LongRoPE", "MsPoE", "NTKAware", "PairwiseAttention", "PositionInterpolation", "ProportionalRoPE",
           "QueryKeyWhatIf", "RopeParameters", "RopeRescaling", "RopeTheta", "SelfExtend", "Stack", "StreamingLLM",
           "WhatIf", "YaRN"]
