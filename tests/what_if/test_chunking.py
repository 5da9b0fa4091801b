"""The score-level what-ifs computed in query chunks equal the whole-matrix computation (atol 1e-6).

`SCORE_CHUNK_BYTES` is lowered so that the HF adapter runs each edited layer 7 query rows at a time (64 tokens: 10
chunks, the last one ragged); the reference is the same spec with a budget that holds the whole [b, H, n, n]
logits (one chunk, the path tests/what_if/test_remap.py checks against the papers' formulas). Patterns a probe reads
under the what-if and KV-cached greedy decoding are compared the same way.
"""

from __future__ import annotations

import pytest
import torch

from posprobe.access import Tap
from posprobe.what_if import STRING, LMInfinite, SelfExtend, StreamingLLM, remap
from tests.what_if.conftest import tiny_llama, wrap

N = 64
ROWS = 7

SPECS = [STRING(shift=20, window=6), SelfExtend(group=4, window=8), StreamingLLM(n_sink=2, window=9),
         LMInfinite(n_global=3, n_local=20, cap=12)]


@pytest.fixture(scope="module")
def access():
    return wrap(tiny_llama(seed=3))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 250, (2, N), generator=torch.Generator().manual_seed(7))


def _budget(monkeypatch, rows, batch=2, heads=4, n_keys=N):
    monkeypatch.setattr(remap, "SCORE_CHUNK_BYTES", rows * remap.BYTES_PER_PAIR * batch * heads * n_keys)


def _record_chunks(monkeypatch):
    """The number of queries of every edited-layer call the adapter makes (one per chunk)."""
    seen = []
    original = remap.PairwiseAttention.logits

    def logits(self, access, scores, ctx):
        seen.append(len(ctx.query_index))
        return original(self, access, scores, ctx)

    monkeypatch.setattr(remap.PairwiseAttention, "logits", logits)
    return seen


@pytest.mark.parametrize("spec", SPECS, ids=[str(s) for s in SPECS])
def test_chunked_equals_unchunked(access, tokens, spec, monkeypatch):
    _budget(monkeypatch, 10**6)  # one chunk: the whole matrix
    with spec.applied(access):
        whole = access.run(tokens, logits="all").logits
    _budget(monkeypatch, ROWS)
    seen = _record_chunks(monkeypatch)
    with spec.applied(access):
        chunked = access.run(tokens, logits="all").logits
    n_layers = len(spec.target_layers(access))
    assert max(seen) == ROWS and len(seen) == n_layers * -(-N // ROWS), seen  # it really ran in chunks
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spec", [SelfExtend(group=4, window=8), StreamingLLM(n_sink=2, window=9)], ids=str)
def test_patterns_a_probe_reads_are_the_same(access, tokens, spec, monkeypatch):
    def patterns():
        out = {}

        def on_layer(cap):
            out[cap.layer] = torch.cat([p for _, p in cap.pattern_chunks(chunk_size=16)], dim=2).clone()

        with spec.applied(access):
            access.run(tokens, taps=[Tap.PATTERN], on_layer=on_layer)
        return out

    _budget(monkeypatch, 10**6)
    whole = patterns()
    _budget(monkeypatch, ROWS)
    chunked = patterns()
    for layer in whole:
        torch.testing.assert_close(chunked[layer], whole[layer], atol=1e-6, rtol=0)
        torch.testing.assert_close(chunked[layer].sum(-1), torch.ones_like(chunked[layer].sum(-1)), atol=1e-5,
                                   rtol=0)


def test_kv_cached_greedy_is_the_same(access, tokens, monkeypatch):
    spec = SelfExtend(group=4, window=8)
    _budget(monkeypatch, 10**6)
    with spec.applied(access):
        whole = access.greedy(tokens[:1, :40], 4)
    _budget(monkeypatch, 3, batch=1, n_keys=40)
    with spec.applied(access):
        chunked = access.greedy(tokens[:1, :40], 4)
    assert torch.equal(whole, chunked)
