"""The explorer's callbacks: thin wiring from Dash inputs to pure `update_*` functions.

Owns `register_callbacks(app, catalog)` and one plain function per callback (`update_scan`, `update_atlas`,
`select_head`, `update_head`, `update_pattern`, `update_top_keys`, `update_ranking`, `download_ranking`,
`update_model*`, `update_compare*`, `update_compare_many`). Each takes the
catalogue plus the raw input values and returns the outputs as a tuple, so it is unit-tested without a browser. They
only read saved scans (never run a model), accept only catalogue names from the browser (never a path), and turn any
failure into a message in the page instead of a traceback. Implements no metric (docs/explorer.md).
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from dash import Input, Output, State, ctx, no_update
from dash.exceptions import PreventUpdate

from posprobe.app import ids
from posprobe.app.catalog import ScanCatalog, ScanUnavailable
from posprobe.app.pages import atlas as atlas_page
from posprobe.app.pages import compare as compare_page
from posprobe.app.pages import head as head_page
from posprobe.app.pages import model as model_page
from posprobe.app.pages.common import (
    HIDDEN,
    SHOWN,
    empty_figure,
    error_page,
    error_text,
    message,
    metric_choices,
    options,
    pick,
    scan_summary,
)
from posprobe.render.compare import (
    common_curves,
    common_metrics,
    compare_agreement,
    compare_atlas,
    compare_curve,
    compare_top_heads,
    scan_labels,
    shared_metrics,
)
from posprobe.render.model_view import head_level_curve_names, layer_mean_curve, metric_by_layer
from posprobe.render.pattern_view import has_examples, no_examples_reason, pattern, pattern_top_keys

Head = tuple[int, int]


def _as_head(value: Any) -> Head | None:
    """A (layer, head) from the selected-head store ({"layer": int, "head": int}); None if malformed."""
    if isinstance(value, dict):
        layer, head = value.get("layer"), value.get("head")
        if isinstance(layer, int) and isinstance(head, int) and not isinstance(layer, bool):
            return layer, head
    return None


def _has_head(scan: Any, key: Head | None) -> bool:
    if key is None:
        return False
    heads = scan.heads
    return bool(((heads["layer"] == key[0]) & (heads["head"] == key[1])).any())


def default_head(scan: Any, metric: str | None = None) -> Head | None:
    """The head shown before the user picks one: the top head by `metric` (or the first metric), else the first."""
    if scan.heads.empty:
        return None
    metrics = metric_choices(scan)
    metric = metric if metric in metrics else (metrics[0] if metrics else None)
    if metric is not None and scan.heads[metric].notna().any():
        top = scan.rank(metric, top=1).iloc[0]
        return int(top["layer"]), int(top["head"])
    first = scan.heads.iloc[0]
    return int(first["layer"]), int(first["head"])


# --- scan picker ----------------------------------------------------------------------------------------------
def update_scan(catalog: ScanCatalog, name: str | None) -> tuple[Any, dict[str, str], Any]:
    """(error page or None, style of the views, summary line) for the chosen scan."""
    try:
        scan = catalog.get(name)
    except ScanUnavailable as exc:
        return error_page(str(exc)), HIDDEN, ""
    return None, SHOWN, scan_summary(scan)


# --- atlas ----------------------------------------------------------------------------------------------------
def update_atlas(catalog: ScanCatalog, name: str | None, metric: str | None,
                 selected: Any) -> tuple[list[dict[str, str]], str | None, go.Figure]:
    """(metric options, metric, atlas figure). Keeps the metric across scans when the new scan has it."""
    try:
        scan = catalog.get(name)
        metrics = metric_choices(scan)
        metric = pick(metric, metrics)
        if metric is None:
            return [], None, empty_figure("This scan has no head metrics.")
        key = _as_head(selected)
        return options(metrics), metric, atlas_page.figure(scan, metric, key if _has_head(scan, key) else None)
    except ScanUnavailable:
        return [], None, empty_figure()
    except Exception as exc:
        return [], None, empty_figure(error_text(exc))


def atlas_marker(selected: Any) -> list[dict[str, Any]]:
    """The atlas `layout.shapes` outlining the selected head; merged into the figure in the browser (MERGE_SHAPES_JS)
    so a selection never re-sends the heatmap."""
    return atlas_page.marker_shapes(_as_head(selected))


MERGE_SHAPES_JS = """
function(shapes, figure) {
    if (!figure || !figure.layout) { return window.dash_clientside.no_update; }
    const layout = Object.assign({}, figure.layout, {shapes: shapes || []});
    return Object.assign({}, figure, {layout: layout});
}
"""


def update_atlas_panel(catalog: ScanCatalog, name: str | None, selected: Any) -> tuple[list[Any], bool]:
    """(side panel children, 'head detail' button disabled)."""
    try:
        scan = catalog.get(name)
        key = _as_head(selected)
        return atlas_page.head_panel(scan, key if _has_head(scan, key) else None), not _has_head(scan, key)
    except ScanUnavailable:
        return [], True
    except Exception as exc:
        return [message(error_text(exc), "error")], True


def select_head(catalog: ScanCatalog, name: str | None, trigger: str | None, click_data: Any, clicked_cell: Any,
                layer_value: Any, head_value: Any, current: Any, metric: str | None = None) -> tuple[Any, ...]:
    """Resolve the selected head from whichever input fired.

    Returns (selected store, layer dropdown value, head dropdown value, layer options, head options). An atlas
    click, a click on a ranking-grid row (its `cellClicked`, whose rowId is "layer:head") and the layer / head
    dropdowns all select; a selection that is not a head of the
    scan is ignored (the previous or default head stays).
    """
    try:
        scan = catalog.get(name)
    except ScanUnavailable:
        return None, None, None, [], []
    layer_options, head_options = head_page.head_options(scan)
    candidate: Head | None = None
    if trigger == ids.ATLAS_GRAPH and isinstance(click_data, dict) and click_data.get("points"):
        point = click_data["points"][0]
        try:
            candidate = int(point["y"]), int(point["x"])
        except (KeyError, TypeError, ValueError):
            candidate = None
    elif trigger == ids.RANKING_TABLE and isinstance(clicked_cell, dict):
        candidate = head_page.parse_row_id(clicked_cell.get("rowId"))
    elif trigger in (ids.HEAD_LAYER, ids.HEAD_HEAD) and isinstance(layer_value, int) and isinstance(head_value, int):
        candidate = layer_value, head_value
    for key in (candidate, _as_head(current)):
        if _has_head(scan, key):
            break
    else:
        key = default_head(scan, metric)
    if key is None:
        return None, None, None, layer_options, head_options
    return {"layer": key[0], "head": key[1]}, key[0], key[1], layer_options, head_options


# --- head detail ----------------------------------------------------------------------------------------------
def update_head(catalog: ScanCatalog, name: str | None, selected: Any) -> tuple[Any, list[Any], list[Any]]:
    """(title, metrics table, curve cards) for the selected head."""
    try:
        scan = catalog.get(name)
        key = _as_head(selected)
        if key is None or not _has_head(scan, key):
            return "", [], [message("Select a head in the atlas, the ranking below, or the dropdowns above.")]
        layer, head = key
        row = scan.heads[(scan.heads["layer"] == layer) & (scan.heads["head"] == head)].iloc[0]
        title = f"Layer {layer}, head {head} — kv head {row['kv_head']}, {row['layer_type']} ({scan.meta.get('model')})"
        return title, head_page.metrics_table(scan, layer, head), head_page.curve_cards(scan, layer, head)
    except ScanUnavailable:
        return "", [], []
    except Exception as exc:
        return "", [], [message(error_text(exc), "error")]


def update_pattern(catalog: ScanCatalog, name: str | None, selected: Any, example: Any,
                   query: Any) -> tuple[Any, ...]:
    """(example options, example, query options, message, section style, pattern figure) of the selected head.

    A scan without stored examples says so (and why) instead of showing an empty heatmap; `query` (the query
    picker's current value) is outlined when it is a position of the example."""
    blank: tuple[Any, ...] = ([], None, [], [], HIDDEN, empty_figure())
    try:
        scan = catalog.get(name)
        key = _as_head(selected)
        if key is None or not _has_head(scan, key):
            return blank
        if not has_examples(scan):
            return ([], None, [], [message(no_examples_reason(scan), "info")], HIDDEN, empty_figure())
        example = head_page.valid_example(scan, example)
        queries = head_page.query_options(scan, str(example))
        outline = query if isinstance(query, int) and 0 <= query < len(queries) else None
        figure = pattern(scan, key[0], key[1], example, query=outline)
        return head_page.example_options(scan), example, queries, [], SHOWN, figure
    except ScanUnavailable:
        return blank
    except Exception as exc:
        return ([], None, [], [message(error_text(exc), "error")], HIDDEN, empty_figure())


def update_top_keys(catalog: ScanCatalog, name: str | None, selected: Any, example: Any, trigger: str | None,
                    click_data: Any, query: Any) -> tuple[Any, go.Figure]:
    """(query, top-keys figure): the query is a clicked heatmap row, else the query picker's value while it is a
    position of the example, else the example's last token (the query a needle prompt asks with)."""
    try:
        scan = catalog.get(name)
        key = _as_head(selected)
        if key is None or not _has_head(scan, key) or not has_examples(scan):
            return None, empty_figure()
        example = head_page.valid_example(scan, example)
        n = len(head_page.query_options(scan, str(example)))
        clicked = head_page.clicked_query(click_data) if trigger == ids.HEAD_PATTERN_GRAPH else None
        candidate = clicked if clicked is not None else query
        if not (isinstance(candidate, int) and not isinstance(candidate, bool) and 0 <= candidate < n):
            candidate = n - 1
        return candidate, pattern_top_keys(scan, key[0], key[1], example, candidate)
    except ScanUnavailable:
        return None, empty_figure()
    except Exception as exc:
        return None, empty_figure(error_text(exc))


def _follow(trigger: str | None, leader: str | None, own: str | None, choices: list[str]) -> str | None:
    """A view's metric: its own dropdown when that fired, else the atlas metric (when the view opens, the scan
    changes or the atlas metric changes)."""
    if trigger in (ids.RANKING_METRIC, ids.MODEL_METRIC) and own in choices:
        return own
    return pick(leader, choices, default=own)


def update_ranking(catalog: ScanCatalog, name: str | None, trigger: str | None, atlas_metric: str | None,
                   metric: str | None) -> tuple[Any, ...]:
    """(metric options, metric, compact rows payload, grid columnDefs) of the ranking grid (see `head.ranking`)."""
    empty: dict[str, Any] = {"columns": [], "rows": []}
    try:
        scan = catalog.get(name)
        metrics = metric_choices(scan)
        metric = _follow(trigger, atlas_metric, metric, metrics)
        if metric is None:
            return [], None, empty, []
        rows, columns = head_page.ranking(scan, metric)
        return options(metrics), metric, rows, columns
    except ScanUnavailable:
        return [], None, empty, []
    except Exception as exc:
        return [], None, {"columns": ["error"], "rows": [[error_text(exc)]]}, [{"field": "error", "flex": 1}]


def download_ranking(catalog: ScanCatalog, name: str | None, metric: str | None,
                     row_ids: list[Any] | None) -> dict[str, Any] | None:
    """The dcc.Download payload of the ranking CSV (the grid's current filter and order, given as "layer:head" row
    ids; None = every head in ranking order), None if impossible."""
    try:
        scan = catalog.get(name)
        if metric not in metric_choices(scan):
            return None
        filename, text = head_page.ranking_csv(scan, metric, row_ids, str(name))  # get() accepted it: a name
    except ScanUnavailable:
        return None
    return {"content": text, "filename": filename, "type": "text/csv", "base64": False}


# --- model view -----------------------------------------------------------------------------------------------
def update_model(catalog: ScanCatalog, name: str | None, trigger: str | None, atlas_metric: str | None,
                 metric: str | None) -> tuple[Any, ...]:
    """(metric options, metric, metric-by-layer figure, curve sections) of the model view."""
    try:
        scan = catalog.get(name)
        metrics = metric_choices(scan)
        metric = _follow(trigger, atlas_metric, metric, metrics)
        figure = metric_by_layer(scan, metric) if metric else empty_figure("This scan has no head metrics.")
        return options(metrics), metric, figure, model_page.curve_sections(scan)
    except ScanUnavailable:
        return [], None, empty_figure(), []
    except Exception as exc:
        return [], None, empty_figure(), [message(error_text(exc), "error")]


def update_model_headcurve(catalog: ScanCatalog, name: str | None, curve: str | None) -> tuple[Any, ...]:
    """(curve options, curve, layer-mean figure, section style); the section hides when there are no head curves."""
    try:
        scan = catalog.get(name)
        names = head_level_curve_names(scan)
        curve = pick(curve, names)
        if curve is None:
            return [], None, empty_figure(), HIDDEN
        return options(names), curve, layer_mean_curve(scan, curve), SHOWN
    except ScanUnavailable:
        return [], None, empty_figure(), HIDDEN
    except Exception as exc:
        return [], None, empty_figure(error_text(exc)), SHOWN


def update_model_table(catalog: ScanCatalog, name: str | None, table: str | None) -> tuple[Any, ...]:
    """(table options, table, preview data, preview columns, section style) of the extra-tables section."""
    try:
        scan = catalog.get(name)
        names = sorted(scan.tables)
        table = pick(table, names)
        if table is None:
            return [], None, [], [], HIDDEN
        data, columns = model_page.table_preview(scan.tables[table])
        labels = {n: f"{n} ({len(scan.tables[n])} rows)" for n in names}
        return options(names, labels), table, data, columns, SHOWN
    except ScanUnavailable:
        return [], None, [], [], HIDDEN
    except Exception as exc:
        return [], None, [{"error": error_text(exc)}], [{"field": "error", "flex": 1}], SHOWN


# --- compare --------------------------------------------------------------------------------------------------
def _pair_labels(scan_a: Any, scan_b: Any, a: str | None, b: str | None) -> tuple[str, str]:
    """Figure labels of A and B: model and what-if / intervention, the catalogue name where those collide."""
    label_a, label_b = scan_labels([scan_a, scan_b], names=[str(a), str(b)])
    return label_a, label_b


def update_compare(catalog: ScanCatalog, name: str | None, trigger: str | None, a: str | None, b: str | None,
                   metric: str | None, curve: str | None) -> tuple[Any, ...]:
    """(A, B, A/B options, metric options, metric, message, figure, table data, table columns, curve options, curve).

    A follows the scan picked in the header; B defaults to the next scan of the catalogue.
    """
    names = catalog.names
    scan_options = [{"label": catalog.label(n), "value": n} for n in names]
    if trigger in (ids.SCAN, ids.TABS, None) or a not in names:
        a = name if name in names else (names[0] if names else None)
    if b not in names:
        b = next((n for n in names if n != a), a)
    blank: tuple[Any, ...] = (a, b, scan_options, [], None)
    if len(names) < 2:
        hint = message("Compare needs two scans: start the explorer with two scan directories, e.g. "
                       "posprobe app scans/a scans/b.", "info")
    else:
        hint = None
    try:
        scan_a, scan_b = catalog.get(a), catalog.get(b)
    except ScanUnavailable as exc:
        return (*blank, message(str(exc), "error"), empty_figure(), [], [], [], None)
    try:
        metrics = common_metrics(scan_a, scan_b)
        metric = pick(metric, metrics)
        labels = _pair_labels(scan_a, scan_b, a, b)
        note = compare_page.shape_note(scan_a, scan_b, (str(a), str(b)))
        notes = [m for m in (hint, message(note, "warning") if note else None) if m is not None]
        data: list[Any]
        columns: list[Any]
        if metric is None:
            notes.append(message("The two scans share no head metric.", "warning"))
            figure, data, columns = empty_figure(), [], []
        else:
            figure = compare_atlas(scan_a, scan_b, metric, labels=labels)
            data, columns = compare_page.difference_rows(scan_a, scan_b, metric)
        curves = common_curves(scan_a, scan_b)
        return (a, b, scan_options, options(metrics), metric, notes, figure, data, columns, options(curves),
                pick(curve, curves))
    except Exception as exc:
        return (*blank, message(error_text(exc), "error"), empty_figure(), [], [], [], None)


def update_compare_curve(catalog: ScanCatalog, a: str | None, b: str | None, curve: str | None,
                         selected: Any) -> go.Figure:
    """A shared curve of A and B overlaid: for per-head curves, the selected head's; else model / layer level."""
    try:
        scan_a, scan_b = catalog.get(a), catalog.get(b)
        if curve is None or curve not in common_curves(scan_a, scan_b):
            return empty_figure("The two scans share no curve." if curve is None else "")
        key = _as_head(selected)
        rows = scan_a.curves[scan_a.curves["curve"] == curve]
        if key is not None and (rows["head"] >= 0).any():
            return compare_curve(scan_a, scan_b, curve, layer=key[0], head=key[1],
                                 labels=_pair_labels(scan_a, scan_b, a, b))
        return compare_curve(scan_a, scan_b, curve, labels=_pair_labels(scan_a, scan_b, a, b))
    except ScanUnavailable:
        return empty_figure()
    except Exception as exc:
        return empty_figure(error_text(exc))


def update_compare_many(catalog: ScanCatalog, chosen: Any, metric: str | None) -> tuple[Any, ...]:
    """(scan options, selected scans, metric options, metric, message, top-heads figure, agreement figure) of the
    N-scan section: every selected scan that opens, on the metrics they all share."""
    names = catalog.names
    scan_options = [{"label": catalog.label(n), "value": n} for n in names]
    selected = compare_page.default_selection(names, chosen)
    scans, opened, notes = [], [], []
    for n in selected:
        try:
            scans.append(catalog.get(n))
            opened.append(n)
        except ScanUnavailable as exc:
            notes.append(message(f"left out: {exc}", "warning"))
    labels = scan_labels(scans, names=opened)
    if len(scans) < 2:
        notes.insert(0, message("The N-scan comparison needs at least two scans that open: select them above, or "
                                "start the explorer with more, e.g. posprobe app scans/ (a directory of scans).",
                                "info"))
        return scan_options, selected, [], None, notes, empty_figure(), empty_figure()
    try:
        metrics = shared_metrics(scans)
        metric = pick(metric, metrics)
        note = compare_page.many_note(scans, labels)
        if note:
            notes.append(message(note, "warning"))
        if metric is None:
            notes.append(message("The selected scans share no head metric.", "warning"))
            return scan_options, selected, [], None, notes, empty_figure(), empty_figure()
        return (scan_options, selected, options(metrics), metric, notes,
                compare_top_heads(scans[0], scans[1:], labels=labels),
                compare_agreement(scans[0], scans[1:], metric=metric, labels=labels))
    except Exception as exc:
        return scan_options, selected, [], None, [message(error_text(exc), "error")], empty_figure(), empty_figure()


# --- wiring ---------------------------------------------------------------------------------------------------
def _only_on(view: str, tab: str | None) -> None:
    """Views compute only while their tab is shown (a 1,500-head ranking table is not sent to the atlas)."""
    if tab != view:
        raise PreventUpdate


def register_callbacks(app: Any, catalog: ScanCatalog) -> None:
    """Attach every callback to `app`; each body is one call of the pure function above (views compute only while
    their tab is shown)."""

    @app.callback(Output(ids.SCAN_ERROR, "children"), Output(ids.VIEWS, "style"), Output(ids.SCAN_SUMMARY, "children"),
                  Input(ids.SCAN, "value"))
    def _scan(name):
        return update_scan(catalog, name)

    @app.callback(Output(ids.ATLAS_METRIC, "options"), Output(ids.ATLAS_METRIC, "value"),
                  Output(ids.ATLAS_GRAPH, "figure"),
                  Input(ids.SCAN, "value"), Input(ids.ATLAS_METRIC, "value"), Input(ids.TABS, "value"),
                  State(ids.SELECTED, "data"))
    def _atlas(name, metric, tab, selected):
        _only_on("atlas", tab)
        return update_atlas(catalog, name, metric, selected)

    @app.callback(Output(ids.ATLAS_SHAPES, "data"), Input(ids.SELECTED, "data"))
    def _atlas_marker(selected):
        return atlas_marker(selected)

    # the outline is merged into the figure already in the browser: the heatmap is not sent again
    app.clientside_callback(MERGE_SHAPES_JS, Output(ids.ATLAS_GRAPH, "figure", allow_duplicate=True),
                            Input(ids.ATLAS_SHAPES, "data"), State(ids.ATLAS_GRAPH, "figure"),
                            prevent_initial_call=True)

    @app.callback(Output(ids.ATLAS_PANEL, "children"), Output(ids.OPEN_HEAD, "disabled"),
                  Input(ids.SCAN, "value"), Input(ids.SELECTED, "data"))
    def _atlas_panel(name, selected):
        return update_atlas_panel(catalog, name, selected)

    @app.callback(Output(ids.SELECTED, "data"), Output(ids.HEAD_LAYER, "value"), Output(ids.HEAD_HEAD, "value"),
                  Output(ids.HEAD_LAYER, "options"), Output(ids.HEAD_HEAD, "options"),
                  Input(ids.SCAN, "value"), Input(ids.ATLAS_GRAPH, "clickData"),
                  Input(ids.RANKING_TABLE, "cellClicked"), Input(ids.HEAD_LAYER, "value"),
                  Input(ids.HEAD_HEAD, "value"),
                  State(ids.SELECTED, "data"), State(ids.ATLAS_METRIC, "value"))
    def _select(name, click_data, clicked_cell, layer_value, head_value, current, metric):
        return select_head(catalog, name, ctx.triggered_id, click_data, clicked_cell, layer_value, head_value,
                           current, metric)

    @app.callback(Output(ids.TABS, "value"), Input(ids.OPEN_HEAD, "n_clicks"), prevent_initial_call=True)
    def _open_head(n_clicks):
        return "head" if n_clicks else no_update

    @app.callback(Output(ids.HEAD_TITLE, "children"), Output(ids.HEAD_METRICS, "children"),
                  Output(ids.HEAD_CURVES, "children"), Input(ids.SCAN, "value"), Input(ids.SELECTED, "data"),
                  Input(ids.TABS, "value"))
    def _head(name, selected, tab):
        _only_on("head", tab)
        return update_head(catalog, name, selected)

    @app.callback(Output(ids.HEAD_EXAMPLE, "options"), Output(ids.HEAD_EXAMPLE, "value"),
                  Output(ids.HEAD_QUERY, "options"), Output(ids.HEAD_PATTERN_MESSAGE, "children"),
                  Output(ids.HEAD_PATTERN_SECTION, "style"), Output(ids.HEAD_PATTERN_GRAPH, "figure"),
                  Input(ids.SCAN, "value"), Input(ids.SELECTED, "data"), Input(ids.HEAD_EXAMPLE, "value"),
                  Input(ids.TABS, "value"), State(ids.HEAD_QUERY, "value"))
    def _pattern(name, selected, example, tab, query):
        _only_on("head", tab)
        return update_pattern(catalog, name, selected, example, query)

    @app.callback(Output(ids.HEAD_QUERY, "value"), Output(ids.HEAD_TOPKEYS_GRAPH, "figure"),
                  Input(ids.SCAN, "value"), Input(ids.SELECTED, "data"), Input(ids.HEAD_EXAMPLE, "value"),
                  Input(ids.HEAD_PATTERN_GRAPH, "clickData"), Input(ids.HEAD_QUERY, "value"),
                  Input(ids.TABS, "value"))
    def _top_keys(name, selected, example, click_data, query, tab):
        _only_on("head", tab)
        return update_top_keys(catalog, name, selected, example, ctx.triggered_id, click_data, query)

    @app.callback(Output(ids.HEAD_QUERY_SHAPES, "data"), Input(ids.HEAD_QUERY, "value"))
    def _query_outline(query):
        return head_page.query_outline(query)

    # the chosen query row is outlined in the browser: a new query never re-sends the heatmap
    app.clientside_callback(MERGE_SHAPES_JS, Output(ids.HEAD_PATTERN_GRAPH, "figure", allow_duplicate=True),
                            Input(ids.HEAD_QUERY_SHAPES, "data"), State(ids.HEAD_PATTERN_GRAPH, "figure"),
                            prevent_initial_call=True)

    @app.callback(Output(ids.RANKING_METRIC, "options"), Output(ids.RANKING_METRIC, "value"),
                  Output(ids.RANKING_ROWS, "data"), Output(ids.RANKING_TABLE, "columnDefs"),
                  Input(ids.SCAN, "value"), Input(ids.ATLAS_METRIC, "value"), Input(ids.RANKING_METRIC, "value"),
                  Input(ids.TABS, "value"))
    def _ranking(name, atlas_metric, metric, tab):
        _only_on("head", tab)
        return update_ranking(catalog, name, ctx.triggered_id, atlas_metric, metric)

    # rows travel as lists and become the grid's records in the browser (a third of the bytes for 1,536 heads)
    app.clientside_callback(head_page.EXPAND_ROWS_JS, Output(ids.RANKING_TABLE, "rowData"),
                            Input(ids.RANKING_ROWS, "data"))

    # "Download CSV": the browser sends only the filtered, sorted row ids; the server writes the full-precision CSV
    app.clientside_callback(head_page.EXPORT_ROWS_JS, Output(ids.RANKING_EXPORT, "data"),
                            Input(ids.RANKING_DOWNLOAD_BUTTON, "n_clicks"), State(ids.RANKING_TABLE, "virtualRowData"),
                            prevent_initial_call=True)

    @app.callback(Output(ids.RANKING_DOWNLOAD, "data"), Input(ids.RANKING_EXPORT, "data"),
                  State(ids.SCAN, "value"), State(ids.RANKING_METRIC, "value"), prevent_initial_call=True)
    def _download(export, name, metric):
        payload = download_ranking(catalog, name, metric, head_page.row_ids_of(export)) if export else None
        return payload if payload is not None else no_update

    @app.callback(Output(ids.MODEL_METRIC, "options"), Output(ids.MODEL_METRIC, "value"),
                  Output(ids.MODEL_METRIC_GRAPH, "figure"), Output(ids.MODEL_CURVES, "children"),
                  Input(ids.SCAN, "value"), Input(ids.ATLAS_METRIC, "value"), Input(ids.MODEL_METRIC, "value"),
                  Input(ids.TABS, "value"))
    def _model(name, atlas_metric, metric, tab):
        _only_on("model", tab)
        return update_model(catalog, name, ctx.triggered_id, atlas_metric, metric)

    @app.callback(Output(ids.MODEL_HEADCURVE, "options"), Output(ids.MODEL_HEADCURVE, "value"),
                  Output(ids.MODEL_HEADCURVE_GRAPH, "figure"), Output(ids.MODEL_HEADCURVE_SECTION, "style"),
                  Input(ids.SCAN, "value"), Input(ids.MODEL_HEADCURVE, "value"), Input(ids.TABS, "value"))
    def _model_headcurve(name, curve, tab):
        _only_on("model", tab)
        return update_model_headcurve(catalog, name, curve)

    @app.callback(Output(ids.MODEL_TABLE, "options"), Output(ids.MODEL_TABLE, "value"),
                  Output(ids.MODEL_TABLE_VIEW, "rowData"), Output(ids.MODEL_TABLE_VIEW, "columnDefs"),
                  Output(ids.MODEL_TABLE_SECTION, "style"), Input(ids.SCAN, "value"), Input(ids.MODEL_TABLE, "value"),
                  Input(ids.TABS, "value"))
    def _model_table(name, table, tab):
        _only_on("model", tab)
        return update_model_table(catalog, name, table)

    @app.callback(Output(ids.COMPARE_A, "value"), Output(ids.COMPARE_B, "value"), Output(ids.COMPARE_A, "options"),
                  Output(ids.COMPARE_METRIC, "options"), Output(ids.COMPARE_METRIC, "value"),
                  Output(ids.COMPARE_MESSAGE, "children"), Output(ids.COMPARE_GRAPH, "figure"),
                  Output(ids.COMPARE_TABLE, "rowData"), Output(ids.COMPARE_TABLE, "columnDefs"),
                  Output(ids.COMPARE_CURVE, "options"), Output(ids.COMPARE_CURVE, "value"),
                  Input(ids.SCAN, "value"), Input(ids.COMPARE_A, "value"), Input(ids.COMPARE_B, "value"),
                  Input(ids.COMPARE_METRIC, "value"), Input(ids.TABS, "value"), State(ids.COMPARE_CURVE, "value"))
    def _compare(name, a, b, metric, tab, curve):
        _only_on("compare", tab)
        return update_compare(catalog, name, ctx.triggered_id, a, b, metric, curve)

    @app.callback(Output(ids.COMPARE_B, "options"), Input(ids.COMPARE_A, "options"))
    def _compare_b_options(scan_options):
        return scan_options

    @app.callback(Output(ids.COMPARE_CURVE_GRAPH, "figure"), Input(ids.COMPARE_A, "value"),
                  Input(ids.COMPARE_B, "value"), Input(ids.COMPARE_CURVE, "value"), Input(ids.SELECTED, "data"),
                  Input(ids.TABS, "value"))
    def _compare_curve(a, b, curve, selected, tab):
        _only_on("compare", tab)
        return update_compare_curve(catalog, a, b, curve, selected)

    @app.callback(Output(ids.COMPARE_SCANS, "options"), Output(ids.COMPARE_SCANS, "value"),
                  Output(ids.COMPARE_N_METRIC, "options"), Output(ids.COMPARE_N_METRIC, "value"),
                  Output(ids.COMPARE_N_MESSAGE, "children"), Output(ids.COMPARE_TOP_GRAPH, "figure"),
                  Output(ids.COMPARE_AGREEMENT_GRAPH, "figure"),
                  Input(ids.COMPARE_SCANS, "value"), Input(ids.COMPARE_N_METRIC, "value"), Input(ids.TABS, "value"))
    def _compare_many(chosen, metric, tab):
        _only_on("compare", tab)
        return update_compare_many(catalog, chosen, metric)
