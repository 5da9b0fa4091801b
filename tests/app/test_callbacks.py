"""The explorer's callbacks as plain functions: right outputs, partial scans, broken scans, large scans."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from plotly.io.json import to_json_plotly

from posprobe.app import callbacks as cb
from posprobe.app import ids
from posprobe.app.catalog import ScanCatalog
from posprobe.app.pages.common import HIDDEN, SHOWN
from posprobe.render.head_detail import head_curve_names, layer_curve_names
from posprobe.render.model_view import model_curve_names
from posprobe.scan import Scan
from tests.app.synthetic import synthetic_scan


def props(component: Any) -> list[dict[str, Any]]:
    """Every component (as its JSON dict) in a Dash component tree."""
    out = []

    def walk(node: Any) -> None:
        if isinstance(node, (list, tuple)):
            for child in node:
                walk(child)
        elif hasattr(node, "to_plotly_json"):
            data = node.to_plotly_json()
            out.append(data)
            walk(data["props"].get("children"))

    walk(component)
    return out


def text_of(component: Any) -> str:
    parts = []
    for data in props(component):
        children = data["props"].get("children")
        for child in children if isinstance(children, list) else [children]:
            if isinstance(child, (str, int, float)):
                parts.append(str(child))
    return " ".join(parts)


def serializable(value: Any) -> bool:
    json.loads(to_json_plotly(value))
    return True


@pytest.fixture
def catalog() -> ScanCatalog:
    return ScanCatalog.build({"small": synthetic_scan(3, 4, seed=0), "other": synthetic_scan(3, 4, seed=1)})


def partial_scan() -> Scan:
    """Only head-basics-like metrics and one per-head curve; no model-level curves, no tables, a text column."""
    full = synthetic_scan(2, 3, n_metrics=2, model_curves=False, tables=False, name="partial")
    full.curves = full.curves[full.curves["curve"] == "attention_vs_distance"].reset_index(drop=True)
    full.heads["note"] = "text"
    full.meta["probes"] = {"head_basics": {}}
    return full


# --- scan picker ----------------------------------------------------------------------------------------------
def test_update_scan_good_and_broken(synthetic_dir, broken_dirs):
    catalog = ScanCatalog.build({"good": synthetic_dir, "bad": broken_dirs["truncated"]})
    error, style, summary = cb.update_scan(catalog, "good")
    assert error is None and style == SHOWN and "synthetic" in text_of(summary)
    assert "skipped: retrieval (synthetic scan)" in text_of(summary)
    error, style, summary = cb.update_scan(catalog, "bad")
    assert style == HIDDEN and summary == ""
    page = text_of(error)
    assert "This scan cannot be opened" in page and "corrupted or incomplete" in page and "Traceback" not in page
    error, style, _ = cb.update_scan(catalog, "/etc/passwd")
    assert style == HIDDEN and "There is no scan called '/etc/passwd'" in text_of(error)


# --- atlas ----------------------------------------------------------------------------------------------------
def test_update_atlas_offers_every_numeric_metric_and_keeps_the_choice(catalog):
    options, metric, fig = cb.update_atlas(catalog, "small", None, None)
    assert [o["value"] for o in options] == ["planted", "signed", "metric_2", "metric_3"] and metric == "planted"
    assert fig.data[0].type == "heatmap"
    options, metric, fig = cb.update_atlas(catalog, "other", "signed", {"layer": 1, "head": 2})
    assert metric == "signed" and fig.layout.title.text.startswith("signed")
    assert [(s.x0, s.y0) for s in fig.layout.shapes] == [(1.5, 0.5)]
    _, metric, _ = cb.update_atlas(catalog, "small", "gone", None)
    assert metric == "planted"
    assert serializable(cb.update_atlas(catalog, "small", None, None))


def test_atlas_marker_and_panel(catalog):
    assert cb.atlas_marker(None) == []
    (shape,) = cb.atlas_marker({"layer": 2, "head": 1})
    assert (shape["x0"], shape["x1"], shape["y0"], shape["y1"]) == (0.5, 1.5, 1.5, 2.5)
    assert cb.atlas_marker({"layer": "2; rm -rf", "head": 1}) == []
    children, disabled = cb.update_atlas_panel(catalog, "small", {"layer": 2, "head": 1})
    text = text_of(children)
    # planted = 2001 ranks third, after 2003 and 2002
    assert not disabled and "L2 H1" in text and "2001" in text and "#3 of 12" in text
    _, disabled = cb.update_atlas_panel(catalog, "small", None)
    assert disabled
    _, disabled = cb.update_atlas_panel(catalog, "small", {"layer": 9, "head": 9})
    assert disabled


def test_select_head_from_every_source(catalog):
    def select(trigger, click=None, cell=None, layer=None, head=None, current=None):
        return cb.select_head(catalog, "small", trigger, click, cell, layer, head, current, "planted")

    selected, layer, head, layer_options, head_options = select(None)
    assert selected == {"layer": 2, "head": 3} and (layer, head) == (2, 3)  # top head by `planted`
    assert [o["value"] for o in layer_options] == [0, 1, 2] and [o["value"] for o in head_options] == [0, 1, 2, 3]
    assert select(ids.ATLAS_GRAPH, click={"points": [{"x": 1, "y": 0, "z": 1.0}]})[0] == {"layer": 0, "head": 1}
    clicked = {"value": 0.5, "colId": "signed", "rowIndex": 0, "rowId": "1:2", "timestamp": 1}  # AgGrid cellClicked
    assert select(ids.RANKING_TABLE, cell=clicked)[0] == {"layer": 1, "head": 2}
    assert select(ids.HEAD_LAYER, layer=2, head=0)[0] == {"layer": 2, "head": 0}
    current = {"layer": 1, "head": 1}
    # out-of-range or malformed selections keep the current head
    assert select(ids.ATLAS_GRAPH, click={"points": [{"x": 9, "y": 9}]}, current=current)[0] == current
    assert select(ids.ATLAS_GRAPH, click={"points": [{"x": "a"}]}, current=current)[0] == current
    assert select(ids.RANKING_TABLE, cell={"rowId": "../../etc"}, current=current)[0] == current
    assert select(ids.RANKING_TABLE, cell={"rowId": "7:7"}, current=current)[0] == current
    assert select(ids.SCAN, current=current)[0] == current
    assert cb.select_head(catalog, "nope", None, None, None, None, None, None) == (None, None, None, [], [])


# --- head detail ----------------------------------------------------------------------------------------------
def test_update_head_shows_every_curve_of_the_head(catalog):
    scan = catalog.get("small")
    title, metrics, curves = cb.update_head(catalog, "small", {"layer": 1, "head": 2})
    assert title.startswith("Layer 1, head 2") and "kv head" in title
    shown = [p["props"]["data-curve"] for p in props(curves) if "data-curve" in p["props"]]
    assert shown == head_curve_names(scan, 1, 2) + layer_curve_names(scan, 1)
    assert shown == ["attention_vs_distance", "entropy_by_position", "variance_by_position"]
    assert "planted" in text_of(metrics) and "1002" in text_of(metrics)
    title, _, curves = cb.update_head(catalog, "small", None)
    assert title == "" and "Select a head" in text_of(curves)
    assert serializable(cb.update_head(catalog, "small", {"layer": 0, "head": 0}))


def test_partial_scan_shows_only_what_exists():
    catalog = ScanCatalog.build({"partial": partial_scan()})
    options, metric, _ = cb.update_atlas(catalog, "partial", None, None)
    assert [o["value"] for o in options] == ["planted", "signed"]  # the text column `note` is not colourable
    _, metrics, curves = cb.update_head(catalog, "partial", {"layer": 0, "head": 1})
    assert [p["props"]["data-curve"] for p in props(curves) if "data-curve" in p["props"]] == ["attention_vs_distance"]
    assert "note" in text_of(metrics) and "text" in text_of(metrics)
    _, _, figure, sections = cb.update_model(catalog, "partial", None, "planted", None)
    assert "no model- or layer-level curves (probes run: head_basics)" in text_of(sections)
    assert not [p for p in props(sections) if "data-curve" in p["props"]]
    assert cb.update_model_headcurve(catalog, "partial", None)[3] == SHOWN
    assert cb.update_model_table(catalog, "partial", None)[4] == HIDDEN
    empty = synthetic_scan(2, 2, head_curves=False, model_curves=False, tables=False)
    catalog = ScanCatalog.build({"bare": empty})
    assert "holds no per-head curves" in text_of(cb.update_head(catalog, "bare", {"layer": 0, "head": 0})[2])
    assert cb.update_model_headcurve(catalog, "bare", None)[3] == HIDDEN


def test_scan_without_metrics():
    scan = synthetic_scan(2, 2, model_curves=False, tables=False)
    scan.heads = scan.heads[["layer", "head", "kv_head", "layer_type"]]
    catalog = ScanCatalog.build({"s": scan})
    assert cb.update_atlas(catalog, "s", None, None)[:2] == ([], None)
    assert cb.update_ranking(catalog, "s", None, None, None)[:2] == ([], None)
    assert cb.select_head(catalog, "s", None, None, None, None, None, None)[0] == {"layer": 0, "head": 0}


# --- ranking --------------------------------------------------------------------------------------------------
def records(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """What EXPAND_ROWS_JS builds in the browser from the compact ranking payload."""
    return [dict(zip(payload["columns"], values)) for values in payload["rows"]]


def test_update_ranking_follows_the_atlas_until_changed(catalog):
    options, metric, payload, columns = cb.update_ranking(catalog, "small", None, "signed", None)
    assert metric == "signed"
    data = records(payload)
    assert [row["rank"] for row in data] == list(range(1, 13))
    signed = [row["signed"] for row in data]
    assert signed == sorted(signed, reverse=True)
    assert [c["field"] for c in columns][:6] == ["rank", "layer", "head", "kv_head", "layer_type", "signed"]
    assert payload["columns"] == [c["field"] for c in columns]
    assert cb.update_ranking(catalog, "small", ids.RANKING_METRIC, "signed", "metric_2")[1] == "metric_2"
    assert cb.update_ranking(catalog, "small", ids.ATLAS_METRIC, "planted", "metric_2")[1] == "planted"
    assert serializable(cb.update_ranking(catalog, "small", None, "signed", None))


def test_ranking_grid_columns_sort_filter_and_format(catalog):
    _, _, payload, columns = cb.update_ranking(catalog, "small", None, "signed", None)
    by_field = {c["field"]: c for c in columns}
    # every column sorts (defaultColDef) and the ranking order is restored whenever the ranking is sent
    assert all("sort" in c and c["sort"] is None for c in columns)
    assert {f for f, c in by_field.items() if c["filter"] == "agNumberColumnFilter"} == {
        "rank", "layer", "head", "kv_head", "signed", "planted", "metric_2", "metric_3"}
    assert by_field["layer_type"]["filter"] == "agTextColumnFilter"
    # metrics: 4 significant digits in the cell, a dash for a missing value; integers are shown as they are
    for field in ("signed", "planted", "metric_2", "metric_3"):
        assert "d3.format('.4~g')" in by_field[field]["valueFormatter"]["function"]
        assert by_field[field]["filterParams"] == {"defaultOption": "greaterThanOrEqual"}
    assert all("valueFormatter" not in by_field[f] for f in ("rank", "layer", "head", "kv_head", "layer_type"))
    assert "pp-ranked" in by_field["signed"]["cellClass"] and "cellClass" not in by_field["planted"]
    # values go rounded to 5 significant digits; row ids are computed in the browser, not sent
    scan = catalog.get("small")
    ranked = scan.rank("signed", top=None)
    data = records(payload)
    assert "id" not in payload["columns"]
    assert [(r["layer"], r["head"]) for r in data] == list(zip(ranked["layer"], ranked["head"]))
    assert [r["signed"] for r in data] == pytest.approx(list(ranked["signed"]), rel=1e-4)
    assert all(r["signed"] == float(f"{r['signed']:.5g}") for r in data)


def test_ranking_sends_missing_values_as_null():
    scan = synthetic_scan(2, 2, model_curves=False, tables=False)
    scan.heads.loc[1, "metric_2"] = np.nan
    scan.heads.loc[2, "metric_2"] = np.inf
    catalog = ScanCatalog.build({"s": scan})
    data = records(cb.update_ranking(catalog, "s", ids.RANKING_METRIC, None, "metric_2")[2])
    assert [r["metric_2"] for r in data][-1] is None  # NaN ranks last
    assert sum(r["metric_2"] is None for r in data) == 2
    assert json.loads(json.dumps(data, allow_nan=False))  # strict JSON: no NaN / Infinity tokens


def test_ranking_export_request():
    from posprobe.app.pages.head import row_ids_of

    assert row_ids_of({"clicks": 2, "row_ids": ["1:2", "0:0"]}) == ["1:2", "0:0"]
    assert row_ids_of({"clicks": 1, "row_ids": None}) is None  # grid rows not known yet: every head
    assert row_ids_of(None) is None and row_ids_of({"row_ids": "1:2"}) is None


def test_download_ranking_full_precision_in_table_order(catalog):
    scan = catalog.get("small")
    payload = cb.download_ranking(catalog, "small", "signed", None)
    assert payload["filename"] == "small_ranking_signed.csv" and payload["type"] == "text/csv"
    frame = pd.read_csv(io.StringIO(payload["content"]))
    pd.testing.assert_frame_equal(frame, scan.rank("signed", top=None), check_dtype=False, rtol=0, atol=1e-15)
    # the grid's filtered / re-sorted view (row ids) decides rows and order; unknown ids are dropped
    payload = cb.download_ranking(catalog, "small", "signed", ["2:3", "0:0", "7:7", "junk"])
    frame = pd.read_csv(io.StringIO(payload["content"]))
    assert list(zip(frame["layer"], frame["head"])) == [(2, 3), (0, 0)]
    assert cb.download_ranking(catalog, "small", "not_a_metric", None) is None
    assert cb.download_ranking(catalog, "missing", "signed", None) is None
    odd = ScanCatalog.build({"a b/../c": scan})
    assert cb.download_ranking(odd, "a b/../c", "signed", None)["filename"] == "a_b_.._c_ranking_signed.csv"


# --- model view -----------------------------------------------------------------------------------------------
def test_update_model_lists_model_and_layer_curves_and_position_sweeps(catalog):
    scan = catalog.get("small")
    options, metric, figure, sections = cb.update_model(catalog, "small", None, "signed", None)
    assert metric == "signed" and figure.layout.title.text == "signed by layer"
    curves = [p["props"]["data-curve"] for p in props(sections) if "data-curve" in p["props"]]
    assert sorted(curves) == sorted(model_curve_names(scan))
    assert set(curves) == {"u_curve_attention", "implicit_position_r2", "variance_by_position"}
    tables = [p["props"]["data-table"] for p in props(sections) if "data-table" in p["props"]]
    assert tables == ["position_bias.kv_words"]
    probes = [p["props"]["children"] for p in props(sections) if p["type"] == "H4"]
    assert probes == ["position_bias", "implicit_position"]  # in the order the scan holds them
    assert serializable((figure, sections))


def test_update_model_headcurve_and_table(catalog):
    options, curve, figure, style = cb.update_model_headcurve(catalog, "small", None)
    assert [o["value"] for o in options] == ["attention_vs_distance", "entropy_by_position"] and style == SHOWN
    assert cb.update_model_headcurve(catalog, "small", "entropy_by_position")[1] == "entropy_by_position"
    options, table, data, columns, style = cb.update_model_table(catalog, "small", None)
    assert table == "position_bias.kv_words" and style == SHOWN and len(data) == 20
    assert "position_bias.kv_words (20 rows)" in [o["label"] for o in options]
    _, table, data, columns, _ = cb.update_model_table(catalog, "small", "retrieval.trials")
    assert [c["field"] for c in columns] == ["trial", "depth", "context_length", "correct"]
    assert [c["filter"] for c in columns][:3] == ["agNumberColumnFilter"] * 3 and "valueFormatter" in columns[1]
    assert data[1]["correct"] is False
    assert serializable(data)


def test_table_preview_handles_nan_and_objects():
    from posprobe.app.pages.model import PREVIEW_ROWS, table_preview

    table = pd.DataFrame({"a": np.arange(500.0), "b": [np.nan, np.inf] * 250, "c": [[1, 2]] * 500, 3: "x",
                          "n.k": np.arange(500)})
    data, columns = table_preview(table)
    assert len(data) == PREVIEW_ROWS and data[0]["b"] is None and data[1]["b"] is None
    assert data[0]["c"] == "[1, 2]" and data[0]["3"] == "x" and data[7]["n.k"] == 7
    assert [c["field"] for c in columns] == ["a", "b", "c", "3", "n.k"]
    kinds = {c["field"]: ("float" if "valueFormatter" in c else c["filter"]) for c in columns}
    assert kinds == {"a": "float", "b": "float", "c": "agTextColumnFilter", "3": "agTextColumnFilter",
                     "n.k": "agNumberColumnFilter"}
    assert json.loads(json.dumps(data, allow_nan=False))
    assert serializable(data)


# --- compare --------------------------------------------------------------------------------------------------
def test_update_compare_defaults_and_outputs(catalog):
    out = cb.update_compare(catalog, "small", ids.SCAN, None, None, None, None)
    a, b, scan_options, metric_options, metric, notes, figure, data, columns, curve_options, curve = out
    assert (a, b, metric) == ("small", "other", "planted")
    assert [t.type for t in figure.data] == ["heatmap"] * 3
    assert data[0]["B − A"] == 0  # `planted` is the same in both synthetic scans
    assert [c["field"] for c in columns] == ["layer", "head", "A", "B", "B − A"] and "valueFormatter" in columns[4]
    out = cb.update_compare(catalog, "small", ids.COMPARE_METRIC, "small", "other", "signed", None)
    data = out[7]
    diffs = [abs(row["B − A"]) for row in data]
    assert diffs == sorted(diffs, reverse=True) and diffs[0] > 0
    assert [o["value"] for o in out[9]] == ["attention_vs_distance", "entropy_by_position", "u_curve_attention",
                                           "implicit_position_r2", "variance_by_position"]
    assert serializable(out)


def test_update_compare_messages(catalog, broken_dirs):
    single = ScanCatalog.build({"only": synthetic_scan()})
    out = cb.update_compare(single, "only", ids.SCAN, None, None, None, None)
    assert out[0] == out[1] == "only"
    assert "Compare needs two scans" in text_of(out[5]) and "same scan" in text_of(out[5])
    mixed = ScanCatalog.build({"a": synthetic_scan(2, 4), "b": synthetic_scan(3, 2, name="other-model"),
                               "bad": broken_dirs["version"]})
    out = cb.update_compare(mixed, "a", ids.SCAN, None, "b", None, None)
    assert "different shapes (2x4 vs 3x2" in text_of(out[5]) and "different models" in text_of(out[5])
    assert len(out[7]) == 4  # the heads both scans have: layers 0-1, heads 0-1
    out = cb.update_compare(mixed, "a", ids.COMPARE_B, "a", "bad", None, None)
    assert "format version 99" in text_of(out[5]) and out[6].data == ()


def test_update_compare_curve(catalog):
    fig = cb.update_compare_curve(catalog, "small", "other", "attention_vs_distance", {"layer": 1, "head": 2})
    # one model, no what-if: the labels collide, so each gets its catalogue name
    assert [t.name for t in fig.data] == ["synthetic (small) L1 H2", "synthetic (other) L1 H2"]
    fig = cb.update_compare_curve(catalog, "small", "other", "u_curve_attention", {"layer": 1, "head": 2})
    assert [t.name for t in fig.data] == ["synthetic (small) baseline", "synthetic (small) found_in_the_middle",
                                          "synthetic (other) baseline", "synthetic (other) found_in_the_middle"]
    assert cb.update_compare_curve(catalog, "small", "other", None, None).data == ()
    assert cb.update_compare_curve(catalog, "small", "nope", "u_curve_attention", None).data == ()


def test_compare_labels_a_what_if_scan_apart_from_its_baseline():
    from posprobe.interventions import parse

    base, yarn = synthetic_scan(3, 4, seed=0), synthetic_scan(3, 4, seed=1)
    yarn.meta["intervention"] = {**parse("yarn:factor=8").to_dict(), "resolved": {"layers": "0:3"},
                                 "calibrations": []}  # what scan(intervention=...) records
    catalog = ScanCatalog.build({"base": base, "yarn": yarn})
    out = cb.update_compare(catalog, "base", ids.SCAN, None, None, "signed", None)
    assert out[:2] == ("base", "yarn")
    figure = out[6]
    assert [t.name for t in figure.data[:2]] == ["synthetic", "synthetic · yarn:factor=8"]
    titles = [a.text for a in figure.layout.annotations]
    assert titles == ["synthetic", "synthetic · yarn:factor=8", "synthetic · yarn:factor=8 − synthetic"]
    curve = cb.update_compare_curve(catalog, "base", "yarn", "attention_vs_distance", {"layer": 1, "head": 2})
    assert [t.name for t in curve.data] == ["synthetic L1 H2", "synthetic · yarn:factor=8 L1 H2"]
    many = cb.update_compare_many(catalog, ["yarn", "base"], "signed")
    assert list(many[5].data[0].y) == ["synthetic · yarn:factor=8", "synthetic"]
    assert list(many[6].data[1].x) == ["synthetic · yarn:factor=8", "synthetic"]


# --- large scans ----------------------------------------------------------------------------------------------
def test_large_scan_payloads(large_scan_dir, capsys):
    """A 1,536-head scan: the atlas figure stays small (float32 customdata, one hover template); the ranking goes as
    value lists (489 kB as DataTable records with ids, 203 kB now)."""
    catalog = ScanCatalog.build({"large": large_scan_dir})
    atlas = cb.update_atlas(catalog, "large", "signed", {"layer": 40, "head": 17})
    atlas_bytes = len(to_json_plotly(atlas))
    ranking_bytes = len(to_json_plotly(cb.update_ranking(catalog, "large", None, "signed", None)))
    head_bytes = len(to_json_plotly(cb.update_head(catalog, "large", {"layer": 40, "head": 17})))
    marker_bytes = len(json.dumps(cb.atlas_marker({"layer": 40, "head": 17})))
    with capsys.disabled():
        print(f"\n1536-head scan payloads: atlas {atlas_bytes / 1e3:.0f} kB, selection {marker_bytes} B, "
              f"ranking table {ranking_bytes / 1e3:.0f} kB, head detail {head_bytes / 1e3:.0f} kB")
    assert atlas_bytes < 250_000
    assert marker_bytes < 500
    assert ranking_bytes < 300_000
    fig = atlas[2]
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (48, 32) and z[40, 17] == pytest.approx(np.cos(40 + 0.37 * 17))


# --- pattern viewer ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pattern_catalog() -> ScanCatalog:
    from tests.app.synthetic import pattern_scan

    return ScanCatalog.build({"planted": pattern_scan(), "old": synthetic_scan(2, 4)})


def test_update_pattern_shows_the_selected_heads_pattern_and_example_picker(pattern_catalog):
    from posprobe.render.pattern_view import example_tokens, token_labels

    scan = pattern_catalog.get("planted")
    out = cb.update_pattern(pattern_catalog, "planted", {"layer": 1, "head": 2}, None, None)
    example_options, example, query_options, notes, style, figure = out
    assert [o["value"] for o in example_options] == ["text", "repeated", "needle"]
    assert example_options[1]["label"] == "repeated (47 tokens)" and example == "text"
    assert [o["label"] for o in query_options] == token_labels(example_tokens(scan, "text"))
    assert notes == [] and style == SHOWN and figure.data[0].type == "heatmap"
    assert "text: L1 H2" in figure.layout.title.text and not figure.layout.shapes
    switched = cb.update_pattern(pattern_catalog, "planted", {"layer": 1, "head": 2}, "repeated", 40)
    assert switched[1] == "repeated" and len(switched[2]) == 47
    z_text, z_rep = (np.asarray(f.data[0].z, dtype=float) for f in (figure, switched[5]))
    assert z_text.shape != z_rep.shape and z_rep[40, 17] == 1.0  # the duplicate-token head finds the twin
    assert switched[5].layout.shapes[0].y0 == 39.5  # the chosen query is outlined
    unknown = cb.update_pattern(pattern_catalog, "planted", {"layer": 1, "head": 2}, "poem", 999)
    assert unknown[1] == "text" and not unknown[5].layout.shapes  # an unknown example / query falls back
    assert serializable(switched)


def test_scan_without_examples_says_so_not_an_error(pattern_catalog):
    out = cb.update_pattern(pattern_catalog, "old", {"layer": 0, "head": 0}, None, None)
    assert out[0] == [] and out[4] == HIDDEN
    assert "stores no example attention patterns" in text_of(out[3]) and "pp-info" in str(out[3][0].className)
    query, fig = cb.update_top_keys(pattern_catalog, "old", {"layer": 0, "head": 0}, None, None, None, None)
    assert query is None and fig.data == ()
    assert cb.update_pattern(pattern_catalog, "nope", {"layer": 0, "head": 0}, None, None)[4] == HIDDEN


def test_update_top_keys_follows_clicks_and_the_query_picker(pattern_catalog):
    sel = {"layer": 0, "head": 0}  # previous-token head
    query, fig = cb.update_top_keys(pattern_catalog, "planted", sel, "text", ids.HEAD_EXAMPLE, None, None)
    assert query == 47 and list(fig.data[0].customdata) == [1]  # default: the last token
    click = {"points": [{"x": "3:a", "y": "12:b", "z": 0.0}]}
    query, fig = cb.update_top_keys(pattern_catalog, "planted", sel, "text", ids.HEAD_PATTERN_GRAPH, click, 5)
    assert query == 12 and fig.data[0].y[0].startswith("11:")
    query, fig = cb.update_top_keys(pattern_catalog, "planted", sel, "text", ids.HEAD_QUERY, click, 5)
    assert query == 5 and fig.data[0].y[0].startswith("4:")  # the picker wins when it fired
    query, _ = cb.update_top_keys(pattern_catalog, "planted", sel, "repeated", ids.HEAD_EXAMPLE, None, 300)
    assert query == 46  # out of range for the new example: its last token
    bad = {"points": [{"y": "not a label"}]}
    assert cb.update_top_keys(pattern_catalog, "planted", sel, "text", ids.HEAD_PATTERN_GRAPH, bad, 7)[0] == 7
    from posprobe.app.pages.head import query_outline

    assert query_outline(7)[0]["y0"] == 6.5 and query_outline(None) == [] and query_outline(True) == []


# --- compare N scans --------------------------------------------------------------------------------------------
def test_update_compare_many_defaults_to_every_scan(broken_dirs):
    catalog = ScanCatalog.build({"s0": synthetic_scan(3, 4, seed=0), "s1": synthetic_scan(3, 4, seed=1),
                                 "s2": synthetic_scan(3, 4, seed=2)})
    out = cb.update_compare_many(catalog, None, None)
    scan_options, selected, metric_options, metric, notes, top, agreement = out
    assert selected == ["s0", "s1", "s2"] and [o["value"] for o in scan_options] == selected
    assert metric == "planted" and notes == []
    labels = [f"synthetic ({n})" for n in selected]  # one model, no what-if: the catalogue names tell them apart
    assert list(top.data[0].y) == labels and len(top.data[0].x) == len(metric_options)
    assert list(agreement.data[1].x) == labels and np.allclose(np.asarray(agreement.data[1].z, float), 1.0)
    out = cb.update_compare_many(catalog, ["s2", "s0", "nope"], "metric_2")
    assert out[1] == ["s2", "s0"] and out[3] == "metric_2"
    assert list(out[6].data[1].x) == ["synthetic (s2)", "synthetic (s0)"]
    assert serializable(out)
    one = cb.update_compare_many(catalog, ["s1"], None)
    assert "at least two scans" in text_of(one[4]) and one[5].data == ()
    mixed = ScanCatalog.build({"a": synthetic_scan(2, 4), "b": synthetic_scan(3, 2, name="other-model"),
                               "bad": broken_dirs["version"]})
    out = cb.update_compare_many(mixed, ["a", "b", "bad"], None)
    text = text_of(out[4])
    assert "left out" in text and "format version 99" in text and "2 model(s) and 2 shape(s)" in text
    assert list(out[5].data[0].y) == ["synthetic", "other-model"]  # two models: the model names suffice
