"""Chunked prefill of `HFAccess.greedy` (issue 20): the prompt fed to the KV cache a few tokens per pass gives the
tokens and the logits of one pass (atol 1e-5), on tiny random models built from configs (no download).

Covered: a Gemma 3 layout whose sliding window (8) is shorter than the prompt (40 tokens, chunks of 5: sliding and
full layers), a GQA Llama, the what-ifs YaRN / Self-Extend / StreamingLLM / Ms-PoE (head order by index), the
interventions mask_heads and disable_rope, and query-scaling edits on the last query only (`_greedy_last_query`).
Where chunks might change values (length-dependent RoPE, Ms-PoE's outlier head order, Found-in-the-Middle, attention
edits on a layer whose cache keeps a window shorter than the prompt) the prompt runs in one pass; the sizing rule
(`posprobe.devices.prefill_chunk_size`) is checked directly, never by a long run.
"""

from __future__ import annotations

import pytest
import torch

import posprobe
from posprobe import devices
from posprobe.access import AttentionEdit, ModelAccess, ProjectionInputEdit, RotaryEdit
from posprobe.adapters import hf
from posprobe.errors import InputError
from posprobe.interventions.disable_rope import DisableRope
from posprobe.interventions.mask_heads import MaskHeads
from posprobe.models import byte_tokenizer
from posprobe.what_if import DynamicNTK, MsPoE, SelfExtend, StreamingLLM, YaRN

N, CHUNK, STEPS = 40, 5, 6


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
                              bos_token_id=2, eos_token_id=1, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return Gemma3ForCausalLM(config).eval()


def _llama(native=128, seed=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=native,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def _wrap(model):
    return posprobe.load_model(model, tokenizer=byte_tokenizer())


@pytest.fixture(scope="module")
def gemma3():
    return _wrap(_gemma3())


@pytest.fixture(scope="module")
def llama():
    return _wrap(_llama())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 250, (2, N), generator=torch.Generator().manual_seed(5))


def _decode(access, ids, **kw):
    """(new tokens, the logits of every step [b, V], the tokens of every decoder pass)."""
    logits, lengths = [], []
    head = access.model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: logits.append(out[:, -1].detach().clone()))
    base = access.base.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(int(kwargs["input_ids"].shape[1])), with_kwargs=True)
    try:
        tokens = access.greedy(ids, STEPS, **kw)
    finally:
        head.remove()
        base.remove()
    return tokens, logits, lengths


def _assert_chunked_equals_one_pass(access, ids, prompt_passes=None, **kw):
    """Greedy tokens and every step's logits equal between one prefill pass and chunks of CHUNK tokens, and the
    chunked call really ran CHUNK-token passes (`prompt_passes`: the expected prompt passes, default 40 / 5)."""
    one = _decode(access, ids, prefill_chunk=None, **kw)
    chunked = _decode(access, ids, prefill_chunk=CHUNK, **kw)
    expected = prompt_passes if prompt_passes is not None else [CHUNK] * (N // CHUNK)
    assert chunked[2][:len(expected)] == expected and set(chunked[2][len(expected):]) == {1}, chunked[2]
    assert max(one[2]) >= N - 1  # the reference prefilled in one pass
    assert torch.equal(chunked[0], one[0])
    assert len(chunked[1]) == len(one[1]) == STEPS
    for got, want in zip(chunked[1], one[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return one


def _assert_recomputed(access, ids, decoded, edits=()):
    """The decoded tokens and every step's logits equal a pass over the whole sequence so far (no cache)."""
    tokens, logits, _ = decoded
    assert torch.equal(tokens, ModelAccess.greedy(access, ids, STEPS, edits=edits))
    for step, got in enumerate(logits):
        sequence = torch.cat([ids, tokens[:, :step]], dim=1)
        want = access.run(sequence, logits="last", edits=edits).logits[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _assert_one_pass(access, ids, **kw):
    """prefill_chunk=CHUNK is refused (one prefill pass) and gives the tokens of prefill_chunk=None."""
    one = _decode(access, ids, prefill_chunk=None, **kw)
    asked = _decode(access, ids, prefill_chunk=CHUNK, **kw)
    assert asked[2] == one[2] and asked[2][0] == N
    assert torch.equal(asked[0], one[0])


# --- the model alone ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma3", "llama"])
def test_chunked_prefill_equals_one_pass(name, ids, request):
    access = request.getfixturevalue(name)
    one = _assert_chunked_equals_one_pass(access, ids)
    _assert_recomputed(access, ids, one)
    assert torch.equal(one[0], _decode(access, ids)[0])  # "auto" at 40 tokens: one pass, today's path
    assert _decode(access, ids)[2][0] == N


def test_ragged_last_chunk_and_chunks_longer_than_the_window(gemma3, ids):
    """A last chunk shorter than the others (41 = 3 x 13 + 2), chunks longer than the sliding window (13 > 8)."""
    longer = torch.cat([ids, ids[:, :1]], dim=1)
    one = _decode(gemma3, longer, prefill_chunk=None)
    chunked = _decode(gemma3, longer, prefill_chunk=13)
    assert chunked[2][:4] == [13, 13, 13, 2]
    assert torch.equal(chunked[0], one[0])
    for got, want in zip(chunked[1], one[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_one_row_and_a_chunk_of_one_token(llama, ids):
    _assert_chunked_equals_one_pass(llama, ids[:1])
    one = _decode(llama, ids[:1, :12], prefill_chunk=None)
    tokenwise = _decode(llama, ids[:1, :12], prefill_chunk=1)
    assert tokenwise[2][:12] == [1] * 12 and torch.equal(tokenwise[0], one[0])


# --- what-ifs and interventions -------------------------------------------------------------------------------------

WHAT_IFS = [YaRN(factor=2.0), SelfExtend(group=4, window=8), StreamingLLM(n_sink=2, window=9),
            MsPoE(order="index", layers="0:")]


@pytest.mark.parametrize("spec", WHAT_IFS, ids=str)
def test_what_ifs_chunked_equal_one_pass(llama, ids, spec):
    with spec.applied(llama):
        _assert_chunked_equals_one_pass(llama, ids)


def test_stacked_what_ifs_on_the_gemma3_layout(gemma3, ids):
    """YaRN + Self-Extend on Gemma 3's global layers (their default), sliding layers left to the model."""
    with YaRN(factor=2.0).applied(gemma3), SelfExtend(group=4, window=8).applied(gemma3):
        _assert_chunked_equals_one_pass(gemma3, ids)


@pytest.mark.parametrize("spec", [MaskHeads(heads=[(1, 0), (1, 3)]), DisableRope(layers=[1])], ids=str)
def test_interventions_chunked_equal_one_pass(llama, ids, spec):
    with spec.applied(llama):
        _assert_chunked_equals_one_pass(llama, ids)


def test_mask_heads_on_a_gemma3_global_layer(gemma3, ids):
    with MaskHeads(heads=[(1, 2)]).applied(gemma3):
        _assert_chunked_equals_one_pass(gemma3, ids)


def test_query_scaling_edits(llama, ids):
    """ProjectionInputEdit on every query (the plain path) and on the last query only (`_greedy_last_query`: the
    prompt but its last token is prefilled, 39 = 7 x 5 + 4, then the last token as the last query)."""
    everywhere = [ProjectionInputEdit(0, (1, 5, 9), 0.0, keys=True, queries="all"), RotaryEdit(1)]
    _assert_chunked_equals_one_pass(llama, ids, edits=everywhere)
    last = [ProjectionInputEdit(layer, (1, 5, 9), 0.0, keys=True, queries="last") for layer in (0, 1)]
    one = _assert_chunked_equals_one_pass(llama, ids, prompt_passes=[CHUNK] * 7 + [4], edits=last)
    _assert_recomputed(llama, ids, one, edits=last)


# --- where the prompt stays in one pass -----------------------------------------------------------------------------


def test_ms_poe_outlier_order_stays_in_one_pass(llama, ids):
    """Ms-PoE ranks its heads by the call's last query: a chunk's last query would rank them otherwise."""
    with MsPoE(layers="0:").applied(llama):
        _assert_one_pass(llama, ids)


@pytest.mark.parametrize("spec", [MaskHeads(heads=[(0, 1)]), StreamingLLM(n_sink=2, window=6, layers="0:"),
                                  SelfExtend(group=2, window=4, layers="0:")], ids=lambda s: type(s).__name__)
def test_attention_edits_on_a_sliding_layer_keep_every_key(gemma3, ids, spec):
    """transformers' cache keeps only the last 7 keys of layer 0 (window 8), while edits index keys from the first
    token: with an attention edit on a sliding layer the cache keeps every key (`new_kv_cache`), so decoding, in
    one prefill pass or in chunks, equals a pass over the whole sequence (the trimmed cache did not: sinks and
    grouped positions were read from the wrong keys)."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    assert any(isinstance(layer, DynamicSlidingWindowLayer) for layer in gemma3.new_kv_cache().layers)
    with spec.applied(gemma3):
        cache = gemma3.new_kv_cache(gemma3._edits)
        assert not any(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)
        one = _assert_chunked_equals_one_pass(gemma3, ids)
        _assert_recomputed(gemma3, ids, one)
    assert gemma3._prefill_blocker(7, gemma3._edits, gemma3.new_kv_cache()) is None  # shorter than the window


def test_found_in_the_middle_stays_in_one_pass(llama):
    from posprobe.interventions.found_in_the_middle import DocumentCalibration

    member = torch.zeros(1, N, 2)
    member[0, 4:10, 0] = member[0, 12:20, 1] = 1
    fn = DocumentCalibration(1, member, torch.zeros(4, 2), N - 1, 0.3)
    reason = llama._prefill_blocker(N, [AttentionEdit(1, fn, stage="probs")], llama.new_kv_cache())
    assert reason is not None and "whole prompt" in reason


def test_length_dependent_rope_stays_in_one_pass(ids, monkeypatch):
    """Dynamic NTK past a 32-token native window: transformers recomputes the base from each pass's length, so
    chunks would rotate the prompt at other frequencies (forced chunks do change the logits)."""
    access = _wrap(_llama(native=32))
    with DynamicNTK(factor=2.0).applied(access):
        _assert_one_pass(access, ids)
        one = _decode(access, ids, prefill_chunk=None)
        monkeypatch.setattr(hf.HFAccess, "_prefill_blocker", lambda self, n, edits, cache: None)
        forced = _decode(access, ids, prefill_chunk=CHUNK)
        assert forced[2][0] == CHUNK
        assert float((forced[1][0] - one[1][0]).abs().max()) > 1e-4


def test_prefill_chunk_is_checked(llama, ids):
    for bad in (0, -3):
        with pytest.raises(InputError, match="prefill_chunk"):
            llama.greedy(ids, 2, prefill_chunk=bad)
    for bad in (2.5, True, "half"):  # what the annotation refuses, for callers without a type checker
        with pytest.raises(InputError, match="prefill_chunk"):
            devices.check_prefill_chunk(bad)
    assert [devices.check_prefill_chunk(v) for v in ("auto", None, 7)] == ["auto", None, 7]


# --- the sizing rule ------------------------------------------------------------------------------------------------


def test_prefill_chunk_size_from_the_scores_budget(llama, monkeypatch):
    """None (one pass) while [b, H, n, n] float32 scores fit the budget; else the chunk that fits, evened out."""
    info = llama.info  # 4 query heads
    assert devices.prefill_scores_bytes(info, 100, 2) == 2 * 4 * 100 * 100 * 4
    assert devices.prefill_chunk_size(info, N, 2) is None  # every prompt of these tests: one pass
    assert devices.prefill_chunk_size(info, 8192, 1) is None  # 4 x 8192^2 x 4 = 1 GiB exactly: one pass
    assert devices.prefill_chunk_size(info, 16384, 1) == 4096  # 4.3 GB over one pass: 4 chunks of 4096
    assert devices.prefill_chunk_size(info, 32748, 1) == 2047  # 2049 fit: 16 chunks, evened out
    assert devices.prefill_chunk_size(info, 8192, 5) == 1366  # 5 rows (a trial of evaluate_positions): 1638 fit
    assert devices.prefill_chunk_size(info, 100, 1, budget_bytes=4 * 100 * 30 * 4) == 25  # 30 fit: 4 x 25
    assert devices.prefill_chunk_size(info, 100, 1, budget_bytes=1) == 1  # never 0
    monkeypatch.setenv("POSPROBE_MEMORY_LIMIT", str(4 * 4 * 100 * 100 * 4 - 1))  # a quarter of it: just short
    assert devices.prefill_chunk_size(info, 100, 1, device="cpu") == 50
    monkeypatch.setenv("POSPROBE_MEMORY_LIMIT", str(4 * 4 * 100 * 100 * 4))
    assert devices.prefill_chunk_size(info, 100, 1, device="cpu") is None


def test_auto_uses_the_sizing_rule(llama, ids, monkeypatch):
    """prefill_chunk="auto" prefills in the chunks `prefill_chunk_size` gives (a budget that holds 10 queries)."""
    monkeypatch.setattr(devices, "PREFILL_BYTES", devices.prefill_scores_bytes(llama.info, N, 2, queries=10))
    auto = _decode(llama, ids)
    assert auto[2][:4] == [10, 10, 10, 10]
    assert torch.equal(auto[0], _decode(llama, ids, prefill_chunk=None)[0])


def test_attention_buckets_prefill_each_pass_in_chunks(llama, ids):
    """Attention Buckets decodes its passes in lockstep, one cache each (`buckets._lockstep_greedy`): every pass
    prefills in chunks and the combined decoding equals one prefill pass each, logits of every step included."""
    from posprobe.what_if import AttentionBuckets

    with AttentionBuckets(bases=(10000, 15000, 25000)).applied(llama):
        one = _decode(llama, ids, prefill_chunk=None)
        chunked = _decode(llama, ids, prefill_chunk=CHUNK)
    assert chunked[2][:N // CHUNK] == [CHUNK] * (N // CHUNK)  # the first pass's prompt, then the next passes'
    assert chunked[2].count(CHUNK) == 3 * (N // CHUNK) and one[2].count(N) == 3
    assert torch.equal(chunked[0], one[0])
    for got, want in zip(chunked[1], one[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
