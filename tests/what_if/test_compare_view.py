"""The explorer's compare view shows a what-if scan against its baseline (callback level, no browser).

Two scans of one tiny Llama on the same texts (same budget and seed, 32 tokens = its native window): plain and
under `yarn:factor=2` (YaRN rescales the frequencies at any length, so the heads move). The pure renderers
(posprobe/render/compare.py) and the app's compare callback must show B - A = the yarn scan minus the plain one,
head by head, and the yarn scan must carry the what-if in its provenance.
"""

from __future__ import annotations

import numpy as np
import pytest

import posprobe
from posprobe.app import callbacks as cb
from posprobe.app import ids as app_ids
from posprobe.app.catalog import ScanCatalog
from posprobe.probes import Budget
from posprobe.render.compare import common_metrics, compare_atlas, head_differences, scan_labels
from tests.what_if.conftest import NATIVE


@pytest.fixture(scope="module")
def scans(llama):
    budget = Budget("compare", (NATIVE,), 2, 16, level="quick")
    options = {"probes": ["head_basics", "attention_entropy"], "budget": budget, "seed": 3, "progress": False}
    return posprobe.scan(llama, **options), posprobe.scan(llama, intervention="yarn:factor=2", **options)


def test_the_yarn_scan_records_the_what_if_and_differs(scans):
    plain, yarn = scans
    assert yarn.meta["intervention"]["name"] == "yarn" and yarn.meta["intervention"]["factor"] == 2
    assert yarn.meta["intervention"]["resolved"]["rope_parameters"]["rope_type"] == "yarn"
    assert not plain.meta.get("intervention")
    assert "entropy_norm" in common_metrics(plain, yarn)


def test_renderers_show_yarn_minus_plain(scans):
    plain, yarn = scans
    diff = head_differences(plain, yarn, "entropy_norm")
    merged = plain.heads.merge(yarn.heads, on=["layer", "head"], suffixes=("_plain", "_yarn"))
    want = (merged["entropy_norm_yarn"] - merged["entropy_norm_plain"]).to_numpy()
    got = diff.set_index(["layer", "head"]).loc[list(zip(merged["layer"], merged["head"])), "diff"].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)
    # YaRN multiplies cos / sin by 0.1 ln 2 + 1, so q.k grows by ~1.14: every head's attention sharpens (the random
    # model's near-uniform heads by little, but far above float noise)
    assert (want < -1e-5).all(), want
    figure = compare_atlas(plain, yarn, "entropy_norm", labels=("plain", "yarn:factor=2"))
    a, b, d = figure.data
    assert (a.name, b.name, d.name) == ("plain", "yarn:factor=2", "difference")
    for row in diff.itertuples(index=False):
        assert d.z[int(row.layer)][int(row.head)] == pytest.approx(row.diff)


def test_the_compare_callback_shows_them(scans):
    plain, yarn = scans
    catalog = ScanCatalog.build({"plain": plain, "yarn": yarn})
    out = cb.update_compare(catalog, "plain", app_ids.SCAN, None, None, "entropy_norm", None)
    a, b, _, metric_options, metric, notes, figure, data, columns = out[:9]
    assert (a, b, metric) == ("plain", "yarn", "entropy_norm")
    assert "entropy_norm" in [o["value"] for o in metric_options]
    assert not [n for n in notes if "error" in str(n).lower()]
    # traces are labelled by model + what-if from the provenance (render.compare.scan_labels), so the two differ
    names = [trace.name for trace in figure.data]
    assert names == [*scan_labels([plain, yarn]), "difference"]
    assert "yarn" not in names[0] and "yarn" in names[1]
    top = head_differences(plain, yarn, "entropy_norm").iloc[0]
    assert (data[0]["layer"], data[0]["head"]) == (int(top["layer"]), int(top["head"]))
    assert data[0]["B − A"] == pytest.approx(round(float(top["diff"]), 5))
