"""The compare view: two scans side by side (per-head difference on a metric, a shared curve overlaid), then any
number of scans at once (their top heads on every shared metric, and the rank agreement between them).

Owns the compare tab's layout and pure helpers over `posprobe.render.compare` (`difference_rows`, `shape_note`,
`default_selection`, `many_note`). Scans of different shapes are compared on the heads they share (the view says
so). Implements no metric (docs/explorer.md).
"""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from posprobe.app import ids
from posprobe.app.pages.common import control_row, data_grid, grid_column
from posprobe.render.compare import head_differences

TOP_DIFFERENCES = 200  # rows of the difference table sent to the browser
DEFAULT_SCANS = 6  # scans of the N-scan section before the user picks (each one is loaded to be shown)


def layout() -> html.Div:
    return html.Div(className="pp-view", children=[
        html.Div(className="pp-controls", children=[
            html.Label("A", htmlFor=ids.COMPARE_A),
            dcc.Dropdown(id=ids.COMPARE_A, clearable=False, className="pp-dropdown"),
            html.Label("B", htmlFor=ids.COMPARE_B),
            dcc.Dropdown(id=ids.COMPARE_B, clearable=False, className="pp-dropdown"),
            html.Label("metric", htmlFor=ids.COMPARE_METRIC),
            dcc.Dropdown(id=ids.COMPARE_METRIC, clearable=False, className="pp-dropdown"),
        ]),
        html.Div(id=ids.COMPARE_MESSAGE),
        dcc.Graph(id=ids.COMPARE_GRAPH, config={"displaylogo": False}),
        html.Div(className="pp-row", children=[
            html.Div(className="pp-side pp-left pp-wide", children=[
                html.H3("Largest differences (B − A)", className="pp-section"),
                data_grid(ids.COMPARE_TABLE, 12, floating_filters=False),
            ]),
            html.Div(className="pp-main", children=[
                html.H3("A shared curve (the selected head's, for per-head curves)", className="pp-section"),
                dcc.Dropdown(id=ids.COMPARE_CURVE, clearable=False, className="pp-dropdown"),
                dcc.Graph(id=ids.COMPARE_CURVE_GRAPH, config={"displaylogo": False}),
            ]),
        ]),
        html.H3("All selected scans: top heads and rank agreement", className="pp-section"),
        control_row(("scans", dcc.Dropdown(id=ids.COMPARE_SCANS, multi=True, className="pp-dropdown pp-multi")),
                    ("agreement metric", dcc.Dropdown(id=ids.COMPARE_N_METRIC, clearable=False,
                                                      className="pp-dropdown")),
                    hint="each cell names a scan's top head on a metric (colour: its value relative to the other "
                         "scans); agreement is Spearman's rho of the metric's head ranking over common (layer, "
                         "head) pairs"),
        html.Div(id=ids.COMPARE_N_MESSAGE),
        dcc.Graph(id=ids.COMPARE_TOP_GRAPH, config={"displaylogo": False}),
        dcc.Graph(id=ids.COMPARE_AGREEMENT_GRAPH, config={"displaylogo": False}),
    ])


def difference_rows(scan: Any, other: Any, metric: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Grid (rowData, columnDefs): the heads with the largest |B - A| on `metric`."""
    diff = head_differences(scan, other, metric).head(TOP_DIFFERENCES)
    data = [{"layer": int(r.layer), "head": int(r.head),
             "A": None if r.a != r.a else round(float(r.a), 5), "B": None if r.b != r.b else round(float(r.b), 5),
             "B − A": None if r.diff != r.diff else round(float(r.diff), 5)} for r in diff.itertuples(index=False)]
    # narrow columns: the grid sits in a side panel, all five must fit without scrolling
    columns = [{**grid_column("layer", "int"), "minWidth": 60}, {**grid_column("head", "int"), "minWidth": 60},
               *({**grid_column(c, "float"), "minWidth": 80} for c in ("A", "B", "B − A"))]
    return data, columns


def shape_note(scan: Any, other: Any, names: tuple[str, str]) -> str | None:
    """A sentence when the two scans differ in shape, model or are the same scan; None otherwise."""
    notes = []
    if names[0] == names[1]:
        notes.append("A and B are the same scan (differences are 0); pick another B")
    shape_a = (int(scan.heads["layer"].max()) + 1, int(scan.heads["head"].max()) + 1)
    shape_b = (int(other.heads["layer"].max()) + 1, int(other.heads["head"].max()) + 1)
    if shape_a != shape_b:
        notes.append(f"the scans have different shapes ({shape_a[0]}x{shape_a[1]} vs {shape_b[0]}x{shape_b[1]} "
                     f"layers x heads): differences are over the heads both have")
    if scan.meta.get("model") != other.meta.get("model"):
        notes.append(f"different models: {scan.meta.get('model')} vs {other.meta.get('model')}")
    return "; ".join(notes) + "." if notes else None


def default_selection(names: list[str], current: Any) -> list[str]:
    """The scans of the N-scan section: the user's choice (names of the catalogue only, in their order), else the
    first DEFAULT_SCANS of the catalogue."""
    if isinstance(current, list):
        chosen = [n for n in dict.fromkeys(current) if isinstance(n, str) and n in names]
        if chosen:
            return chosen
    return names[:DEFAULT_SCANS]


def many_note(scans: list[Any], names: list[str]) -> str | None:
    """A sentence when the selected scans differ in shape or model (rank agreement pairs heads by position)."""
    shapes = {(int(s.heads["layer"].max()) + 1, int(s.heads["head"].max()) + 1) for s in scans}
    models = {str(s.meta.get("model")) for s in scans}
    if len(shapes) == 1 and len(models) == 1:
        return None
    return (f"The {len(names)} scans span {len(models)} model(s) and {len(shapes)} shape(s): rank agreement pairs "
            f"heads by (layer, head), so it is meaningful between scans of one architecture (seeds, budgets, "
            f"interventions); the top-heads map compares any models.")
