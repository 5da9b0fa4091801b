"""`results_scan`: results computed outside `scan()` become a Scan with the same identifying columns and provenance,
that saves, loads and opens in the explorer like any other."""

from __future__ import annotations

import pandas as pd

import posprobe
from posprobe.probes.base import curve_frame
from posprobe.scan import HEAD_ID_COLUMNS, head_ids, results_scan
from posprobe.testing import PlantedAccess, planted_info


def test_results_scan_round_trip(tmp_path):
    info = planted_info(n_layers=2, n_heads=4, n_kv_heads=2)
    access = PlantedAccess(info, patterns=lambda layer, ids: None)
    curves = curve_frame([{"curve": "accuracy_by_position", "series": "baseline", "x": 0, "y": 0.5},
                          {"curve": "accuracy_by_position", "series": "baseline", "x": 1, "y": 0.25}], "analysis")
    extra = pd.DataFrame({"layer": [1], "head": [3], "kv_head": [9], "my_score": [0.75]})
    table = pd.DataFrame({"gold_position": [0, 1], "accuracy": [0.5, 0.25]})
    made = results_scan(access, curves=curves, tables={"analysis.sweep": table}, heads=extra,
                        summaries={"analysis": {"n": 2}}, analysis="tests")
    assert list(made.heads.columns) == HEAD_ID_COLUMNS + ["my_score"] and len(made.heads) == 8
    assert made.heads["kv_head"].tolist() == head_ids(info)["kv_head"].tolist()  # the model's mapping, not the input's
    assert made.heads["my_score"].isna().sum() == 7 and made.rank("my_score", top=1)["head"].item() == 3
    for key in ("model", "backend", "weights_hash", "model_info", "versions", "created"):
        assert key in made.meta
    assert made.meta["summaries"] == {"analysis": {"n": 2}} and made.meta["analysis"] == "tests"
    loaded = posprobe.load(made.save(tmp_path / "scan"))
    assert loaded.tables["analysis.sweep"].equals(table) and loaded.curve("accuracy_by_position")["y"].tolist() == \
        [0.5, 0.25]
    empty = results_scan(access)
    assert len(empty.curves) == 0 and list(empty.curves.columns) == list(curves.columns)
    assert posprobe.load(empty.save(tmp_path / "empty")).info.n_layers == 2
