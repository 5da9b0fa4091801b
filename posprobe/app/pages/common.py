"""Small building blocks shared by the explorer's views: messages, the error page, empty figures, options.

Owns presentation helpers only (Dash components and plain dicts): messages, the error page, empty figures, options, and
the explorer's data grids (`data_grid`, `grid_column`: dash-ag-grid with sorting, floating filters, 4-significant-digit
numbers); no callbacks, no scan loading. Implements no metric (docs/explorer.md).
"""

from __future__ import annotations

from typing import Any

import dash_ag_grid as dag
import plotly.graph_objects as go
from dash import html

from posprobe.render.heads import numeric_metrics

HIDDEN: dict[str, str] = {"display": "none"}
SHOWN: dict[str, str] = {}

# a number cell of a grid: 4 significant digits, trailing zeros trimmed, a dash when there is no value
NUMBER_FORMAT = {"function": "params.value == null ? '\u2013' : d3.format('.4~g')(params.value)"}


def grid_column(name: str, kind: str = "text") -> dict[str, Any]:
    """An AG Grid column definition. kind: "int" (shown as is), "float" (NUMBER_FORMAT; its filter keeps values >=
    the number typed) or "text"; every column sorts and filters (see `data_grid`)."""
    spec: dict[str, Any] = {"field": name, "headerName": name, "headerTooltip": name}
    if kind == "int":
        spec.update(filter="agNumberColumnFilter", type="numericColumn", minWidth=70, maxWidth=120)
    elif kind == "float":
        spec.update(filter="agNumberColumnFilter", type="numericColumn", valueFormatter=NUMBER_FORMAT,
                    filterParams={"defaultOption": "greaterThanOrEqual"}, minWidth=110)
    else:
        spec.update(filter="agTextColumnFilter", minWidth=120)
    return spec


def data_grid(grid_id: str, page_size: int, row_id: str | None = None, floating_filters: bool = True,
              **options: Any) -> dag.AgGrid:
    """A compact, paged AG Grid: columns sort on a header click and filter in the row under the headers.

    row_id: the grid's getRowId expression (e.g. "params.data.key"); floating_filters: the filter row under the headers
    (else filters are in each column's menu); options go into dashGridOptions (e.g. a row selection). Field names are
    taken literally (a dot in a column name is not a path into the row)."""
    grid_options = {"pagination": True, "paginationPageSize": page_size,
                    "paginationPageSizeSelector": [page_size, 50, 200], "domLayout": "autoHeight",
                    "rowHeight": 30, "headerHeight": 34, "floatingFiltersHeight": 36, "animateRows": False,
                    "suppressFieldDotNotation": True, "tooltipShowDelay": 300,
                    "localeText": {"noRowsToShow": "No rows to show (check the filters)"}, **options}
    extra = {"getRowId": row_id} if row_id else {}
    return dag.AgGrid(id=grid_id, className="pp-grid-table", rowData=[], columnDefs=[], **extra,
                      defaultColDef={"sortable": True, "filter": True, "floatingFilter": floating_filters,
                                     "resizable": True, "minWidth": 60, "flex": 1},
                      dashGridOptions=grid_options, style={"width": "100%"})


def control_row(*fields: tuple[str, Any], hint: str | None = None) -> html.Div:
    """A row of labelled controls: (label, component) pairs, each label pointing at its component's id, then an
    optional hint."""
    children: list[Any] = []
    for label, component in fields:
        children += [html.Label(label, htmlFor=component.id), component]
    if hint:
        children.append(html.Span(hint, className="pp-hint"))
    return html.Div(className="pp-controls", children=children)


def empty_figure(message: str = "") -> go.Figure:
    """A blank figure with a centred message (what a graph shows when there is nothing to draw)."""
    fig = go.Figure()
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, height=260,
                      margin={"l": 10, "r": 10, "t": 10, "b": 10}, plot_bgcolor="white")
    if message:
        fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                           font={"size": 14, "color": "#666"})
    return fig


def message(text: str, kind: str = "info") -> html.Div:
    """An inline note (kind: info | warning | error)."""
    return html.Div(text, className=f"pp-message pp-{kind}")


def error_page(text: str) -> html.Div:
    """What replaces the views when the selected scan cannot be opened: the reason and what to do, no traceback."""
    return html.Div(className="pp-error-page", children=[
        html.H2("This scan cannot be opened"),
        html.P(text, className="pp-error-text"),
        html.P("Pick another scan above, or fix the directory and restart the explorer "
               "(posprobe app SCAN_DIR ...). Scans are re-created with `posprobe scan --out DIR`."),
    ])


def options(values: list[str], labels: dict[str, str] | None = None) -> list[dict[str, str]]:
    labels = labels or {}
    return [{"label": labels.get(v, v), "value": v} for v in values]


def pick(current: Any, values: list[str], default: str | None = None) -> str | None:
    """Keep `current` if it is still a valid choice, else `default` (if valid), else the first value."""
    if current in values:
        return current
    if default in values:
        return default
    return values[0] if values else None


def metric_choices(scan: Any) -> list[str]:
    return numeric_metrics(scan)


def format_value(value: Any) -> str:
    """A metric value for a table cell: 4 significant digits, a dash for a missing value."""
    if isinstance(value, float):
        return "–" if value != value else f"{value:.4g}"
    return "–" if value is None else str(value)


def error_text(exc: BaseException) -> str:
    """One line for an unexpected failure inside a view (never a traceback)."""
    return f"{type(exc).__name__}: {exc}"


def scan_summary(scan: Any) -> list[Any]:
    """One line about a scan: model, heads, budget, seed, date; then probes run and probes skipped (with reasons)."""
    meta = scan.meta
    info = meta.get("model_info", {})
    budget = (meta.get("budget") or {}).get("name", "?")
    probes = sorted((meta.get("probes") or {}).keys())
    parts = [html.Span(f"{meta.get('model')}", className="pp-model"),
             html.Span(f" · {info.get('n_layers', '?')} layers × {info.get('n_heads', '?')} heads "
                       f"({len(scan.heads)} rows) · budget {budget} · seed {meta.get('seed')} · "
                       f"{meta.get('created', '')}")]
    children = [html.Div(parts), html.Div(f"probes: {', '.join(probes) or 'none'}", className="pp-probes")]
    skipped = meta.get("skipped") or {}
    if skipped:
        children.append(html.Div("skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()),
                                 className="pp-skipped"))
    return children
