"""Conformance suite: every family of the registry (`posprobe.adapters.families`) through the HF adapter.

For each family's tiny random-init model: (facts) ModelInfo says what the family's HF implementation does;
(a) streaming patterns equal eager `output_attentions` (atol 1e-5) at two context lengths, one longer than any
window / attention chunk, and logits are the model's own; (b) on RoPE layers the chunk decomposition is exact:
softmax(scale * sum_k c_k, with the model's mask / softcap / sinks) equals the eager pattern, and the chunk layout
matches the rotation (pre- and post-rotary chunk-norm profiles agree); (c) a quick scan with every applicable probe
finishes with finite numbers and skipped probes give their reason; (d) every applicable edit changes the logits and
restores them bit-for-bit on exit, an inapplicable one raises a clear error; (e) TransformerLens / nnsight parity
where those backends support the family (a skip with the reason otherwise).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from posprobe.access import (
    AttentionEdit,
    ChunkLayout,
    Positional,
    ProjectionInputEdit,
    RotaryEdit,
    Tap,
)
from posprobe.adapters.families import FAMILIES
from posprobe.errors import (
    InputError,
    InterventionError,
    MissingDependencyError,
    UnsupportedModelError,
)
from posprobe.probes.rope_chunks import chunk_contributions, chunk_norms, n_bands
from tests.conformance.conftest import (
    eager_reference,
    family_access,
    lengths,
    token_ids,
)

NAMES = list(FAMILIES)
_LETTER = {Positional.ROPE: "r", Positional.NONE: "n", Positional.ABSOLUTE: "a", Positional.ALIBI: "l"}


def _collect(access, ids, taps, **kw):
    caps = {}

    def on_layer(cap):
        caps[cap.layer] = {"pattern": cap.pattern() if Tap.PATTERN in taps else None, "q": cap.q, "k": cap.k,
                           "q_pre": cap.q_pre, "k_pre": cap.k_pre, "info": cap.info,
                           "call": cap.extras.get("attention_call")}

    result = access.run(ids, taps=taps, on_layer=on_layer, **kw)
    return caps, result


@pytest.mark.parametrize("name", NAMES)
def test_positional_facts(name):
    access = family_access(name)
    info, expect = access.info, FAMILIES[name].expect
    assert "".join(_LETTER[layer.positional] for layer in info.layers) == expect["positional"]
    rope = [layer for layer in info.layers if layer.has_rope]
    for layer in rope:
        assert layer.rotary_dim == expect["rotary_dim"]
        assert layer.rotary_offset == expect.get("offset", 0)
        assert layer.chunk_layout is ChunkLayout(expect.get("layout", "half_split"))
        assert n_bands(layer, info.head_dim) == layer.n_chunks + (layer.rotary_dim < info.head_dim)
    if "windows" in expect:
        assert [layer.sliding_window for layer in info.layers] == expect["windows"]
    if "chunks" in expect:
        assert [layer.attention_chunk for layer in info.layers] == expect["chunks"]
    if "theta" in expect:
        assert [layer.rope_theta for layer in info.layers] == expect["theta"]
    for key, field in (("softcap", "attn_softcap"), ("scale", "attn_scale")):
        if key in expect:
            assert all(math.isclose(getattr(layer, field), expect[key]) for layer in info.layers)
    assert all(layer.learned_sinks == expect.get("sinks", False) for layer in info.layers)
    assert info.moe == expect.get("moe", False)
    if "kv_heads" in expect:
        assert info.n_kv_heads == expect["kv_heads"]
    assert type(info).from_dict(info.to_dict()) == info  # what a scan saves, it loads


def test_alibi_slopes_are_the_models_own():
    """BLOOM / Falcon build their bias with `build_alibi_tensor`; posprobe's slopes are the same numbers."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for name in ("bloom", "falcon_alibi"):
        info = family_access(name).info
        alibi = build_alibi_tensor(torch.ones(1, 3), info.n_heads, torch.float32)  # [heads, 1, 3]: slope * j
        for layer in info.layers:
            assert np.allclose(layer.alibi_slopes, alibi[:, 0, 1].numpy())


@pytest.mark.parametrize("name", NAMES)
def test_patterns_equal_eager_at_two_lengths(name):
    access = family_access(name)
    impl = access.model.config._attn_implementation
    for n in lengths(access):
        ids = token_ids(access, n)
        caps, result = _collect(access, ids, [Tap.PATTERN], logits="all")
        ref = eager_reference(access, ids)
        assert len(caps) == access.info.n_layers
        for layer, cap in caps.items():
            assert cap["pattern"].shape == ref.attentions[layer].shape
            assert float((cap["pattern"] - ref.attentions[layer]).abs().max()) <= 1e-5, (name, n, layer)
            window = cap["info"].sliding_window
            if window is not None and n > window:  # the longer length really exercises the window
                dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
                assert float(cap["pattern"][..., dist >= window].abs().max()) == 0.0
        assert float((result.logits - ref.logits).abs().max()) <= 1e-4
        if not access.outside_interface:  # reading statistics leaves the model's own output path bit-identical
            with torch.inference_mode():
                own = access.model(ids).logits
            assert torch.equal(result.logits, own), name
    assert access.model.config._attn_implementation == impl


@pytest.mark.parametrize("name", NAMES)
def test_chunk_decomposition_is_exact(name):
    access = family_access(name)
    info = access.info
    if not info.has_rope:
        pytest.skip(f"{name} has no RoPE layer ({info.layers[0].positional.value})")
    ids = token_ids(access, lengths(access)[1], seed=1)
    projected = {}  # q_proj outputs: pre-rotary q where the model normalises nothing between (GPT-J's check)
    hooks = []
    if access.paths.q_proj and not access.paths.q_norm:
        for layer in range(info.n_layers):
            proj = getattr(access.attention_module(layer), access.paths.q_proj)
            hooks.append(proj.register_forward_hook(
                lambda m, a, out, layer=layer: projected.__setitem__(layer, out.view(*out.shape[:2], -1,
                                                                                     info.head_dim).transpose(1, 2))))
    try:
        caps, _ = _collect(access, ids, [Tap.Q, Tap.K, Tap.Q_PRE, Tap.K_PRE])
    finally:
        for hook in hooks:
            hook.remove()
    ref = eager_reference(access, ids)
    checked_layout = 0
    for layer, cap in caps.items():
        lay = cap["info"]
        if not lay.has_rope:
            continue
        q, k = cap["q"].double(), cap["k"].double()
        k_full = k.repeat_interleave(info.n_heads // k.shape[1], dim=1)
        c = chunk_contributions(q, k_full, lay)  # [b, H, bands, n, n]
        call = cap["call"]
        scale = call.scale if call is not None else lay.attn_scale
        logits = c.sum(2) * scale
        assert torch.allclose(logits, torch.matmul(q, k_full.transpose(-1, -2)) * scale, atol=1e-9)
        if call is not None:  # the same logits, through the model's own mask / softcap / sinks
            rebuilt = dataclasses.replace(call, q=cap["q"].double(), k=cap["k"].double(),
                                          sinks=None if call.sinks is None else call.sinks.detach().double())
            full = torch.arange(ids.shape[1])
            s = logits
            if rebuilt.softcap is not None:
                s = torch.tanh(s / rebuilt.softcap) * rebuilt.softcap
            scores = rebuilt.masked_scores(full, 0, ids.shape[1])
            assert torch.allclose(torch.where(torch.isinf(scores), scores, s), scores, atol=1e-6)
            probs = rebuilt.softmax(torch.where(torch.isinf(scores), scores, s))
            assert float((probs - ref.attentions[layer].double()).abs().max()) <= 1e-5, (name, layer)
        # chunk layout: the rotation keeps every chunk's share of the head's rotary norm (profiles, so that a
        # per-vector rescaling after the rotation, Llama 4's qk-norm or YaRN's cos factor, does not matter)
        pairs = [(cap["q_pre"], cap["q"]), (cap["k_pre"], cap["k"])]
        if cap["q_pre"] is None and layer in projected:
            pairs.append((projected[layer], cap["q"]))
        for pre, post in pairs:
            if pre is None or pre is post:
                continue
            a = chunk_norms(pre.double(), lay)[..., : lay.n_chunks]
            b = chunk_norms(post.double(), lay)[..., : lay.n_chunks]
            a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
            assert float((a - b).abs().max()) < 1e-5, (name, layer)
            assert not torch.allclose(pre, post)  # the rotation really happened
            checked_layout += 1
    if FAMILIES[name].expect.get("layout") == "interleaved":
        assert checked_layout, f"{name}: the interleaved layout was not checked against the rotation"


class _KernelsLikeFunc(torch.nn.Module):
    """What the `kernels` package puts in place of a modeling module's rotary function (kernels 0.19 with
    transformers 5.25): an nn.Module that calls the original and has no `__name__`."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("name", ["deepseek_v3", "llama", "gemma3_text"])
def test_rotary_functions_wrapped_like_kernels_are_still_recognised(name, monkeypatch):
    """The rotary wrapper tells the interleaved variant by the modeling module's attribute name, so a function
    replaced by an nn.Module wrapper is still recorded and still de-interleaved (DeepSeek-V3 is interleaved: a
    missed de-interleave fails the layout check of the decomposition test)."""
    import sys

    from posprobe.adapters.hf import _ROTARY_FUNCTIONS

    access = family_access(name)
    owner = sys.modules[type(access.attention_module(0)).__module__]
    wrapped = [f for f in _ROTARY_FUNCTIONS if callable(getattr(owner, f, None))]
    assert wrapped, f"{owner.__name__} has none of {_ROTARY_FUNCTIONS}"
    for fname in wrapped:
        monkeypatch.setattr(owner, fname, _KernelsLikeFunc(getattr(owner, fname)))
    assert not hasattr(getattr(owner, wrapped[0]), "__name__")
    test_chunk_decomposition_is_exact(name)


def _budget():
    from posprobe.probes.base import get_budget

    return dataclasses.replace(get_budget("quick"), name="conformance", context_lengths=(16, 40), n_texts=1,
                               max_queries=8)


def _small_configs():
    from posprobe.probes import get_probe

    return {
        "position_bias": get_probe("position_bias").Config(context_length=40, n_contexts=1, doc_items=3,
                                                           doc_trials=2, n_bootstrap=10, n_query=4),
        "implicit_position": get_probe("implicit_position").Config(context_length=40, n_sequences=4,
                                                                   positions_per_sequence=16),
        "retrieval": get_probe("retrieval").Config(n_trials=1, include_wrong=True),  # random weights answer nothing
    }


@pytest.mark.parametrize("name", NAMES)
def test_quick_scan_finishes_with_finite_numbers(name):
    import posprobe
    from posprobe.probes import list_probes

    access = family_access(name)
    scan = posprobe.scan(access, budget=_budget(), configs=_small_configs(), progress=False)
    skipped = scan.meta.get("skipped", {})
    assert all(isinstance(reason, str) and len(reason) > 20 for reason in skipped.values()), skipped
    if access.info.has_rope:
        assert not {"rope_frequency", "positional_heads"} & set(skipped)
    else:
        assert {"rope_frequency", "positional_heads"} <= set(skipped)
    ran = set(list_probes()) - set(skipped)
    assert ran
    numeric = scan.heads.select_dtypes("number").drop(columns=["layer", "head"], errors="ignore")
    values = numeric.to_numpy(dtype=float)
    assert not np.isinf(values).any(), name
    assert np.isfinite(values).any(axis=0).mean() >= 0.8, name  # NaN only where a statistic is undefined, e.g.
    # u_score when every layer's window is shorter than the context (no mass reaches the middle bins)


def _edits(access):
    """One edit of each kind, on the first layer where it can apply (or layer 0 to show the error)."""
    info = access.info
    rope = next((layer.index for layer in info.layers if layer.has_rope), 0)

    def uniform(p, ctx):
        keep = (p > 0).to(p.dtype)
        return keep / keep.sum(-1, keepdim=True)

    return {
        "attention": AttentionEdit(info.n_layers - 1, uniform),
        "projection": ProjectionInputEdit(0, dims=tuple(range(8)), factor=-3.0, queries="all"),
        "rotary": RotaryEdit(rope),
    }


def _applies(access, kind: str) -> bool:
    if kind == "attention":
        return not access.outside_interface
    if kind == "projection":
        return access.paths.q_proj is not None and access.paths.k_proj is not None
    return access.info.has_rope


@pytest.mark.parametrize("name", NAMES)
def test_edits_restore_logits_bitwise(name):
    access = family_access(name)
    ids = token_ids(access, lengths(access)[1], seed=2)
    before = access.run(ids, logits="all").logits
    for kind, edit in _edits(access).items():
        if not _applies(access, kind):
            with pytest.raises((InterventionError, InputError)) as err, access.editing([edit]):
                access.run(ids, logits="all")
            assert len(str(err.value)) > 40  # says what and why
            continue
        with access.editing([edit]):
            edited = access.run(ids, logits="all").logits
        assert not torch.allclose(before, edited, atol=1e-5), (name, kind)
        assert torch.equal(access.run(ids, logits="all").logits, before), (name, kind)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
@pytest.mark.parametrize("name", NAMES)
def test_backend_parity(name, backend):
    from posprobe.models import wrap

    access = family_access(name)
    if backend not in FAMILIES[name].backends:  # the registry says it does not apply: it must say why, clearly
        with pytest.raises(UnsupportedModelError) as err:
            wrap(access.model, tokenizer=access.tokenizer, backend=backend, name=access.info.name)
        pytest.skip(f"{backend}: {err.value}")
    try:
        other = wrap(access.model, tokenizer=access.tokenizer, backend=backend, name=access.info.name)
    except (UnsupportedModelError, MissingDependencyError) as exc:
        pytest.skip(f"{backend}: {exc}")
    assert other.info == access.info
    ids = token_ids(access, lengths(access)[1], seed=3)
    ref, ref_out = _collect(access, ids, [Tap.PATTERN], logits="all")
    got, got_out = _collect(other, ids, [Tap.PATTERN], logits="all")
    for layer in ref:
        assert float((got[layer]["pattern"] - ref[layer]["pattern"]).abs().max()) <= 1e-4, (name, backend, layer)
    assert float((got_out.logits - ref_out.logits).abs().max()) <= 1e-3


def test_learned_sink_mass_is_reported_next_to_the_first_token_sink():
    """gpt-oss: rows of the pattern sum to 1 - (the learned sink's share); head_basics reports that share."""
    import posprobe

    access = family_access("gpt_oss")
    scan = posprobe.scan(access, probes=["head_basics"], budget=_budget(), progress=False)
    learned = scan.heads["learned_sink_mass"]
    assert learned.between(0, 1).all() and float(learned.max()) > 0.01
    ids = token_ids(access, 20)
    caps, _ = _collect(access, ids, [Tap.PATTERN])
    rows = caps[0]["pattern"].sum(-1)
    assert float(rows.max()) < 1.0  # some mass went to the sink logit
    assert "learned_sink_mass" not in posprobe.scan(family_access("llama"), probes=["head_basics"],
                                                    budget=_budget(), progress=False).heads
