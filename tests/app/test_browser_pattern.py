"""The pattern viewer and the N-scan compare in a real headless Chromium: hover text, example switch, top keys on
click, a screenshot whose pixels are checked, and the top-heads / agreement maps over three scans.

Scan: `tests.app.synthetic.pattern_scan` (planted heads: H0 previous token, H1 sink, H2 duplicate token, H3
uniform), so every value on screen is known. Skipped with the reason when chromium / chromedriver / dash[testing]
are missing (see conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="browser tests need dash[testing] (selenium)")

from posprobe.app import create_app, ids  # noqa: E402
from tests.app.browser import (  # noqa: E402
    click_heatmap_cell,
    figure,
    heatmap_values,
    hover_text,
    open_tab,
    png_colours,
    png_size,
    save_full_page,
    wait_until,
)
from tests.app.synthetic import pattern_scan, synthetic_scan  # noqa: E402

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


@pytest.fixture(scope="module")
def pattern_dir(tmp_path_factory):
    return pattern_scan().save(tmp_path_factory.mktemp("scans") / "planted-patterns")


def _blues(colours: dict[tuple[int, int, int], int]) -> int:
    """Distinct colours of the 'Blues' scale (blue clearly above red) in a screenshot."""
    return sum(1 for (r, g, b) in colours if b > r + 25 and b > 90)


def _no_console_errors(dash_duo):
    errors = [e for e in dash_duo.get_logs() or []
              if e.get("level") == "SEVERE" and "favicon" not in e.get("message", "")]
    assert not errors, [e["message"] for e in errors]


def test_pattern_view_hover_example_switch_top_keys_and_screenshot(dash_duo, pattern_dir):
    scan = pattern_scan()
    dash_duo.start_server(create_app([pattern_dir]))
    open_tab(dash_duo, "Head detail")
    dash_duo.select_dcc_dropdown(f"#{ids.HEAD_LAYER}", value="L1")
    dash_duo.select_dcc_dropdown(f"#{ids.HEAD_HEAD}", value="H2")
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_TITLE}", "Layer 1, head 2")
    text = wait_until(lambda: (v := heatmap_values(dash_duo, ids.HEAD_PATTERN_GRAPH)) and
                      v["title"].startswith("text: L1 H2") and v, what="the pattern of L1 H2 on the text example")
    n = len(text["x"])
    assert n == 48 and text["x"] == text["y"] and text["x"][0].startswith("0:")

    # hover: the label names the query token, the key token, the weight and the distance
    # (a stored cell off the diagonal: the duplicate-token head attends to an earlier copy of the query's token)
    query, key = next((q, k) for q in range(10, n) for k in range(q) if text["z"][q][k] is not None)
    weight = text["z"][query][key]
    assert scan.tables["pattern_examples.tokens"].query("example == 0")["token"].iloc[query] == \
        scan.tables["pattern_examples.tokens"].query("example == 0")["token"].iloc[key]
    click_heatmap_cell(dash_duo, ids.HEAD_PATTERN_GRAPH, query, key, n, n, click=False)
    label = wait_until(lambda: (t := hover_text(dash_duo, ids.HEAD_PATTERN_GRAPH)) and "distance" in t and t,
                       what="the pattern's hover label")
    assert f"query {text['y'][query]}" in label and f"key {text['x'][key]}" in label, label
    assert f"weight {weight:.4f}" in label and f"distance {query - key}" in label, label
    shot_text = dash_duo.find_element(f"#{ids.HEAD_PATTERN_GRAPH} .js-plotly-plot").screenshot_as_png

    # switch the example: the heatmap is redrawn with the repeated block (47 tokens; the twin 23 tokens back)
    dash_duo.select_dcc_dropdown(f"#{ids.HEAD_EXAMPLE}", value="repeated (47 tokens)")
    repeated = wait_until(lambda: (v := heatmap_values(dash_duo, ids.HEAD_PATTERN_GRAPH)) and
                          v["title"].startswith("repeated: L1 H2") and v, what="the repeated-block pattern")
    assert len(repeated["x"]) == 47 and repeated["z"][40][17] == 1.0 and repeated["z"] != text["z"]

    # click a row: the top-keys strip shows that query's keys
    click_heatmap_cell(dash_duo, ids.HEAD_PATTERN_GRAPH, 40, 17, 47, 47)
    wait_until(lambda: "top keys of query 40:" in (figure(dash_duo, ids.HEAD_TOPKEYS_GRAPH) or {}).get("title", ""),
               what="the top keys of query 40")
    bars = dash_duo.driver.execute_script(
        f"return Array.from(document.querySelector('#{ids.HEAD_TOPKEYS_GRAPH} .js-plotly-plot').data[0].y);")
    assert bars[0].startswith("17:"), bars
    wait_until(lambda: heatmap_values(dash_duo, ids.HEAD_PATTERN_GRAPH)["shapes"] == [{"y0": 39.5, "y1": 40.5}],
               what="query 40 outlined on the heatmap")
    wait_until(lambda: dash_duo.find_element(f"#{ids.HEAD_QUERY}").text.startswith("40:"),
               what="the query picker at 40")

    # the screenshot: the heatmap is drawn in many shades of the colour scale, and the two examples differ
    shot_repeated = dash_duo.find_element(f"#{ids.HEAD_PATTERN_GRAPH} .js-plotly-plot").screenshot_as_png
    assert shot_repeated != shot_text
    for shot in (shot_text, shot_repeated):
        colours = png_colours(shot)
        assert _blues(colours) >= 8, f"the heatmap shows {_blues(colours)} shades of blue"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = save_full_page(dash_duo, SCREENSHOTS / "5_pattern_view.png")
    page = dash_duo.driver.execute_script("return document.documentElement.scrollHeight")
    width, height = png_size(path)
    assert width == 1440 and height >= page - 2 and path.stat().st_size > 20_000
    assert _blues(png_colours(path.read_bytes(), step=3)) >= 8
    _no_console_errors(dash_duo)


def test_pattern_view_says_when_a_scan_stores_no_examples(dash_duo, synthetic_dir):
    dash_duo.start_server(create_app([synthetic_dir]))
    open_tab(dash_duo, "Head detail")
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_PATTERN_MESSAGE}", "stores no example attention patterns")
    assert not dash_duo.find_element(f"#{ids.HEAD_PATTERN_SECTION}").is_displayed()
    _no_console_errors(dash_duo)


def test_compare_n_scans_top_heads_and_agreement(dash_duo, tmp_path):
    dirs = [synthetic_scan(3, 4, seed=s, name=f"model-{s}").save(tmp_path / f"s{s}") for s in range(3)]
    dash_duo.start_server(create_app(dirs))
    open_tab(dash_duo, "Compare")
    top = wait_until(lambda: (v := heatmap_values(dash_duo, ids.COMPARE_TOP_GRAPH)) and len(v["y"]) == 3 and v,
                     what="the top-heads map of three scans")
    assert top["y"] == ["model-0", "model-1", "model-2"] and "planted" in top["x"]  # labelled by model
    wait_until(lambda: len((figure(dash_duo, ids.COMPARE_AGREEMENT_GRAPH) or {"data": []})["data"]) == 2,
               what="the rank agreement maps")
    dash_duo.select_dcc_dropdown(f"#{ids.COMPARE_N_METRIC}", value="signed")
    wait_until(lambda: "signed" in " ".join(dash_duo.driver.execute_script(
        f"return Array.from(document.querySelectorAll('#{ids.COMPARE_AGREEMENT_GRAPH} .gtitle, "
        f"#{ids.COMPARE_AGREEMENT_GRAPH} .annotation-text')).map(e => e.textContent);")),
        what="the agreement matrix of `signed`")
    _no_console_errors(dash_duo)
