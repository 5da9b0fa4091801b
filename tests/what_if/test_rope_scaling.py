"""RoPE rescaling what-ifs equal the same weights loaded with that rope_parameters in transformers (atol 1e-5).

The reference rope_parameters are written out here by hand from the transformers docs / paper settings, not taken
from the what-if, so a wrong constant in posprobe/what_if/rope_scaling.py (a default, a key, the NTK exponent)
makes its test fail. Checked by hand once, each fails here: YaRN's beta_fast default 32 -> 16 and beta_slow
1 -> 2 (visible only with a trained length where the ramp bounds are not clipped, hence the 1024 case), the NTK
exponent r/(r-2) -> r/(r-1), llama3's high_freq_factor 4 -> 2, Gemma 3's default layer type full -> sliding, and
factor -> 1.01 x factor.
"""

from __future__ import annotations

import pytest
import torch

from posprobe.errors import InterventionError
from posprobe.interventions.spec import LayerRange, parse
from posprobe.what_if import (
    DynamicNTK,
    Llama3,
    LongRoPE,
    NTKAware,
    PositionInterpolation,
    ProportionalRoPE,
    RopeTheta,
    YaRN,
)
from tests.what_if.conftest import NATIVE, reference_logits, tiny_gemma3, tiny_llama

THETA = 10000.0
HALF = 8  # r / 2 of the tiny models (head_dim 16)
LONG = [1.0 + 0.5 * k for k in range(HALF)]
SHORT = [1.0 + 0.1 * k for k in range(HALF)]

CASES = [
    (PositionInterpolation(factor=3.0), {"rope_type": "linear", "factor": 3.0}),
    (NTKAware(factor=3.0), {"rope_type": "default", "rope_theta": THETA * 3.0 ** (16 / 14)}),
    (DynamicNTK(factor=3.0), {"rope_type": "dynamic", "factor": 3.0}),
    (YaRN(factor=3.0), {"rope_type": "yarn", "factor": 3.0, "beta_fast": 32, "beta_slow": 1,
                        "original_max_position_embeddings": NATIVE}),
    (YaRN(factor=3.0, original_max_position_embeddings=1024),  # a trained length where beta_fast / slow matter
     {"rope_type": "yarn", "factor": 3.0, "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 1024}),
    (YaRN(factor=3.0, beta_fast=8.0, attention_factor=1.2),
     {"rope_type": "yarn", "factor": 3.0, "beta_fast": 8, "beta_slow": 1, "attention_factor": 1.2,
      "original_max_position_embeddings": NATIVE}),
    (Llama3(factor=3.0), {"rope_type": "llama3", "factor": 3.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": NATIVE}),
    (LongRoPE(factor=3.0, long_factor=tuple(LONG), short_factor=tuple(SHORT)),
     {"rope_type": "longrope", "factor": 3.0, "long_factor": LONG, "short_factor": SHORT,
      "original_max_position_embeddings": NATIVE}),
    (ProportionalRoPE(factor=2.0, partial_rotary_factor=0.5, max_length=80),
     {"rope_type": "proportional", "factor": 2.0, "partial_rotary_factor": 0.5}),
    (RopeTheta(theta=2500.0), {"rope_type": "default", "rope_theta": 2500.0}),
    (RopeTheta(ratio=3.0), {"rope_type": "default", "rope_theta": THETA * 3.0}),
]


@pytest.mark.parametrize("spec,params", CASES, ids=[c[0].name + str(i) for i, c in enumerate(CASES)])
def test_llama_logits_equal_transformers_with_that_rope_parameters(llama, ids, spec, params):
    with spec.applied(llama):
        got = llama.run(ids, logits="all").logits
    want = reference_logits(tiny_llama, {"rope_theta": THETA, **params}, llama.model.state_dict(), ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert spec.target_layers(llama) == [0, 1]


@pytest.mark.parametrize("spec,params", CASES[:7], ids=[c[0].name + str(i) for i, c in enumerate(CASES[:7])])
def test_gemma3_scales_full_attention_layers_only_by_default(gemma3, ids, spec, params):
    """Gemma 3's convention: rope scaling in the full_attention parameters; sliding layers keep theta 10k."""
    theta = 1_000_000.0
    if spec.name == "ntk":
        params = {**params, "rope_theta": theta * 3.0 ** (16 / 14)}
    reference = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                 "full_attention": {"rope_theta": theta, **params}}
    with spec.applied(gemma3):
        got = gemma3.run(ids, logits="all").logits
    want = reference_logits(tiny_gemma3, reference, gemma3.model.state_dict(), ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert spec.target_layers(gemma3) == [1, 3]
    assert spec.resolved(gemma3)["layers"] == "1:4" or spec.resolved(gemma3)["layers"] == "1,3"


def test_gemma3_every_layer_when_chosen(gemma3, ids):
    spec = YaRN(factor=3.0, layers=LayerRange(0))
    yarn = {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": NATIVE}
    reference = {"sliding_attention": {"rope_theta": 10000.0, **yarn}, "full_attention": {"rope_theta": 1e6, **yarn}}
    with spec.applied(gemma3):
        got = gemma3.run(ids, logits="all").logits
    torch.testing.assert_close(got, reference_logits(tiny_gemma3, reference, gemma3.model.state_dict(), ids),
                               atol=1e-5, rtol=0)


def test_gemma3_half_a_layer_type_is_refused(gemma3):
    with pytest.raises(InterventionError, match="share a type"), YaRN(layers="1:2").applied(gemma3):
        pass


def test_dynamic_is_a_no_op_within_the_native_window(llama):
    short = torch.randint(3, 250, (1, NATIVE), generator=torch.Generator().manual_seed(2))
    before = llama.run(short, logits="all").logits
    with DynamicNTK(factor=4.0).applied(llama):
        during = llama.run(short, logits="all").logits
    assert torch.equal(before, during)


def test_chosen_layers_only(llama, ids):
    """layers=1:2 rescales layer 1 only: differs from both the plain model and the all-layer what-if."""
    short = ids[:, :NATIVE]
    plain = llama.run(short, logits="all").logits
    with PositionInterpolation(factor=4.0).applied(llama):
        both = llama.run(short, logits="all").logits
    with PositionInterpolation(factor=4.0, layers="1:2").applied(llama):
        one = llama.run(short, logits="all").logits
    assert not torch.allclose(one, plain) and not torch.allclose(one, both)


@pytest.mark.parametrize("spec", [YaRN(factor=2.0), NTKAware(factor=2.0), DynamicNTK(factor=2.0)])
def test_exit_restores_bitwise_and_lifts_the_limit_only_inside(llama, ids, spec):
    short = ids[:, :NATIVE]
    before = llama.run(short, logits="all").logits
    with spec.applied(llama):
        assert llama.info.max_positions == 2 * NATIVE
        llama.run(ids[:, : 2 * NATIVE], logits="last")
    assert llama.info.max_positions == NATIVE
    assert torch.equal(before, llama.run(short, logits="all").logits)
    assert not llama.model.model.rotary_emb._forward_hooks
    assert not any(m._forward_pre_hooks for m in llama.model.modules())


def test_kv_cached_greedy_under_yarn_matches_recompute(llama, ids):
    with YaRN(factor=3.0).applied(llama):
        cached = llama.greedy(ids[:1, :40], 6)
        ref = ids[:1, :40]
        for _ in range(6):
            nxt = llama.run(ref, logits="last").logits[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], dim=1)
    assert torch.equal(cached, ref[:, 40:])


def test_text_form_and_provenance(llama):
    spec = parse("yarn:factor=2,beta_fast=16")
    assert spec == YaRN(factor=2, beta_fast=16)
    described = spec.describe(llama)
    assert described["name"] == "yarn" and described["resolved"]["layers"] == "0:2"
    assert described["resolved"]["rope_parameters"]["rope_type"] == "yarn"


def test_bad_factor_is_refused():
    with pytest.raises(InterventionError, match="positive"):
        YaRN(factor=0)


def test_longrope_factors_from_text():
    spec = parse("longrope:factor=3,long_factor=" + ",".join(str(v) for v in LONG) + ",short_factor=1,1,1,1,1,1,1,1")
    assert spec.long_factor == tuple(LONG) and spec.short_factor == (1.0,) * HALF
    with pytest.raises(InterventionError, match="numbers"):
        LongRoPE(long_factor="a,b")
