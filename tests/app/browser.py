"""Helpers for driving the explorer in a real browser (used by the browser tests and the screenshot test).

Owns small selenium helpers: wait for a condition, read a Plotly figure out of the page, click or hover a heatmap
cell at a given (row, column), read the hover label and a heatmap's values, read and drive an AG Grid (rows shown,
header click, floating filter, row click), open a tab, wait for a downloaded file, save a full-page screenshot once
the page has settled, and decode a PNG's pixels (`png_pixels`, standard library only) so a test can check what a
screenshot shows.
"""

from __future__ import annotations

import base64
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium.webdriver.common.action_chains import ActionChains

from posprobe.app import ids


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


def click_heatmap_cell(dash_duo: Any, graph_id: str, layer: int, head: int, n_layers: int, n_heads: int,
                       click: bool = True) -> None:
    """Click (or with click=False only hover) the centre of cell (layer, head) of a heatmap whose rows run top to
    bottom and columns left to right (the atlas: layers x heads; the pattern viewer: queries x keys)."""
    driver = dash_duo.driver
    drag = dash_duo.find_element(f"#{graph_id} .nsewdrag")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", drag)
    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                 "return {x: r.left, y: r.top, w: r.width, h: r.height};", drag)
    x = rect["x"] + (head + 0.5) / n_heads * rect["w"]
    y = rect["y"] + (layer + 0.5) / n_layers * rect["h"]
    chain = ActionChains(driver).move_to_location(int(x), int(y))
    (chain.click() if click else chain).perform()


def hover_text(dash_duo: Any, graph_id: str) -> str:
    """The text of the hover label a graph shows now ("" when none)."""
    return dash_duo.driver.execute_script(
        "const l = document.querySelector(`#${arguments[0]} .hoverlayer .hovertext`);"
        "return l ? l.textContent : '';", graph_id)


def heatmap_values(dash_duo: Any, graph_id: str) -> dict[str, Any] | None:
    """A heatmap's live values: {title, x, y (axis labels), z (rows of numbers, null for gaps), shapes}."""
    return dash_duo.driver.execute_script(
        """
        const gd = document.querySelector(`#${arguments[0]} .js-plotly-plot`);
        if (!gd || !gd.data || !gd.data.length || gd.data[0].type !== 'heatmap') return null;
        const t = (gd._fullData && gd._fullData[0]) || gd.data[0];  // z decoded (figures send typed arrays)
        const title = gd.layout && gd.layout.title ? (gd.layout.title.text || gd.layout.title) : '';
        return {title: String(title), x: Array.from(t.x || []), y: Array.from(t.y || []),
                z: Array.from(t.z || []).map(r => Array.from(r).map(v => (v === null || isNaN(v)) ? null : v)),
                shapes: (gd.layout.shapes || []).map(s => ({y0: s.y0, y1: s.y1}))};
        """, graph_id)


def grid_rows(dash_duo: Any, grid_id: str) -> list[dict[str, str]]:
    """The rows an AG Grid shows (its current page, top to bottom) as {col-id: cell text, "_id": row id}."""
    return dash_duo.driver.execute_script(
        """
        const rows = Array.from(document.querySelectorAll(`#${arguments[0]} .ag-center-cols-container .ag-row`));
        rows.sort((a, b) => Number(a.getAttribute('row-index')) - Number(b.getAttribute('row-index')));
        return rows.map(r => {
            const row = {_id: r.getAttribute('row-id')};
            r.querySelectorAll('.ag-cell').forEach(c => { row[c.getAttribute('col-id')] = c.textContent; });
            return row;
        });
        """, grid_id)


def grid_paging(dash_duo: Any, grid_id: str) -> str:
    """The grid's paging summary text, e.g. "1 to 15 of 1,536"."""
    return dash_duo.find_element(f"#{grid_id} .ag-paging-row-summary-panel").text


def click_grid_header(dash_duo: Any, grid_id: str, column: str) -> None:
    """Click a column header's label (sorts by it: ascending, then descending, then unsorted)."""
    dash_duo.find_element(f'#{grid_id} .ag-header-cell[col-id="{column}"] .ag-header-cell-label').click()


def filter_grid(dash_duo: Any, grid_id: str, column: str, text: str) -> None:
    """Type into a column's floating filter (the row under the headers)."""
    box = dash_duo.find_element(f'#{grid_id} .ag-floating-filter[col-id="{column}"] input')
    box.clear()
    box.send_keys(text)


def click_grid_row(dash_duo: Any, grid_id: str, row_id: str, column: str = "head") -> None:
    """Click a cell of the row whose id is `row_id` ("layer:head" in the ranking)."""
    cell = dash_duo.find_element(f'#{grid_id} .ag-row[row-id="{row_id}"] .ag-cell[col-id="{column}"]')
    dash_duo.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", cell)
    cell.click()


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


PAGE_SETTLED_JS = """
const plots = Array.from(document.querySelectorAll('.js-plotly-plot'));
const drawn = plots.every(g => g._fullLayout && !g._transitioning && g.querySelector('.main-svg'));
const loading = document.querySelectorAll('[data-dash-is-loading="true"]').length;
return {drawn: drawn && loading === 0, height: Math.ceil(Math.max(document.documentElement.scrollHeight,
                                                                  document.body.scrollHeight))};
"""


def save_full_page(dash_duo: Any, path: str | Path, width: int = 1440, max_height: int = 12000) -> Path:
    """A PNG of the whole page, not just the window: wait until every Plotly graph is drawn and Dash is idle, then
    make the viewport as tall as the document (Chrome's device-metrics override: a headless window cannot grow past
    its screen) and repeat until the height holds (graphs redraw on resize), then capture and restore the viewport."""
    driver = dash_duo.driver
    path = Path(path)
    heights: list[int] = []
    # no hover label left over from the last click (it would cover a colour bar in the picture)
    ActionChains(driver).move_to_element(driver.find_element("css selector", "h1")).perform()
    driver.execute_script("document.querySelectorAll('.js-plotly-plot').forEach(g => {"
                          "try { window.Plotly.Fx.unhover(g); } catch (e) {} });")

    def settled() -> bool:  # plots drawn, Dash idle and the document height unchanged over three polls
        state = driver.execute_script(PAGE_SETTLED_JS)
        heights.append(int(state["height"]))
        time.sleep(0.25)
        return bool(state["drawn"]) and len(heights) >= 3 and heights[-1] == heights[-2] == heights[-3]

    height = 0
    try:
        for _ in range(4):
            heights.clear()
            wait_until(settled, timeout=30, what="plots drawn and the page height settled")
            if heights[-1] == height:
                break
            height = min(heights[-1], max_height)
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            driver.execute_script("window.dispatchEvent(new Event('resize'));")
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a PNG from its header."""
    header = Path(path).read_bytes()[:24]
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced RGB or RGBA PNG (what Chrome writes)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    if header is None:
        raise ValueError("a PNG without IHDR")
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in (2, 6) or interlace:
        raise ValueError(f"png_pixels reads 8-bit RGB / RGBA, non-interlaced PNGs; this one has depth {depth}, "
                         f"colour type {color}, interlace {interlace}")
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for r in range(height):
        kind, line = raw[r * (stride + 1)], bytearray(raw[r * (stride + 1) + 1:(r + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def png_colours(data: bytes, step: int = 2) -> dict[tuple[int, int, int], int]:
    """How often each RGB colour occurs in a PNG (every `step`-th pixel of every `step`-th row)."""
    width, _, rows = png_pixels(data)
    bpp = len(rows[0]) // width
    counts: dict[tuple[int, int, int], int] = {}
    for row in rows[::step]:
        for i in range(0, len(row), bpp * step):
            key = (row[i], row[i + 1], row[i + 2])
            counts[key] = counts.get(key, 0) + 1
    return counts
