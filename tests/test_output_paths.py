"""Output paths: a bad --out is refused before any model is loaded; saves are atomic (`posprobe._io`)."""

from __future__ import annotations

import os
import time

import pandas as pd
import pytest

import posprobe.models
from posprobe._io import check_output_dir, replace_dir
from posprobe.cli import main
from posprobe.errors import OutputPathError
from posprobe.scan import Scan


@pytest.fixture
def loader_spy(monkeypatch):
    """Fail the test if anything tries to load a model."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(posprobe.models, "load_model", spy)
    return calls


def _bad_outs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    return {"existing file": a_file, "foreign directory": foreign, "below a file": a_file / "scan"}


@pytest.mark.parametrize("case", ["existing file", "foreign directory", "below a file"])
def test_bad_out_refused_before_any_model_load(tmp_path, loader_spy, capsys, case):
    out = _bad_outs(tmp_path)[case]
    start = time.perf_counter()
    code = main(["scan", "--model", "tiny-rope", "--budget", "quick", "--out", str(out)])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and loader_spy == []
    assert err.startswith("posprobe: error: ") and "--out" in err and "Traceback" not in err
    assert elapsed < 1.0
    if case == "foreign directory":
        assert (out / "thesis.tex").read_text() == "precious"


def test_unwritable_parent_refused(tmp_path, loader_spy, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Simulated (tests run as root in CI, and root may write anywhere): the OS says "no" for this one directory.
    monkeypatch.setattr("posprobe._io.os.access",
                        lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    assert main(["scan", "--model", "tiny-rope", "--out", str(locked / "scan")]) == 2
    assert "no write permission" in capsys.readouterr().err and loader_spy == []


def test_output_dir_states(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper", marker="manifest.json") == "new"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", marker="manifest.json") == "empty"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text("{}")
    assert check_output_dir(tmp_path / "old", marker="manifest.json") == "overwrite"


def test_rank_to_a_directory_is_refused_before_reading(tmp_path, capsys):
    assert main(["rank", str(tmp_path / "missing-scan"), "--metric", "sink_mass", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def _scan(value: float) -> Scan:
    heads = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "kv_head": [0, 0], "layer_type": ["full_attention"] * 2,
                          "sink_mass": [value, value / 2]})
    curves = pd.DataFrame({"probe": ["p"], "curve": ["c"], "series": [""], "layer": [0], "head": [0], "x": [1.0],
                           "y": [value]})
    tables = {"head_basics.extra": pd.DataFrame({"a": [1, 2, 3]})}
    return Scan(heads, curves, {"model": "m", "model_info": {"name": "m"}}, tables)


def test_save_that_fails_halfway_leaves_the_previous_scan_unchanged(tmp_path, monkeypatch):
    out = tmp_path / "scan"
    before = _scan(0.5)
    before.save(out)
    listing = sorted(p.relative_to(out) for p in out.rglob("*"))
    real = pd.DataFrame.to_parquet
    calls = {"n": 0}

    def flaky(self, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # heads written, curves fail
            raise OSError("disk full (simulated)")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", flaky)
    with pytest.raises(OSError, match="simulated"):
        _scan(0.9).save(out)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    assert Scan.load(out).equals(Scan.load(out)) and Scan.load(out).equals(_reloaded(before, tmp_path))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "scan"]  # no temporary directory left


def _reloaded(scan: Scan, tmp_path) -> Scan:
    return Scan.load(scan.save(tmp_path / "reference"))


def test_save_over_a_scan_replaces_it_whole(tmp_path):
    out = tmp_path / "scan"
    _scan(0.5).save(out)
    (out / "tables" / "stale.parquet").write_bytes(b"left over")
    new = _scan(0.25)
    new.save(out)
    assert not (out / "tables" / "stale.parquet").exists()
    assert Scan.load(out).heads.sink_mass.tolist() == [0.25, 0.125]


def test_save_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(OutputPathError, match="something other than a posprobe scan"):
        _scan(0.5).save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_replace_dir_keeps_target_on_error(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "x").write_text("old")
    with pytest.raises(RuntimeError):
        with replace_dir(target) as tmp:
            (tmp / "x").write_text("new")
            raise RuntimeError("boom")
    assert (target / "x").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t"]
    with replace_dir(target) as tmp:
        (tmp / "x").write_text("new")
    assert (target / "x").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["t"]
