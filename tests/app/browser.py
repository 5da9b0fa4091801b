"""Helpers for driving the explorer in a real browser (used by the browser tests and the screenshot test).

Owns small selenium helpers: wait for a condition, read a Plotly figure out of the page, click a heatmap cell at a
given (layer, head), open a tab, wait for a downloaded file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from selenium.webdriver.common.action_chains import ActionChains

from app import ids


def wait_until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; raise AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the DOM is re-rendered under us; retry
            last_error = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_error})"
                                                                                   if last_error else ""))


def figure(dash_duo: Any, graph_id: str) -> dict[str, Any] | None:
    """The live Plotly figure ({data: [{type, name}], layout: {title, shapes}}) of a dcc.Graph, or None."""
    return dash_duo.driver.execute_script(
        """
        const gd = document.querySelector(`#${arguments[0]} .js-plotly-plot`);
        if (!gd || !gd.data) return null;
        const title = gd.layout && gd.layout.title ? (gd.layout.title.text || gd.layout.title) : '';
        return {data: gd.data.map(t => ({type: t.type, name: t.name || ''})), title: String(title),
                shapes: (gd.layout.shapes || []).map(s => ({x0: s.x0, y0: s.y0}))};
        """, graph_id)


def click_heatmap_cell(dash_duo: Any, graph_id: str, layer: int, head: int, n_layers: int, n_heads: int) -> None:
    """Click the centre of cell (layer, head) of an atlas heatmap (layers top to bottom, heads left to right)."""
    driver = dash_duo.driver
    drag = dash_duo.find_element(f"#{graph_id} .nsewdrag")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", drag)
    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                 "return {x: r.left, y: r.top, w: r.width, h: r.height};", drag)
    x = rect["x"] + (head + 0.5) / n_heads * rect["w"]
    y = rect["y"] + (layer + 0.5) / n_layers * rect["h"]
    ActionChains(driver).move_to_location(int(x), int(y)).click().perform()


def open_tab(dash_duo: Any, label: str) -> None:
    """Click the view tab whose label is `label`."""
    tabs = dash_duo.find_elements(f"#{ids.TABS} .tab")
    match = [tab for tab in tabs if tab.text.strip() == label]
    assert match, f"no tab labelled {label!r} (tabs: {[t.text for t in tabs]})"
    match[0].click()


def wait_for_download(folder: str | Path, suffix: str = ".csv", timeout: float = 20.0) -> Path:
    """The first completed file with `suffix` that appears in `folder`."""
    folder = Path(folder)

    def done() -> Path | None:
        files = [p for p in folder.glob(f"*{suffix}") if not p.name.endswith(".crdownload")]
        return files[0] if files else None

    return wait_until(done, timeout, f"a downloaded {suffix} file in {folder}")
