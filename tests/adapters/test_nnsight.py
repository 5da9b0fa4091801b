"""nnsight adapter: user models wrapped directly, attention implementation restored, streaming vs collected passes,
the remote path (nnsight's local serialising dry run), and errors.

Cross-backend parity, invariants and edits live in test_parity.py; this file covers what is specific to nnsight.
"""

from __future__ import annotations

import builtins
import copy

import pytest
import torch

from posprobe.access import AttentionEdit, ProjectionInputEdit, RotaryEdit, Tap
from posprobe.adapters.hf import HFAccess
from posprobe.adapters.nnsight import NNsightAccess
from posprobe.errors import InterventionError, MissingDependencyError, UnsupportedModelError
from posprobe.models import tiny_model, wrap

TEXT = "The river pilot measured the long fence before the storm."


@pytest.fixture(scope="module")
def hf_and_users_lm():
    """An HF access and an nnsight TransformersModel the 'user' built over their own copy of the same weights."""
    from nnsight import TransformersModel

    model, tokenizer = tiny_model("rope")
    users = TransformersModel(copy.deepcopy(model), tokenizer=copy.deepcopy(tokenizer))
    return HFAccess(model, tokenizer, name="tiny"), users


def _collect(access, ids, taps):
    caps = {}

    def on_layer(cap):
        caps[cap.layer] = {"pattern": cap.pattern() if Tap.PATTERN in taps else None, "q": cap.q, "k": cap.k,
                           "resid_post": cap.resid_post}

    return caps, access.run(ids, taps=taps, on_layer=on_layer, logits="all").logits


def test_a_users_model_is_wrapped_and_its_attention_implementation_restored(hf_and_users_lm):
    hf, users = hf_and_users_lm
    access = wrap(users)
    assert isinstance(access, NNsightAccess) and access.tokenizer is users.tokenizer
    assert access.info == HFAccess(access.hf_model, access.tokenizer, name=access.info.name).info
    assert users.attn_implementation == "sdpa"
    ids = hf.encode(TEXT)
    caps, logits = _collect(access, ids, [Tap.PATTERN, Tap.RESID_POST])  # patterns need eager attention
    assert users.attn_implementation == "sdpa"
    reference, ref_logits = _collect(hf, ids, [Tap.PATTERN, Tap.RESID_POST])
    for layer in reference:
        assert torch.allclose(caps[layer]["pattern"], reference[layer]["pattern"], atol=1e-5)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    with users.trace(torch.tensor([ids])):  # the user's own nnsight workflow still works
        import nnsight

        hidden = nnsight.save(users.model.layers[0].output)
    assert hidden.shape == (1, len(ids), access.info.d_model)


def test_attention_implementation_restored_when_on_layer_raises(hf_and_users_lm):
    _, users = hf_and_users_lm
    access = NNsightAccess(users)

    def on_layer(cap):
        raise KeyError("a probe failed")

    with pytest.raises(KeyError, match="a probe failed"):
        access.run([1, 50, 60, 70], taps=[Tap.PATTERN], on_layer=on_layer)
    assert users.attn_implementation == "sdpa"


def test_streaming_calls_on_layer_inside_the_pass_and_collected_after_it(hf_and_users_lm):
    _, users = hf_and_users_lm
    for streaming, expected in ((True, [0, "block 1 runs", 1]), (False, ["block 1 runs", 0, 1])):
        access = NNsightAccess(users, streaming=streaming)
        events = []
        handle = access.hf_model.model.layers[1].register_forward_pre_hook(
            lambda m, a, events=events: events.append("block 1 runs"))
        try:
            access.run([1, 50, 60], taps=[Tap.RESID_POST], on_layer=lambda cap, events=events: events.append(cap.layer))
        finally:
            handle.remove()
        assert events == expected, streaming


def test_collected_mode_gives_the_streaming_results_and_only_requested_taps(hf_and_users_lm):
    hf, users = hf_and_users_lm
    ids = hf.encode(TEXT)
    streamed, logits = _collect(NNsightAccess(users), ids, [Tap.PATTERN, Tap.Q, Tap.K])
    collected, logits2 = _collect(NNsightAccess(users, streaming=False), ids, [Tap.PATTERN, Tap.Q, Tap.K])
    for layer in streamed:
        for field in ("pattern", "q", "k"):
            assert torch.equal(streamed[layer][field], collected[layer][field])
        assert collected[layer]["resid_post"] is None
    assert torch.equal(logits, logits2)


def test_remote_path_through_nnsight_local_simulation(hf_and_users_lm):
    """remote="local" serialises the trace like an NDIF request and runs it here (the real remote is untested)."""
    hf, users = hf_and_users_lm
    access = NNsightAccess(users, remote="local")
    assert not access.streaming
    ids = hf.encode(TEXT)
    caps, logits = _collect(access, ids, [Tap.PATTERN, Tap.RESID_POST])
    reference, ref_logits = _collect(hf, ids, [Tap.PATTERN, Tap.RESID_POST])
    for layer in reference:
        assert torch.allclose(caps[layer]["pattern"], reference[layer]["pattern"], atol=1e-5)
        assert torch.allclose(caps[layer]["resid_post"], reference[layer]["resid_post"], atol=1e-5)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    with pytest.raises(InterventionError, match="remote"):
        access.run(ids, edits=[AttentionEdit(0, lambda p, ctx: p)])
    assert users.attn_implementation == "sdpa"


def test_greedy_matches_hf(hf_and_users_lm):
    hf, users = hf_and_users_lm
    ids = hf.encode("The engineer counted")
    assert torch.equal(NNsightAccess(users).greedy(ids, 5), hf.greedy(ids, 5))


def test_edit_errors_name_the_cause():
    nope_model, tokenizer = tiny_model("nope")
    with pytest.raises(InterventionError, match="no RoPE"):
        NNsightAccess.from_hf(nope_model, tokenizer).run([1, 2, 3], edits=[RotaryEdit(0)])
    gpt2, tokenizer = tiny_model("absolute")
    with pytest.raises(InterventionError, match="fused QKV"):
        NNsightAccess.from_hf(gpt2, tokenizer).run([1, 2, 3], edits=[ProjectionInputEdit(0, (0,), 2.0)])


def test_bad_objects_are_refused_with_the_fix():
    with pytest.raises(UnsupportedModelError, match="TransformersModel"):
        NNsightAccess(torch.nn.Linear(2, 2))
    from transformers import LlamaModel

    model, tokenizer = tiny_model("rope")
    with pytest.raises(UnsupportedModelError, match="AutoModelForCausalLM"):
        NNsightAccess.from_hf(LlamaModel(model.config), tokenizer)


def test_missing_nnsight_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("nnsight"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    model, tokenizer = tiny_model("rope")
    with pytest.raises(MissingDependencyError, match="pip install"):
        wrap(model, tokenizer=tokenizer, backend="nnsight")
