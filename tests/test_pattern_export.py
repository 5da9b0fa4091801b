"""posprobe.pattern_export: heads chosen by default (planted heads with known answers), heads / examples / query
checked before anything is written, the page's figures, atomic writes.

Scan: `tests.app.synthetic.pattern_scan`, planted heads H0 previous token, H1 sink on key 0, H2 duplicate token,
H3 uniform in both layers, with the three stored examples (full rows).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from posprobe.errors import InputError, UnknownNameError
from posprobe.pattern_export import (
    DEFAULT_METRICS,
    default_heads,
    figures,
    parse_heads,
    patterns_html,
    query_row,
    select,
    write_patterns,
)
from tests.app.synthetic import pattern_scan, synthetic_scan


@pytest.fixture(scope="module")
def scan():
    return pattern_scan()


def test_parse_heads_reads_l_h_pairs_in_order_without_repeats():
    assert parse_heads("L3H1, l5h0,L3H1") == [(3, 1), (5, 0)]
    for bad in ("L3", "3:1", "L3H1,H2", "LxH1"):
        with pytest.raises(InputError, match="L<layer>H<head>"):
            parse_heads(bad)
    with pytest.raises(InputError, match="names no head"):
        parse_heads(" , ")


def test_default_heads_are_the_planted_top_heads(scan):
    chosen = dict(default_heads(scan))
    # previous_token_score: H0 of both layers score 1.0, the first in head order wins; sink_mass: H1
    assert list(chosen) == [(0, 0), (0, 1)]
    assert chosen[(0, 0)].startswith("top previous_token_score = 1") and "top sink_mass = 1" in chosen[(0, 1)]
    assert set(DEFAULT_METRICS) - set(scan.metrics), "the scan lacks some default metrics: they are skipped"
    assert default_heads(scan, ["distance_corr"])[0][1].startswith("top distance_corr")
    with pytest.raises(UnknownNameError, match="head metric 'nope'"):
        default_heads(scan, ["nope"])
    empty = pattern_scan(probes=())
    with pytest.raises(InputError, match="--heads L0H0"):
        default_heads(empty)


def test_select_checks_heads_examples_and_query(scan):
    chosen = select(scan, heads="L1H2,L0H3", examples=["repeated", "0"], query=-1)
    assert chosen.heads == ((1, 2), (0, 3)) and chosen.reasons == ("asked for", "asked for")
    assert chosen.examples == (1, 0)
    assert select(scan).examples == (0, 1, 2) and select(scan).heads == ((0, 0), (0, 1))
    with pytest.raises(InputError, match=r"L2H0 is not in this scan: .* 2 layers x 4 heads \(L0H0 to L1H3\)"):
        select(scan, heads="L0H0,L2H0")
    with pytest.raises(InputError, match=r"Example 3 is out of range: this scan stores 3 examples \(0 text, 1 "
                                         r"repeated, 2 needle\)"):
        select(scan, examples=["3"])
    with pytest.raises(UnknownNameError, match="stored example 'haystack'"):
        select(scan, examples=["haystack"])
    n_text = len(scan.tables["pattern_examples.tokens"].query("example == 0"))
    assert query_row(scan, 0, None) == n_text - 1 and query_row(scan, 0, -n_text) == 0
    with pytest.raises(InputError, match=f"--query {n_text} is not a position of example 0"):
        select(scan, examples=["text"], query=n_text)


def test_a_scan_without_examples_says_why_and_how_to_rescan():
    plain = synthetic_scan(2, 2)
    with pytest.raises(InputError) as info:
        select(plain, source="scans/plain")
    text = str(info.value)
    assert "scans/plain stores no example attention patterns" in text and "did not run" in text
    assert "made before" in text and "--examples on" in text
    plain.meta["skipped"] = {"pattern_examples": "the stored patterns would take ~900 MB"}
    assert "was skipped: the stored patterns would take ~900 MB" in str(pytest.raises(InputError, select, plain).value)


def test_figures_are_the_heatmap_and_top_keys_of_each_head_and_example(scan):
    chosen = select(scan, heads="L0H0,L1H1", examples=["text", "repeated"], query=5)
    pages = figures(scan, chosen)
    assert [(head, len(figs)) for head, _, figs in pages] == [((0, 0), 4), ((1, 1), 4)]
    heatmap, strip = pages[0][2][:2]
    z = np.asarray(heatmap.data[0].z, dtype=float)
    n = z.shape[0]
    assert np.allclose(z[np.arange(1, n), np.arange(n - 1)], 1.0), "L0H0 is the planted previous-token head"
    assert heatmap.layout.shapes[0].y0 == 4.5, "the query row is outlined"
    assert list(strip.data[0].customdata)[0] == 1, "query 5's top key is one token back"
    sink_strip = pages[1][2][3]
    assert "top keys of query 5" in sink_strip.layout.title.text and sink_strip.data[0].y[0].startswith("0:")
    assert [len(figs) for _, _, figs in figures(scan, select(scan, heads="L0H0", top_keys=False))] == [3]


def test_page_holds_every_figure_once_and_plotly_inline_or_from_the_cdn(scan):
    chosen = select(scan, heads="L0H0,L1H3", examples=["needle"])
    page = patterns_html(scan, chosen)
    assert page.count("Plotly.newPlot") == 4 and page.count("<h2>") == 2
    assert "needle: L0 H0" in page and "needle: L1 H3" in page and "asked for" in page
    cdn_script = re.compile(r'<script[^>]*src="https://cdn\.plot\.ly/')
    assert len(re.findall(r"/\*\*\s*\* plotly\.js v", page)) == 1 and not cdn_script.search(page)
    small = patterns_html(scan, chosen, plotlyjs="cdn")
    assert len(cdn_script.findall(small)) == 1 and "* plotly.js v" not in small and len(small) < len(page) / 2
    with pytest.raises(InputError, match="'inline' or 'cdn'"):
        patterns_html(scan, chosen, plotlyjs="local")


def test_write_is_atomic(scan, tmp_path, monkeypatch):
    import posprobe.pattern_export as export

    out = tmp_path / "sub" / "patterns.html"
    chosen = select(scan, heads="L0H1", examples=["text"], query=2)
    assert write_patterns(scan, out, chosen) == out and "text: L0 H1" in out.read_text()
    out.write_text("previous page")

    def broken(*args, **kwargs):
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(export, "patterns_html", broken)
    with pytest.raises(RuntimeError):
        write_patterns(scan, out, chosen)
    assert out.read_text() == "previous page" and sorted(p.name for p in out.parent.iterdir()) == ["patterns.html"]
