"""Synthetic scans for explorer and renderer tests: any shape, known values, optional model-level curves and tables.

Builds `posprobe.Scan` objects directly (no model): head metrics with planted values (metric `planted` = layer * 1000
+ head, so every head's value is known), per-head curves, layer-level and model-level curves with an intervention
series, and a position-sweep table shaped like `evaluate_positions` output.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from posprobe.probes.base import curve_frame
from posprobe.scan import Scan


def model_info(n_layers: int, n_heads: int, n_kv_heads: int | None = None, name: str = "synthetic") -> dict:
    n_kv = n_kv_heads or max(1, n_heads // 4)
    layers = [{"index": layer, "layer_type": "sliding_attention" if layer % 2 == 0 else "full_attention",
               "positional": "rope", "rope_theta": 10000.0, "rotary_dim": 64, "chunk_layout": "half_split",
               "rope_scaling": None, "sliding_window": 512 if layer % 2 == 0 else None} for layer in range(n_layers)]
    return {"name": name, "architecture": "Synthetic", "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv,
            "head_dim": 64, "d_model": 64 * n_heads, "vocab_size": 1000, "max_positions": 4096, "attn_scale": 0.125,
            "attn_softcap": None, "adds_bos": True, "layers": layers}


def synthetic_scan(n_layers: int = 3, n_heads: int = 4, n_metrics: int = 4, seed: int = 0, *, head_curves: bool = True,
                   model_curves: bool = True, tables: bool = True, name: str = "synthetic") -> Scan:
    """A Scan of a made-up model. Metric columns: `planted` (layer*1000 + head), `signed` (cos, both signs), then
    `metric_2` ... random in [0, 1); curves and tables only when asked."""
    rng = np.random.default_rng(seed)
    info = model_info(n_layers, n_heads, name=name)
    group = n_heads // info["n_kv_heads"]
    rows = [(layer, head, head // group, info["layers"][layer]["layer_type"]) for layer in range(n_layers)
            for head in range(n_heads)]
    heads = pd.DataFrame(rows, columns=["layer", "head", "kv_head", "layer_type"])
    heads["planted"] = (heads["layer"] * 1000 + heads["head"]).astype(float)
    heads["signed"] = np.cos(heads["layer"] + 0.37 * heads["head"] + seed)
    for index in range(2, n_metrics):
        heads[f"metric_{index}"] = rng.random(len(heads))
    curves = []
    if head_curves:
        x = np.array([0.0, 1, 2, 4, 8, 16, 32, 64, 128, 256])
        layer, head = heads["layer"].to_numpy(), heads["head"].to_numpy()
        for curve, probe in (("attention_vs_distance", "head_basics"), ("entropy_by_position", "attention_entropy")):
            grid = pd.DataFrame({"layer": np.repeat(layer, len(x)), "head": np.repeat(head, len(x)),
                                 "x": np.tile(x, len(layer))})
            grid["y"] = np.exp(-grid["x"] / (1 + grid["head"])) + 0.01 * grid["layer"]
            grid["curve"] = curve
            curves.append(curve_frame(grid, probe))
    if model_curves:
        rel = np.linspace(0.05, 0.95, 10)
        u = 1 + 2 * (rel - 0.5) ** 2
        model = [{"curve": "u_curve_attention", "series": series, "x": r, "y": v * scale}
                 for series, scale in (("baseline", 1.0), ("found_in_the_middle", 0.5)) for r, v in zip(rel, u)]
        curves.append(curve_frame(model, "position_bias"))
        r2 = [{"curve": "implicit_position_r2", "series": "ridge", "x": float(layer), "y": layer / n_layers}
              for layer in range(n_layers)]
        curves.append(curve_frame(r2, "implicit_position"))
        per_layer = [{"curve": "variance_by_position", "layer": layer, "x": float(2 ** p), "y": 1.0 / (p + 1 + layer)}
                     for layer in range(n_layers) for p in range(8)]
        curves.append(curve_frame(per_layer, "implicit_position"))
    curve_table = pd.concat(curves, ignore_index=True) if curves else curve_frame(
        pd.DataFrame(columns=["curve", "x", "y"]), "none")
    extra = {}
    if tables:
        gold = np.arange(10)
        sweep = pd.DataFrame({
            "task": "kv_words", "intervention": np.repeat(["none", "found_in_the_middle"], len(gold)),
            "gold_position": np.tile(gold, 2),
            "accuracy": np.concatenate([0.9 - 0.5 * np.sin(np.pi * gold / 9), 0.9 - 0.2 * np.sin(np.pi * gold / 9)]),
            "n": 20})
        sweep["ci_low"] = (sweep["accuracy"] - 0.1).clip(0, 1)
        sweep["ci_high"] = (sweep["accuracy"] + 0.1).clip(0, 1)
        extra["position_bias.kv_words"] = sweep
        extra["retrieval.trials"] = pd.DataFrame({"trial": range(6), "depth": np.linspace(0, 1, 6),
                                                  "context_length": 256, "correct": [True, False] * 3})
    meta = {"model": name, "backend": "synthetic", "weights_hash": "0" * 16, "model_info": info,
            "probes": {"head_basics": {}, "attention_entropy": {}}, "skipped": {"retrieval": "synthetic scan"},
            "summaries": {}, "budget": {"name": "quick"}, "seed": seed, "text_source": None, "versions": {},
            "timings_s": {}, "created": "2026-01-01T00:00:00+00:00"}
    return Scan(heads, curve_table, meta, extra)


def _duplicate_token(ids: torch.Tensor) -> torch.Tensor:
    """[n, n]: each query attends evenly to the earlier copies of its own token (to itself when there is none)."""
    same = (ids[:, None] == ids[None, :]) & torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool), -1)
    rows = same.float()
    rows[rows.sum(-1) == 0] = torch.eye(len(ids))[rows.sum(-1) == 0]
    return rows / rows.sum(-1, keepdim=True)


def planted_pattern_access(n_layers: int = 2):
    """A PlantedAccess (byte tokenizer, 4 heads a layer) with known heads: H0 previous token, H1 sink on key 0,
    H2 duplicate token (earlier copies of the query's token: a different pattern on every example), H3 uniform."""
    from posprobe.testing import PlantedAccess, planted_info, previous_token, sink, uniform

    def patterns(layer: int, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        return torch.stack([torch.stack([previous_token(n), sink(n), _duplicate_token(row), uniform(n)])
                            for row in input_ids])

    return PlantedAccess(planted_info(n_layers=n_layers, n_heads=4), patterns)


def pattern_scan(*, top_k: int | None = None, n_tokens: int = 48, probes: tuple[str, ...] = ("head_basics",)) -> Scan:
    """A quick scan of `planted_pattern_access` with stored example patterns (full rows, or `top_k` keys a query)."""
    import posprobe
    from posprobe.probes.pattern_examples import PatternExamplesConfig

    config = PatternExamplesConfig(n_tokens=n_tokens, **({"top_k": top_k, "full_rows": False} if top_k else {}))
    return posprobe.scan(planted_pattern_access(), probes=[*probes, "pattern_examples"], budget="quick",
                         progress=False, configs={"pattern_examples": config})
