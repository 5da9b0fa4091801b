"""Attention Buckets (Chen et al. 2023) against a naive reference written here from the paper's formula.

The reference runs each pass as the same weights loaded in transformers with that rope_theta (no posprobe), and
combines the passes' logits z_j as the authors' code does: weights softmax over passes of each pass's largest logit,
output sum_j w_j z_j (or, for combine="probs", log sum_j w_j softmax(z_j)). The default bases are written out here
from the authors' inference config for Llama 2 (10000, 17500, 18000, 19000, 20000, 25000 at theta 10000). Checked
by hand once, it fails here: the confidence max_v z_j written mean_v z_j in posprobe/what_if/buckets.py fails the
two reference tests, the greedy test and the STRING stack test (the sharpened model makes the passes differ).
"""

from __future__ import annotations

import pytest
import torch

import posprobe
from posprobe.access import ModelAccess, Tap
from posprobe.errors import InterventionError
from posprobe.interventions.spec import parse
from posprobe.probes import Budget
from posprobe.tasks import get_task
from posprobe.what_if import STRING, AttentionBuckets, Extrapolate, RopeTheta, Stack, YaRN
from tests.what_if.conftest import reference_logits, tiny_gemma3, tiny_llama, wrap

BASES = (500.0, 10000.0, 100000.0)  # far apart: the passes' logits and confidences differ clearly
PAPER_BASES_LLAMA2 = (10000, 17500, 18000, 19000, 20000, 25000)  # their tool-use config, Llama 2 theta 10000


@pytest.fixture(scope="module")
def sharp():
    """The tiny Llama with its unembedding x 40 and q / k projections x 8: confident predictions from sharp,
    position-dependent attention, so the passes' max logits differ (a wrong confidence, mean instead of max, moves
    the output far above the tolerance) and their greedy decodings differ from each other and from the combined one
    (with the random model's flat logits and near-uniform attention every base decodes the same tokens)."""
    model = tiny_llama(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
        for block in model.model.layers:
            block.self_attn.q_proj.weight.mul_(8.0)
            block.self_attn.k_proj.weight.mul_(8.0)
    return wrap(model)


def naive_combined(passes: list[torch.Tensor], combine: str = "logits") -> torch.Tensor:
    """sum_j w_j z_j with w = softmax_j(max_v z_j), or log sum_j w_j softmax(z_j): written out, in float64."""
    zs = [z.double() for z in passes]
    confidence = torch.stack([z.max(dim=-1).values for z in zs])  # [P, b, n]
    e = torch.exp(confidence - confidence.max(dim=0).values)
    w = e / e.sum(dim=0)
    if combine == "logits":
        return sum(w[j][..., None] * zs[j] for j in range(len(zs))).float()
    mixed = sum(w[j][..., None] * torch.exp(zs[j] - torch.logsumexp(zs[j], dim=-1, keepdim=True))
                for j in range(len(zs)))
    return torch.log(mixed).float()


def llama_pass(weights, ids, theta):
    return reference_logits(tiny_llama, {"rope_type": "default", "rope_theta": theta}, weights, ids)


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_llama_equals_the_naive_reference(sharp, ids, combine):
    spec = AttentionBuckets(bases=BASES, combine=combine)
    with spec.applied(sharp):
        got = sharp.run(ids, logits="all").logits  # 80 tokens: past the native 32 (no limit while applied)
    weights = sharp.model.state_dict()
    want = naive_combined([llama_pass(weights, ids, b) for b in BASES], combine)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the combination is not one of the passes (the test can tell them apart)
    assert not torch.allclose(got, llama_pass(weights, ids, BASES[0]), atol=1e-3)


def test_weights_are_the_naive_confidences_and_rebuild_the_combination(sharp, ids):
    """`weights` = softmax_j(max_v z_j) of the transformers passes, in the order of `passes()`; with them the
    passes' logits give back what the applied spec returns (the weights are the ones it combined with)."""
    spec = AttentionBuckets(bases=BASES)
    got = spec.weights(sharp, ids, logits="all")  # [P, b, n]
    weights = sharp.model.state_dict()
    passes = [llama_pass(weights, ids, b) for b in BASES]
    confidence = torch.stack([z.double().max(dim=-1).values for z in passes])
    want = torch.exp(confidence - torch.logsumexp(confidence, dim=0))
    assert got.shape == (len(BASES), *ids.shape)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # the passes differ in confidence on this model, so the test can tell a wrong order or a uniform weight apart
    assert float((want - 1 / len(BASES)).abs().max()) > 0.1
    with spec.applied(sharp):
        combined = sharp.run(ids, logits="all").logits
    rebuilt = sum(got[j][..., None] * passes[j] for j in range(len(BASES)))
    torch.testing.assert_close(combined, rebuilt.float(), atol=1e-5, rtol=0)
    last = spec.weights(sharp, ids)  # default: the last position, the first token a greedy decode picks
    torch.testing.assert_close(last, got[:, :, -1:])


def test_weights_refuse_what_they_cannot_answer(sharp, ids):
    spec = AttentionBuckets(bases=BASES)
    with pytest.raises(InterventionError, match="logits='none'"):
        spec.weights(sharp, ids, logits="none")
    with spec.applied(sharp), pytest.raises(InterventionError, match="outside"):
        spec.weights(sharp, ids)
    with YaRN(factor=2).applied(sharp), pytest.raises(InterventionError, match="rescaling"):
        spec.weights(sharp, ids)


def test_default_bases_are_the_papers_ratios_on_gemma3_full_layers(gemma3, ids):
    """Gemma 3: the buckets go to the full_attention layers (theta 1e6), sliding layers keep 10k."""
    spec = AttentionBuckets()
    ratios = [b / 10000 for b in PAPER_BASES_LLAMA2]
    assert spec.resolved(gemma3)["bases"] == [[1e6 * r] for r in ratios]
    assert spec.target_layers(gemma3) == [1, 3]
    short = ids[:, :40]
    with spec.applied(gemma3):
        got = gemma3.run(short, logits=[10, 39]).logits
    weights = gemma3.model.state_dict()
    passes = [reference_logits(tiny_gemma3, {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                             "full_attention": {"rope_type": "default", "rope_theta": 1e6 * r}},
                               weights, short)[:, [10, 39]] for r in ratios]
    torch.testing.assert_close(got, naive_combined(passes), atol=1e-5, rtol=0)


def test_greedy_decodes_from_the_combined_distribution(sharp, ids):
    prompt = ids[:1, :40]
    with AttentionBuckets(bases=BASES).applied(sharp):
        got = sharp.greedy(prompt, 4)
    weights = sharp.model.state_dict()
    ref = prompt
    for _ in range(4):
        combined = naive_combined([llama_pass(weights, ref, b)[:, -1:] for b in BASES])
        ref = torch.cat([ref, combined[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, ref[:, 40:])
    for base in BASES:  # the combined decoding is none of the single passes' (the test can tell them apart)
        with RopeTheta(theta=base).applied(sharp):
            assert not torch.equal(got, sharp.greedy(prompt, 4)), base


def test_exit_restores_the_access_exactly(llama, ids):
    short = ids[:, :32]
    before = llama.run(short, logits="all").logits
    info = llama.info
    with pytest.raises(RuntimeError, match="inside"), AttentionBuckets(bases=BASES).applied(llama):
        assert llama.info.max_positions is None
        llama.run(short, logits="last")
        raise RuntimeError("inside the block")
    assert llama.info is info
    assert "_forward" not in vars(llama) and "greedy" not in vars(llama)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in llama.model.modules())
    assert torch.equal(before, llama.run(short, logits="all").logits)


def test_activation_reads_are_refused_with_the_fix(llama, ids):
    with AttentionBuckets(bases=BASES).applied(llama):
        with pytest.raises(InterventionError, match="rope_theta:theta="):
            llama.run(ids[:, :16], taps=[Tap.Q])


def test_scan_refuses_buckets_when_it_resolves_the_spec_before_any_pass(llama, monkeypatch):
    """scan(intervention=buckets) used to raise only inside the first shared pass; now the spec refuses the scan
    runner when scan resolves it: no model is loaded, no forward pass runs (also as text, in a Stack, bound)."""
    import posprobe.models

    passes = []
    hook = llama.model.get_input_embeddings().register_forward_pre_hook(lambda module, args: passes.append(1))
    budget = Budget("t", (24,), 1, 8, level="quick")
    spec = AttentionBuckets(bases=BASES)
    try:
        for intervention in (spec, str(spec), Stack((STRING(), spec)), spec.bind(llama)):
            with pytest.raises(InterventionError, match=r"refused before the model is loaded.*rope_theta:theta=B"):
                posprobe.scan(llama, probes=["head_basics"], budget=budget, intervention=intervention,
                              progress=False)
        loads = []
        monkeypatch.setattr(posprobe.models, "load_model", lambda *a, **k: loads.append(a) or llama)
        with pytest.raises(InterventionError, match="Scan one pass instead"):
            posprobe.scan("tiny-llama", probes=["head_basics"], budget=budget, intervention="buckets",
                          progress=False)
        assert loads == []
        assert passes == []
        posprobe.scan(llama, probes=["head_basics"], budget=budget, intervention=RopeTheta(theta=BASES[0]),
                      progress=False)  # the fix the message gives runs
        assert passes  # the hook counts this access's passes: the zero above is no dead hook
    finally:
        hook.remove()


def test_one_bucket_is_rope_theta(llama, ids):
    with RopeTheta(theta=17500.0).applied(llama):
        got = llama.run(ids, logits="all").logits
    torch.testing.assert_close(got, llama_pass(llama.model.state_dict(), ids, 17500.0), atol=1e-5, rtol=0)


def test_stacks_with_score_level_what_ifs_not_with_rescaling(sharp, ids):
    string = STRING(shift=20, window=4)
    with Stack((AttentionBuckets(bases=BASES), string)).applied(sharp):
        got = sharp.run(ids[:, :48], logits="all").logits
    passes = []
    for b in BASES:
        with Stack((RopeTheta(theta=b), string)).applied(sharp):
            passes.append(sharp.run(ids[:, :48], logits="all").logits)
    torch.testing.assert_close(got, naive_combined(passes), atol=1e-5, rtol=0)
    with Stack((AttentionBuckets(bases=BASES), string)).applied(sharp):  # KV-cached lockstep == recompute
        assert torch.equal(sharp.greedy(ids[:, :40], 4), ModelAccess.greedy(sharp, ids[:, :40], 4))
    for parts in ((YaRN(factor=2.0), AttentionBuckets(bases=BASES)), (AttentionBuckets(bases=BASES), YaRN(factor=2.0))):
        with pytest.raises(InterventionError, match="rescaling"), Stack(parts).applied(sharp):
            sharp.run(ids[:, :16], logits="last")


def test_text_form_and_bad_settings(llama):
    spec = parse("buckets:bases=500/10000/100000")
    assert spec == AttentionBuckets(bases=BASES) == parse(str(spec))
    assert parse("buckets:bases=500,10000,100000,combine=probs").combine == "probs"
    described = spec.describe(llama)
    assert described["resolved"]["bases"] == [[b] for b in BASES] and described["resolved"]["layers"] == "0:2"
    with pytest.raises(InterventionError, match="numbers"):
        AttentionBuckets(bases="a/b")
    with pytest.raises(InterventionError, match="positive"):
        AttentionBuckets(bases=(10000, -1))
    with pytest.raises(InterventionError, match="combine"):
        AttentionBuckets(combine="mean")


def test_evaluate_positions_decodes_the_combined_distribution(sharp):
    """evaluate_positions under buckets: each trial's completion is the combined greedy decoding of its prompt
    (rebuilt from the trial's seed), and the spec is recorded."""
    spec = AttentionBuckets(bases=BASES)
    table = posprobe.evaluate_positions(sharp, "kv_words", n_items=2, gold_positions=2, n_trials=1, intervention=spec,
                                        seed=0, progress=False)
    assert table.attrs["intervention"]["name"] == "buckets"
    assert table.attrs["intervention"]["resolved"]["bases"] == [[b] for b in BASES]
    assert int(table["n"].sum()) == 2
    task = get_task("kv_words")
    for row in table.attrs["trials"]:
        prompt = task.make(sharp, 2, row["gold_position"], row["seed"])
        with spec.applied(sharp):
            new = sharp.greedy(torch.tensor([prompt.input_ids]), task.max_new_tokens)[0]
        assert sharp.decode(new).startswith(row["completion"]) and row["completion"], row
        with Extrapolate().applied(sharp):  # the plain model answers otherwise (the test can tell them apart)
            plain = sharp.greedy(torch.tensor([prompt.input_ids]), task.max_new_tokens)[0]
        assert not sharp.decode(plain).startswith(row["completion"]), row
