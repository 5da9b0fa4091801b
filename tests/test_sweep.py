"""Sweeps and combined tables: a 2-model sweep through the CLI is resumable and its combined export parses back equal.

Tiny random models (no download) and a tiny inline budget keep every scan to a second or two.
"""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

import posprobe
from posprobe.cli import main
from posprobe.errors import InputError
from posprobe.sweep import CONDITION_COLUMNS, SweepSpec, combined_table, slug

SWEEP = """
models = ["tiny-rope", "tiny-nope"]
budgets = [{name = "tiny", context_lengths = [48, 96], n_texts = 1, max_queries = 32}]
seeds = [0]
probes = ["head_basics"]
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    (root / "sweep.toml").write_text(SWEEP)
    out = root / "scans"
    assert main(["sweep", str(root / "sweep.toml"), "--out", str(out)]) == 0
    return root, out


def _manifests(out):
    return {p.parent.name: p.read_text() for p in sorted(out.glob("*/manifest.json"))}


def test_one_scan_per_cell_with_its_conditions(swept):
    _, out = swept
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["tiny-nope__tiny__seed0", "tiny-rope__tiny__seed0"]
    scan = posprobe.load(out / "tiny-rope__tiny__seed0")
    assert scan.meta["sweep"]["cell"]["model"] == "tiny-rope" and scan.meta["budget"]["context_lengths"] == [48, 96]
    record = json.loads((out / "sweep.json").read_text())
    assert [row["status"] for row in record["last_run"]] == ["done", "done"]


def test_second_run_does_nothing(swept, capsys):
    root, out = swept
    before = _manifests(out)
    assert main(["sweep", str(root / "sweep.toml"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("skipped") == 2 and "scanning" not in printed.err
    assert _manifests(out) == before  # not rewritten: same creation times, same bytes


def test_changed_settings_are_rescanned_and_new_cells_added(swept, tmp_path, capsys):
    root, out = swept
    import shutil

    copy = tmp_path / "scans"
    shutil.copytree(out, copy)
    changed = SWEEP.replace("max_queries = 32", "max_queries = 16").replace("models = [\"tiny-rope\", \"tiny-nope\"]",
                                                                           "models = [\"tiny-rope\"]")
    (tmp_path / "s.toml").write_text(changed.replace("seeds = [0]", "seeds = [0, 1]"))
    assert main(["sweep", str(tmp_path / "s.toml"), "--out", str(copy)]) == 0
    summary = json.loads((copy / "sweep.json").read_text())["last_run"]
    assert [(r["scan"], r["status"]) for r in summary] == [("tiny-rope__tiny__seed0", "done"),
                                                          ("tiny-rope__tiny__seed1", "done")]
    assert posprobe.load(copy / "tiny-rope__tiny__seed0").meta["budget"]["max_queries"] == 16


def test_combined_csv_export_parses_back_equal(swept, capsys):
    _, out = swept
    assert main(["export", str(out), "--format", "csv"]) == 0
    exported = pd.read_csv(io.StringIO(capsys.readouterr().out), keep_default_na=False, na_values=[""])
    assert list(exported.columns[:6]) == CONDITION_COLUMNS
    expected = []
    for name in ("tiny-nope__tiny__seed0", "tiny-rope__tiny__seed0"):
        heads = posprobe.load(out / name).heads.copy()
        for position, (col, value) in enumerate(zip(CONDITION_COLUMNS, [name.split("__")[0], name, "tiny", 0, "",
                                                                         ""])):
            heads.insert(position, col, value)
        expected.append(heads)
    expected = pd.concat(expected, ignore_index=True)
    exported[["intervention", "what_if"]] = exported[["intervention", "what_if"]].fillna("")
    pd.testing.assert_frame_equal(exported, expected, check_dtype=False, rtol=1e-12, atol=0)


def test_combined_parquet_export_and_ranking(swept, tmp_path, capsys):
    _, out = swept
    target = tmp_path / "all.parquet"
    dirs = [str(p) for p in sorted(out.iterdir()) if p.is_dir()]
    assert main(["export", *dirs, "--format", "parquet", "--table", "curves", "--out", str(target)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(target), combined_table(dirs, "curves"))
    assert main(["rank", *dirs, "--metric", "previous_token_score", "--top", "3"]) == 0
    ranking = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(ranking) == 6 and list(ranking.groupby("model")["rank"].apply(list)) == [[1, 2, 3], [1, 2, 3]]
    assert ranking.groupby("model").previous_token_score.apply(lambda s: s.is_monotonic_decreasing).all()


def test_scan_with_several_models_writes_one_scan_each(tmp_path, capsys):
    out = tmp_path / "scans"
    args = ["scan", "--model", "tiny-rope", "--model", "tiny-absolute", "--probes", "attention_entropy", "--budget",
            "quick", "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["tiny-absolute", "tiny-rope"]
    assert posprobe.load(out / "tiny-absolute").meta["model"] == "tiny-absolute"
    capsys.readouterr()
    assert main(args) == 0 and capsys.readouterr().out.count("skipped") == 2


def test_interventions_axis_applies_the_edit(tmp_path):
    """A hand-wired previous-token head (layer 1, head 2) loses its RoPE distance signal under disable_rope."""
    from tests.planted_models import previous_token_model

    model, tok = previous_token_model(layer=1, head=2)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    spec = SweepSpec.build(models=[str(tmp_path / "model")], budgets=[{"name": "tiny", "context_lengths": [64],
                                                                        "n_texts": 1}],
                           probes=["head_basics"], interventions=["none", "disable_rope:layers=1"])
    from posprobe.sweep import run_sweep

    summary = run_sweep(spec, tmp_path / "s")
    assert list(summary.status) == ["done", "done"]
    table = combined_table([tmp_path / "s"]).set_index(["intervention", "layer", "head"])
    assert table.loc[("", 1, 2), "previous_token_score"] > 0.95
    assert table.loc[("disable_rope:layers=1", 1, 2), "previous_token_score"] < 0.2
    assert table.loc[("disable_rope:layers=1", 0, 0), "sink_mass"] == table.loc[("", 0, 0), "sink_mass"]
    masked_dir = next((tmp_path / "s").glob("*__disable_rope*"))
    assert posprobe.load(masked_dir).meta["sweep"]["applied"]["intervention"]["name"] == "disable_rope"


def test_a_failing_cell_is_reported_and_the_others_run(tmp_path, capsys):
    (tmp_path / "s.toml").write_text(SWEEP.replace('"tiny-nope"', '"no-such-model"'))
    assert main(["sweep", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o")]) == 1
    summary = json.loads((tmp_path / "o" / "sweep.json").read_text())["last_run"]
    assert [r["status"] for r in summary] == ["done", "failed"] and "Unknown model" in summary[1]["error"]


@pytest.mark.parametrize("text, message", [
    ('models = ["tiny-rope"]\nbudget = "quick"', "unknown keys ['budget']"),
    ('models = ["tiny-rope"]\nbudgets = ["fast"]', "Unknown budget 'fast'"),
    ('models = ["tiny-rope"]\ninterventions = ["mask_head:heads=L0H1"]', "Did you mean 'mask_heads'"),
    ('budgets = ["quick"]', "names no models"),
    ('models = ["tiny-rope"', "Cannot read the sweep file"),
])
def test_bad_sweep_files_exit_2_before_any_model_loads(tmp_path, capsys, text, message):
    (tmp_path / "s.toml").write_text(text)
    assert main(["sweep", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("axis", ["what_ifs", "interventions"])
def test_a_condition_scan_refuses_is_refused_when_the_sweep_is_built(tmp_path, monkeypatch, axis):
    """buckets reads activations of several models at once: scan() refuses it, so the sweep refuses it at build,
    with scan's own message, before any model is loaded or any cell runs."""
    from posprobe.errors import InterventionError
    from posprobe.interventions.spec import parse

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded for a sweep that should have been refused at build")

    monkeypatch.setattr("posprobe.models.load_model", no_load)
    with pytest.raises(InterventionError) as refused:
        SweepSpec.build(models=["tiny-rope"], **{axis: ["none", "buckets:bases=10000/20000"]})
    with pytest.raises(InterventionError) as by_scan:
        parse("buckets:bases=10000/20000").check_runner("scan")
    assert str(refused.value) == str(by_scan.value) and "scan(intervention=" in str(refused.value)
    (tmp_path / "s.toml").write_text('models = ["tiny-rope"]\nwhat_ifs = ["none", "buckets"]\n')
    assert main(["sweep", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_output_directory_of_something_else_is_refused(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    (tmp_path / "s.toml").write_text(SWEEP)
    assert main(["sweep", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "holds something other than a posprobe sweep" in capsys.readouterr().err


def test_slugs_are_safe_and_distinct():
    assert slug("tiny-rope") == "tiny-rope"
    assert slug("/models/a b") != slug("/models/a-b") and "/" not in slug("/models/a b")
    with pytest.raises(InputError, match="same directory"):
        SweepSpec.build(models=["tiny-rope"], budgets=[{"name": "x", "n_texts": 1}, {"name": "x", "n_texts": 2}])


RAY_HEAD = """
import sys, ray
ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes stdin
ray.shutdown()
"""


def test_the_same_sweep_through_a_local_ray_instance_gives_equal_scans(swept, tmp_path):
    """A Ray instance in its own process (started and stopped by this test); the CLI, in another, connects by address.

    RAY_AUTH_MODE=token for both: Ray 2.5x generates a token for a new local instance, and a driver that connects by
    address sends it only when the mode is set before ray is imported (hence separate processes).
    """
    pytest.importorskip("ray")
    import os
    import subprocess
    import sys

    _, local = swept
    (tmp_path / "s.toml").write_text(SWEEP + "\n[ray]\nnum_cpus = 1\nnum_gpus = 0\n")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen([sys.executable, "-c", RAY_HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    sweep = [sys.executable, "-m", "posprobe.cli", "sweep", str(tmp_path / "s.toml"), "--out", str(tmp_path / "ray")]
    try:
        address = head.stdout.readline().strip()
        assert address, "the Ray head did not start"
        first = subprocess.run([*sweep, "--ray", address], capture_output=True, text=True, env=env, timeout=300)
        assert first.returncode == 0, first.stderr[-2000:]
        assert "submitted 2 scans to the Ray cluster" in first.stderr
        again = subprocess.run([*sweep, "--ray", address], capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 0 and again.stdout.count("skipped") == 2  # resumable on Ray too
    finally:
        head.stdin.close()
        head.wait(timeout=120)
    for name in ("tiny-nope__tiny__seed0", "tiny-rope__tiny__seed0"):
        a, b = posprobe.load(local / name), posprobe.load(tmp_path / "ray" / name)
        pd.testing.assert_frame_equal(a.heads, b.heads, rtol=1e-6)
        pd.testing.assert_frame_equal(a.curves, b.curves, rtol=1e-6)
        drop = ("timings_s", "created")
        assert {k: v for k, v in a.meta.items() if k not in drop} == {k: v for k, v in b.meta.items() if k not in drop}


def test_a_ray_request_must_be_numbers():
    with pytest.raises(InputError, match=r"\[ray\] must be a table"):
        SweepSpec.build(models=["tiny-rope"], ray={"num_gpu": 1})


def test_missing_ray_says_how_to_install_before_any_work(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    (tmp_path / "s.toml").write_text(SWEEP)
    assert main(["sweep", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o"), "--ray", "auto"]) == 2
    assert 'pip install "posprobe[ray]"' in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
