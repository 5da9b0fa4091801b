"""Scan: tables and provenance, save/load round trip, ranking equals pandas sorting, errors, skipped probes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import posprobe
from posprobe.errors import ProbeError, ScanFormatError, UnknownNameError
from posprobe.probes import get_probe, list_probes, register
from posprobe.probes.base import BUDGETS, ProbeResult, get_budget
from posprobe.scan import HEAD_ID_COLUMNS, Scan
from tests.probes.test_head_basics import TINY


@pytest.fixture(scope="module")
def tiny_scan():
    return posprobe.scan("tiny-rope", probes=["head_basics", "attention_entropy"], budget=TINY, seed=3, progress=False)


def test_heads_table_shape_and_columns(tiny_scan):
    info = tiny_scan.info
    assert len(tiny_scan.heads) == info.n_layers * info.n_heads
    assert list(tiny_scan.heads.columns[:4]) == HEAD_ID_COLUMNS
    assert tiny_scan.heads["kv_head"].tolist() == [info.kv_head(h) for _ in range(info.n_layers)
                                                   for h in range(info.n_heads)]
    for metric in ("sink_mass", "previous_token_score", "distance_corr", "entropy_mean", "entropy_norm",
                   "entropy_nosink"):
        assert metric in tiny_scan.metrics
        assert tiny_scan.heads[metric].notna().all()


def test_meta_has_provenance(tiny_scan):
    meta = tiny_scan.meta
    assert meta["model"] == "tiny-rope" and meta["seed"] == 3 and meta["budget"]["context_lengths"] == [48, 96]
    assert len(meta["weights_hash"]) == 24
    assert set(meta["probes"]) == {"head_basics", "attention_entropy"}
    assert meta["probes"]["head_basics"]["chunk_size"] == 256
    assert "torch" in meta["versions"] and meta["timings_s"]["total"] > 0
    assert meta["text_source"].startswith("posprobe.tasks.text")


def test_save_load_round_trip(tiny_scan, tmp_path):
    tiny_scan.save(tmp_path / "scan")
    loaded = posprobe.load(tmp_path / "scan")
    assert loaded.equals(tiny_scan)
    pd.testing.assert_frame_equal(loaded.heads, tiny_scan.heads)
    pd.testing.assert_frame_equal(loaded.curves, tiny_scan.curves)


def test_same_seed_same_tables():
    a = posprobe.scan("tiny-rope", probes=["head_basics"], budget=TINY, seed=1, progress=False)
    b = posprobe.scan("tiny-rope", probes=["head_basics"], budget=TINY, seed=1, progress=False)
    pd.testing.assert_frame_equal(a.heads, b.heads)


@pytest.mark.parametrize("metric,ascending", [("previous_token_score", False), ("entropy_norm", True)])
def test_rank_matches_pandas_sort(tiny_scan, metric, ascending):
    ranked = tiny_scan.rank(metric, top=5, ascending=ascending)
    expected = tiny_scan.heads.sort_values(metric, ascending=ascending, kind="stable").head(5)
    assert ranked[metric].tolist() == expected[metric].tolist()
    assert ranked["rank"].tolist() == [1, 2, 3, 4, 5]


def test_unknown_metric_lists_valid_ones(tiny_scan):
    with pytest.raises(UnknownNameError, match="previous_token_score") as err:
        tiny_scan.rank("previous_token")
    assert "Did you mean 'previous_token_score'" in str(err.value)


def test_unknown_probe_and_budget_suggest_close_match():
    with pytest.raises(UnknownNameError, match="Did you mean 'head_basics'"):
        get_probe("head_basic")
    with pytest.raises(UnknownNameError, match="quick"):
        get_budget("quik")


def test_budget_presets_are_ordered():
    assert BUDGETS["quick"].n_texts <= BUDGETS["standard"].n_texts <= BUDGETS["full"].n_texts
    assert max(BUDGETS["quick"].context_lengths) <= max(BUDGETS["full"].context_lengths)


def test_builtin_registry_lists_first_probes():
    assert {"head_basics", "attention_entropy"} <= set(list_probes())


def test_skipped_probe_is_recorded_not_an_error(monkeypatch):
    from posprobe import probes as registry

    # the test double leaves the registry as it found it (the README support matrix lists every registered probe)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class NeedsRope:
        name = "needs_rope_test_probe"
        description = "test double"
        streaming = False

        from dataclasses import dataclass as _dc

        @_dc(frozen=True)
        class Config:
            pass

        def skip_reason(self, info, config):
            return None if info.has_rope else "the model has no RoPE layer"

        def run(self, ctx, config):
            return ProbeResult()

    register(NeedsRope(), replace=True)
    scan = posprobe.scan("tiny-nope", probes=["head_basics", "needs_rope_test_probe"], budget=TINY, progress=False)
    assert scan.meta["skipped"] == {"needs_rope_test_probe": "the model has no RoPE layer"}
    assert "previous_token_score" in scan.metrics


def test_wrong_config_type_is_a_clear_error():
    with pytest.raises(ProbeError, match="HeadBasicsConfig"):
        posprobe.scan("tiny-rope", probes=["head_basics"], budget=TINY, configs={"head_basics": object()})


@pytest.mark.parametrize("damage", ["no_manifest", "bad_json", "wrong_version", "truncated_parquet", "missing_column",
                                    "path_escape"])
def test_corrupted_scans_raise_scan_format_error(tiny_scan, tmp_path, damage):
    folder = tiny_scan.save(tmp_path / "scan")
    manifest = json.loads((folder / "manifest.json").read_text())
    if damage == "no_manifest":
        (folder / "manifest.json").unlink()
    elif damage == "bad_json":
        (folder / "manifest.json").write_text("{not json")
    elif damage == "wrong_version":
        manifest["format_version"] = 999
        (folder / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "truncated_parquet":
        data = (folder / "heads.parquet").read_bytes()
        (folder / "heads.parquet").write_bytes(data[: len(data) // 2])
    elif damage == "missing_column":
        tiny_scan.heads.drop(columns=["kv_head"]).to_parquet(folder / "heads.parquet")
    elif damage == "path_escape":
        manifest["files"]["heads"] = "../../etc/passwd"
        (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ScanFormatError):
        posprobe.load(folder)


def test_missing_scan_dir(tmp_path):
    with pytest.raises(ScanFormatError, match="does not exist"):
        Scan.load(tmp_path / "nope")


def test_repr_html_and_figures(tiny_scan):
    html = tiny_scan._repr_html_()
    assert "tiny-rope" in html and "previous_token_score" in html
    fig = tiny_scan.figure("atlas", metric="sink_mass")
    assert np.asarray(fig.data[0].z).shape == (tiny_scan.info.n_layers, tiny_scan.info.n_heads)
