"""evaluate_positions: the behavioural U-curve from a scripted model with a known answer, errors, interventions."""

from __future__ import annotations

import contextlib
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import binomtest

import posprobe
from posprobe.errors import InputError
from posprobe.tasks import evaluate_positions, wilson_interval
from posprobe.testing import PlantedAccess, planted_info


class LostInTheMiddle(PlantedAccess):
    """Answers a kv_words prompt correctly iff the asked word sits in the first or last line ("0000" otherwise).

    `fail_at`: gold slots whose prompts make greedy raise (to check error accounting).
    """

    def __init__(self, fail_at: tuple[int, ...] = ()) -> None:
        super().__init__(planted_info())
        self.fail_at = fail_at
        self.batch_sizes: list[int] = []

    def greedy(self, input_ids, max_new_tokens, *, stop_ids=(), edits=()):
        ids = self._check_ids(input_ids)
        self.batch_sizes.append(ids.shape[0])
        rows = []
        for row in ids.tolist():
            text = self.decode(row)
            lines = re.findall(r"^(\w+): (\d+)$", text, flags=re.M)
            key = re.search(r"The secret number for (\w+) is$", text).group(1)
            slot = [k for k, _ in lines].index(key)
            if slot in self.fail_at:
                raise RuntimeError(f"planted failure at slot {slot}")
            answer = dict(lines)[key] if slot in (0, len(lines) - 1) else "0000"
            rows.append(self.encode(f" {answer}\n\n\n", add_bos=False)[:max_new_tokens])
        return torch.tensor(rows)


def test_wilson_matches_scipy():
    for k, n in [(0, 10), (3, 10), (10, 10), (17, 40)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert np.allclose(wilson_interval(k, n), (ci.low, ci.high))
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_planted_u_curve_is_recovered_exactly():
    access = LostInTheMiddle()
    table = evaluate_positions(access, "kv_words", 9, [0, 2, 4, 6, 8], n_trials=6, seed=1, progress=False)
    assert list(table.columns[:4]) == ["task", "n_items", "gold_position", "relative_position"]
    assert table["accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert (table["n"] == 6).all() and (table["n_errors"] == 0).all()
    low, high = wilson_interval(6, 6)
    assert table.loc[0, "ci_low"] == pytest.approx(low) and table.loc[0, "ci_high"] == 1.0
    assert (table["ci_low"] <= table["accuracy"]).all() and (table["accuracy"] <= table["ci_high"]).all()
    assert access.batch_sizes == [5] * 6  # one equal-length batch per trial
    trials = pd.DataFrame(table.attrs["trials"])
    assert len(trials) == 30 and trials["correct"].sum() == 12
    assert table.attrs["tokens_per_second"] > 0 and table.attrs["n_errors"] == 0


def test_batching_does_not_change_answers():
    batched = evaluate_positions(LostInTheMiddle(), "kv_words", 5, 3, n_trials=3, progress=False)
    single_access = LostInTheMiddle()
    single = evaluate_positions(single_access, "kv_words", 5, 3, n_trials=3, batch_size=1, progress=False)
    assert set(single_access.batch_sizes) == {1}
    pd.testing.assert_frame_equal(batched, single)


def test_same_seed_same_table_and_prompts():
    a = evaluate_positions(LostInTheMiddle(), "kv_words", [5, 8], 3, n_trials=4, seed=7, progress=False)
    b = evaluate_positions(LostInTheMiddle(), "kv_words", [5, 8], 3, n_trials=4, seed=7, progress=False)
    pd.testing.assert_frame_equal(a, b)
    ta, tb = pd.DataFrame(a.attrs["trials"]), pd.DataFrame(b.attrs["trials"])
    assert ta[["seed", "answer", "completion"]].equals(tb[["seed", "answer", "completion"]])
    c = evaluate_positions(LostInTheMiddle(), "kv_words", [5, 8], 3, n_trials=4, seed=8, progress=False)
    assert not pd.DataFrame(c.attrs["trials"])["answer"].equals(ta["answer"])
    assert sorted(a["n_items"].unique()) == [5, 8]


def test_errors_are_counted_never_dropped():
    with pytest.warns(RuntimeWarning, match="raised"):
        table = evaluate_positions(LostInTheMiddle(fail_at=(2,)), "kv_words", 5, [0, 2, 4], n_trials=3,
                                   progress=False)
    row = table.set_index("gold_position").loc[2]
    assert row["n_errors"] == 3 and row["n"] == 0 and math.isnan(row["accuracy"])
    assert table.set_index("gold_position").loc[0, "accuracy"] == 1.0  # the batch fell back to single rows
    trials = pd.DataFrame(table.attrs["trials"])
    assert (trials["error"] != "").sum() == 3 and table.attrs["n_errors"] == 3
    assert trials.loc[trials["error"] != "", "error"].str.contains("planted failure").all()


def test_intervention_protocols():
    log: list[str] = []

    @contextlib.contextmanager
    def manager():
        log.append("enter")
        yield
        log.append("exit")

    evaluate_positions(LostInTheMiddle(), "kv_words", 4, 2, n_trials=2, intervention=manager(), progress=False)
    assert log == ["enter", "exit"]
    log.clear()
    seen = []
    evaluate_positions(LostInTheMiddle(), "kv_words", 4, 2, n_trials=2, progress=False,
                       intervention=lambda access: (seen.append(access.info.name), manager())[1])
    assert log == ["enter", "exit"] and seen == ["planted"]

    class PerPrompt:
        def __init__(self) -> None:
            self.calls: list[list[int]] = []

        def prompt_context(self, access, prompts):
            self.calls.append([p.gold_index for p in prompts])
            assert all(len(p.spans) == 4 for p in prompts)
            return contextlib.nullcontext()

    per = PerPrompt()
    evaluate_positions(LostInTheMiddle(), "kv_words", 4, 2, n_trials=3, intervention=per, progress=False)
    assert per.calls == [[0, 3]] * 3
    with pytest.raises(InputError, match="context manager"):
        evaluate_positions(LostInTheMiddle(), "kv_words", 4, 2, n_trials=1, intervention=42, progress=False)


def test_input_validation():
    with pytest.raises(InputError, match="outside"):
        evaluate_positions(LostInTheMiddle(), "kv_words", 4, [0, 4], n_trials=1, progress=False)
    with pytest.raises(InputError, match="n_trials"):
        evaluate_positions(LostInTheMiddle(), "kv_words", 4, 2, n_trials=0, progress=False)
    table = evaluate_positions(LostInTheMiddle(), "kv_words", 4, [-1, 0], n_trials=1, progress=False)
    assert table["gold_position"].tolist() == [0, 3]


def test_runs_on_a_tiny_model_by_name_and_is_exported(tiny_rope):
    assert posprobe.evaluate_positions is evaluate_positions
    table = evaluate_positions(tiny_rope, "multidoc", 4, 2, n_trials=2, progress=False)
    assert set(table.columns) >= {"gold_position", "accuracy", "ci_low", "ci_high", "n"}
    assert (table["n"] == 2).all()
    single = evaluate_positions(tiny_rope, "multidoc", 4, 2, n_trials=2, batch_size=1, progress=False)
    assert [r["completion"] for r in table.attrs["trials"]] == [r["completion"] for r in single.attrs["trials"]]


@pytest.mark.real_model
def test_gemma_answers_the_first_position(gemma):
    table = evaluate_positions(gemma, "kv_words", 10, [0, 9], n_trials=4, seed=0, progress=False)
    assert table.loc[table["gold_position"] == 0, "accuracy"].item() >= 0.75
    assert table.attrs["n_errors"] == 0
