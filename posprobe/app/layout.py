"""The explorer's page: header with the scan picker, the error page slot, and the four view tabs.

Owns `build_layout(catalog)` (called on every page load, so scans newly saved into a scan root appear) and the page
template with its stylesheet (inline, so the app needs no asset files and no network). Implements no metric
(docs/explorer.md).
"""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from posprobe.app import ids
from posprobe.app.catalog import ScanCatalog
from posprobe.app.pages import atlas, compare, head, model

TABS = (("atlas", "Head atlas", atlas), ("head", "Head detail", head), ("model", "Model", model),
        ("compare", "Compare", compare))

STYLE = """
:root { --pp-accent: #e4572e; --pp-ink: #1f2430; --pp-muted: #6b7280; --pp-line: #e5e7eb; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--pp-ink);
       margin: 0; background: #fafafa; }
.pp-header { display: flex; align-items: center; gap: 18px; padding: 10px 18px; background: white;
             border-bottom: 1px solid var(--pp-line); flex-wrap: wrap; }
.pp-header h1 { font-size: 20px; margin: 0; white-space: nowrap; }
.pp-header h1 span { color: var(--pp-accent); }
.pp-summary { font-size: 13px; color: var(--pp-muted); line-height: 1.45; }
.pp-summary .pp-model { color: var(--pp-ink); font-weight: 600; }
.pp-skipped { color: #9a6700; }
.pp-body { padding: 0 18px 30px 18px; }
.pp-view { padding-top: 10px; }
.pp-controls { display: flex; align-items: center; gap: 10px; margin: 8px 0; flex-wrap: wrap; }
.pp-controls label { font-size: 13px; color: var(--pp-muted); }
.pp-dropdown { width: 300px; font-size: 14px; }
.pp-dropdown.pp-small { width: 110px; }
.pp-dropdown.pp-multi { width: 520px; }
.pp-hint { font-size: 12px; color: var(--pp-muted); }
.pp-row { display: flex; gap: 16px; align-items: flex-start; }
.pp-main { flex: 1 1 auto; min-width: 0; }
.pp-side { flex: 0 0 330px; background: white; border: 1px solid var(--pp-line); border-radius: 6px; padding: 10px;
           max-height: 85vh; overflow-y: auto; }
.pp-side.pp-wide { flex-basis: 430px; }
.pp-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 12px; }
.pp-card { background: white; border: 1px solid var(--pp-line); border-radius: 6px; padding: 4px; }
.pp-section { font-size: 16px; margin: 18px 0 6px 0; }
.pp-probe { font-size: 13px; margin: 10px 0 4px 0; color: var(--pp-muted); text-transform: uppercase;
            letter-spacing: 0.04em; }
.pp-title { font-size: 18px; margin: 6px 0; }
.pp-head-name { margin: 0 0 2px 0; }
.pp-sub { font-size: 12px; color: var(--pp-muted); margin-bottom: 6px; }
.pp-table { border-collapse: collapse; font-size: 12.5px; width: 100%; }
.pp-table td, .pp-table th { padding: 2px 6px; border-bottom: 1px solid var(--pp-line); text-align: left; }
.pp-num { text-align: right !important; font-variant-numeric: tabular-nums; }
.pp-rank { color: var(--pp-muted); white-space: nowrap; }
.pp-button { margin-top: 8px; padding: 6px 12px; border: 1px solid var(--pp-accent); background: var(--pp-accent);
             color: white; border-radius: 5px; cursor: pointer; font-size: 13px; }
.pp-button:disabled { background: #ddd; border-color: #ddd; color: #888; cursor: default; }
.pp-message { padding: 8px 12px; border-radius: 5px; margin: 8px 0; font-size: 13px; }
.pp-info { background: #eef2ff; color: #3730a3; }
.pp-warning { background: #fff7e6; color: #8a5a00; }
.pp-error { background: #fdecea; color: #8f1d14; }
.pp-error-page { margin: 30px auto; max-width: 820px; background: white; border: 1px solid #f3c2bc;
                 border-left: 5px solid var(--pp-accent); border-radius: 6px; padding: 14px 22px; }
.pp-error-page h2 { margin-top: 4px; }
.pp-grid-table { --ag-font-family: inherit; --ag-font-size: 13px; --ag-accent-color: var(--pp-accent);
                 --ag-selected-row-background-color: #fde8e1; margin-bottom: 8px; }
.pp-grid-table .ag-header-cell.pp-ranked { background: #fde8e1; }
.pp-grid-table .ag-cell.pp-ranked { font-weight: 600; }
.pp-grid-table .ag-row { cursor: pointer; }
.pp-error-text { font-family: ui-monospace, Menlo, monospace; font-size: 13px; white-space: pre-wrap; }
"""

INDEX = """<!DOCTYPE html>
<html>
    <head>
        {%metas%}
        <title>{%title%}</title>
        {%favicon%}
        {%css%}
        <style>""" + STYLE + """</style>
    </head>
    <body>
        {%app_entry%}
        <footer>
            {%config%}
            {%scripts%}
            {%renderer%}
        </footer>
    </body>
</html>"""


def build_layout(catalog: ScanCatalog) -> html.Div:
    """The whole page. The scan dropdown lists the catalogue's names only (nothing else can be opened)."""
    catalog.refresh()
    names = catalog.names
    header = html.Header(className="pp-header", children=[
        html.H1(["pos", html.Span("probe"), " explorer"]),
        dcc.Dropdown(id=ids.SCAN, options=[{"label": catalog.label(n), "value": n} for n in names],
                     value=names[0] if names else None, clearable=False, className="pp-dropdown",
                     placeholder="no scans"),
        html.Div(id=ids.SCAN_SUMMARY, className="pp-summary"),
    ])
    tab_style = {"padding": "8px 12px", "fontSize": "14px"}
    selected = {**tab_style, "borderTop": "3px solid #e4572e", "fontWeight": "600"}
    tabs = dcc.Tabs(id=ids.TABS, value="atlas", style={"height": "42px", "marginTop": "8px"}, children=[
        dcc.Tab(label=label, value=value, children=module.layout(), style=tab_style, selected_style=selected)
        for value, label, module in TABS])
    body: list[Any] = [html.Div(id=ids.SCAN_ERROR), html.Div(id=ids.VIEWS, children=tabs)]
    if not names:
        body.insert(0, html.Div(className="pp-error-page", children=[
            html.H2("No scans to show"),
            html.P("Start the explorer with saved scans: posprobe app SCAN_DIR [SCAN_DIR ...], or "
                   "scan.explore() from Python. Make one with posprobe scan --out SCAN_DIR."),
        ]))
    return html.Div([header, html.Div(className="pp-body", children=body), dcc.Store(id=ids.SELECTED)])
