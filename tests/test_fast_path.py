"""The optimised shared streaming pass equals a naive reference (issue 20 item 1).

The fast path reads grouped-query KV heads without expanding them (`grouped_matmul`), splits each layer's keys into
rotary bands once (memoised on the capture) and reads the RoPE probes' probabilities from the capture's shared
pattern chunks. The references here are the plain formulas: `expand_kv` + full `chunk_contributions` over every key,
and the model's own eager attention with `output_attentions` for the probabilities. Models: a Gemma 3 layout (4 query
heads / 1 KV head, sliding + global layers, window 8 shorter than the text), a GQA Llama, and a partial-rotary
GPT-NeoX (the non-rotated band).
"""

from __future__ import annotations

import pytest
import torch

from posprobe.access import Tap, attention_scores, expand_kv, grouped_matmul
from posprobe.probes.rope_chunks import (
    chunk_contributions,
    layer_chunk_usage,
    layer_long_range,
)
from tests.probes.test_rope_chunks import (
    _eager_attentions,  # the model's eager attention, output_attentions
)

TEXT = "The lighthouse keeper wrote down every passing ship in a worn blue ledger. " * 2


def _tok():
    from posprobe.models import tiny_model

    return tiny_model("rope")[1]


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = _tok()
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                              query_pre_attn_scalar=16)
    return Gemma3ForCausalLM(config).eval(), tok


def _llama_gqa():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tok()
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval(), tok


def _neox_partial():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = _tok()
    torch.manual_seed(2)
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=512)
    return GPTNeoXForCausalLM(config).eval(), tok


@pytest.fixture(scope="module", params=["gemma3", "llama_gqa", "neox_partial"])
def access(request):
    from posprobe.adapters.hf import HFAccess

    model, tok = {"gemma3": _gemma3, "llama_gqa": _llama_gqa, "neox_partial": _neox_partial}[request.param]()
    model.config._attn_implementation = "sdpa"
    return HFAccess(model, tok, name=f"tiny-{request.param}")


def test_grouped_matmul_equals_expanded_kv():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 5, 8), torch.randn(2, 3, 7, 8)
    ref = torch.matmul(q, expand_kv(k, 6).transpose(-1, -2))
    assert torch.allclose(grouped_matmul(q, k.transpose(-1, -2)), ref, atol=1e-6)
    assert torch.allclose(attention_scores(q, k, 0.5, softcap=3.0), attention_scores(q, expand_kv(k, 6), 0.5, 3.0),
                          atol=1e-6)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        grouped_matmul(torch.randn(1, 5, 2, 4), torch.randn(1, 2, 4, 3))


def test_fast_path_equals_naive_reference(access):
    ids = access.encode(TEXT)
    n = len(ids)
    eager = _eager_attentions(access, ids)
    queries = torch.linspace(1, n - 1, 40).round().long().unique()
    distance = 12
    windows = {layer.sliding_window for layer in access.info.layers}
    seen: dict[int, dict] = {}

    def on_layer(cap):
        if not cap.info.has_rope:
            return
        # the fast path, with chunks that split the queries unevenly (pattern chunks of 24, blocks of 5)
        usage = layer_chunk_usage(cap, queries, block_size=5, pattern_chunk=24)
        long = layer_long_range(cap, queries, distance, pattern_chunk=24)
        seen[cap.layer] = {"usage": usage, "long": long, "pattern": cap.pattern(queries).clone(),
                           "q": cap.q.clone(), "k": cap.k.clone(), "info": cap.info}

    access.run(ids, taps=[Tap.Q, Tap.K, Tap.PATTERN], on_layer=on_layer)
    assert seen, "no RoPE layer reached the callback"
    for layer, got in seen.items():
        probs = eager[layer][:, :, queries].float()  # the model's own eager attention: [1, H, cq, n]
        assert torch.allclose(got["pattern"], probs, atol=2e-6), f"layer {layer}: pattern != eager attention"
        k = expand_kv(got["k"], access.info.n_heads).float()  # the naive reference: expanded KV heads, every key
        c = chunk_contributions(got["q"][:, :, queries].float(), k, got["info"])  # [1, H, bands, cq, n]
        ref_usage = torch.einsum("bhcqk,bhqk->hc", c.abs(), probs).double()
        assert torch.allclose(got["usage"].usage, ref_usage, rtol=1e-5, atol=1e-6), f"layer {layer}: chunk usage"
        assert got["usage"].max_logit_error < 1e-4
        far = (queries[:, None] - torch.arange(n)[None, :]) >= distance
        w = probs * far
        assert torch.allclose(got["long"].signed, torch.einsum("bhcqk,bhqk->hc", c, w).double(), rtol=1e-5,
                              atol=1e-6), f"layer {layer}: long-range signed contributions"
        assert torch.allclose(got["long"].mass, w.sum((0, 2, 3)).double(), atol=1e-6)
    if access.info.name == "tiny-gemma3":  # the window is shorter than the text: masked keys really were exercised
        assert windows == {8, None} and n > 16
