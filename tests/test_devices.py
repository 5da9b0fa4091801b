"""Devices, dtypes, batching and the memory estimate (issue 15), on the CPU.

A user's model is never moved or cast; models loaded by name follow device= / dtype=; statistics of a bf16 model
are float32+; batched shared passes and left-padded task batches give the results of batch size 1, and no query a
probe reads is ever a padding column; a pass that would not fit raises MemoryBudgetError before it runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import posprobe
from posprobe.access import LayerCapture, Tap
from posprobe.devices import (
    MemoryEstimate,
    default_dtype,
    estimate_pass_memory,
    input_device,
    placement,
    resolve_device,
    resolve_dtype,
)
from posprobe.errors import InputError, MemoryBudgetError
from posprobe.models import tiny_model
from posprobe.probes.base import Budget
from posprobe.tasks.base import pad_left

STREAMING = ["head_basics", "attention_entropy", "positional_heads", "rope_frequency", "induction"]
TINY_BUDGET = Budget("tiny", context_lengths=(48, 80), n_texts=3, max_queries=24)


def _table(result, name):
    """A retrieval table by its current name (`copies`) or its posprobe 0.1 name (`retrieval_copies`)."""
    return result.tables[name] if name in result.tables else result.tables[f"retrieval_{name}"]


def _metrics_close(a, b, atol=1e-6):
    assert a.metrics == b.metrics
    for metric in a.metrics:
        x, y = a.heads[metric].to_numpy(dtype=float), b.heads[metric].to_numpy(dtype=float)
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-6, equal_nan=True, err_msg=metric)


# --- defaults and parsing ----------------------------------------------------------------------------------------


def test_defaults_follow_the_device():
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda") == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device(None) == torch.device("cpu")
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(None, "cpu") == torch.float32
    with pytest.raises(InputError, match="dtype posprobe knows"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(InputError, match="not a torch device"):
        resolve_device("gpu-please")


def test_named_model_loads_in_the_requested_dtype_and_records_it():
    access = posprobe.load_model("tiny-rope", dtype="bfloat16", device="cpu")
    assert {p.dtype for p in access.model.parameters()} == {torch.bfloat16}
    result = posprobe.scan(access, probes=["head_basics", "attention_entropy"], budget=TINY_BUDGET, progress=False)
    hardware = result.meta["hardware"]
    assert hardware["dtype"] == "bfloat16" and hardware["devices"] == ["cpu"] and hardware["device_map"] is None
    assert hardware["batch_size"] == 1
    # statistics of a bf16 model are float32+ (probabilities sum to 1 far better than bf16's 3 digits would)
    for metric in result.metrics:
        assert np.isfinite(result.heads[metric].to_numpy(dtype=float)).all(), metric


def test_a_users_model_is_never_moved_or_cast():
    model, tokenizer = tiny_model("rope")
    before = {n: (p.device, p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    access = posprobe.load_model(model, tokenizer=tokenizer, dtype="float32", device="cpu")  # matching: fine
    assert {n: (p.device, p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == before
    with pytest.raises(InputError, match="never casts"):
        posprobe.load_model(model, tokenizer=tokenizer, dtype="bfloat16")
    with pytest.raises(InputError, match="never moves"):
        posprobe.load_model(model, tokenizer=tokenizer, device="cuda")
    with pytest.raises(InputError, match="never casts"):
        posprobe.scan(access, dtype="float16", budget=TINY_BUDGET, progress=False)
    assert {n: (p.device, p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == before
    assert placement(model)["dtype"] == "float32" and input_device(model) == torch.device("cpu")


# --- bf16 vs fp32 ------------------------------------------------------------------------------------------------


def test_bf16_statistics_agree_with_fp32_on_a_tiny_model():
    fp32 = posprobe.scan("tiny-rope", probes=["head_basics", "attention_entropy"], budget=TINY_BUDGET,
                         progress=False)
    bf16 = posprobe.scan("tiny-rope", probes=["head_basics", "attention_entropy"], budget=TINY_BUDGET,
                         dtype="bfloat16", progress=False)
    for metric in ("sink_mass", "previous_token_score", "entropy_mean"):
        x, y = fp32.heads[metric].to_numpy(), bf16.heads[metric].to_numpy()
        assert np.abs(x - y).max() < 0.02, metric  # bf16 weights and activations; float32 statistics


# --- batching ------------------------------------------------------------------------------------------------------


def test_batched_shared_passes_equal_batch_size_one(tiny_rope):
    one = posprobe.scan(tiny_rope, probes=STREAMING, budget=TINY_BUDGET, progress=False)
    three = posprobe.scan(tiny_rope, probes=STREAMING, budget=TINY_BUDGET, batch_size=3, progress=False)
    assert one.meta["hardware"]["shared_passes"] == 6 and three.meta["hardware"]["shared_passes"] == 2
    _metrics_close(one, three)
    c1 = one.curves.sort_values(["probe", "curve", "series", "layer", "head", "x"]).reset_index(drop=True)
    c3 = three.curves.sort_values(["probe", "curve", "series", "layer", "head", "x"]).reset_index(drop=True)
    assert c1.drop(columns="y").equals(c3.drop(columns="y"))
    np.testing.assert_allclose(c1["y"], c3["y"], atol=1e-6, rtol=1e-6)


def test_batch_size_is_checked_before_the_model_loads():
    with pytest.raises(InputError, match="batch_size"):
        posprobe.scan("no-such-model", batch_size=0)


def test_left_padding_reproduces_each_unpadded_sequence(tiny_rope):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(4, 250, size=n).tolist() for n in (40, 23, 31)]
    batch = pad_left(seqs, pad_id=0)
    assert batch.offsets == (0, 17, 9) and bool((batch.attention_mask[:, -1] == 1).all())
    seen: dict[int, torch.Tensor] = {}

    def keep(cap: LayerCapture) -> None:
        seen[cap.layer] = cap.pattern(torch.tensor([39])).clone()

    padded = tiny_rope.run(batch.input_ids, taps={Tap.PATTERN}, on_layer=keep, logits="last", **batch.run_kwargs())
    for r, seq in enumerate(seqs):
        alone: dict[int, torch.Tensor] = {}
        single = tiny_rope.run([seq], taps={Tap.PATTERN}, logits="last",
                               on_layer=lambda cap, alone=alone, seq=seq: alone.__setitem__(cap.layer, cap.pattern(
                                   torch.tensor([len(seq) - 1])).clone()))
        torch.testing.assert_close(padded.logits[r], single.logits[0], atol=1e-5, rtol=1e-5)
        off = batch.offsets[r]
        for layer, probs in seen.items():
            assert float(probs[r, :, 0, :off].abs().sum()) == 0.0  # padding keys get exactly 0
            torch.testing.assert_close(probs[r, :, 0, off:], alone[layer][0, :, 0], atol=1e-6, rtol=1e-5)


def test_batched_retrieval_equals_one_trial_at_a_time_and_never_reads_padding(tiny_rope, monkeypatch):
    from posprobe.probes.retrieval import RetrievalConfig, build_trials, score_trials

    config = RetrievalConfig(include_wrong=True)
    trials = build_trials(tiny_rope, 5, [380, 430, 470], config, seed=1)
    assert len({t.n_tokens for t in trials}) > 1  # different lengths: the batch is padded
    one = score_trials(tiny_rope, trials, config)
    read: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = LayerCapture.pattern
    masks: list[torch.Tensor] = []
    run = type(tiny_rope).run

    def spy_run(self, input_ids, **kwargs):
        masks.append(kwargs.get("attention_mask"))
        return run(self, input_ids, **kwargs)

    def spy_pattern(self, query_index=None):
        read.append((query_index.clone(), masks[-1]))
        return original(self, query_index)

    monkeypatch.setattr(type(tiny_rope), "run", spy_run)
    monkeypatch.setattr(LayerCapture, "pattern", spy_pattern)
    four = score_trials(tiny_rope, trials, config, batch_size=4)
    assert any(mask is not None for mask in masks)
    for queries, mask in read:
        if mask is not None:
            assert bool((mask[:, queries.cpu()] == 1).all()), "a query read on a padding column"
    assert _table(one, "copies").equals(_table(four, "copies"))
    cols = ["correct", "token_accuracy", "n_steps"]
    assert _table(one, "trials")[cols].equals(_table(four, "trials")[cols])


def test_batched_position_bias_equals_batch_size_one(tiny_rope):
    from posprobe.probes.position_bias import PositionBiasConfig

    configs = {"position_bias": PositionBiasConfig(context_length=64, n_contexts=4, doc_trials=2, doc_items=3,
                                                   n_bootstrap=10)}
    one = posprobe.scan(tiny_rope, probes=["position_bias"], budget=TINY_BUDGET, configs=configs, progress=False)
    three = posprobe.scan(tiny_rope, probes=["position_bias"], budget=TINY_BUDGET, configs=configs, batch_size=3,
                          progress=False)  # filler contexts in passes of 3 + 1
    _metrics_close(one, three)


def test_batched_implicit_position_equals_batch_size_one(tiny_rope):
    from posprobe.probes.implicit_position import ImplicitPositionConfig

    configs = {"implicit_position": ImplicitPositionConfig(context_length=64, n_sequences=7, positions_per_sequence=16,
                                                           regressors=("ridge",), shuffled_control=("ridge",))}
    one, three = (posprobe.scan(tiny_rope, probes=["implicit_position"], budget=TINY_BUDGET, configs=configs,
                                batch_size=b, progress=False) for b in (1, 3))  # passes of 3 + 3 + 1
    key = ["probe", "curve", "series", "layer", "head", "x"]
    c1, c3 = (s.curves.sort_values(key).reset_index(drop=True) for s in (one, three))
    assert len(c1) and c1.drop(columns="y").equals(c3.drop(columns="y"))
    np.testing.assert_allclose(c1["y"], c3["y"], atol=1e-6, rtol=1e-5)
    assert one.tables.keys() == three.tables.keys()
    for name in one.tables:
        a, b = one.tables[name], three.tables[name]
        numeric = a.select_dtypes("number").columns
        np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), atol=1e-6, rtol=1e-5,
                                   equal_nan=True, err_msg=name)


# --- memory --------------------------------------------------------------------------------------------------------


def test_memory_estimate_grows_with_length_and_batch(tiny_rope):
    info = tiny_rope.info
    small = estimate_pass_memory(info, 512, 1, torch.float32, reads_attention=True, n_logits=0)
    assert isinstance(small, MemoryEstimate)
    longer = estimate_pass_memory(info, 2048, 1, torch.float32, reads_attention=True, n_logits=0)
    wider = estimate_pass_memory(info, 512, 4, torch.float32, reads_attention=True, n_logits=0)
    assert longer.statistics > 3 * small.statistics and wider.needed > 3 * small.needed
    half = estimate_pass_memory(info, 512, 1, torch.bfloat16, reads_attention=False, n_logits=0)
    assert half.statistics == 0 and half.activations * 2 == small.activations


def test_a_pass_that_does_not_fit_raises_before_running(tiny_rope, monkeypatch):
    calls = []
    handle = tiny_rope.model.get_input_embeddings().register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        monkeypatch.setenv("POSPROBE_MEMORY_LIMIT", str(2**20))  # 1 MiB free
        with pytest.raises(MemoryBudgetError, match="batch_size=.*max_queries.*bfloat16.*device="):
            tiny_rope.run(torch.randint(4, 200, (4, 512)), taps={Tap.PATTERN}, on_layer=lambda cap: cap.pattern())
        with pytest.raises(MemoryBudgetError, match="4 x 48 tokens"):
            posprobe.scan(tiny_rope, probes=["head_basics"], budget=Budget("m", (48,), 4, 24), batch_size=4,
                          progress=False)
        assert not calls  # nothing ran
        monkeypatch.delenv("POSPROBE_MEMORY_LIMIT")
        tiny_rope.run(torch.randint(4, 200, (1, 16)))
        assert calls
    finally:
        handle.remove()


# --- the real model ------------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_gemma_bf16_head_metrics_rank_like_fp32(gemma_quick_scan):
    """Gemma 3 270M quick scan in bfloat16 vs float32 (CPU): Spearman over the 72 heads per metric."""
    bf16 = posprobe.load_model(dtype="bfloat16", device="cpu")
    scan = posprobe.scan(bf16, probes=["head_basics", "attention_entropy"], budget="quick", progress=False)
    assert scan.meta["hardware"]["dtype"] == "bfloat16"
    rho = {m: spearmanr(gemma_quick_scan.heads[m], scan.heads[m]).statistic for m in gemma_quick_scan.metrics}
    assert rho["previous_token_score"] >= 0.95 and rho["sink_mass"] >= 0.95, rho


@pytest.mark.real_model
def test_gemma_batched_retrieval_equals_unbatched(gemma):
    from posprobe.probes.retrieval import RetrievalConfig, build_trials, score_trials

    config = RetrievalConfig()
    trials = build_trials(gemma, 3, [400, 450, 520], config, seed=0)
    one = score_trials(gemma, trials, config)
    three = score_trials(gemma, trials, config, batch_size=3)
    a, b = _table(one, "copies"), _table(three, "copies")
    assert int(a["copies"].sum()) > 0  # Gemma copies: the comparison is not vacuous
    assert (a["copies"] == b["copies"]).mean() >= 0.99  # argmax ties may flip in the 6th digit
    assert _table(one, "trials")["correct"].tolist() == _table(three, "trials")["correct"].tolist()


# --- the command line ------------------------------------------------------------------------------------------------


def test_cli_hardware_options_reach_the_scan(tmp_path, capsys):
    from posprobe.cli import main

    out = tmp_path / "scan"
    assert main(["scan", "--model", "tiny-rope", "--budget", "quick", "--probes", "head_basics", "--dtype",
                 "bfloat16", "--batch-size", "2", "--device", "cpu", "--out", str(out)]) == 0
    hardware = posprobe.load(out).meta["hardware"]
    assert hardware["dtype"] == "bfloat16" and hardware["batch_size"] == 2 and hardware["remote"] is False
    assert main(["scan", "--model", "tiny-rope", "--dtype", "int4", "--out", str(tmp_path / "bad")]) == 2
    assert "dtype" in capsys.readouterr().err


def test_every_adapter_reports_where_its_weights_are():
    pytest.importorskip("transformer_lens")
    pytest.importorskip("nnsight")
    model, tokenizer = tiny_model("rope")
    for backend in ("hf", "transformer_lens", "nnsight"):
        access = posprobe.load_model(model, tokenizer=tokenizer, backend=backend)
        assert isinstance(access.torch_model(), torch.nn.Module), backend
        assert access.input_device == torch.device("cpu") and access.placement()["dtype"] == "float32", backend


def test_query_chunks_follow_the_memory_estimate(tiny_rope, monkeypatch):
    from posprobe import devices

    info = tiny_rope.info
    per_query = devices.statistics_bytes_per_query(info, 1000, 2)
    assert per_query == devices.STATISTICS_FACTOR * 2 * info.n_heads * 1000 * 4
    assert devices.query_chunk_size(info, 1000, 2, budget_bytes=37 * per_query + 5) == 37
    assert devices.query_chunk_size(info, 1000, 2, budget_bytes=10**12) == 256  # capped at the limit
    assert devices.query_chunk_size(info, 1000, 2, budget_bytes=1) == 1  # never 0 (check_memory refuses instead)
    monkeypatch.setenv("POSPROBE_MEMORY_LIMIT", str(4 * 20 * per_query))  # a quarter of the free memory: 20 queries
    assert devices.query_chunk_size(info, 1000, 2, device="cpu") == 20
    monkeypatch.delenv("POSPROBE_MEMORY_LIMIT")
    chunk = devices.query_chunk_size(info, 1000, 2)
    assert devices.estimate_pass_memory(info, 1000, 2, torch.float32, reads_attention=True, n_logits=0) == \
        devices.estimate_pass_memory(info, 1000, 2, torch.float32, reads_attention=True, n_logits=0, query_chunk=chunk)
    monkeypatch.setattr(devices, "STATISTICS_BYTES", 7 * devices.statistics_bytes_per_query(info, 60, 1))
    seen = {}

    def on_layer(cap):
        seen[cap.layer] = (cap.query_chunk(), [len(q) for q, _ in cap.pattern_chunks(queries=torch.arange(20))])

    tiny_rope.run(torch.randint(4, 200, (1, 60)), taps={Tap.PATTERN}, on_layer=on_layer)
    assert seen and all(v == (7, [7, 7, 6]) for v in seen.values())


def test_streaming_results_do_not_depend_on_the_query_chunk(tiny_rope, monkeypatch):
    from posprobe import devices

    reference = posprobe.scan(tiny_rope, probes=STREAMING, budget=TINY_BUDGET, progress=False)
    monkeypatch.setattr(devices, "STATISTICS_BYTES", 5 * devices.statistics_bytes_per_query(tiny_rope.info, 80, 1))
    calls = []
    original = LayerCapture.pattern_chunks

    def spy(self, chunk_size=None, queries=None):
        for index, probs in original(self, chunk_size, queries):
            calls.append((self.n_tokens, len(index)))
            yield index, probs

    monkeypatch.setattr(LayerCapture, "pattern_chunks", spy)
    chunked = posprobe.scan(tiny_rope, probes=STREAMING, budget=TINY_BUDGET, progress=False)
    at_80 = [size for n, size in calls if n == 80]
    assert at_80 and max(at_80) == 5 < 24  # the 80-token texts' 24 sampled queries really were read 5 at a time
    _metrics_close(reference, chunked)
    a, b = reference.curves, chunked.curves
    assert a[["probe", "curve", "series", "layer", "head", "x"]].equals(b[["probe", "curve", "series", "layer", "head",
                                                                           "x"]])
    np.testing.assert_allclose(a["y"].to_numpy(float), b["y"].to_numpy(float), rtol=1e-5, atol=1e-6, equal_nan=True)
