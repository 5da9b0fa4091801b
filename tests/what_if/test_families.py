"""The what-ifs on every RoPE family of the conformance registry (posprobe/adapters/families.py).

Two checks per family, each against transformers itself on identical weights:
- YaRN x2: logits equal a model loaded with that rope_parameters (the position_embeddings hook is the family's own
  rotary module run on another config);
- Ms-PoE with every head at ratio 2 (positions p / 2, through the logit engine's delta rotations of the layer's own
  rotated q/k) equals PI x2 loaded in transformers (rope_type linear, factor 2): the engine agrees with the family's
  own rotation, q/k norms, partial rotary, scale, softcap and windows.
STRING and Self-Extend (the same engine) then run on the family and change its logits (finite), and the model is
bit-for-bit restored after each. Families the what-ifs cannot serve must refuse with an InterventionError saying
why (listed below, checked).
"""

from __future__ import annotations

import pytest
import torch

from posprobe.errors import InterventionError
from posprobe.what_if import STRING, MsPoE, PositionInterpolation, SelfExtend, YaRN
from tests.what_if.conftest import wrap

# Families whose RoPE the what-ifs do not implement, and why (the error must say so).
REFUSED = {
    "gptj": "interleaved",  # rotate_every_two layout
    "cohere": "interleaved",
    "llama4_text": "interleaved",  # complex-number rotary (freqs_cis)
    "falcon": "inside its module",  # attention computed inside the module: no AttentionEdit

}
N = 24  # tokens: past the registry's windows (8)


def _rope_families():
    from posprobe.adapters.families import FAMILIES

    return [name for name, fam in FAMILIES.items() if "r" in fam.expect.get("positional", "")]


def _build(name, rope_parameters=None):
    from transformers import AutoModelForCausalLM

    from posprobe.adapters.families import family_config
    from posprobe.models import byte_tokenizer

    config = family_config(name, len(byte_tokenizer()))
    if rope_parameters is not None:
        config.rope_parameters = rope_parameters
    torch.manual_seed(0)
    try:
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    except ValueError:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _reference(name, spec, access, ids):
    reference = _build(name, spec.scaled_config(access, spec.target_layers(access)).rope_parameters)
    reference.load_state_dict(access.model.state_dict())
    with torch.no_grad():
        return reference(ids).logits


@pytest.mark.parametrize("name", _rope_families())
def test_family(name):
    access = wrap(_build(name))
    ids = torch.randint(3, 250, (1, N), generator=torch.Generator().manual_seed(0))
    yarn, pi = YaRN(factor=2.0, layers="0:"), PositionInterpolation(factor=2.0, layers="0:")
    ms_poe = MsPoE(ratio_min=2.0, ratio_max=2.0, layers="0:")
    if name in REFUSED:
        with pytest.raises(InterventionError, match=REFUSED[name]), ms_poe.applied(access):
            access.run(ids, logits="all")
        return
    with yarn.applied(access):
        got = access.run(ids, logits="all").logits
    torch.testing.assert_close(got, _reference(name, yarn, access, ids), atol=1e-5, rtol=0)
    plain = access.run(ids, logits="all").logits
    windowed = all(layer.sliding_window for layer in access.info.layers if layer.has_rope)
    for spec in (SelfExtend(group=2, window=8, layers="0:"), STRING(shift=12, window=4, layers="0:")):
        with spec.applied(access):
            got = access.run(ids, logits="all").logits
        assert torch.isfinite(got).all()
        if not windowed:  # windows of 8 tokens hide every pair these settings remap: nothing may change there
            assert (got - plain).abs().max() > 1e-4
        assert torch.equal(plain, access.run(ids, logits="all").logits)
    if any(layer.rope_scaling for layer in access.info.layers):  # gpt-oss ships YaRN: p / 2 is no named type
        return
    with ms_poe.applied(access):
        got = access.run(ids, logits="all").logits
    torch.testing.assert_close(got, _reference(name, pi, access, ids), atol=1e-5, rtol=0)
