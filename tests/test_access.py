"""LayerCapture's pattern memo: shared results, bounded bytes, no first-in-first-out misses on long sweeps."""

from __future__ import annotations

import torch

from posprobe.access import LayerCapture, LayerInfo, ModelInfo, Positional


def _capture(n_tokens: int, n_heads: int = 2) -> tuple[LayerCapture, list[int]]:
    layer = LayerInfo(index=0, layer_type="full_attention", positional=Positional.NONE)
    model = ModelInfo(name="toy", architecture="toy", n_layers=1, n_heads=n_heads, n_kv_heads=n_heads, head_dim=4,
                      d_model=8, vocab_size=10, max_positions=None, attn_scale=0.5, attn_softcap=None,
                      adds_bos=False, layers=(layer,))
    calls: list[int] = []

    def source(query_index: torch.Tensor) -> torch.Tensor:
        calls.append(int(query_index[0]))
        return torch.rand(1, n_heads, len(query_index), n_tokens)

    cap = LayerCapture(layer=0, info=layer, model=model, position_ids=torch.arange(n_tokens)[None],
                       pattern_source=source)
    return cap, calls


def test_same_queries_share_one_result():
    cap, calls = _capture(64)
    queries = torch.tensor([3, 9, 20])
    assert cap.pattern(queries) is cap.pattern(queries.clone())
    assert len(calls) == 1


def test_different_queries_with_equal_length_ends_and_sum_are_not_confused():
    cap, calls = _capture(16)
    a, b = torch.tensor([0, 2, 3, 5]), torch.tensor([0, 1, 4, 5])  # same length, first, last and sum
    first, second = cap.pattern(a), cap.pattern(b)
    assert len(calls) == 2 and first is not second
    assert cap.pattern(a.to(torch.int32)) is first  # the same index list in another integer dtype still hits


def test_memo_keeps_first_chunks_within_its_byte_budget(monkeypatch):
    n, chunk = 64, 8
    cap, calls = _capture(n)
    chunk_bytes = 1 * 2 * chunk * n * 4
    monkeypatch.setattr(LayerCapture, "PATTERN_MEMO_BYTES", 3 * chunk_bytes)
    first = [probs for _, probs in cap.pattern_chunks(chunk)]
    assert len(calls) == n // chunk
    assert cap.extras["pattern_memo_bytes"] == 3 * chunk_bytes  # bounded: later chunks were not kept
    second = [probs for _, probs in cap.pattern_chunks(chunk)]
    # a second sweep reuses the first three chunks (a FIFO memo smaller than the sweep would miss every one)
    assert len(calls) == 2 * (n // chunk) - 3
    assert all(a is b for a, b in zip(first[:3], second[:3]))
    assert all(torch.equal(a, b) is False for a, b in zip(first[3:], second[3:]))  # recomputed (fresh random)


def test_a_result_larger_than_the_budget_is_still_shared(monkeypatch):
    cap, calls = _capture(32)
    monkeypatch.setattr(LayerCapture, "PATTERN_MEMO_BYTES", 16)
    assert cap.pattern() is cap.pattern()
    assert len(calls) == 1


def test_pattern_from_qk_takes_each_layer_override_on_its_own():
    """A layer's softcap applies even when the layer sets no scale of its own (and the reverse): the pattern built
    from q/k equals a softmax of the softcapped logits written out here."""
    torch.manual_seed(0)
    n, d = 6, 4
    q, k = torch.randn(1, 2, n, d) * 3, torch.randn(1, 2, n, d) * 3
    for layer_scale, layer_cap, model_scale, model_cap in ((None, 2.0, 0.5, None), (0.7, None, 0.5, 3.0)):
        layer = LayerInfo(index=0, layer_type="full_attention", positional=Positional.NONE, attn_scale=layer_scale,
                          attn_softcap=layer_cap)
        model = ModelInfo(name="toy", architecture="toy", n_layers=1, n_heads=2, n_kv_heads=2, head_dim=d,
                          d_model=8, vocab_size=10, max_positions=None, attn_scale=model_scale,
                          attn_softcap=model_cap, adds_bos=False, layers=(layer,))
        cap = LayerCapture(layer=0, info=layer, model=model, position_ids=torch.arange(n)[None])
        cap.q, cap.k = q, k
        scale = layer_scale if layer_scale is not None else model_scale
        softcap = layer_cap if layer_cap is not None else model_cap
        logits = (q @ k.transpose(-1, -2)) * scale
        logits = torch.tanh(logits / softcap) * softcap
        logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(cap.pattern(), torch.softmax(logits, -1), atol=1e-6, rtol=1e-5)
