"""attention_entropy: planted uniform / one-hot heads give entropy_norm 1 / 0; sink exclusion; curves present."""

from __future__ import annotations

import math

import pytest
import torch

import posprobe
from posprobe.probes.attention_entropy import entropy_rows
from posprobe.testing import PlantedAccess, per_head, planted_info, previous_token, sink, uniform
from tests.probes.test_head_basics import TINY


@pytest.fixture(scope="module")
def scan():
    access = PlantedAccess(planted_info(n_layers=1, n_heads=3), per_head(uniform, previous_token, sink))
    return posprobe.scan(access, probes=["attention_entropy"], budget=TINY, progress=False)


def test_entropy_rows_matches_definition():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(entropy_rows(p), torch.tensor([math.log(2), 0.0]))


def test_uniform_head_has_normalised_entropy_one(scan):
    row = scan.heads[scan.heads["head"] == 0].iloc[0]
    assert row.entropy_norm == pytest.approx(1.0, abs=1e-6)
    assert row.entropy_nosink == pytest.approx(row.entropy_nosink)  # finite
    assert row.entropy_mean > 2.0


def test_one_hot_heads_have_zero_entropy(scan):
    for head in (1, 2):
        row = scan.heads[scan.heads["head"] == head].iloc[0]
        assert row.entropy_mean == pytest.approx(0.0, abs=1e-12)
        assert row.entropy_norm == pytest.approx(0.0, abs=1e-12)


def test_sink_excluded_entropy_of_uniform_head_is_log_of_remaining_keys(scan):
    # a uniform head without the sink is uniform over i keys: mean of log(i) over the sampled queries
    queries = torch.linspace(1, 47, 47).round().long().unique()
    expected_48 = torch.log(queries.double()).mean()
    queries96 = torch.linspace(1, 95, 64).round().long().unique()
    expected_96 = torch.log(queries96.double()).mean()
    expected = ((expected_48 * len(queries) * 2 + expected_96 * len(queries96) * 2)
                / (2 * len(queries) + 2 * len(queries96)))
    row = scan.heads[scan.heads["head"] == 0].iloc[0]
    assert row.entropy_nosink == pytest.approx(float(expected), rel=1e-6)


def test_entropy_curves_by_position_and_length(scan):
    by_len = scan.curve("entropy_by_length", layer=0, head=0)
    assert sorted(by_len.x) == [48.0, 96.0]
    assert by_len.sort_values("x").y.is_monotonic_increasing  # uniform: longer contexts, higher entropy
    by_pos = scan.curve("entropy_by_position", layer=0, head=0)
    assert set(by_pos.series) == {"len=48", "len=96"}
