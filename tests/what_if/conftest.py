"""Tiny random models for the what-if tests (no download): a Llama and a Gemma 3 with sliding + global layers."""

from __future__ import annotations

import pytest
import torch

NATIVE = 32  # max_position_embeddings of the tiny models: sequences of 48-80 tokens go past the native window
N = 64  # tokens of the `tokens` fixture: twice the native window


def tiny_llama(rope_parameters=None, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=NATIVE,
                         rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def tiny_gemma3(rope_parameters=None, seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=NATIVE, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"] * 2,
                              rope_parameters=rope_parameters, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return Gemma3ForCausalLM(config).eval()


def reference_logits(build, rope_parameters, weights, ids):
    """Logits of the same weights loaded in a model built with `rope_parameters` (plain transformers, no posprobe)."""
    reference = build(rope_parameters)
    reference.load_state_dict(weights)
    with torch.no_grad():
        return reference(ids).logits


def wrap(model):
    import posprobe
    from posprobe.models import byte_tokenizer

    return posprobe.load_model(model, tokenizer=byte_tokenizer())


@pytest.fixture(scope="module")
def llama():
    return wrap(tiny_llama())


@pytest.fixture(scope="module")
def gemma3():
    return wrap(tiny_gemma3())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 250, (2, 80), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    """The tiny Llama the naive-reference tests (test_remap, test_query_key) compare against."""
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def access(model):
    return wrap(model)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 250, (1, N), generator=torch.Generator().manual_seed(5))
