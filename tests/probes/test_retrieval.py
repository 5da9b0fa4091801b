"""Retrieval probe: a planted copy head scores exactly 1 and every other head 0, in both modes; wrong answers are
counted and reported; the scan integration; on Gemma 3 270M teacher-forced and generate modes agree."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from posprobe.probes.base import Budget
from posprobe.probes.retrieval import (
    PROBE,
    RetrievalConfig,
    build_trials,
    context_lengths,
    mode_agreement,
    score_trials,
)
from posprobe.tasks.needle import make_needle_trials
from posprobe.testing import PlantedAccess, planted_info

TARGET = (1, 2)  # the planted copy head
DECOY = (0, 3)  # attends into the needle statement, but never to the token being produced


def _oracle(trials, correct: bool = True):
    """PatternFn + logits of a model whose head TARGET copies the needle answer token by token.

    At every answer step (query = last prompt token + t) TARGET attends to the t-th answer token inside the needle;
    other rows and heads: previous-token (head 0), sink (head 1, head 2 outside TARGET), and a decoy (head 3) that
    attends to the second token of the needle statement (inside the needle, never an answer token). The logits
    predict the token TARGET attends to, so the model answers by copying (or predict token 0 if not `correct`).
    """
    prompts = [(list(t.input_ids), t) for t in trials]

    def find(ids):
        for prompt, trial in prompts:
            if ids[:len(prompt)] == prompt:
                return trial
        raise AssertionError("input does not start with a known trial prompt")

    def copy_targets(ids):
        trial = find(ids)
        n = len(ids)
        target = torch.zeros(n, dtype=torch.long)  # BOS / sink by default
        first = trial.query_index
        for t in range(len(trial.answer_ids)):
            if first + t < n:
                target[first + t] = trial.answer_span[0] + t
        return trial, target

    def patterns(layer, input_ids):
        ids = input_ids[0].tolist()
        n = len(ids)
        trial, target = copy_targets(ids)
        p = torch.zeros(1, 4, n, n)
        rows = torch.arange(n)
        p[0, 0, rows, (rows - 1).clamp(min=0)] = 1.0
        p[0, 1, :, 0] = 1.0
        if layer == TARGET[0]:
            p[0, TARGET[1], rows, target] = 1.0
        else:
            p[0, 2, :, 0] = 1.0
        decoy = torch.zeros(n, dtype=torch.long)
        first = trial.query_index
        decoy[first:] = trial.needle_span[0] + 1
        p[0, 3, rows, decoy] = 1.0
        return p

    def logits(input_ids):
        ids = input_ids[0].tolist()
        _, target = copy_targets(ids)
        out = torch.zeros(1, len(ids), 260)
        if correct:
            out[0, torch.arange(len(ids)), input_ids[0, target]] = 1.0
        else:
            out[0, :, 3] = 1.0  # an id the answer never contains
        return out

    return patterns, logits


def _planted(lengths=(480, 640), depths=(0.0, 0.5, 1.0), correct=True):
    info = planted_info(n_layers=2, n_heads=4, vocab_size=260)
    access = PlantedAccess(info)
    trials = make_needle_trials(access, lengths, depths, seed=3)
    access.patterns, access.logits_fn = _oracle(trials, correct)
    return access, trials


def _score(result, layer, head, column="retrieval_score"):
    heads = result.heads
    return float(heads.loc[(heads["layer"] == layer) & (heads["head"] == head), column].iloc[0])


@pytest.mark.parametrize("mode", ["teacher_forced", "generate"])
def test_planted_copy_head_scores_one_and_every_other_head_zero(mode):
    access, trials = _planted()
    result = score_trials(access, trials, RetrievalConfig(mode=mode))
    scores = result.heads.set_index(["layer", "head"])["retrieval_score"]
    assert scores[TARGET] == 1.0
    assert (scores.drop(TARGET) == 0.0).all()
    activation = result.heads.set_index(["layer", "head"])["retrieval_activation"]
    assert activation[TARGET] == 1.0 and (activation.drop(TARGET) == 0.0).all()
    table = result.tables["trials"]
    assert len(table) == len(trials) and table["correct"].all() and table["scored"].all()
    assert result.summary["n_retrieval_heads"] == 1
    copies = result.tables["copies"]
    assert len(copies) == len(trials) * 8
    target_rows = copies[(copies["layer"] == TARGET[0]) & (copies["head"] == TARGET[1])]
    assert (target_rows["copies"] == [len(t.answer_ids) for t in trials]).all()
    by_depth = result.curves[(result.curves["curve"] == "retrieval_by_depth") & (result.curves["layer"] == 1)
                             & (result.curves["head"] == 2)]
    assert sorted(by_depth["x"]) == [0.0, 0.5, 1.0] and (by_depth["y"] == 1.0).all()
    assert all(out.strip().startswith(t.answer) for out, t in zip(table["output"], trials))


def test_whole_needle_span_divides_by_needle_length():
    access, trials = _planted(lengths=(480,), depths=(0.5,))
    result = score_trials(access, trials, RetrievalConfig(span="needle"))
    trial = trials[0]
    expected = len(trial.answer_ids) / (trial.needle_span[1] - trial.needle_span[0])
    assert _score(result, *TARGET) == pytest.approx(expected)
    assert _score(result, *DECOY) == 0.0  # inside the needle, but the token never matches w


def test_all_wrong_answers_are_reported_loudly_and_not_silently_dropped():
    access, trials = _planted(correct=False)
    with pytest.warns(RuntimeWarning, match="none of the 6 needle trials"):
        result = score_trials(access, trials, RetrievalConfig())
    assert result.heads["retrieval_score"].isna().all()
    assert result.summary["n_wrong"] == 6 and result.summary["n_scored"] == 0 and "warning" in result.summary
    assert len(result.tables["trials"]) == 6
    assert not result.tables["trials"]["correct"].any()
    # a recorded choice: include_wrong scores the copying anyway
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = score_trials(access, trials, RetrievalConfig(include_wrong=True))
    assert _score(kept, *TARGET) == 1.0 and kept.summary["n_scored"] == 6 and "note" in kept.summary


def test_probe_runs_in_a_scan_with_budget_trials_and_clipped_lengths():
    import posprobe

    access, _ = _planted()
    budget = Budget("tiny", context_lengths=(64, 520, 100_000), n_texts=1, max_queries=8, retrieval_trials=4,
                    bias_trials=1, implicit_sequences=2)
    lengths = context_lengths(access, budget.context_lengths, RetrievalConfig())
    room = RetrievalConfig().n_digits + 2  # the appended answer must fit too (a prompt at the full context did not)
    assert lengths[0] > 64 and lengths[-1] == access.info.max_positions - room and 520 in lengths
    config = RetrievalConfig(context_lengths=(480, 640))
    trials = build_trials(access, 4, context_lengths(access, config.context_lengths, config), config, seed=0)
    access.patterns, access.logits_fn = _oracle(trials)
    scan = posprobe.scan(access, probes=["retrieval"], budget=budget, configs={"retrieval": config}, progress=False)
    assert scan.heads.set_index(["layer", "head"]).loc[TARGET, "retrieval_score"] == 1.0
    assert scan.meta["summaries"]["retrieval"]["n_trials"] == 4
    assert {"retrieval.trials", "retrieval.copies"} <= set(scan.tables)
    assert PROBE.streaming is False


def test_mode_agreement_is_one_for_identical_copying():
    access, trials = _planted(lengths=(480,))
    a = score_trials(access, trials, RetrievalConfig(mode="teacher_forced"))
    b = score_trials(access, trials, RetrievalConfig(mode="generate"))
    agreement = mode_agreement(a, b)
    assert agreement["n_common_correct"] == 3 and agreement["spearman"] == pytest.approx(1.0)
    assert agreement["max_abs_diff"] == 0.0


def test_bad_config_is_a_probe_error():
    from posprobe.errors import ProbeError

    access, trials = _planted(lengths=(480,), depths=(0.5,))
    bad = RetrievalConfig()
    object.__setattr__(bad, "mode", "sample")  # bypass the dataclass (beartype checks the constructor in tests)
    with pytest.raises(ProbeError, match="mode"):
        score_trials(access, trials, bad)
    with pytest.raises(ProbeError, match="at least one needle trial"):
        score_trials(access, [], RetrievalConfig())


def test_tiny_real_model_runs_both_modes(tiny_rope):
    trials = make_needle_trials(tiny_rope, [520], [0.0, 1.0], seed=1)
    for mode in ("teacher_forced", "generate"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a random model answers nothing
            result = score_trials(tiny_rope, trials, RetrievalConfig(mode=mode, include_wrong=True))
        scores = result.heads["retrieval_score"].to_numpy()
        assert np.all((scores >= 0) & (scores <= 1))
        assert result.summary["n_trials"] == 2


@pytest.mark.real_model
def test_gemma_teacher_forced_and_generate_agree(gemma):
    trials = make_needle_trials(gemma, [320, 480], [0.2, 0.8], seed=0)
    tf = score_trials(gemma, trials, RetrievalConfig(mode="teacher_forced"))
    gen = score_trials(gemma, trials, RetrievalConfig(mode="generate"))
    agreement = mode_agreement(tf, gen)
    assert agreement["n_common_correct"] >= 3, tf.tables["trials"]
    assert agreement["spearman"] >= 0.9
    assert not math.isnan(tf.heads["retrieval_score"].max()) and tf.heads["retrieval_score"].max() > 0.1
