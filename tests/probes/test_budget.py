"""Budgets and the probe registry: each probe owns its budget knobs (resolved from the named budget, overridable,
recorded), posprobe 0.1 budgets still load, `register()` refuses malformed probes, tables are `<probe>.<table>`.

The planted probe below is a whole new probe written as the docs page "How to add a probe" says (a Config with a
budget knob, a reducer, one `StreamingProbe` line, registered) without touching posprobe/probes/base.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import pytest
import torch

import posprobe
from posprobe.access import Tap
from posprobe.errors import ProbeError, UnknownNameError
from posprobe.probes import get_probe, list_probes, register
from posprobe.probes.base import (
    BUDGET_LEVELS,
    BUDGETS,
    Budget,
    ProbeResult,
    StreamingProbe,
    TaskProbe,
    budget_knobs,
    head_frame,
    per_level,
    probe_problems,
    resolve_budget,
)
from posprobe.probes.implicit_position import ImplicitPositionConfig
from posprobe.probes.position_bias import PositionBiasConfig
from posprobe.probes.retrieval import RetrievalConfig
from posprobe.scan import LEGACY_TABLE_NAMES, Scan, table_name
from posprobe.testing import PlantedAccess, planted_info


# --- a planted probe with one budget knob ---------------------------------------------------------------------
@dataclass(frozen=True)
class CountingConfig:
    BUDGET_KNOBS: ClassVar[dict[str, dict[str, Any]]] = {"n_seen": per_level(1, 2, 3)}
    n_seen: int | None = None  # a sample count: None = the budget's
    offset: float = 0.0


class _CountingReducer:
    taps = frozenset({Tap.PATTERN})

    def __init__(self, ctx, config):
        self.ctx, self.config, self.texts = ctx, config, 0

    def begin(self, sample):
        self.texts += 1

    def on_layer(self, capture):
        pass

    def finish(self):
        info = self.ctx.info
        value = [[self.config.n_seen + self.config.offset] * info.n_heads for _ in range(info.n_layers)]
        return ProbeResult(heads=head_frame(info, {"counted": value}),
                           tables={"seen": pd.DataFrame({"texts": [self.texts]})})


COUNTING = StreamingProbe("counting_test_probe", CountingConfig, "test double: reports its budget knob",
                          _CountingReducer)
PLANTED = planted_info(n_layers=2, n_heads=2)


def _access():
    return PlantedAccess(PLANTED, patterns=lambda layer, ids: None)


@pytest.fixture(scope="module", autouse=True)
def registered():
    register(COUNTING, replace=True)


SMALL = dict(context_lengths=(16,), n_texts=1, max_queries=4)


@pytest.mark.parametrize("level, expected", [("quick", 1), ("standard", 2), ("full", 3)])
def test_a_knob_left_at_none_takes_the_budget_levels_value(level, expected):
    scan = posprobe.scan(_access(), probes=["counting_test_probe"], budget=Budget(level, **SMALL), progress=False)
    assert set(scan.heads["counted"]) == {expected}
    assert scan.meta["probes"]["counting_test_probe"]["n_seen"] == expected  # the resolved value is recorded
    assert scan.meta["budget"]["level"] == level


def test_overrides_and_explicit_configs():
    budget = Budget("mine", **SMALL, level="quick", probes={"counting_test_probe": {"n_seen": 7}})
    scan = posprobe.scan(_access(), probes=["counting_test_probe"], budget=budget, progress=False)
    assert set(scan.heads["counted"]) == {7}  # the budget's override beats the level
    scan = posprobe.scan(_access(), probes=["counting_test_probe"], budget=budget, progress=False,
                         configs={"counting_test_probe": CountingConfig(n_seen=5)})
    assert set(scan.heads["counted"]) == {5}  # an explicit config value beats the budget
    assert Budget("mine", **SMALL).level == "standard"  # a custom name follows "standard" unless told otherwise


def test_bad_overrides_fail_before_the_model_is_loaded():
    not_a_model = object()  # loading it would raise UnsupportedModelError: these errors must come first
    with pytest.raises(ProbeError, match=r"overrides \['n_sen'\].*budget knobs \['n_seen'\]"):
        posprobe.scan(not_a_model, budget=Budget("b", **SMALL, probes={"counting_test_probe": {"n_sen": 1}}))
    with pytest.raises(UnknownNameError, match="counting_test_prob"):
        posprobe.scan(not_a_model, budget=Budget("b", **SMALL, probes={"counting_test_prob": {"n_seen": 1}}))
    with pytest.raises(UnknownNameError, match="budget level"):
        Budget("b", **SMALL, level="huge")


def _counting_run(ctx, config):
    info = ctx.info
    return ProbeResult(heads=head_frame(info, {"task_counted": [[float(config.n_seen)] * info.n_heads
                                                                 for _ in range(info.n_layers)]}))


def test_a_task_probe_gets_its_knobs_resolved_too():
    register(TaskProbe("counting_task_test_probe", CountingConfig, "test double: a task probe", _counting_run),
             replace=True)
    scan = posprobe.scan(_access(), probes=["counting_task_test_probe"], budget=Budget("full", **SMALL),
                         progress=False)
    assert set(scan.heads["task_counted"]) == {3.0} and scan.meta["probes"]["counting_task_test_probe"]["n_seen"] == 3
    assert get_probe("counting_task_test_probe").streaming is False


def test_tables_are_probe_dot_table():
    scan = posprobe.scan(_access(), probes=["counting_test_probe"], budget=Budget("quick", **SMALL), progress=False)
    assert list(scan.tables) == ["counting_test_probe.seen"]
    assert table_name("retrieval", "trials") == "retrieval.trials"
    assert table_name("rope_frequency", "rope_frequency.chunks") == "rope_frequency.chunks"  # already qualified
    assert table_name("retrieval", "retrieval_trials") == "retrieval.retrieval_trials"  # no prefix guessing


# --- the built-in probes' knobs and posprobe 0.1 budgets ---------------------------------------------------------
def test_builtin_budgets_match_posprobe_0_1():
    """The knobs moved into the probes keep the sample counts the three named budgets had."""
    old = {"quick": (6, 4, 16, ("ridge",)), "standard": (20, 12, 48, ("ridge", "mlp")),
           "full": (60, 40, 128, ("ridge", "mlp"))}
    for level, (retrieval, bias, sequences, regressors) in old.items():
        budget = BUDGETS[level]
        assert resolve_budget("retrieval", RetrievalConfig(), budget).n_trials == retrieval
        bias_config = resolve_budget("position_bias", PositionBiasConfig(), budget)
        assert (bias_config.n_contexts, bias_config.doc_trials) == (bias, bias)
        implicit = resolve_budget("implicit_position", ImplicitPositionConfig(), budget)
        assert (implicit.n_sequences, implicit.regressors) == (sequences, regressors)
    assert BUDGETS["standard"].context_lengths == (512, 1024, 2048)


def test_posprobe_0_1_keywords_and_saved_budgets_still_work():
    legacy = Budget("old", context_lengths=(64,), n_texts=1, max_queries=8, retrieval_trials=4, bias_trials=2,
                    implicit_sequences=12, implicit_mlp=False)
    assert legacy.probes == {"retrieval": {"n_trials": 4}, "position_bias": {"n_contexts": 2, "doc_trials": 2},
                             "implicit_position": {"n_sequences": 12, "regressors": ("ridge",)}}
    assert dataclasses.replace(legacy, bias_trials=3).probes["position_bias"] == {"n_contexts": 3, "doc_trials": 3}
    saved_by_0_1 = {"name": "quick", "context_lengths": [256, 512], "n_texts": 2, "max_queries": 128,
                    "retrieval_trials": 6, "bias_trials": 4, "implicit_sequences": 16, "implicit_mlp": False}
    old_quick = Budget.from_dict(saved_by_0_1)
    assert old_quick.level == "quick" and old_quick.context_lengths == (256, 512)
    assert resolve_budget("retrieval", RetrievalConfig(), old_quick).n_trials == 6
    assert resolve_budget("implicit_position", ImplicitPositionConfig(), old_quick).regressors == ("ridge",)
    for budget in (legacy, old_quick, *BUDGETS.values()):
        assert Budget.from_dict(json.loads(json.dumps(budget.to_dict()))).to_dict() == budget.to_dict()
    with pytest.raises(ProbeError, match="unknown fields"):
        Budget.from_dict({**saved_by_0_1, "surprise": 1})


def test_every_builtin_probe_is_valid_and_its_knobs_cover_every_level():
    for name in list_probes():
        probe = get_probe(name)
        assert probe_problems(probe) == [], name
        for knob, values in budget_knobs(probe.Config).items():
            assert set(values) == set(BUDGET_LEVELS), (name, knob)


# --- register() validation ---------------------------------------------------------------------------------------
@dataclass
class Unfrozen:
    x: int = 0


@dataclass(frozen=True)
class Required:
    x: int


@dataclass(frozen=True)
class BadKnobs:
    BUDGET_KNOBS: ClassVar[dict[str, dict[str, Any]]] = {"n": per_level(1, 2, 3), "m": {"quick": 1},
                                                         "missing": per_level(1, 2, 3)}
    n: int = 5
    m: int | None = None


@pytest.mark.parametrize("changes, message", [
    ({"name": "Bad Name"}, "lower-case identifier"),
    ({"description": ""}, "non-empty string"),
    ({"Config": Unfrozen}, "must be frozen"),
    ({"Config": Required}, r"\['x'\] have none"),
    ({"Config": dict}, "must be a dataclass"),
])
def test_register_refuses_malformed_probes(changes, message):
    with pytest.raises(ProbeError, match=message):
        register(dataclasses.replace(COUNTING, **changes), replace=True)


def test_register_lists_every_budget_knob_problem():
    with pytest.raises(ProbeError) as info:
        register(dataclasses.replace(COUNTING, name="bad_knobs_probe", Config=BadKnobs))
    text = str(info.value)
    assert "'n' must default to None" in text and "'m' has no value for levels ['standard', 'full']" in text
    assert "'missing' is not a field" in text and "How to add a probe" in text
    assert "bad_knobs_probe" not in list_probes()


def test_register_refuses_a_task_probe_without_run_and_duplicates():
    class NoRun:
        name, description, streaming, Config = "no_run_probe", "x", False, CountingConfig

        def skip_reason(self, info, config):
            return None

    with pytest.raises(ProbeError, match=r"needs a `run\(ctx, config\)` method"):
        register(NoRun())
    with pytest.raises(ProbeError, match="already registered"):
        register(dataclasses.replace(COUNTING, name="head_basics"))


# --- table names of old scans --------------------------------------------------------------------------------------
def test_old_table_names_load_under_the_new_ones(tmp_path):
    scan = posprobe.scan(_access(), probes=["counting_test_probe"], budget=Budget("quick", **SMALL), progress=False)
    trials = pd.DataFrame({"trial": [0, 1], "correct": [True, False]})
    old = Scan(scan.heads, scan.curves, scan.meta, {"retrieval_trials": trials})
    assert list(old.tables) == ["retrieval.trials"]
    folder = old.save(tmp_path / "scan")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["tables"] = {"retrieval_trials": "tables/retrieval.trials.parquet"}  # as 0.1 wrote it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loaded = posprobe.load(folder)
    assert list(loaded.tables) == ["retrieval.trials"] and loaded.tables["retrieval.trials"].equals(trials)
    with pytest.warns(DeprecationWarning, match=r"now scan.tables\['retrieval.trials'\]"):
        assert loaded.tables["retrieval_trials"].equals(trials)
    with pytest.raises(KeyError):
        loaded.tables["no_such_table"]
    assert set(LEGACY_TABLE_NAMES.values()) == {"retrieval.trials", "retrieval.copies", "position_bias.documents"}


def test_the_long_budget_reads_one_text_at_the_models_full_context():
    long = BUDGETS["long"]
    assert long.full_context and long.n_texts == 1 and long.level == "quick"
    assert long.shared_lengths(32768) == (32768,) and long.shared_lengths(600) == (600,)
    assert long.shared_lengths(None) == (max(long.context_lengths),)  # a model without a maximum: the longest
    assert BUDGETS["quick"].shared_lengths(300) == (256, 300)  # the others: their lengths, clipped
    assert Budget.from_dict(json.loads(json.dumps(long.to_dict()))) == long
    assert "full_context" not in BUDGETS["standard"].to_dict()  # older budget records are unchanged
    assert resolve_budget("position_bias", PositionBiasConfig(), long).context_length == 16384
    assert resolve_budget("retrieval", RetrievalConfig(), long).n_trials == 6
    for level in BUDGET_LEVELS:
        assert resolve_budget("position_bias", PositionBiasConfig(), BUDGETS[level]).context_length == 512


@pytest.mark.filterwarnings("ignore:retrieval. the model answered none")  # a random model answers no needle
def test_a_long_scan_runs_every_pass_at_the_models_maximum():
    from posprobe.models import tiny_model, wrap

    model, tokenizer = tiny_model("rope", max_positions=2048)  # the multidoc prompts need ~1.6k
    access = wrap(model, tokenizer=tokenizer, name="tiny-rope-2048")
    seen: list[int] = []
    original = access.run

    def spy(input_ids, **kwargs):
        seen.append(int(torch.as_tensor(input_ids).shape[-1]))
        return original(input_ids, **kwargs)

    access.run = spy
    scan = posprobe.scan(access, probes=["head_basics", "retrieval", "position_bias"], budget="long", progress=False)
    assert scan.meta["budget"]["name"] == "long" and scan.meta["budget"]["full_context"] is True
    assert seen[0] == 2048  # the shared text pass: one text at the full context
    # needles at 8k / 16k / 32k, clipped to the model with room for the answer (7 digits + 2)
    assert set(scan.tables["retrieval.trials"]["context_length"]) == {2048 - 9}
    assert scan.meta["probes"]["position_bias"]["context_length"] == 16384
    assert scan.meta["summaries"]["position_bias"]["context_length"] == 2048
    assert scan.heads["sink_mass"].notna().all()
