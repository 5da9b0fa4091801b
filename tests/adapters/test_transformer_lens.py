"""TransformerLens adapter: bridges given directly, streaming order, facts from the HF config, clean hooks, errors.

Cross-backend parity, invariants and edits live in test_parity.py; this file covers what is specific to wrapping a
`TransformerBridge`.
"""

from __future__ import annotations

import builtins
import copy

import pytest
import torch

from posprobe.access import ProjectionInputEdit, RotaryEdit, Tap
from posprobe.adapters.hf import HFAccess
from posprobe.adapters.transformer_lens import TransformerLensAccess
from posprobe.errors import InterventionError, MissingDependencyError, UnsupportedModelError
from posprobe.models import tiny_model, wrap


@pytest.fixture(scope="module")
def rope_pair():
    model, tokenizer = tiny_model("rope")
    return HFAccess(model, tokenizer, name="tiny"), TransformerLensAccess.from_hf(model, tokenizer, name="tiny")


def _own_bridge(model, tokenizer):
    """A bridge booted the way a TL user would (on their own copy of the model)."""
    from transformer_lens.model_bridge import TransformerBridge

    tok = copy.deepcopy(tokenizer)
    tok.init_kwargs.setdefault("name_or_path", "tiny")
    tok.init_kwargs["add_bos_token"] = True
    return TransformerBridge.boot_transformers("tiny", hf_model=copy.deepcopy(model), tokenizer=tok, device="cpu")


def test_a_users_bridge_is_wrapped_and_still_works_afterwards():
    model, tokenizer = tiny_model("rope")
    bridge = _own_bridge(model, tokenizer)
    ids = torch.tensor([HFAccess(model, tokenizer).encode("The shepherd noticed the stone bridge.")])
    with torch.inference_mode():
        before = bridge(ids, return_type="logits")
    access = wrap(bridge, tokenizer=tokenizer)
    assert isinstance(access, TransformerLensAccess)
    result = access.run(ids, taps=list(Tap), on_layer=lambda cap: cap.pattern(), logits="all")
    with access.editing([RotaryEdit(0)]):
        access.run(ids, logits="last")
    assert torch.allclose(result.logits, before, atol=1e-6)
    assert all(not hook.fwd_hooks for hook in bridge.hook_dict.values())  # every hook posprobe added is gone
    with torch.inference_mode():
        assert torch.equal(bridge(ids, return_type="logits"), before)
        _, cache = bridge.run_with_cache(ids)  # the user's own TL workflow still works
    assert "blocks.0.attn.hook_pattern" in cache


def test_tokenizer_defaults_to_the_bridges():
    model, tokenizer = tiny_model("rope")
    access = TransformerLensAccess(_own_bridge(model, tokenizer))
    assert access.tokenizer is access.bridge.tokenizer
    assert access.encode("ab")[1:] == HFAccess(model, tokenizer).encode("ab")[1:]


def test_model_info_comes_from_the_hf_config_not_bridge_cfg():
    from tests.adapters.test_parity import tiny_gemma

    model, tokenizer = tiny_gemma(window=8)
    access = TransformerLensAccess.from_hf(model, tokenizer, name="tiny-gemma")
    assert access.info == HFAccess(model, tokenizer, name="tiny-gemma").info
    assert [layer.rope_theta for layer in access.info.layers] == [1e4, 1e4, 1e6]
    assert [layer.sliding_window for layer in access.info.layers] == [8, 8, None]


def test_on_layer_streams_during_the_pass(rope_pair):
    _, access = rope_pair
    events = []
    start_of_block_1 = ("blocks.1.hook_resid_pre", lambda x, hook: events.append("block 1 runs"))
    with access.bridge.hooks(fwd_hooks=[start_of_block_1]):
        access.run(access.encode("hello"), taps=[Tap.RESID_POST], on_layer=lambda cap: events.append(cap.layer))
    assert events == [0, "block 1 runs", 1]


def test_captures_hold_only_requested_taps(rope_pair):
    _, access = rope_pair
    seen = []

    def on_layer(cap):
        seen.append((cap.resid_post is not None, cap.q is not None, cap.pattern_source is not None, cap.attn_out))

    access.run(access.encode("hello there"), taps=[Tap.RESID_POST], on_layer=on_layer)
    assert seen == [(True, False, False, None)] * access.info.n_layers


def test_greedy_matches_hf(rope_pair):
    hf, tl = rope_pair
    ids = hf.encode("The engineer counted")
    assert torch.equal(tl.greedy(ids, 5), hf.greedy(ids, 5))


def test_edit_errors_name_the_cause():
    nope_model, tokenizer = tiny_model("nope")
    with pytest.raises(InterventionError, match="no RoPE"):
        TransformerLensAccess.from_hf(nope_model, tokenizer).run([1, 2, 3], edits=[RotaryEdit(0)])
    gpt2, tokenizer = tiny_model("absolute")
    with pytest.raises(InterventionError, match="fused QKV"):
        TransformerLensAccess.from_hf(gpt2, tokenizer).run([1, 2, 3], edits=[ProjectionInputEdit(0, (0,), 2.0)])


def test_bad_objects_are_refused_with_the_fix():
    with pytest.raises(UnsupportedModelError, match="TransformerBridge"):
        TransformerLensAccess(torch.nn.Linear(2, 2))
    from transformers import LlamaModel

    base = LlamaModel(tiny_model("rope")[0].config)
    with pytest.raises(UnsupportedModelError, match="AutoModelForCausalLM"):
        TransformerLensAccess.from_hf(base, tiny_model("rope")[1])


def test_missing_transformer_lens_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("transformer_lens"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    model, tokenizer = tiny_model("rope")
    with pytest.raises(MissingDependencyError, match="pip install"):
        wrap(model, tokenizer=tokenizer, backend="transformer_lens")
