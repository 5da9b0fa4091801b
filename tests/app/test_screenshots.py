"""Screenshots of every explorer view on real scans of Gemma 3 270M (real-model tier, needs the browser too).

Scans: the shared quick scan (`gemma_quick_scan`: head_basics + attention_entropy) and the same probes with RoPE
switched off in every layer (`disable_rope`), so the compare view shows what the ablation changes. PNGs go to
`artifacts/screenshots/` (git-ignored; CI keeps them as artifacts).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="browser tests need dash[testing] (selenium)")

from posprobe.app import create_app, ids  # noqa: E402
from tests.app.browser import click_heatmap_cell, figure, open_tab, png_size, save_full_page, wait_until  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.browser]

SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


def _save(dash_duo, name: str) -> Path:
    """Full-page PNG (the whole document, not the window), taken once every graph is drawn; checks it is whole."""
    path = save_full_page(dash_duo, SCREENSHOTS / f"{name}.png")
    page = dash_duo.driver.execute_script("return document.documentElement.scrollHeight")
    width, height = png_size(path)
    assert width == 1440 and height >= page - 2, f"{path} is {width}x{height}, the page is {page} px tall"
    return path


@pytest.fixture(scope="module")
def gemma_no_rope_scan(gemma):
    import posprobe
    from posprobe.interventions.disable_rope import disable_rope

    with disable_rope(gemma) as access:
        return posprobe.scan(access, probes=["head_basics", "attention_entropy"], budget="quick", progress=False)


def test_screenshots_of_every_view_on_gemma(dash_duo, gemma_quick_scan, gemma_no_rope_scan, tmp_path):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    scan = gemma_quick_scan
    a = scan.save(tmp_path / "gemma-3-270m")
    b = gemma_no_rope_scan.save(tmp_path / "gemma-3-270m-no-rope")
    app = create_app({"gemma-3-270m": a, "gemma-3-270m (RoPE disabled)": b})
    dash_duo.start_server(app)
    info = scan.info

    metric = "previous_token_score"
    wait_until(lambda: figure(dash_duo, ids.ATLAS_GRAPH), what="the atlas")
    dash_duo.select_dcc_dropdown(f"#{ids.ATLAS_METRIC}", value=metric)
    wait_until(lambda: figure(dash_duo, ids.ATLAS_GRAPH)["title"].startswith(metric), what=f"atlas of {metric}")
    top = scan.rank(metric, top=1).iloc[0]
    layer, head = int(top["layer"]), int(top["head"])
    click_heatmap_cell(dash_duo, ids.ATLAS_GRAPH, layer, head, info.n_layers, info.n_heads)
    dash_duo.wait_for_contains_text(f"#{ids.ATLAS_PANEL}", f"L{layer} H{head}")
    wait_until(lambda: figure(dash_duo, ids.ATLAS_GRAPH)["shapes"], what="the selected head outlined")
    shots = [_save(dash_duo, "1_atlas")]

    dash_duo.find_element(f"#{ids.OPEN_HEAD}").click()
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_TITLE}", f"Layer {layer}, head {head}")
    wait_until(lambda: len(dash_duo.find_elements(f"#{ids.HEAD_CURVES} .js-plotly-plot")) >= 3, what="head curves")
    dash_duo.wait_for_element(f"#{ids.RANKING_TABLE} .ag-row .ag-cell")
    shots.append(_save(dash_duo, "2_head_detail"))

    open_tab(dash_duo, "Model")
    wait_until(lambda: (figure(dash_duo, ids.MODEL_METRIC_GRAPH) or {}).get("data"), what="metric by layer")
    wait_until(lambda: (figure(dash_duo, ids.MODEL_HEADCURVE_GRAPH) or {}).get("data"), what="layer-mean curves")
    shots.append(_save(dash_duo, "3_model"))
    assert png_size(shots[-1])[1] > 1000, \
        "the model view is taller than the 1000-px window: the PNG must not be clipped"

    open_tab(dash_duo, "Compare")
    wait_until(lambda: len((figure(dash_duo, ids.COMPARE_GRAPH) or {"data": []})["data"]) == 3, what="compare")
    dash_duo.select_dcc_dropdown(f"#{ids.COMPARE_METRIC}", value="entropy_norm")
    wait_until(lambda: "entropy_norm" in figure(dash_duo, ids.COMPARE_GRAPH)["title"], what="compare entropy_norm")
    dash_duo.wait_for_element(f"#{ids.COMPARE_TABLE} .ag-row .ag-cell")
    wait_until(lambda: (figure(dash_duo, ids.COMPARE_CURVE_GRAPH) or {}).get("data"), what="compare curve")
    shots.append(_save(dash_duo, "4_compare"))

    for path in shots:
        assert path.stat().st_size > 20_000, f"{path} looks empty"


def test_screenshot_of_the_pattern_view_on_gemma(dash_duo, gemma, tmp_path):
    """Gemma 3 270M's top previous-token head on its stored examples: the heatmap, a row's top keys, a PNG."""
    import posprobe
    from posprobe.render.pattern_view import top_keys

    scan = posprobe.scan(gemma, probes=["head_basics", "pattern_examples"], budget="quick", progress=False)
    top = scan.rank("previous_token_score", top=1).iloc[0]
    layer, head = int(top["layer"]), int(top["head"])
    query = 60
    assert top_keys(scan, layer, head, "text", query, k=1)["key"].tolist() == [query - 1]
    app = create_app({"gemma-3-270m": scan.save(tmp_path / "gemma-3-270m")})
    dash_duo.start_server(app)
    open_tab(dash_duo, "Head detail")
    dash_duo.select_dcc_dropdown(f"#{ids.HEAD_LAYER}", value=f"L{layer}")
    dash_duo.select_dcc_dropdown(f"#{ids.HEAD_HEAD}", value=f"H{head}")
    dash_duo.wait_for_contains_text(f"#{ids.HEAD_TITLE}", f"Layer {layer}, head {head}")
    wait_until(lambda: (figure(dash_duo, ids.HEAD_PATTERN_GRAPH) or {}).get("title", "").startswith(
        f"text: L{layer} H{head}"), what="the pattern of the top previous-token head")
    n = len(scan.tables["pattern_examples.tokens"].query("example == 0"))
    click_heatmap_cell(dash_duo, ids.HEAD_PATTERN_GRAPH, query, query - 1, n, n)
    wait_until(lambda: f"top keys of query {query}:" in (figure(dash_duo, ids.HEAD_TOPKEYS_GRAPH) or {}).get(
        "title", ""), what=f"the top keys of query {query}")
    path = _save(dash_duo, "5_pattern_view_gemma")
    assert path.stat().st_size > 20_000
