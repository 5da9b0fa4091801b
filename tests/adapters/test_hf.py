"""HF adapter: patterns equal eager attention, invariants, logits unchanged, edits restore exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from posprobe.access import AttentionEdit, ProjectionInputEdit, RotaryEdit, Tap
from posprobe.errors import InputError, InterventionError


def _eager(access, ids):
    model = access.model
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            return model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation(before)


def _collect(access, ids, taps, **kw):
    caps = {}

    def on_layer(c):
        caps[c.layer] = {"pattern": c.pattern() if Tap.PATTERN in taps else None, "q": c.q, "k": c.k,
                         "q_pre": c.q_pre, "k_pre": c.k_pre, "resid_post": c.resid_post, "info": c.info}

    result = access.run(ids, taps=taps, on_layer=on_layer, **kw)
    return caps, result


@pytest.mark.parametrize("name", ["tiny_rope", "tiny_nope", "tiny_absolute"])
def test_patterns_residuals_and_logits_match_eager(name, request):
    access = request.getfixturevalue(name)
    ids = access.encode("The old farmer carried a wooden chair near the harbour. " * 3)
    caps, result = _collect(access, ids, [Tap.PATTERN, Tap.RESID_POST], logits="all")
    ref = _eager(access, ids)
    assert len(caps) == access.info.n_layers
    for layer, cap in caps.items():
        assert torch.allclose(cap["pattern"][0], ref.attentions[layer][0], atol=1e-5)
    # hidden_states[l + 1] is the output of block l (the last one after the final norm in HF: skip it)
    for layer in range(access.info.n_layers - 1):
        assert torch.allclose(caps[layer]["resid_post"], ref.hidden_states[layer + 1], atol=1e-5)
    assert torch.allclose(result.logits, ref.logits, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_rope", "tiny_nope", "tiny_absolute"])
def test_pattern_invariants(name, request):
    access = request.getfixturevalue(name)
    ids = access.encode("A quiet student found the blue lantern. " * 4)
    caps, _ = _collect(access, ids, [Tap.PATTERN])
    for cap in caps.values():
        p = cap["pattern"][0]
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5)
        assert float(p.triu(diagonal=1).abs().max()) == 0.0


def test_sliding_window_puts_no_mass_beyond_window():
    from transformers import MistralConfig, MistralForCausalLM

    from posprobe.adapters.hf import HFAccess
    from posprobe.models import tiny_model

    _, tok = tiny_model("rope")
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           max_position_embeddings=512)
    model = MistralForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    access = HFAccess(model, tok, name="tiny-mistral-window8")
    assert all(layer.sliding_window == 8 for layer in access.info.layers)
    ids = access.encode("The shepherd noticed the stone bridge. " * 2)
    caps, result = _collect(access, ids, [Tap.PATTERN], logits="all")
    ref = _eager(access, ids)
    for layer, cap in caps.items():
        p = cap["pattern"][0]
        dist = torch.arange(len(ids))[:, None] - torch.arange(len(ids))[None, :]
        assert float(p[:, dist >= 8].abs().max()) == 0.0
        assert torch.allclose(p, ref.attentions[layer][0], atol=1e-5)
    assert torch.allclose(result.logits, ref.logits, atol=1e-4)


def test_rotary_preserves_chunk_norms(tiny_rope):
    ids = tiny_rope.encode("The river pilot measured the long fence before the storm.")
    caps, _ = _collect(tiny_rope, ids, [Tap.Q, Tap.K, Tap.Q_PRE, Tap.K_PRE])
    for cap in caps.values():
        a, b = cap["info"].chunk_coordinates()
        for post, pre in ((cap["q"], cap["q_pre"]), (cap["k"], cap["k_pre"])):
            norm_post = torch.sqrt(post[..., a] ** 2 + post[..., b] ** 2)
            norm_pre = torch.sqrt(pre[..., a] ** 2 + pre[..., b] ** 2)
            assert torch.allclose(norm_post, norm_pre, atol=1e-5)
            assert not torch.allclose(post, pre)  # the rotation really happened


def test_run_leaves_model_untouched(tiny_rope):
    model = tiny_rope.model
    impl = model.config._attn_implementation

    def hooks():
        return [(name, list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()]

    before = hooks()
    ids = tiny_rope.encode("A curious child sold the copper kettle.")
    tiny_rope.run(ids, taps=list(Tap), on_layer=lambda c: c.pattern())
    assert model.config._attn_implementation == impl
    assert hooks() == before


@pytest.mark.parametrize("edit_factory", [
    lambda: AttentionEdit(1, lambda p, ctx: torch.tril(torch.ones_like(p))
                          / torch.tril(torch.ones_like(p)).sum(-1, keepdim=True)),
    lambda: ProjectionInputEdit(0, dims=(0, 1, 2), factor=-1.0),
    lambda: RotaryEdit(0),
])
def test_edit_changes_logits_and_exit_restores_bitwise(tiny_rope, edit_factory):
    ids = tiny_rope.encode("The librarian wrapped an old photograph across the square.")
    before = tiny_rope.run(ids, logits="all").logits
    with tiny_rope.editing([edit_factory()]):
        edited = tiny_rope.run(ids, logits="all").logits
    after = tiny_rope.run(ids, logits="all").logits
    assert not torch.allclose(before, edited, atol=1e-4)
    assert torch.equal(before, after)


def test_kv_cached_greedy_matches_recompute(tiny_rope):
    from posprobe.access import ModelAccess

    ids = tiny_rope.encode("The engineer counted")
    cached = tiny_rope.greedy(ids, 6)
    recomputed = ModelAccess.greedy(tiny_rope, ids, 6)
    assert torch.equal(cached, recomputed)
    edit = [AttentionEdit(1, lambda p, ctx: torch.tril(torch.ones_like(p), diagonal=p.shape[-1] - p.shape[-2])
                          / torch.tril(torch.ones_like(p), diagonal=p.shape[-1] - p.shape[-2]).sum(-1, keepdim=True))]
    assert torch.equal(tiny_rope.greedy(ids, 6, edits=edit), ModelAccess.greedy(tiny_rope, ids, 6, edits=edit))


def test_rotary_edit_on_nope_model_is_an_error(tiny_nope):
    with pytest.raises((InterventionError, InputError), match="no (RoPE|rotary)"), tiny_nope.editing([RotaryEdit(0)]):
        tiny_nope.run(tiny_nope.encode("hello"))


def test_weights_hash_is_blake2b_of_names_and_raw_bytes(tiny_rope):
    import hashlib

    from posprobe.adapters.hf import HFAccess

    digest = hashlib.blake2b(digest_size=12)  # the reference definition (it used to copy each tensor with tobytes)
    for name, tensor in sorted(tiny_rope.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    fresh = HFAccess(tiny_rope.model, tiny_rope.tokenizer)
    assert fresh.weights_hash() == digest.hexdigest()
    assert fresh.weights_hash() == tiny_rope.weights_hash()


def test_qwen3_rope_frequency_over_two_context_lengths():
    """Regression (issue 14): Qwen 3 normalises q/k per head *before* the transpose ([b, n, H, d]); the old pre-rotary
    hook handed that layout on as [b, H, n, d] and rope_frequency summed norms along the wrong axis, so the second
    context length crashed (`self.q_norm[layer] += qn`: size 32 vs 64)."""
    import posprobe
    from posprobe.adapters.families import build_family
    from posprobe.adapters.hf import HFAccess
    from posprobe.probes.base import get_budget

    model, tok = build_family("qwen3")
    access = HFAccess(model, tok, name="tiny-qwen3")
    budget = dataclasses.replace(get_budget("quick"), context_lengths=(32, 64), n_texts=1, max_queries=16)
    scan = posprobe.scan(access, probes=["rope_frequency"], budget=budget, progress=False)
    norms = scan.curves[scan.curves["curve"] == "rope_q_norm"]
    assert len(norms) == access.info.n_layers * access.info.n_heads * access.info.layers[0].n_chunks
    assert norms["y"].notna().all() and (norms["y"] > 0).all()
    # the pre-rotary q the adapter hands over has the post-rotary layout and the same chunk norms
    caps = {}
    access.run(access.encode("The clerk folded the long letter twice."), taps=[Tap.Q, Tap.Q_PRE],
               on_layer=lambda c: caps.setdefault(c.layer, (c.q, c.q_pre, c.info)))
    from posprobe.probes.rope_chunks import chunk_norms

    for q, q_pre, info in caps.values():
        assert q_pre.shape == q.shape
        assert torch.allclose(chunk_norms(q_pre, info), chunk_norms(q, info), atol=1e-5)


def test_model_info_of_old_scans_still_loads(tiny_rope):
    """ModelInfo / LayerInfo dicts saved before the round-2 fields (family, moe, rotary_offset, alibi_slopes, ...)
    load with the defaults; fields a newer posprobe wrote are ignored."""
    from posprobe.access import ModelInfo

    old = tiny_rope.info.to_dict()
    for key in ("family", "moe"):
        old.pop(key)
    new_layer_fields = ("rotary_offset", "rotary_cos_scale", "attention_chunk", "attn_scale", "attn_softcap",
                        "learned_sinks", "alibi_slopes")
    old["layers"] = [{k: v for k, v in layer.items() if k not in new_layer_fields} for layer in old["layers"]]
    info = ModelInfo.from_dict(old)
    assert info.family is None and info.layers[0].rotary_offset == 0 and info.layers[0].alibi_slopes is None
    future = tiny_rope.info.to_dict() | {"a_field_of_the_future": 1}
    assert ModelInfo.from_dict(future) == tiny_rope.info


def test_an_attention_call_knows_when_a_mask_lets_queries_see_later_keys() -> None:
    """The edited path stops a query chunk at its last query's key only where no query sees a later key."""
    from posprobe.adapters.hf import AttentionCall

    n = 6
    q, k = torch.zeros(1, 2, n, 4), torch.zeros(1, 1, n, 4)
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    prefix_lm = causal.clone()
    prefix_lm[..., :3, :3] = True  # the first 3 tokens see each other (bidirectional prefix)
    rows = torch.tensor([0, 1])

    def call(mask: torch.Tensor | None) -> AttentionCall:
        return AttentionCall(q=q, k=k, mask=mask, scale=1.0, softcap=None, sliding_window=None, sinks=None)

    assert call(None).blocks_keys_from(rows, 2)
    assert call(causal).blocks_keys_from(rows, 2)
    assert not call(prefix_lm).blocks_keys_from(rows, 2)
    assert call(prefix_lm).blocks_keys_from(rows, 3)
    additive = torch.zeros(1, 1, n, n).masked_fill(~prefix_lm, torch.finfo(torch.float32).min)
    assert not call(additive).blocks_keys_from(rows, 2)
    assert call(additive).blocks_keys_from(torch.tensor([3, 4]), 5)
