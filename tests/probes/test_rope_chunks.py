"""The shared RoPE chunk kernel: layouts, frequency order, exactness (tiny model and Gemma 3), scaled frequencies.

Also holds `interleaved_twin`, the interleaved-layout copy of a half-split model used by the probe tests.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from posprobe.access import ChunkLayout, LayerInfo, ModelAccess, Positional, Tap, causal_key_mask, expand_kv
from posprobe.probes.rope_chunks import (
    chunk_contributions,
    chunk_dot,
    chunk_norms,
    effective_frequencies,
    n_bands,
    split_chunks,
    weighted_chunk_contributions,
)
from posprobe.testing import PlantedAccess


def layer_info(layout: ChunkLayout, rotary_dim: int = 8, theta: float = 100.0) -> LayerInfo:
    return LayerInfo(0, "full_attention", Positional.ROPE, rope_theta=theta, rotary_dim=rotary_dim,
                     chunk_layout=layout)


# --- independent rotary implementations (written from the papers, not from posprobe) -----------------------------

def rotate_half_split(x: torch.Tensor, pos: torch.Tensor, theta: float, r: int) -> torch.Tensor:
    """HF `rotate_half` RoPE (Llama / Gemma / NeoX) on the first r dims; x [..., n, d], pos [n]."""
    inv = theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    xr, rest = x[..., :r].double(), x[..., r:]
    half = torch.cat((-xr[..., r // 2:], xr[..., : r // 2]), -1)
    return torch.cat(((xr * cos + half * sin).to(x.dtype), rest), -1)


def rotate_every_two(x: torch.Tensor, pos: torch.Tensor, theta: float, r: int) -> torch.Tensor:
    """GPT-J / RoFormer interleaved RoPE on the first r dims."""
    inv = theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = pos[:, None].double() * inv[None]
    cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
    xr, rest = x[..., :r].double(), x[..., r:]
    swapped = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    return torch.cat(((xr * cos + swapped * sin).to(x.dtype), rest), -1)


def half_to_interleaved(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Index map so that x[..., perm] puts half-split chunk k (k, k + r/2) at interleaved (2k, 2k + 1)."""
    c = rotary_dim // 2
    perm = torch.stack((torch.arange(c), torch.arange(c) + c), -1).flatten()
    return torch.cat((perm, torch.arange(rotary_dim, head_dim)))


def interleaved_twin(access: ModelAccess) -> PlantedAccess:
    """The same model seen through an interleaved layout: q/k dims permuted, LayerInfo says INTERLEAVED.

    Every q.k (hence every pattern) is unchanged; chunk k now lives at dims (2k, 2k + 1).
    """
    info = access.info
    layers = tuple(dataclasses.replace(lay, chunk_layout=ChunkLayout.INTERLEAVED) if lay.has_rope else lay
                   for lay in info.layers)
    twin = dataclasses.replace(info, name=info.name + "-interleaved", layers=layers)
    perm = half_to_interleaved(info.head_dim, info.layers[0].rotary_dim)
    cache: dict[tuple, dict[int, dict[str, torch.Tensor]]] = {}

    def tensors(layer: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        key = tuple(ids.flatten().tolist())
        if key not in cache:
            grabbed: dict[int, dict[str, torch.Tensor]] = {}

            def grab(cap):
                grabbed[cap.layer] = {n: getattr(cap, n)[..., perm].clone() for n in ("q", "k", "q_pre", "k_pre")}

            access.run(ids, taps=[Tap.Q, Tap.K, Tap.Q_PRE, Tap.K_PRE], on_layer=grab)
            cache.clear()
            cache[key] = grabbed
        return cache[key][layer]

    return PlantedAccess(twin, tensors=tensors, tokenizer=access.tokenizer)


# --- layout ----------------------------------------------------------------------------------------------------

def test_split_chunks_pairs_the_layout_coordinates():
    x = torch.arange(12.0)
    chunks, rest = split_chunks(x, layer_info(ChunkLayout.HALF_SPLIT))
    assert chunks.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert rest.tolist() == [8, 9, 10, 11]
    chunks, rest = split_chunks(x, layer_info(ChunkLayout.INTERLEAVED))
    assert chunks.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rest.tolist() == [8, 9, 10, 11]
    full, none = split_chunks(torch.arange(8.0), layer_info(ChunkLayout.HALF_SPLIT))
    assert none is None and full.shape == (4, 2)
    assert n_bands(layer_info(ChunkLayout.HALF_SPLIT), 12) == 5
    assert n_bands(layer_info(ChunkLayout.HALF_SPLIT), 8) == 4


@pytest.mark.parametrize("layout,rotate", [(ChunkLayout.HALF_SPLIT, rotate_half_split),
                                           (ChunkLayout.INTERLEAVED, rotate_every_two)])
def test_chunk_k_rotates_at_frequency_w_k(layout, rotate):
    """After RoPE, c_k(i,j) = Re(z_q conj(z_k) e^{i w_k (i - j)}) with w_k = theta^(-2k/r): chunk 0 is the fastest."""
    torch.manual_seed(0)
    r, d, theta, n = 8, 12, 100.0, 9
    info = layer_info(layout, r, theta)
    q_pre, k_pre = torch.randn(1, 1, n, d, dtype=torch.float64), torch.randn(1, 1, n, d, dtype=torch.float64)
    pos = torch.arange(n)
    q, k = rotate(q_pre, pos, theta, r), rotate(k_pre, pos, theta, r)
    c = chunk_contributions(q, k, info)[0, 0]  # [bands, n, n]
    qc, _ = split_chunks(q_pre[0, 0], info)
    kc, _ = split_chunks(k_pre[0, 0], info)
    zq, zk = torch.complex(qc[..., 0], qc[..., 1]), torch.complex(kc[..., 0], kc[..., 1])  # [n, C]
    w = torch.as_tensor(info.chunk_frequencies())
    dist = (pos[:, None] - pos[None, :]).double()
    expected = (zq[:, None, :] * zk.conj()[None, :, :] * torch.exp(1j * w[None, None] * dist[..., None])).real
    assert torch.allclose(c[: r // 2], expected.permute(2, 0, 1), atol=1e-10)
    # the non-rotated band is the plain dot product of dims r..d, position-independent
    assert torch.allclose(c[-1], q_pre[0, 0, :, r:] @ k_pre[0, 0, :, r:].T, atol=1e-10)
    # rotation preserves chunk norms (so pre- and post-rotary norms agree)
    assert torch.allclose(chunk_norms(q, info), chunk_norms(q_pre, info), atol=1e-10)


@pytest.mark.parametrize("layout", list(ChunkLayout))
@pytest.mark.parametrize("rotary_dim", [8, 12])
def test_contributions_sum_to_dot_product_and_kernels_agree(layout, rotary_dim):
    torch.manual_seed(1)
    info = layer_info(layout, rotary_dim)
    q, k = torch.randn(2, 3, 5, 12), torch.randn(2, 3, 7, 12)
    c = chunk_contributions(q, k, info)
    assert c.shape == (2, 3, n_bands(info, 12), 5, 7)
    assert torch.allclose(c.sum(2), q @ k.transpose(-1, -2), atol=1e-5)
    w = torch.rand(2, 3, 5, 7)
    assert torch.allclose(weighted_chunk_contributions(q, k, w, info), (c * w[:, :, None]).sum(-1).permute(0, 1, 3, 2),
                          atol=1e-5)
    diag = chunk_dot(q, k[:, :, :5], info)  # matched pairs (i, i)
    assert torch.allclose(diag, torch.diagonal(c[..., :5], dim1=-2, dim2=-1).transpose(-1, -2), atol=1e-5)


# --- the model's own numbers -----------------------------------------------------------------------------------

def _collect(access, ids):
    caps = {}

    def on_layer(cap):
        caps[cap.layer] = (cap.q.clone(), cap.k.clone(), cap.q_pre.clone(), cap.k_pre.clone(),
                           float(cap.extras["attn_scale"]), cap.info)

    access.run(ids, taps=[Tap.Q, Tap.K, Tap.Q_PRE, Tap.K_PRE], on_layer=on_layer)
    return caps


def _eager_attentions(access, ids):
    model = access.model
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            return model(torch.tensor([ids]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(before)


def exactness(access, ids, block: int = 64) -> tuple[float, float]:
    """(max |sum_k c_k * scale - model logit|, max |softmax of the reconstruction - model's eager pattern|)."""
    caps = _collect(access, ids)
    eager = _eager_attentions(access, ids)
    n, logit_err, prob_err = len(ids), 0.0, 0.0
    for layer, (q, k, _, _, scale, info) in caps.items():
        k = expand_kv(k, access.info.n_heads)
        for s in range(0, n, block):
            qi = torch.arange(s, min(s + block, n))
            c = chunk_contributions(q[:, :, qi], k, info)
            rebuilt = c.sum(2) * scale
            logits = (q[:, :, qi] @ k.transpose(-1, -2)) * scale  # exactly what the model's attention computes
            logit_err = max(logit_err, float((rebuilt - logits).abs().max()))
            allowed = causal_key_mask(qi, n, info.sliding_window)
            probs = torch.softmax(rebuilt.masked_fill(~allowed, float("-inf")), -1)
            prob_err = max(prob_err, float((probs - eager[layer][:, :, qi]).abs().max()))
    return logit_err, prob_err


def test_exactness_on_tiny_rope(tiny_rope):
    ids = tiny_rope.encode("The harbour master counted seven boats before the storm arrived. " * 3)
    logit_err, prob_err = exactness(tiny_rope, ids)
    assert logit_err < 1e-4
    assert prob_err < 1e-5


def test_hf_rotation_is_half_split_at_the_reported_frequencies(tiny_rope):
    """The adapter's layout and frequencies describe what the model does: chunk k of post-rotary q is the
    pre-rotary chunk rotated by pos * w_k."""
    ids = tiny_rope.encode("Quiet rivers run deep. " * 2)
    pos = torch.arange(len(ids))
    for q, k, q_pre, k_pre, _, info in _collect(tiny_rope, ids).values():
        assert info.chunk_layout is ChunkLayout.HALF_SPLIT
        r = info.rotary_dim
        assert torch.allclose(rotate_half_split(q_pre, pos, info.rope_theta, r), q, atol=1e-5)
        assert torch.allclose(rotate_half_split(k_pre, pos, info.rope_theta, r), k, atol=1e-5)
        assert torch.allclose(chunk_norms(q, info), chunk_norms(q_pre, info), atol=1e-5)


def test_interleaved_twin_is_an_interleaved_rope_model(tiny_rope):
    """The permuted q/k of the twin are exactly GPT-J (rotate_every_two) RoPE of its permuted pre-rotary q/k."""
    twin = interleaved_twin(tiny_rope)
    ids = torch.tensor([tiny_rope.encode("Seven ravens sat on the old wall. ")])
    pos = torch.arange(ids.shape[1])
    for layer in range(twin.info.n_layers):
        t = twin.tensors(layer, ids)
        info = twin.info.layers[layer]
        assert info.chunk_layout is ChunkLayout.INTERLEAVED
        assert torch.allclose(rotate_every_two(t["q_pre"], pos, info.rope_theta, info.rotary_dim), t["q"], atol=1e-5)
        assert torch.allclose(rotate_every_two(t["k_pre"], pos, info.rope_theta, info.rotary_dim), t["k"], atol=1e-5)


@pytest.mark.real_model
def test_exactness_on_gemma(gemma):
    """600 tokens: beyond the 512-token sliding window, so local and global layers are both checked."""
    from posprobe.tasks.text import text_ids

    ids = text_ids(gemma, 600, seed=3)
    logit_err, prob_err = exactness(gemma, ids)
    print(f"gemma exactness: max logit error {logit_err:.3g}, max probability error {prob_err:.3g}")
    assert logit_err < 1e-4
    assert prob_err < 1e-4
    thetas = {lay.index: lay.rope_theta for lay in gemma.info.layers}
    assert thetas[5] == 1e6 and thetas[4] == 1e4  # per-layer theta (local / global)


# --- scaled frequencies ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
])
def test_effective_frequencies_match_transformers(params):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from posprobe.adapters.architectures import layer_infos

    config = LlamaConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, head_dim=32,
                         max_position_embeddings=1024, rope_parameters={"rope_theta": 10000.0, **params})
    info = layer_infos(config)[0]
    assert info.rope_scaling is not None and info.rope_scaling["rope_type"] == params["rope_type"]
    ours, rope_type = effective_frequencies(info, 1024)
    assert rope_type == params["rope_type"]
    theirs, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    assert torch.allclose(torch.as_tensor(ours), theirs.double(), rtol=1e-5)
    assert not math.isclose(float(ours[-1]), float(info.chunk_frequencies()[-1]))  # the slowest chunk was rescaled
