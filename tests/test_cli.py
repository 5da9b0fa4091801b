"""CLI: scan -> rank/export round trip, the hand-wired previous-token head ranked first, exit code 2 on bad input."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from posprobe.cli import main


@pytest.fixture(scope="module")
def prev_token_scan_dir(tmp_path_factory):
    from tests.planted_models import previous_token_model

    model, tok = previous_token_model(layer=0, head=3)
    model_dir = tmp_path_factory.mktemp("model")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path_factory.mktemp("scan") / "scan"
    assert main(["scan", "--model", str(model_dir), "--probes", "head_basics,attention_entropy", "--budget", "quick",
                 "--out", str(out), "--rank", "previous_token_score"]) == 0
    return out


def test_cli_ranks_the_hand_wired_previous_token_head_first(prev_token_scan_dir, capsys):
    assert main(["rank", str(prev_token_scan_dir), "--metric", "previous_token_score", "--top", "3"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert (table.layer[0], table["head"][0]) == (0, 3)
    assert table.previous_token_score[0] > 0.95
    ranking = pd.read_csv(prev_token_scan_dir / "ranking.csv")
    assert (ranking.layer[0], ranking["head"][0]) == (0, 3)


def test_csv_export_parses_back_to_the_same_numbers(prev_token_scan_dir, capsys):
    import posprobe

    assert main(["export", str(prev_token_scan_dir), "--format", "csv"]) == 0
    exported = pd.read_csv(io.StringIO(capsys.readouterr().out))
    heads = posprobe.load(prev_token_scan_dir).heads
    pd.testing.assert_frame_equal(exported, heads, check_dtype=False, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fmt", ["json", "parquet", "md"])
def test_other_formats(prev_token_scan_dir, tmp_path, fmt, capsys):
    out = tmp_path / f"rank.{fmt}"
    assert main(["rank", str(prev_token_scan_dir), "--metric", "sink_mass", "--format", fmt, "--out", str(out)]) == 0
    if fmt == "json":
        assert len(json.loads(out.read_text())) == 8
    elif fmt == "parquet":
        assert len(pd.read_parquet(out)) == 8
    else:  # a markdown table: header row, separator row, one row per head
        lines = out.read_text().strip().splitlines()
        assert "sink_mass" in lines[0] and lines[0].startswith("|") and set(lines[1]) <= set("|-: ")
        assert len(lines) == 2 + 8 and all(line.startswith("|") for line in lines)


def test_unknown_metric_exits_2_listing_valid_ones(prev_token_scan_dir, capsys):
    assert main(["rank", str(prev_token_scan_dir), "--metric", "nope"]) == 2
    err = capsys.readouterr().err
    assert "Unknown metric 'nope'" in err and "previous_token_score" in err and "Traceback" not in err


def test_missing_scan_dir_exits_2(tmp_path, capsys):
    assert main(["rank", str(tmp_path / "missing"), "--metric", "sink_mass"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_corrupted_scan_exits_2(prev_token_scan_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(prev_token_scan_dir, broken)
    (broken / "curves.parquet").write_bytes(b"garbage")
    assert main(["export", str(broken), "--table", "curves"]) == 2
    assert "corrupted" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    assert main(["rank"]) == 2
    assert main(["scan", "--out", "x", "--model", "no-such-model"]) == 2
    assert "Unknown model 'no-such-model'" in capsys.readouterr().err


def test_models_and_probes_commands(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "gemma-3-270m" in out and "tiny-rope" in out
    assert main(["probes"]) == 0
    assert "head_basics" in capsys.readouterr().out


def test_scan_examples_switch_stores_or_drops_the_pattern_examples(tmp_path, capsys):
    import posprobe
    from posprobe.render.pattern_view import example_names

    on = tmp_path / "on"
    assert main(["scan", "--model", "tiny-rope", "--probes", "head_basics", "--budget", "quick", "--examples", "on",
                 "--out", str(on)]) == 0
    assert example_names(posprobe.load(on)) == ["text", "repeated", "needle"]
    off = tmp_path / "off"
    assert main(["scan", "--model", "tiny-rope", "--probes", "head_basics,pattern_examples", "--budget", "quick",
                 "--examples", "off", "--out", str(off)]) == 0
    loaded = posprobe.load(off)
    assert example_names(loaded) == [] and "off" in loaded.meta["skipped"]["pattern_examples"]
    assert main(["scan", "--model", "tiny-rope", "--examples", "sometimes", "--out", str(tmp_path / "bad")]) == 2
    assert "auto, on or off" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def examples_scan_dir(tmp_path_factory):
    """A tiny random-model scan with stored example patterns (text, repeated, needle)."""
    out = tmp_path_factory.mktemp("examples") / "scan"
    assert main(["scan", "--model", "tiny-rope", "--probes", "head_basics", "--budget", "quick", "--examples", "on",
                 "--out", str(out)]) == 0
    return out


def test_patterns_exports_the_top_heads_by_default(examples_scan_dir, tmp_path, capsys):
    import posprobe

    out = tmp_path / "patterns.html"
    assert main(["patterns", str(examples_scan_dir), "--out", str(out)]) == 0
    scan = posprobe.load(examples_scan_dir)
    tops = [scan.rank(m, top=1).iloc[0] for m in ("previous_token_score", "sink_mass")]
    heads = list(dict.fromkeys(f"L{r.layer}H{r['head']}" for r in tops))
    assert f"wrote {', '.join(heads)} on 3 example(s) to {out}" in capsys.readouterr().err
    page = out.read_text()
    assert page.count("Plotly.newPlot") == len(heads) * 3 * 2  # per head and example: heatmap + top keys
    for head in heads:
        layer, number = head[1:].split("H")
        assert f"<h2>L{layer} H{number}</h2>" in page and f"needle: L{layer} H{number}" in page
    assert "top previous_token_score" in page and "top sink_mass" in page


def test_patterns_with_heads_examples_query_and_cdn(examples_scan_dir, tmp_path):
    out = tmp_path / "two.html"
    assert main(["patterns", str(examples_scan_dir), "--out", str(out), "--heads", "L1H2,L0H1", "--example",
                 "repeated", "--example", "0", "--query", "-3", "--no-top-keys", "--cdn"]) == 0
    page = out.read_text()
    assert page.count("Plotly.newPlot") == 2 * 2 and page.index("<h2>L1 H2</h2>") < page.index("<h2>L0 H1</h2>")
    assert "repeated: L1 H2" in page and "text: L0 H1" in page and "needle:" not in page
    assert 'src="https://cdn.plot.ly/' in page and "top keys of query" not in page


@pytest.mark.parametrize("args, message", [
    (["--heads", "L7H0"], "L7H0 is not in this scan: tiny-rope has 2 layers x 4 heads (L0H0 to L1H3)"),
    (["--heads", "7.0"], "Cannot read head '7.0'"),
    (["--example", "5"], "Example 5 is out of range: this scan stores 3 examples (0 text, 1 repeated, 2 needle)"),
    (["--example", "haystack"], "Unknown stored example 'haystack'"),
    (["--example", "text", "--query", "500"], "--query 500 is not a position of example 0 (text, "),
    (["--metrics", "nope"], "Unknown head metric 'nope'"),
])
def test_patterns_refuses_bad_input_before_writing(examples_scan_dir, tmp_path, capsys, args, message):
    out = tmp_path / "patterns.html"
    out.write_text("an earlier export")
    assert main(["patterns", str(examples_scan_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert out.read_text() == "an earlier export" and [p.name for p in tmp_path.iterdir()] == ["patterns.html"]


def test_patterns_of_a_scan_without_examples_says_why_and_how_to_rescan(prev_token_scan_dir, tmp_path, capsys):
    out = tmp_path / "patterns.html"
    assert main(["patterns", str(prev_token_scan_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"The scan {prev_token_scan_dir} stores no example attention patterns" in err
    assert "pattern_examples probe did not run" in err and "made before" in err and "--examples on" in err
    assert not out.exists()
