"""posprobe.render.pattern_view: the pattern heatmap (labels, hover, distances), the top-keys strip, examples by name
or index, the top-k layout's blanks, and scans without stored examples.

Scans: `tests.app.synthetic.pattern_scan`, planted heads with known patterns (H0 previous token, H1 sink, H2
duplicate token, H3 uniform) on the three stored examples.
"""

from __future__ import annotations

import numpy as np
import pytest

from posprobe.errors import InputError, UnknownNameError
from posprobe.render import FIGURES
from posprobe.render.pattern_view import (
    example_names,
    example_tokens,
    no_examples_reason,
    parse_label,
    pattern,
    pattern_matrix,
    pattern_top_keys,
    token_labels,
    top_keys,
    visible_token,
)
from tests.app.synthetic import pattern_scan, synthetic_scan


@pytest.fixture(scope="module")
def scan():
    return pattern_scan()


def test_heatmap_has_token_labels_on_both_axes_and_the_stored_weights(scan):
    fig = scan.figure("pattern", layer=1, head=0, example="text")
    trace = fig.data[0]
    tokens = example_tokens(scan, "text")
    assert trace.type == "heatmap" and list(trace.x) == list(trace.y) == token_labels(tokens)
    assert trace.x[0] == f"0:{visible_token(tokens[0])}" and all(parse_label(x) == i for i, x in enumerate(trace.x))
    assert any("␣" in label for label in trace.x), "a space token is shown visibly"
    z = np.asarray(trace.z, dtype=float)
    np.testing.assert_array_equal(z, pattern_matrix(scan, 1, 0, "text").astype(np.float32))
    n = len(tokens)
    assert np.allclose(z[np.arange(1, n), np.arange(n - 1)], 1.0)  # previous-token head
    assert np.isnan(z[np.triu_indices(n, 1)]).all()  # nothing above the diagonal
    assert fig.layout.xaxis.title.text == "key" and fig.layout.yaxis.title.text == "query"
    assert fig.layout.yaxis.autorange == "reversed"
    assert "text: L1 H0" in fig.layout.title.text and "full rows" in fig.layout.title.text


def test_hover_gives_query_token_key_token_weight_distance(scan):
    trace = pattern(scan, 0, 2, "repeated").data[0]
    template = trace.hovertemplate
    for part in ("query %{y}", "key %{x}", "weight %{z:.4f}", "distance %{customdata}"):
        assert part in template
    distance = np.asarray(trace.customdata)
    n = len(trace.x)
    assert distance.shape == (n, n) and distance[40, 17] == 23 and distance[5, 5] == 0
    # the duplicate-token head of the repeated block: query 40 attends to its twin 23 tokens back
    z = np.asarray(trace.z, dtype=float)
    assert z[40, 17] == 1.0 and trace.y[40].split(":", 1)[1] == trace.x[17].split(":", 1)[1]


def test_examples_by_name_or_index_differ(scan):
    assert example_names(scan) == ["text", "repeated", "needle"]
    by_index = pattern(scan, 0, 2, 1).data[0]
    by_name = pattern(scan, 0, 2, "repeated").data[0]
    assert list(by_index.x) == list(by_name.x)
    other = pattern(scan, 0, 2, "needle").data[0]
    assert len(other.x) != len(by_name.x)
    with pytest.raises(UnknownNameError, match="repeated"):
        pattern(scan, 0, 2, "poem")
    with pytest.raises(UnknownNameError, match="head"):
        pattern(scan, 0, 9, "text")


def test_top_keys_of_one_query(scan):
    table = top_keys(scan, 0, 3, "text", query=9, k=4)  # uniform head: 10 keys of 0.1, ties by position
    assert list(table.columns) == ["key", "token", "weight", "distance"]
    assert table["key"].tolist() == [0, 1, 2, 3] and np.allclose(table["weight"], 0.1, atol=1e-3)
    assert (table["distance"] == 9 - table["key"]).all()
    sink = top_keys(scan, 1, 1, "needle")  # default query: the last token
    assert sink["key"].tolist() == [0] and sink["distance"].tolist() == [364]
    fig = pattern_top_keys(scan, 0, 0, "text", query=12)
    bar = fig.data[0]
    tokens = example_tokens(scan, "text")
    assert bar.type == "bar" and list(bar.y) == [f"11:{visible_token(tokens[11])}"] and list(bar.x) == [1.0]
    assert "distance %{customdata}" in bar.hovertemplate and list(bar.customdata) == [1]
    assert "query 12:" in fig.layout.title.text and "1.000 of the row" in fig.layout.title.text
    with pytest.raises(InputError, match="not a position"):
        top_keys(scan, 0, 0, "text", query=999)


def test_selected_query_is_outlined(scan):
    fig = pattern(scan, 0, 0, "text", query=7)
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].y0 == 6.5 and fig.layout.shapes[0].y1 == 7.5
    assert not pattern(scan, 0, 0, "text").layout.shapes


def test_top_k_layout_leaves_blanks_and_says_so():
    scan = pattern_scan(top_k=2, probes=())
    fig = pattern(scan, 0, 3, "text")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert (np.isfinite(z).sum(1) == np.minimum(np.arange(1, z.shape[0] + 1), 2)).all()
    assert "top 2 keys per query" in fig.layout.title.text
    assert "0.200 of the row" in pattern_top_keys(scan, 0, 3, "text", query=9).layout.title.text


def test_registered_and_scans_without_examples_say_why():
    assert FIGURES["pattern"] is pattern and FIGURES["pattern_top_keys"] is pattern_top_keys
    old = synthetic_scan(2, 4)
    assert example_names(old) == []
    with pytest.raises(InputError, match="stores no example attention patterns"):
        old.figure("pattern", layer=0, head=0)
    old.meta["summaries"]["pattern_examples"] = {"examples": [], "dropped": {"needle": "does not fit"}}
    assert "could store none of its examples: needle: does not fit" in no_examples_reason(old)
