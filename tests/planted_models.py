"""Real tiny HF models with hand-set weights, for tests whose answer is known by construction."""

from __future__ import annotations

import math

import torch


def previous_token_model(layer: int = 0, head: int = 0, amplitude: float = 30.0, seed: int = 0):
    """A tiny Llama (RoPE) whose head (layer, head) is a previous-token head by construction.

    q and k of that head are constant (projection weights 0, biases set), so the logit depends only on the distance
    i - j: with k's chunk at angle 0 and q's chunk at angle -w_k, every chunk peaks at distance 1
    (sum_k cos((d - 1) w_k)); `amplitude` (the per-chunk logit scale) makes the peak win the softmax.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from posprobe.models import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(seed)
    head_dim, n_heads, n_kv = 16, 4, 2
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
                         max_position_embeddings=4096, attention_bias=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    attn = model.model.layers[layer].self_attn
    half = head_dim // 2
    w = 10000.0 ** (-2 * torch.arange(half, dtype=torch.float64) / head_dim)
    per_chunk = math.sqrt(amplitude / attn.scaling)
    q = torch.cat([per_chunk * torch.cos(w), -per_chunk * torch.sin(w)]).float()
    k = torch.cat([per_chunk * torch.ones(half), torch.zeros(half)]).float()
    kv = head // (n_heads // n_kv)
    with torch.no_grad():
        rows_q = slice(head * head_dim, (head + 1) * head_dim)
        rows_k = slice(kv * head_dim, (kv + 1) * head_dim)
        attn.q_proj.weight[rows_q] = 0
        attn.q_proj.bias.zero_()
        attn.q_proj.bias[rows_q] = q
        attn.k_proj.weight[rows_k] = 0
        attn.k_proj.bias.zero_()
        attn.k_proj.bias[rows_k] = k
        attn.v_proj.bias.zero_()
        attn.o_proj.bias.zero_()
        for other in model.model.layers:
            if other.self_attn is not attn:
                for proj in (other.self_attn.q_proj, other.self_attn.k_proj, other.self_attn.v_proj,
                             other.self_attn.o_proj):
                    proj.bias.zero_()
    return model, tok
