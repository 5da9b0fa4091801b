"""`posprobe scan --what-if ... (repeatable)` and `posprobe eval --what-if ...`: applied, recorded, refused early."""

from __future__ import annotations

import json

import pytest

from posprobe.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from posprobe.models import tiny_model

    model, tokenizer = tiny_model("rope", max_positions=1024)
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_scan_applies_several_what_ifs_together_and_records_them(model_dir, tmp_path):
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(model_dir), "--probes", "head_basics", "--budget", "quick", "--out", str(out),
                 "--what-if", "yarn:factor=2", "--what-if", "self_extend:group=2,window=16"]) == 0
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else None
    if meta is None:
        from posprobe.scan import load

        meta = load(out).meta
    parts = meta["intervention"]["parts"]
    assert [p["name"] for p in parts] == ["yarn", "self_extend"]
    assert parts[0]["resolved"]["rope_parameters"]["rope_type"] == "yarn"
    assert parts[1]["group"] == 2 and parts[1]["resolved"]["layers"] == "0:2"


def test_scan_refuses_a_bad_what_if_before_loading(tmp_path, capsys):
    assert main(["scan", "--model", "no/such-model", "--out", str(tmp_path / "s"), "--what-if", "yarn:fctor=2"]) == 2
    assert "fctor" in capsys.readouterr().err


def test_eval_compares_each_what_if_with_the_baseline(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model_dir), "--task", "kv_words", "--items", "3", "--positions", "0,2",
                 "--trials", "1", "--what-if", "yarn:factor=2", "--what-if", "streaming_llm:window=16",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "yarn" in table and "streaming_llm" in table


def test_buckets_scan_is_refused_with_the_fix_and_eval_runs(model_dir, tmp_path, capsys):
    """Attention Buckets changes outputs: `posprobe scan` refuses it (naming rope_theta), `posprobe eval` runs it."""
    code = main(["scan", "--model", str(model_dir), "--probes", "head_basics", "--budget", "quick",
                 "--out", str(tmp_path / "scan"), "--what-if", "buckets:bases=10000/20000"])
    assert code != 0 and "rope_theta:theta=" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--task", "kv_words", "--items", "3", "--positions", "0",
                 "--trials", "1", "--what-if", "buckets:bases=10000/20000", "--out", str(tmp_path / "eval")]) == 0
    assert "buckets" in capsys.readouterr().out
