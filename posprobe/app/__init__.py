"""posprobe's Dash explorer: browse head metrics, per-head curves, model-level curves and comparisons of saved scans.

Re-exports `create_app` (the app factory), `serve` (behind `posprobe app`), `run_explorer` (behind `Scan.explore()`)
and `ScanCatalog`. Importing does no work: nothing is built and no scan is read until one of these is called. The
app only reads saved scans; it never runs a model. Implements no metric (docs/explorer.md).
"""

from posprobe.app.catalog import ScanCatalog
from posprobe.app.server import create_app, run_explorer, serve

__all__ = ["ScanCatalog", "create_app", "run_explorer", "serve"]
