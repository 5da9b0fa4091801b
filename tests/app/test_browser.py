"""The explorer in a real headless Chromium: pick a metric, click a head, see its curves, download the ranking CSV,
compare two scans, open a broken scan, and browse a 1,536-head synthetic scan.

Skipped with the reason when chromium / chromedriver / dash[testing] are missing (see conftest.py).
"""

from __future__ import annotations

import pandas as pd
import pytest

pytest.importorskip("selenium", reason="browser tests need dash[testing] (selenium)")

from app import create_app, ids  # noqa: E402
from posprobe.render.head_detail import head_curve_names, layer_curve_names  # noqa: E402
from tests.app.browser import click_heatmap_cell, figure, open_tab, wait_for_download, wait_until  # noqa: E402

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def tiny_seed1_dir(tmp_path_factory):
    """A second tiny-model scan (another seed, the two cheap probes) to compare against."""
    import posprobe

    scan = posprobe.scan("tiny-rope", probes=["head_basics", "attention_entropy"], budget="quick", seed=1,
                         progress=False)
    return scan.save(tmp_path_factory.mktemp("scans") / "tiny-rope-seed1")


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

    # ranking table: sorted by the atlas metric; download the CSV of all heads, then of a filtered view
    dash_duo.wait_for_element(f"#{ids.RANKING_TABLE} td")
    dash_duo.find_element(f"#{ids.RANKING_DOWNLOAD_BUTTON}").click()
    csv_path = wait_for_download(dash_duo.download_path)
    ranking = pd.read_csv(csv_path)
    assert len(ranking) == n_layers * n_heads
    assert list(ranking["rank"]) == list(range(1, len(ranking) + 1))
    values = ranking[metric].dropna().to_numpy()
    assert (values[:-1] >= values[1:]).all(), "the CSV is sorted by the metric, highest first"
    pd.testing.assert_frame_equal(ranking, tiny_scan.rank(metric, top=None), check_dtype=False, atol=1e-9)
    csv_path.unlink()

    filter_cell = dash_duo.find_element(f'#{ids.RANKING_TABLE} th.dash-filter[data-dash-column="layer"] input')
    filter_cell.send_keys("0\n")
    wait_until(lambda: len(dash_duo.find_elements(f"#{ids.RANKING_TABLE} tbody tr td.dash-cell")) > 0
               and all(c.text == "0" for c in dash_duo.find_elements(
                   f'#{ids.RANKING_TABLE} tbody td.dash-cell[data-dash-column="layer"]')),
               what="the ranking filtered to layer 0")
    dash_duo.find_element(f"#{ids.RANKING_DOWNLOAD_BUTTON}").click()
    filtered = pd.read_csv(wait_for_download(dash_duo.download_path))
    assert len(filtered) == n_heads and set(filtered["layer"]) == {0}

    # clicking a ranking row selects that head
    first = dash_duo.find_element(f'#{ids.RANKING_TABLE} tbody td.dash-cell[data-dash-column="head"]')
    row_head = int(first.text)
    first.click()
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_TITLE}", f"Layer 0, head {row_head}")

    # compare: A is the current scan, B the other one; three heatmaps (A, B, B - A) and a difference table
    open_tab(dash_duo, "Compare")
    wait_until(lambda: [t["type"] for t in (figure(dash_duo, ids.COMPARE_GRAPH) or {"data": []})["data"]]
               == ["heatmap"] * 3, what="the compare heatmaps")
    dash_duo.wait_for_element(f"#{ids.COMPARE_TABLE} td")
    rows = dash_duo.find_elements(f"#{ids.COMPARE_TABLE} tbody tr")
    assert len(rows) > 1
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
    assert not dash_duo.find_element(f"#{ids.VIEWS}").is_displayed()
    # the other scan still opens
    dash_duo.select_dcc_dropdown(f"#{ids.SCAN}", value="good")
    wait_until(lambda: figure(dash_duo, ids.ATLAS_GRAPH), what="the good scan's atlas")
    assert dash_duo.find_element(f"#{ids.SCAN_ERROR}").text == ""


def test_large_scan_atlas_click_and_model_view(dash_duo, large_scan_dir):
    app = create_app([large_scan_dir])
    dash_duo.start_server(app)
    wait_until(lambda: figure(dash_duo, ids.ATLAS_GRAPH), what="the 1,536-head atlas")
    click_heatmap_cell(dash_duo, ids.ATLAS_GRAPH, 40, 17, 48, 32)
    dash_duo.wait_for_contains_text(f"#{ids.ATLAS_PANEL}", "L40 H17")
    # `planted` = layer * 1000 + head: the panel shows the clicked head's own value
    dash_duo.wait_for_contains_text(f"#{ids.ATLAS_PANEL}", "4.002e+04")
    open_tab(dash_duo, "Model")
    wait_until(lambda: len(dash_duo.find_elements(".model-curve .js-plotly-plot")) == 3, what="three model curves")
    wait_until(lambda: len(dash_duo.find_elements(".position-curve .js-plotly-plot")) == 1, what="the position sweep")
    _no_console_errors(dash_duo)
