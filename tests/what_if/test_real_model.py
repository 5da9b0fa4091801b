"""The what-ifs on the real Gemma 3 270M (marked real_model): parity with transformers and exact restoration.

YaRN x4 with Gemma 3's convention (full_attention layers only, sliding layers keep theta 10k) equals the same
weights loaded with that rope_parameters; Self-Extend and StreamingLLM leave the model bit-for-bit as it was.
Short inputs (48 tokens): what is checked is the mechanism on the real architecture, not long-context quality.
"""

from __future__ import annotations

import copy

import pytest
import torch

from posprobe.what_if import SelfExtend, StreamingLLM, YaRN

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def ids(gemma):
    return torch.tensor([gemma.encode("The pass key is 71432. Remember it. " * 5)[:48]])


def test_yarn_on_gemma3_full_attention_layers_equals_transformers(gemma, ids):
    from transformers import AutoModelForCausalLM

    spec = YaRN(factor=4.0)
    full = [x.index for x in gemma.info.layers if x.layer_type == "full_attention"]
    assert spec.target_layers(gemma) == full and len(full) < gemma.info.n_layers
    with spec.applied(gemma):
        got = gemma.run(ids, logits="all").logits
    config = copy.deepcopy(gemma.model.config)
    params = copy.deepcopy(config.rope_parameters)
    params["full_attention"] = {**params["full_attention"], "rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": config.max_position_embeddings}
    config.rope_parameters = params
    reference = AutoModelForCausalLM.from_config(config, torch_dtype=gemma.model.dtype).eval()
    reference.load_state_dict(gemma.model.state_dict())
    with torch.no_grad():
        want = reference(ids).logits
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", [SelfExtend(group=4, window=16), StreamingLLM(n_sink=4, window=16)])
def test_logit_what_ifs_change_gemma_and_restore_it_exactly(gemma, ids, spec):
    before = gemma.run(ids, logits="all").logits
    with spec.applied(gemma):
        during = gemma.run(ids, logits="all").logits
    assert (during - before).abs().max() > 1e-3
    assert torch.equal(before, gemma.run(ids, logits="all").logits)
