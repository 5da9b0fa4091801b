"""Component ids of the explorer, in one place so layout, callbacks and browser tests agree.

Owns names only. Implements no metric (docs/explorer.md).
"""

SCAN = "scan-select"
SCAN_SUMMARY = "scan-summary"
SCAN_ERROR = "scan-error"
VIEWS = "views"
TABS = "view-tabs"
SELECTED = "selected-head"

ATLAS_METRIC = "atlas-metric"
ATLAS_GRAPH = "atlas-graph"
ATLAS_PANEL = "atlas-head-panel"
ATLAS_SHAPES = "atlas-shapes"
OPEN_HEAD = "open-head-detail"

HEAD_LAYER = "head-layer"
HEAD_HEAD = "head-head"
HEAD_TITLE = "head-title"
HEAD_METRICS = "head-metrics"
HEAD_CURVES = "head-curves"
HEAD_EXAMPLE = "head-example"  # the stored example whose pattern is shown
HEAD_QUERY = "head-query"  # the query row of the top-keys strip
HEAD_PATTERN_MESSAGE = "head-pattern-message"
HEAD_PATTERN_SECTION = "head-pattern-section"
HEAD_PATTERN_GRAPH = "head-pattern-graph"
HEAD_QUERY_SHAPES = "head-query-shapes"  # the outline of the chosen query row, merged into the heatmap in the browser
HEAD_TOPKEYS_GRAPH = "head-topkeys-graph"
RANKING_METRIC = "ranking-metric"
RANKING_TABLE = "ranking-table"  # a dash-ag-grid AgGrid
RANKING_ROWS = "ranking-rows"  # the compact ranking payload; the browser expands it into the grid's rowData
RANKING_EXPORT = "ranking-export"  # the grid's filtered, sorted row ids, set on "Download CSV"
RANKING_DOWNLOAD_BUTTON = "ranking-download-button"
RANKING_DOWNLOAD = "ranking-download"

MODEL_METRIC = "model-metric"
MODEL_METRIC_GRAPH = "model-metric-graph"
MODEL_CURVES = "model-curves"
MODEL_HEADCURVE = "model-headcurve"
MODEL_HEADCURVE_GRAPH = "model-headcurve-graph"
MODEL_HEADCURVE_SECTION = "model-headcurve-section"
MODEL_TABLE = "model-table"
MODEL_TABLE_VIEW = "model-table-view"
MODEL_TABLE_SECTION = "model-table-section"

COMPARE_A = "compare-a"
COMPARE_B = "compare-b"
COMPARE_METRIC = "compare-metric"
COMPARE_MESSAGE = "compare-message"
COMPARE_GRAPH = "compare-graph"
COMPARE_TABLE = "compare-table"
COMPARE_CURVE = "compare-curve"
COMPARE_CURVE_GRAPH = "compare-curve-graph"
COMPARE_SCANS = "compare-scans"  # the scans of the N-scan section
COMPARE_N_METRIC = "compare-n-metric"
COMPARE_N_MESSAGE = "compare-n-message"
COMPARE_TOP_GRAPH = "compare-top-graph"
COMPARE_AGREEMENT_GRAPH = "compare-agreement-graph"
