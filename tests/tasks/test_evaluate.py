"""evaluate_positions: the behavioural U-curve from a scripted model with a known answer, per-trial errors (only
prompts the model cannot run) versus errors that raise, interventions applied to the runner's own access."""

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
from posprobe.access import AttentionEdit
from posprobe.errors import InputError, InterventionError
from posprobe.interventions import Intervention, MaskHeads, PositionalDimension, mask_heads
from posprobe.tasks import evaluate_positions, get_task, wilson_interval
from posprobe.tasks.evaluate import trial_seed
from posprobe.testing import PlantedAccess, planted_info


class LostInTheMiddle(PlantedAccess):
    """Answers a kv_words prompt correctly iff the asked word sits in the first or last line ("0000" otherwise).

    `fail_at`: gold slots whose prompts make greedy raise (to check error accounting).
    """

    def __init__(self, fail_at: tuple[int, ...] = (), max_positions: int = 8192) -> None:
        super().__init__(planted_info(max_positions=max_positions))
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



def test_batches_span_trials_and_give_the_records_of_unbatched_runs(tiny_rope, monkeypatch):
    """batch_size=N packs prompts of equal token length from different trials into one greedy call (kv_words
    prompts differ in length between trials, never within one); the trial records equal batch_size=1 and the
    default (one call per trial) on a tiny random model."""
    calls: list[tuple[int, int]] = []
    greedy = tiny_rope.greedy
    monkeypatch.setattr(tiny_rope, "greedy",
                        lambda ids, *a, **k: calls.append(tuple(ids.shape)) or greedy(ids, *a, **k))
    records, shapes = {}, {}
    for batch_size in (1, None, 6):
        calls.clear()
        table = evaluate_positions(tiny_rope, "kv_words", 4, [0, 3], n_trials=6, batch_size=batch_size,
                                   progress=False)
        records[batch_size], shapes[batch_size] = pd.DataFrame(table.attrs["trials"]), list(calls)
    lengths = [get_task("kv_words").make(tiny_rope, 4, 0, trial_seed(0, t)).n_tokens for t in range(6)]
    assert sorted(shapes[1]) == sorted((1, n) for n in lengths for _ in range(2))  # grouped by length, one row
    assert shapes[None] == [(2, n) for n in lengths]  # one call per trial, in trial order
    assert len(shapes[6]) == len(set(lengths)) < 6 and max(rows for rows, _ in shapes[6]) > 2  # across trials
    assert sum(rows for rows, _ in shapes[6]) == 12 and {n for _, n in shapes[6]} == set(lengths)
    assert records[1]["completion"].nunique() > 1  # rows differ, so a row given another's answer would show
    pd.testing.assert_frame_equal(records[6], records[1])
    pd.testing.assert_frame_equal(records[None], records[1])


def test_a_batch_across_trials_keeps_answers_prompts_and_errors_per_row():
    """On the planted model each row's answer is its own prompt's number: packed batches return every row its own
    completion, a per-batch intervention gets the call's prompts, and rows too long to run are errors one by one."""
    class PerPrompt:
        def __init__(self) -> None:
            self.calls: list[list[int]] = []

        def prompt_context(self, access, prompts):
            self.calls.append([p.n_tokens for p in prompts])
            return contextlib.nullcontext()

    default = evaluate_positions(LostInTheMiddle(), "kv_words", 4, [0, 3], n_trials=6, progress=False)
    access, per = LostInTheMiddle(), PerPrompt()
    packed = evaluate_positions(access, "kv_words", 4, [0, 3], n_trials=6, batch_size=4, intervention=per,
                                progress=False)
    trials = pd.DataFrame(packed.attrs["trials"])
    pd.testing.assert_frame_equal(trials, pd.DataFrame(default.attrs["trials"]))
    assert trials["correct"].all() and trials["completion"].nunique() == 6  # each trial's own number, twice
    assert [len(c) for c in per.calls] == access.batch_sizes and max(access.batch_sizes) == 4
    assert all(len(set(c)) == 1 for c in per.calls)  # equal lengths within a call
    short = int(trials["n_tokens"].min()) + 1  # prompts of up to `short` tokens fit, the longer ones do not
    with pytest.warns(RuntimeWarning, match="raised"):
        alone = evaluate_positions(LostInTheMiddle(max_positions=short), "kv_words", 4, [0, 3], n_trials=6,
                                   batch_size=1, progress=False)
    with pytest.warns(RuntimeWarning, match="raised"):
        errors = evaluate_positions(LostInTheMiddle(max_positions=short), "kv_words", 4, [0, 3], n_trials=6,
                                    batch_size=4, progress=False)
    pd.testing.assert_frame_equal(pd.DataFrame(errors.attrs["trials"]), pd.DataFrame(alone.attrs["trials"]))
    assert 0 < errors.attrs["n_errors"] == (trials["n_tokens"] > short).sum() < 12

def test_same_seed_same_table_and_prompts():
    a = evaluate_positions(LostInTheMiddle(), "kv_words", [5, 8], 3, n_trials=4, seed=7, progress=False)
    b = evaluate_positions(LostInTheMiddle(), "kv_words", [5, 8], 3, n_trials=4, seed=7, progress=False)
    pd.testing.assert_frame_equal(a, b)
    ta, tb = pd.DataFrame(a.attrs["trials"]), pd.DataFrame(b.attrs["trials"])
    assert ta[["seed", "answer", "completion"]].equals(tb[["seed", "answer", "completion"]])
    c = evaluate_positions(LostInTheMiddle(), "kv_words", [5, 8], 3, n_trials=4, seed=8, progress=False)
    assert not pd.DataFrame(c.attrs["trials"])["answer"].equals(ta["answer"])
    assert sorted(a["n_items"].unique()) == [5, 8]


def test_too_long_prompts_are_counted_per_trial_never_dropped():
    probe = LostInTheMiddle()
    short = get_task("kv_words").make(probe, 3, 0, 0).n_tokens
    long = get_task("kv_words").make(probe, 6, 0, 0).n_tokens
    assert short < long
    access = LostInTheMiddle(max_positions=short + 1)  # 3-item prompts fit, 6-item prompts do not
    with pytest.warns(RuntimeWarning, match="raised"):
        table = evaluate_positions(access, "kv_words", [3, 6], [0, -1], n_trials=3, progress=False)
    by_size = table.set_index(["n_items", "gold_position"])
    assert (by_size.loc[6, "n_errors"] == 3).all() and (by_size.loc[6, "n"] == 0).all()
    assert (by_size.loc[3, "accuracy"] == 1.0).all() and (by_size.loc[3, "n_errors"] == 0).all()
    trials = pd.DataFrame(table.attrs["trials"])
    assert (trials["error"] != "").sum() == 6 and table.attrs["n_errors"] == 6
    assert trials.loc[trials["error"] != "", "error"].str.startswith("ContextLengthError").all()


def test_other_errors_raise_at_once_with_their_traceback(tiny_rope):
    """Issue 21 item 6: only failures of running the model on a prompt are per-trial; bugs and posprobe errors
    of a misconfigured intervention stop the run."""
    with pytest.raises(RuntimeError, match="planted failure"):
        evaluate_positions(LostInTheMiddle(fail_at=(2,)), "kv_words", 5, [0, 2, 4], n_trials=3, progress=False)

    def buggy(probs, ctx):
        return probs.no_such_method()  # an AttributeError inside an edit

    class TypeErrorInside(Intervention):
        name = "type_error_inside"

        def edits(self, access):
            raise TypeError("a bug inside the intervention")

    with pytest.raises(TypeError, match="a bug inside the intervention"):
        evaluate_positions(tiny_rope, "kv_words", 4, 2, n_trials=2, intervention=TypeErrorInside(), progress=False)
    with pytest.raises(AttributeError, match="no_such_method"):
        evaluate_positions(tiny_rope, "kv_words", 4, 2, n_trials=2, progress=False,
                           intervention=tiny_rope.editing([AttentionEdit(1, buggy)]))
    with pytest.raises(InterventionError, match="does not exist"):
        evaluate_positions(tiny_rope, "kv_words", 4, 2, n_trials=2, intervention="mask_heads:heads=L7H0",
                           progress=False)
    assert tiny_rope._edits == []


def test_a_spec_is_applied_to_the_access_being_run(tiny_rope):
    base = evaluate_positions(tiny_rope, "kv_words", 4, 2, n_trials=2, progress=False)
    dims = list(range(0, tiny_rope.info.d_model, 2))
    spec = PositionalDimension(dims=dims, factor=-20.0, layers="0:")  # strong enough to change greedy answers
    edited = evaluate_positions(tiny_rope, "kv_words", 4, 2, n_trials=2, intervention=spec, progress=False)
    by_text = evaluate_positions(tiny_rope, "kv_words", 4, 2, n_trials=2, progress=False, intervention=(
        "positional_dimension:dims=" + ",".join(map(str, dims)) + ",factor=-20,layers=0:"))
    bound = evaluate_positions(tiny_rope, "kv_words", 4, 2, n_trials=2, progress=False,
                               intervention=spec.bind(tiny_rope))
    completions = [[r["completion"] for r in t.attrs["trials"]] for t in (base, edited, by_text, bound)]
    assert completions[1] == completions[2] == completions[3] != completions[0]
    assert edited.attrs["intervention"]["name"] == "positional_dimension"
    assert edited.attrs["intervention"]["resolved"]["layers"] == "0:2"
    assert tiny_rope._edits == []


def test_a_name_with_an_intervention_on_another_model_raises_before_loading(tiny_rope, monkeypatch):
    """Issue 16: evaluate_positions by name with an intervention made on another copy used to report the unedited
    baseline as the intervention's effect. Now the bound intervention raises, before any model is loaded."""
    import posprobe.models

    loads = []
    monkeypatch.setattr(posprobe.models, "load_model", lambda *a, **k: loads.append(a) or tiny_rope)
    with pytest.raises(InterventionError, match="bound to another model access"):
        evaluate_positions("tiny-rope", "kv_words", 4, 2, n_trials=1, progress=False,
                           intervention=mask_heads(tiny_rope, [(0, 1)]))
    assert loads == []
    with pytest.raises(InterventionError, match="never loads a model of its own"):
        mask_heads("tiny-rope", [(0, 1)])
    other = posprobe.models.wrap(tiny_rope.model, tokenizer=tiny_rope.tokenizer)
    try:
        with pytest.raises(InterventionError, match="bound to another model access"):
            evaluate_positions(other, "kv_words", 4, 2, n_trials=1, progress=False,
                               intervention=mask_heads(tiny_rope, [(0, 1)]))
    finally:
        other.close()


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
    with pytest.raises(InputError, match="Intervention spec"):
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


def test_position_sweep_is_a_scan_of_every_condition_on_the_same_trials(tiny_rope, tmp_path):
    from posprobe.scan import empty_curves, head_ids, load, provenance
    from posprobe.tasks.evaluate import position_sweep

    dims = list(range(0, tiny_rope.info.d_model, 2))
    strong = PositionalDimension(dims=dims, factor=-20.0, layers="0:")
    scan = position_sweep(tiny_rope, "kv_words", 4, [0, 3], 2, [strong, "mask_heads:heads=L0H1"], seed=3)
    summary = scan.tables["evaluate.kv_words"]
    assert summary["intervention"].unique().tolist() == ["none", str(strong), "mask_heads:heads=L0H1"]
    alone = evaluate_positions(tiny_rope, "kv_words", 4, [0, 3], 2, strong, 3, progress=False)
    mine = summary[summary["intervention"] == str(strong)].drop(columns="intervention").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, alone.reset_index(drop=True), check_like=True)  # same trials as one run
    trials = scan.tables["evaluate.trials"]
    assert len(trials) == 3 * 2 * 2 and set(trials["seed"]) == {3 * 1_000_003, 3 * 1_000_003 + 1}
    conditions = scan.meta["evaluate"]["conditions"]
    assert [c["label"] for c in conditions] == summary["intervention"].unique().tolist()
    assert conditions[1]["intervention"]["resolved"]["layers"] == "0:2"
    assert scan.heads.equals(head_ids(tiny_rope.info)) and scan.curves.equals(empty_curves())
    assert set(provenance(tiny_rope)) <= set(scan.meta) and scan.meta["weights_hash"] == tiny_rope.weights_hash()
    scan.save(tmp_path / "sweep")
    assert load(tmp_path / "sweep").equals(scan)
    with pytest.raises(InputError, match="twice"):
        position_sweep(tiny_rope, "kv_words", 4, [0], 1, ["mask_heads:heads=L0H1", MaskHeads(heads=[(0, 1)])])


def test_cli_eval_writes_a_scan_and_refuses_bad_specs_before_loading(tmp_path, monkeypatch, capsys):
    import posprobe.models
    from posprobe.cli import main
    from posprobe.render.model_view import position_tables
    from posprobe.scan import load

    out = tmp_path / "eval"
    code = main(["eval", "--model", "tiny-rope", "--items", "4", "--positions", "0,3", "--trials", "2",
                 "--intervention", "mask_heads:heads=L0H1,L1H2", "--out", str(out)])
    assert code == 0
    scan = load(out)
    assert position_tables(scan) == ["evaluate.kv_words"]
    assert scan.tables["evaluate.kv_words"]["intervention"].unique().tolist() == ["none",
                                                                                   "mask_heads:heads=L0H1,L1H2"]
    assert "| mask_heads:heads=L0H1,L1H2" in capsys.readouterr().out
    loads = []
    monkeypatch.setattr(posprobe.models, "load_model", lambda *a, **k: loads.append(a))
    assert main(["eval", "--model", "tiny-rope", "--intervention", "mask_head:heads=L0H1", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "Did you mean 'mask_heads'" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-rope", "--positions", "0,x", "--out", str(tmp_path / "bad")]) == 2
    (tmp_path / "file").write_text("not a directory")
    assert main(["eval", "--model", "tiny-rope", "--out", str(tmp_path / "file")]) == 2
    assert loads == [] and not (tmp_path / "bad").exists()


def test_cli_lists_every_intervention_with_its_settings(capsys):
    from posprobe.cli import main
    from posprobe.interventions import list_interventions, parameters

    assert main(["interventions"]) == 0
    text = capsys.readouterr().out
    for name in list_interventions():
        assert f"\n{name} " in "\n" + text
        for p in parameters(name):
            assert p["name"] in text
    assert "heads" in text and "9:18" not in text  # defaults only, nothing model-specific
