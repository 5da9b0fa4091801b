"""posprobe report: one self-contained HTML page (plotly inlined, nothing fetched): provenance, top heads, figures."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

import posprobe
from posprobe.cli import main
from posprobe.probes.base import Budget

TINY = Budget("tiny", context_lengths=(48, 96), n_texts=1, max_queries=32, retrieval_trials=1, bias_trials=1,
              implicit_sequences=4)


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory):
    from tests.planted_models import previous_token_model

    model, tok = previous_token_model(layer=1, head=2)
    scan = posprobe.scan(model, tokenizer=tok, probes=["head_basics", "attention_entropy"], budget=TINY,
                         progress=False)
    return scan.save(tmp_path_factory.mktemp("scan") / "scan")


class _Resources(HTMLParser):
    """Every URL the page would load (script / img / iframe src, stylesheet links) and every script body."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "img", "iframe", "embed") and attrs.get("src"):
            self.urls.append(attrs["src"])
        if tag == "link" and attrs.get("href"):
            self.urls.append(attrs["href"])
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def test_cli_report_is_self_contained_with_provenance_top_heads_and_figures(scan_dir, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(scan_dir), "--out", str(out)]) == 0
    page = out.read_text()
    parser = _Resources()
    parser.feed(page)
    assert parser.urls == []  # nothing to fetch: opens offline
    assert max(len(s) for s in parser.scripts) > 1_000_000  # plotly.js itself, inlined once
    assert page.count("Plotly.newPlot") == len(re.findall(r'<div class="figure">', page)) > 5
    scan = posprobe.load(scan_dir)
    assert scan.meta["weights_hash"] in page and "tiny" in page
    # the hand-wired previous-token head tops its metric in the top-heads table
    row = re.search(r"<td>previous_token_score</td>\s*<td>([^<]*)</td>", page).group(1)
    assert row.startswith("L1H2=")
    for metric in scan.metrics:
        assert f"atlas: {metric}" in page
    assert "curve: attention_vs_distance" in page


def test_report_refuses_a_directory_as_out_before_reading_the_scan(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing-scan"), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
