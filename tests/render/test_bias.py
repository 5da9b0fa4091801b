"""Bias figures: built from a planted position_bias scan and a planted evaluate_positions table."""

from __future__ import annotations

import pandas as pd
import pytest

import posprobe
from posprobe.errors import UnknownNameError
from posprobe.probes.position_bias import PositionBiasConfig
from posprobe.render import FIGURES
from posprobe.render.bias import accuracy_curve, lost_in_the_middle
from posprobe.tasks import summarize_trials
from posprobe.testing import PlantedAccess, per_head, planted_info, uniform


@pytest.fixture(scope="module")
def bias_scan():
    access = PlantedAccess(planted_info(n_layers=2, n_heads=2), patterns=per_head(uniform, uniform))
    config = PositionBiasConfig(context_length=48, n_contexts=1, doc_task="kv_words", doc_items=4, doc_trials=1)
    return posprobe.scan(access, probes=["position_bias"], budget="quick", configs={"position_bias": config},
                         progress=False)


@pytest.fixture(scope="module")
def table():
    trials = pd.DataFrame({"task": "kv_words", "n_items": 5, "gold_position": [0, 0, 2, 2, 4, 4],
                           "relative_position": [0, 0, 0.5, 0.5, 1, 1], "correct": [1, 1, 0, 1, 1, 1],
                           "error": ["", "", "", "", "", "boom"]})
    return summarize_trials(trials)


def test_scan_figures_registered_and_drawn(bias_scan):
    assert {"position_bias", "document_bias"} <= set(FIGURES)
    assert len(bias_scan.figure("position_bias").data) == 3  # two layer means + the model mean
    assert len(bias_scan.figure("document_bias").data) == 4  # ... + the slot bias over all documents
    assert len(bias_scan.figure("position_bias", layer=0).data) == 3  # two heads + the layer mean


def test_accuracy_curve_has_error_bars(table):
    assert table.set_index("gold_position").loc[4, "n_errors"] == 1
    fig = accuracy_curve(table)
    (trace,) = fig.data
    assert list(trace.y) == [1.0, 0.5, 1.0]
    assert all(v >= 0 for v in trace.error_y.array) and all(v >= 0 for v in trace.error_y.arrayminus)
    with pytest.raises(UnknownNameError):
        accuracy_curve(table, x="depth")


def test_side_by_side(table, bias_scan):
    fig = lost_in_the_middle(table, bias_scan)
    assert len(fig.data) == 3


def test_missing_curve_names_the_probe(table):
    scan = posprobe.scan(PlantedAccess(planted_info(), patterns=per_head(*(uniform,) * 4)), probes=["head_basics"],
                         budget="quick", progress=False)
    with pytest.raises(UnknownNameError, match="position_bias"):
        scan.figure("position_bias")
