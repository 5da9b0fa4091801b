"""Found-in-the-Middle: the rescaling math against an independent numpy construction (document shares follow
softmax(rel / t), total document attention and non-document keys unchanged, rows sum to 1), the slot bias recovered
from a planted positional pattern, exit restores logits bit-for-bit, KV-cached generation equals recomputation,
evaluate_positions integration, user spans (token and character), and every missing-structure error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posprobe.access import EditContext, ModelAccess
from posprobe.errors import InterventionError, UnknownNameError
from posprobe.interventions.found_in_the_middle import (
    DocumentCalibration,
    FoundInTheMiddle,
    FoundInTheMiddleConfig,
    calibrated_layers,
    estimate_slot_bias,
    found_in_the_middle,
    membership,
)
from posprobe.interventions.spec import LayerRange, calibrations
from posprobe.tasks import evaluate_positions, get_task
from posprobe.tasks.base import Prompt
from posprobe.testing import PlantedAccess, planted_info

SPANS = ((2, 4), (5, 8), (9, 11))  # three documents of 2, 3 and 2 tokens in a 12-token prompt


def _prompt(spans=SPANS, n=12) -> Prompt:
    return Prompt(input_ids=tuple(range(10, 10 + n)), answer="", answer_ids=(), spans=spans, gold_index=0, text="",
                  task="user")


def _expected(row: np.ndarray, bias: np.ndarray, t: float, relative: bool = True) -> np.ndarray:
    """Independent construction of one calibrated attention row (numpy, straight from METRICS.md section 7)."""
    counts = np.array([b - a for a, b in SPANS], dtype=float)
    mass = np.array([row[a:b].sum() for a, b in SPANS])
    attn = mass / counts
    rel = attn - bias
    scale = t * attn.mean() if relative else t
    alpha = np.exp(rel / scale - (rel / scale).max())
    alpha /= alpha.sum()
    new_mass = mass.sum() * alpha * counts / (alpha * counts).sum()
    out = row.copy()
    for k, (a, b) in enumerate(SPANS):
        out[a:b] = row[a:b] * new_mass[k] / mass[k]
    return out


@pytest.mark.parametrize("t", [0.05, 0.5, 5.0])
@pytest.mark.parametrize("relative", [True, False])
def test_rescaling_matches_the_definition(t, relative):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 12, 12, dtype=torch.float64), -1)
    probs = probs * torch.tril(torch.ones(12, 12, dtype=torch.float64))
    probs = probs / probs.sum(-1, keepdim=True)
    member, _ = membership([_prompt()])
    bias = torch.rand(3, 3, dtype=torch.float64) * 0.1
    fn = DocumentCalibration(0, member, bias, q_start=11, temperature=t if relative else t * 0.05, relative=relative)
    out = fn(probs, EditContext(layer=0, query_index=torch.arange(12), n_keys=12, position_ids=None))
    assert torch.equal(out[:, :, :11], probs[:, :, :11])  # queries before the answer query untouched
    for b in range(2):
        for h in range(3):
            expected = _expected(probs[b, h, 11].numpy(), bias[h].numpy(), t if relative else t * 0.05, relative)
            assert np.allclose(out[b, h, 11].numpy(), expected, atol=1e-12)
    assert torch.allclose(out.sum(-1), torch.ones(2, 3, 12, dtype=torch.float64))
    outside = [0, 1, 4, 8, 11]
    assert torch.equal(out[:, :, 11, outside], probs[:, :, 11, outside])


def test_temperature_limits():
    probs = torch.full((1, 1, 1, 12), 1 / 12, dtype=torch.float64)
    probs[..., 5:8] = 2 / 12  # document 1 gets the most attention...
    probs /= probs.sum()
    member, _ = membership([_prompt()])
    bias = torch.tensor([[0.0, 0.25, 0.0]], dtype=torch.float64)  # ...but all of it (and more) is positional
    ctx = EditContext(layer=0, query_index=torch.tensor([11]), n_keys=12, position_ids=None)
    doc_total = float(probs[..., [2, 3, 5, 6, 7, 9, 10]].sum())
    sharp = DocumentCalibration(0, member, bias, 11, temperature=1e-4)(probs, ctx)
    # rel = attn - bias is largest for documents 0 and 2 (tie): they split the document mass, document 1 gets ~0
    assert float(sharp[..., 5:8].sum()) < 1e-12
    assert np.isclose(float(sharp[..., 2:4].sum()), doc_total / 2) and np.isclose(float(sharp[..., 9:11].sum()),
                                                                                  doc_total / 2)
    flat = DocumentCalibration(0, member, bias, 11, temperature=1e6)(probs, ctx)
    for (a, b) in SPANS:  # alpha uniform: each document's share is its token count / all document tokens
        assert np.isclose(float(flat[..., a:b].sum()), doc_total * (b - a) / 7)


def test_layer_granularity_rescales_heads_alike():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(1, 4, 1, 12, dtype=torch.float64), -1)
    member, _ = membership([_prompt()])
    fn = DocumentCalibration(0, member, torch.zeros(4, 3, dtype=torch.float64), 11, 0.3, granularity="layer")
    out = fn(probs, EditContext(layer=0, query_index=torch.tensor([11]), n_keys=12, position_ids=None))
    ratio = out / probs
    for a, b in SPANS:
        assert torch.allclose(ratio[0, :, 0, a:b], ratio[0, 0, 0, a])  # one factor per document for every head


def test_generated_keys_are_not_documents_and_short_passes_raise():
    member, _ = membership([_prompt()])
    fn = DocumentCalibration(0, member, torch.zeros(2, 3, dtype=torch.float64), 11, 0.3)
    probs = torch.softmax(torch.randn(1, 2, 1, 15, dtype=torch.float64), -1)  # 3 generated tokens
    out = fn(probs, EditContext(layer=0, query_index=torch.tensor([14]), n_keys=15, position_ids=None))
    assert torch.equal(out[..., 11:], probs[..., 11:])
    assert torch.allclose(out.sum(-1), torch.ones(1, 2, 1, dtype=torch.float64))
    with pytest.raises(InterventionError, match="reach token 11"):
        fn(torch.softmax(torch.randn(1, 2, 1, 9), -1), EditContext(0, torch.tensor([11]), 9, None))


def test_slot_bias_recovers_a_planted_positional_pattern():
    """The last query attends to key j with weight w(j) = 1 + (j mod 7): the dummy's mean attention at slot k is
    known in closed form for every substituted prompt."""
    info = planted_info(n_layers=2, n_heads=2)

    def patterns(layer, ids):
        n = ids.shape[1]
        w = (1.0 + torch.arange(n) % 7).double() * (1 + layer)
        rows = torch.tril(w.expand(n, n)) / torch.tril(w.expand(n, n)).sum(-1, keepdim=True)
        return rows[None, None].expand(ids.shape[0], info.n_heads, n, n).float()

    access = PlantedAccess(info, patterns)
    prompts = [_prompt(), Prompt(input_ids=tuple(range(30, 44)), answer="", answer_ids=(),
                                 spans=((1, 3), (4, 9), (10, 12)), gold_index=1, text="", task="user")]
    dummy = "XYZ"
    bias = estimate_slot_bias(access, prompts, dummy, batch_rows=2)
    expected = np.zeros(3)
    for p in prompts:
        for k, (a, b) in enumerate(p.spans):
            n = p.n_tokens - (b - a) + len(dummy)
            w = 1.0 + np.arange(n) % 7
            expected[k] += (w[a : a + len(dummy)] / w.sum()).mean() / len(prompts)
    assert bias.shape == (2, 2, 3)
    assert np.allclose(bias[0, 0], expected, atol=1e-6) and np.allclose(bias[1, 1], expected, atol=1e-6)


def _kv_prompts(access, n_items=4, seed=0):
    task = get_task("kv_words")
    return [task.make(access, n_items, g, seed) for g in range(n_items)]


def test_exit_restores_logits_bit_for_bit_and_edits_only_answer_rows(tiny_rope):
    prompts = _kv_prompts(tiny_rope)
    ids = torch.tensor([p.input_ids for p in prompts])
    before = tiny_rope.run(ids, logits="all").logits
    fitm = found_in_the_middle(tiny_rope, task="kv_words", calibration_trials=2, layers="0:2")
    with fitm.prompt_context(tiny_rope, prompts):
        edited = tiny_rope.run(ids, logits="all").logits
    after = tiny_rope.run(ids, logits="all").logits
    assert torch.equal(before, after)
    assert (edited[:, -1] - before[:, -1]).abs().max() > 1e-5  # the answer query is calibrated
    assert torch.allclose(edited[:, :-1], before[:, :-1], atol=1e-5)  # earlier queries only see eager-vs-SDPA noise


def test_generation_is_calibrated_at_every_step(tiny_rope):
    """KV-cached greedy equals full recomputation, and teacher-forced logits of the generated tokens equal the
    step-by-step ones: the edit sees every decoding step the same way."""
    prompts = _kv_prompts(tiny_rope)
    ids = torch.tensor([p.input_ids for p in prompts])
    fitm = found_in_the_middle(tiny_rope, task="kv_words", calibration_trials=2, temperature=0.05, layers="0:2")
    with fitm.prompt_context(tiny_rope, prompts):
        cached = tiny_rope.greedy(ids, 4)
        recomputed = ModelAccess.greedy(tiny_rope, ids, 4)
        full = torch.cat([ids, cached], 1)
        forced = tiny_rope.run(full, logits=list(range(ids.shape[1] - 1, full.shape[1] - 1))).logits
        stepwise = torch.stack([tiny_rope.run(full[:, : ids.shape[1] + s], logits="last").logits[:, -1]
                                for s in range(4)], 1)
    assert torch.equal(cached, recomputed)
    assert torch.allclose(forced, stepwise, atol=1e-5)
    plain = tiny_rope.run(full, logits=list(range(ids.shape[1] - 1, full.shape[1] - 1))).logits
    assert (plain - forced)[:, 1:].abs().max() > 1e-5  # generated tokens' queries are calibrated too


def test_evaluate_positions_hands_each_batch_its_spans(tiny_rope, monkeypatch):
    fitm = FoundInTheMiddle(calibration_trials=1, layers="1:2", dummy_text="spy: 0000")
    seen = []
    original = FoundInTheMiddle.prompt_edits

    def spy(self, access, prompts, sink=None):
        seen.append([p.spans for p in prompts])
        return original(self, access, prompts, sink)

    monkeypatch.setattr(FoundInTheMiddle, "prompt_edits", spy)
    table = evaluate_positions(tiny_rope, "kv_words", n_items=4, gold_positions=[0, 3], n_trials=2,
                               intervention=fitm, progress=False)
    assert int(table["n_errors"].sum()) == 0 and int(table["n"].sum()) == 4
    assert len(seen) == 2 and all(len(batch) == 2 for batch in seen)
    record = table.attrs["intervention"]
    assert record["name"] == "found_in_the_middle" and record["resolved"] == {"layers": "1:2"}
    mine = [c for c in record["calibrations"] if c["dummy_text"] == "spy: 0000"]
    assert len(mine) == 1 and mine[0]["n_slots"] == 4  # once, from the prompts' own task
    assert "kv_words" in mine[0]["calibration"] and len(mine[0]["bias_by_slot"]) == 4


def test_user_token_and_character_spans(tiny_rope):
    text = "Intro. [first doc here] and [second doc] then [third one]. Q:"
    char_spans = [(text.index("["), text.index("]") + 1), (text.index("[second"), text.index("doc]") + 4),
                  (text.index("[third"), text.index("one]") + 4)]
    fitm = found_in_the_middle(tiny_rope, text=text, char_spans=char_spans, layers="0:2")
    prompt = fitm.prompts[0]
    ids = list(prompt.input_ids)
    for (a, b), (s, e) in zip(char_spans, prompt.spans):
        assert tiny_rope.decode(ids[s:e]) == text[a:b]
    before = tiny_rope.run(ids, logits="last").logits
    with fitm as model:
        assert model is tiny_rope
        inside = model.run(ids, logits="last").logits
        generated = model.greedy(ids, 3)
    assert (inside - before).abs().max() > 0
    assert torch.equal(tiny_rope.run(ids, logits="last").logits, before)
    assert generated.shape == (1, 3)
    with found_in_the_middle(tiny_rope, spans=prompt.spans, input_ids=ids, layers="0:2"):
        again = tiny_rope.run(ids, logits="last").logits
    assert torch.allclose(again, inside)  # token spans and character spans describe the same documents


def test_missing_structure_raises_clear_errors(tiny_rope):
    with pytest.raises(InterventionError, match="by its document spans"):
        with found_in_the_middle(tiny_rope):
            pass
    with pytest.raises(InterventionError, match="never loads a model of its own"):
        found_in_the_middle("tiny-rope", task="kv_words")
    ids = tiny_rope.encode("one two three four five six")
    with pytest.raises(InterventionError, match="outside"):
        found_in_the_middle(tiny_rope, spans=[(1, 3), (4, 400)], input_ids=ids)
    with pytest.raises(InterventionError, match="at least two documents"):
        found_in_the_middle(tiny_rope, spans=[(1, 3)], input_ids=ids)
    with pytest.raises(InterventionError, match="overlap"):
        found_in_the_middle(tiny_rope, spans=[(1, 5), (4, 8)], input_ids=ids)
    with pytest.raises(InterventionError, match="without document spans"):
        found_in_the_middle(tiny_rope, input_ids=ids)
    with pytest.raises(InterventionError, match="pass text"):
        found_in_the_middle(tiny_rope, char_spans=[(0, 3), (4, 6)])
    with pytest.raises(InterventionError, match="temperature"):
        found_in_the_middle(tiny_rope, temperature=0.0)
    with pytest.raises(UnknownNameError):
        found_in_the_middle(tiny_rope, temprature=1.0)
    with pytest.raises(InterventionError, match="does not fit"):
        calibrated_layers(tiny_rope.info, FoundInTheMiddleConfig(layers="1:5"))
    with pytest.raises(InterventionError, match="ambiguous"):
        found_in_the_middle(tiny_rope, layers=(0, 2))
    fitm = found_in_the_middle(tiny_rope, spans=[(1, 3), (4, 8)], input_ids=ids)
    with fitm:
        with pytest.raises(InterventionError, match="reach token 8"):
            tiny_rope.run(ids[:5], logits="last")
    # a prompt with no task to calibrate from and no fallback
    with pytest.raises(InterventionError, match="no task"):
        found_in_the_middle().calibration_set(tiny_rope, 3)


def test_default_layers_are_the_last_half(tiny_rope):
    assert calibrated_layers(tiny_rope.info, FoundInTheMiddleConfig()) == [1]
    assert calibrated_layers(tiny_rope.info, FoundInTheMiddleConfig(layers="0:2")) == [0, 1]
    assert calibrated_layers(tiny_rope.info, FoundInTheMiddle(layers=LayerRange(1))) == [1]


@pytest.mark.real_model
def test_gemma_calibration_restores_and_moves_attention(gemma):
    prompts = _kv_prompts(gemma, n_items=6, seed=3)[2:3]
    fitm = FoundInTheMiddle(task="kv_words", calibration_trials=1)
    ids = prompts[0].ids()
    before = gemma.run(ids, logits="last").logits
    rows = fitm.answer_attention(gemma, prompts)  # [1, L, H, n] as used by the calibrated model
    after = gemma.run(ids, logits="last").logits
    assert torch.equal(before, after)
    assert np.allclose(rows.sum(-1), 1.0, atol=1e-4)
    with fitm.prompt_context(gemma, prompts):
        edited = gemma.run(ids, logits="last").logits
    assert (edited - before).abs().max() > 1e-3


def test_calibration_is_cached_on_the_access_and_shared_only_when_it_still_applies(tiny_rope, tiny_nope):
    prompts = _kv_prompts(tiny_rope)
    base = FoundInTheMiddle(task="kv_words", calibration_trials=1, calibration_seed=31)
    bias = base.slot_bias(tiny_rope, 4)
    hotter = base.replace(temperature=3.0, layers="0:2")
    assert hotter.config.temperature == 3.0 and hotter.layers_of(tiny_rope.info) == [0, 1]
    assert hotter.slot_bias(tiny_rope, 4) is bias  # no new calibration passes
    assert base.slot_bias(tiny_nope, 4) is not bias  # another access calibrates on its own model
    other = base.replace(dummy_text="zzz: 9999")
    assert not np.allclose(other.slot_bias(tiny_rope, 4), bias)
    seeded = [c for c in calibrations(tiny_rope, "found_in_the_middle") if c["calibration_seed"] == 31]
    assert len(seeded) == 2  # base (shared with hotter) and other
    with pytest.raises(UnknownNameError):
        base.replace(temp=1.0)
    with hotter.prompt_context(tiny_rope, prompts):
        pass


def test_accepted_by_name(tiny_rope):
    import posprobe

    assert {"found_in_the_middle", "positional_dimension"} <= set(posprobe.interventions.list_interventions())
    fitm = posprobe.interventions.get_intervention("found_in_the_middle", tiny_rope, temperature=1.0)
    assert isinstance(fitm.spec, posprobe.interventions.FoundInTheMiddle) and fitm.config.temperature == 1.0
    spec = posprobe.interventions.parse("found_in_the_middle:temperature=1,layers=1:,task=kv_words")
    assert spec == FoundInTheMiddle(temperature=1.0, layers=LayerRange(1), task="kv_words") == fitm.spec.replace(
        layers="1:", task="kv_words")
    assert FoundInTheMiddle.from_dict(spec.to_dict()) == spec and spec.to_dict()["layers"] == "1:"
    with pytest.raises(UnknownNameError, match="found_in_the_middle"):
        posprobe.interventions.get_intervention("found_in_middle", tiny_rope)
