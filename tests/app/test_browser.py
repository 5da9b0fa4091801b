"""The explorer in a real headless Chromium: pick a metric, click a head, see its curves, download the ranking CSV,
compare two scans, open a broken scan, and browse a 1,536-head synthetic scan.

Skipped with the reason when chromium / chromedriver / dash[testing] are missing (see conftest.py).
"""

from __future__ import annotations

import pandas as pd
import pytest

pytest.importorskip("selenium", reason="browser tests need dash[testing] (selenium)")

from posprobe.app import create_app, ids  # noqa: E402
from posprobe.render.head_detail import head_curve_names, layer_curve_names  # noqa: E402
from tests.app.browser import (  # noqa: E402
    click_grid_header,
    click_grid_row,
    click_heatmap_cell,
    figure,
    filter_grid,
    grid_paging,
    grid_rows,
    open_tab,
    wait_for_download,
    wait_until,
)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def tiny_seed1_dir(tmp_path_factory):
    """A second tiny-model scan (another seed, the two cheap probes) to compare against."""
    import posprobe

    scan = posprobe.scan("tiny-rope", probes=["head_basics", "attention_entropy"], budget="quick", seed=1,
                         progress=False)
    return scan.save(tmp_path_factory.mktemp("scans") / "tiny-rope-seed1")


def _d3_4g(value: float) -> str:
    """What the grid's d3.format('.4~g') shows for a value (d3 writes a minus sign, U+2212)."""
    text = f"{value:.4g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa.rstrip('0').rstrip('.') if '.' in mantissa else mantissa}e{int(exponent):+d}"
    elif "." in text:
        text = text.rstrip("0").rstrip(".")
    return text.replace("-", "\u2212")


def _no_console_errors(dash_duo):
    errors = [e for e in dash_duo.get_logs() or []
              if e.get("level") == "SEVERE" and "favicon" not in e.get("message", "")]
    assert not errors, [e["message"] for e in errors]


def test_pick_metric_click_head_curves_download_compare(dash_duo, tiny_scan_dir, tiny_scan, tiny_seed1_dir):
    app = create_app([tiny_scan_dir, tiny_seed1_dir])
    dash_duo.start_server(app)
    n_layers, n_heads = tiny_scan.info.n_layers, tiny_scan.info.n_heads

    # atlas: every numeric metric of the scan is offered; picking one recolours the heatmap
    wait_until(lambda: figure(dash_duo, ids.ATLAS_GRAPH), what="the atlas figure")
    metric = "sink_mass" if "sink_mass" in tiny_scan.metrics else tiny_scan.metrics[-1]
    dash_duo.select_dcc_dropdown(f"#{ids.ATLAS_METRIC}", value=metric)
    wait_until(lambda: figure(dash_duo, ids.ATLAS_GRAPH)["title"].startswith(metric),
               what=f"atlas coloured by {metric}")
    assert figure(dash_duo, ids.ATLAS_GRAPH)["data"][0]["type"] == "heatmap"

    # click a head: the side panel shows it, the atlas outlines it, the button opens its detail
    layer, head = n_layers - 1, 2
    click_heatmap_cell(dash_duo, ids.ATLAS_GRAPH, layer, head, n_layers, n_heads)
    dash_duo.wait_for_contains_text(f"#{ids.ATLAS_PANEL}", f"L{layer} H{head}")
    wait_until(lambda: figure(dash_duo, ids.ATLAS_GRAPH)["shapes"] == [{"x0": head - 0.5, "y0": layer - 0.5}],
               what="the selected head outlined on the atlas")
    dash_duo.find_element(f"#{ids.OPEN_HEAD}").click()
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_TITLE}", f"Layer {layer}, head {head}")

    # head detail: one graph per curve the scan holds for this head (and its layer), and nothing else
    expected = head_curve_names(tiny_scan, layer, head) + layer_curve_names(tiny_scan, layer)
    assert expected, "the tiny scan should hold per-head curves"

    def shown_curves():
        cards = dash_duo.find_elements(f"#{ids.HEAD_CURVES} .head-curve")
        plots = dash_duo.find_elements(f"#{ids.HEAD_CURVES} .head-curve .js-plotly-plot")
        return [c.get_attribute("data-curve") for c in cards] if len(plots) == len(cards) else None

    assert wait_until(lambda: shown_curves() == expected and shown_curves(), what=f"curves {expected}") == expected
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_METRICS}", metric)

    # ranking grid: in ranking order of the atlas metric, formatted to 4 significant digits
    ranked = tiny_scan.rank(metric, top=None)
    expected_ids = [f"{a}:{b}" for a, b in zip(ranked["layer"], ranked["head"])][:min(15, n_layers * n_heads)]
    shown = wait_until(lambda: (rows := grid_rows(dash_duo, ids.RANKING_TABLE))
                       and [r["_id"] for r in rows] == expected_ids and rows,
                       what=f"the ranking grid's first page in {metric} order")
    assert shown[0][metric] == _d3_4g(ranked[metric].iloc[0]) and shown[0]["rank"] == "1"
    assert grid_paging(dash_duo, ids.RANKING_TABLE).endswith(f"of {n_layers * n_heads}")

    # download the CSV of all heads (full precision, ranking order)
    dash_duo.find_element(f"#{ids.RANKING_DOWNLOAD_BUTTON}").click()
    csv_path = wait_for_download(dash_duo.download_path)
    ranking = pd.read_csv(csv_path)
    assert len(ranking) == n_layers * n_heads
    assert list(ranking["rank"]) == list(range(1, len(ranking) + 1))
    values = ranking[metric].dropna().to_numpy()
    assert (values[:-1] >= values[1:]).all(), "the CSV is sorted by the metric, highest first"
    pd.testing.assert_frame_equal(ranking, ranked, check_dtype=False, atol=1e-9)
    csv_path.unlink()

    # sort: clicking the "head" header sorts ascending, again descending; the CSV follows the grid's order
    click_grid_header(dash_duo, ids.RANKING_TABLE, "head")
    wait_until(lambda: [r["head"] for r in grid_rows(dash_duo, ids.RANKING_TABLE)][:n_layers] == ["0"] * n_layers,
               what="the ranking sorted by head, ascending")
    click_grid_header(dash_duo, ids.RANKING_TABLE, "head")
    top = str(n_heads - 1)
    wait_until(lambda: [r["head"] for r in grid_rows(dash_duo, ids.RANKING_TABLE)][:n_layers] == [top] * n_layers,
               what="the ranking sorted by head, descending")

    # filter: layer = 0 in the floating filter; the CSV keeps exactly the filtered rows in the grid's order
    filter_grid(dash_duo, ids.RANKING_TABLE, "layer", "0")
    wait_until(lambda: {r["layer"] for r in grid_rows(dash_duo, ids.RANKING_TABLE)} == {"0"}
               and len(grid_rows(dash_duo, ids.RANKING_TABLE)) == n_heads, what="the ranking filtered to layer 0")
    dash_duo.find_element(f"#{ids.RANKING_DOWNLOAD_BUTTON}").click()
    filtered = pd.read_csv(wait_for_download(dash_duo.download_path))
    assert len(filtered) == n_heads and set(filtered["layer"]) == {0}
    assert list(filtered["head"]) == list(range(n_heads - 1, -1, -1)), "the CSV keeps the grid's sort (head, desc)"

    # clicking a ranking row selects that head: the head detail view follows
    wait_until(lambda: grid_rows(dash_duo, ids.RANKING_TABLE)[-1]["_id"] == "0:0",
               what="the filtered grid's last row L0 H0")
    click_grid_row(dash_duo, ids.RANKING_TABLE, "0:0")
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_TITLE}", "Layer 0, head 0")
    wait_until(lambda: dash_duo.find_element(f"#{ids.HEAD_LAYER}").text == "L0"
               and dash_duo.find_element(f"#{ids.HEAD_HEAD}").text == "H0", what="the layer / head pickers at L0 H0")
    click_grid_row(dash_duo, ids.RANKING_TABLE, f"0:{n_heads - 1}", column=metric)
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_TITLE}", f"Layer 0, head {n_heads - 1}")

    # compare: A is the current scan, B the other one; three heatmaps (A, B, B - A) and a difference table
    open_tab(dash_duo, "Compare")
    wait_until(lambda: [t["type"] for t in (figure(dash_duo, ids.COMPARE_GRAPH) or {"data": []})["data"]]
               == ["heatmap"] * 3, what="the compare heatmaps")
    def differences():
        rows = grid_rows(dash_duo, ids.COMPARE_TABLE)
        return [abs(float(r["B − A"].replace("\u2212", "-"))) for r in rows] if len(rows) > 1 else None

    wait_until(lambda: (d := differences()) and d == sorted(d, reverse=True),
               what="the difference grid, largest |B - A| first")
    wait_until(lambda: figure(dash_duo, ids.COMPARE_CURVE_GRAPH) and figure(dash_duo, ids.COMPARE_CURVE_GRAPH)["data"],
               what="a shared curve overlaid")

    # model view opens and shows the head metric by layer
    open_tab(dash_duo, "Model")
    wait_until(lambda: figure(dash_duo, ids.MODEL_METRIC_GRAPH) and figure(dash_duo, ids.MODEL_METRIC_GRAPH)["data"],
               what="metric by layer")
    _no_console_errors(dash_duo)


def test_broken_scan_shows_error_page(dash_duo, broken_dirs, synthetic_dir):
    app = create_app({"broken": broken_dirs["garbage"], "good": synthetic_dir})
    dash_duo.start_server(app)
    dash_duo.wait_for_contains_text(f"#{ids.SCAN_ERROR}", "This scan cannot be opened")
    text = dash_duo.find_element(f"#{ids.SCAN_ERROR}").text
    assert "corrupted" in text and "Traceback" not in text
    wait_until(lambda: not dash_duo.find_element(f"#{ids.VIEWS}").is_displayed(), what="the views hidden")
    # the other scan still opens
    dash_duo.select_dcc_dropdown(f"#{ids.SCAN}", value="good")
    wait_until(lambda: figure(dash_duo, ids.ATLAS_GRAPH), what="the good scan's atlas")
    wait_until(lambda: dash_duo.find_element(f"#{ids.SCAN_ERROR}").text == "", what="the error banner cleared")


def test_large_scan_atlas_ranking_grid_and_model_view(dash_duo, large_scan_dir):
    app = create_app([large_scan_dir])
    dash_duo.start_server(app)
    wait_until(lambda: figure(dash_duo, ids.ATLAS_GRAPH), what="the 1,536-head atlas")
    click_heatmap_cell(dash_duo, ids.ATLAS_GRAPH, 40, 17, 48, 32)
    dash_duo.wait_for_contains_text(f"#{ids.ATLAS_PANEL}", "L40 H17")
    # `planted` = layer * 1000 + head: the panel shows the clicked head's own value
    dash_duo.wait_for_contains_text(f"#{ids.ATLAS_PANEL}", "4.002e+04")

    # head detail: the ranking grid pages through 1,536 heads; sort by a column, click a row
    dash_duo.find_element(f"#{ids.OPEN_HEAD}").click()
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_TITLE}", "Layer 40, head 17")
    wait_until(lambda: [r["_id"] for r in grid_rows(dash_duo, ids.RANKING_TABLE)][:2] == ["47:31", "47:30"],
               what="the 1,536-head ranking by `planted`")
    wait_until(lambda: len(grid_rows(dash_duo, ids.RANKING_TABLE)) == 15
               and grid_paging(dash_duo, ids.RANKING_TABLE).replace(",", "").endswith("of 1536")
               and grid_rows(dash_duo, ids.RANKING_TABLE)[0]["planted"] == "4.703e+4",
               what="page 1 of 1,536 heads, 15 rows, top planted 4.703e+4")
    click_grid_header(dash_duo, ids.RANKING_TABLE, "planted")  # ascending: the lowest `planted` first
    wait_until(lambda: [r["_id"] for r in grid_rows(dash_duo, ids.RANKING_TABLE)][:3] == ["0:0", "0:1", "0:2"],
               what="the ranking sorted by planted, ascending")
    click_grid_row(dash_duo, ids.RANKING_TABLE, "0:2")
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_TITLE}", "Layer 0, head 2")
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_METRICS}", "planted")

    open_tab(dash_duo, "Model")
    wait_until(lambda: len(dash_duo.find_elements(".model-curve .js-plotly-plot")) == 3, what="three model curves")
    wait_until(lambda: len(dash_duo.find_elements(".position-curve .js-plotly-plot")) == 1, what="the position sweep")
    _no_console_errors(dash_duo)
