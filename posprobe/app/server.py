"""Building and running the explorer: `create_app(scans)`, `serve(scan_dirs, host, port)`, `run_explorer(scans)`.

Owns the Dash app factory (no work at import: nothing is built or loaded until `create_app` is called), the command
line server behind `posprobe app` (bound to 127.0.0.1 unless told otherwise) and the notebook entry behind
`Scan.explore()` (inline in Jupyter, a local server elsewhere). Dash runs without dev tools, so a failure shows a
message in the page, never a traceback; unexpected server errors get a plain error page. Implements no metric
(docs/explorer.md).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dash

from posprobe.app.callbacks import register_callbacks
from posprobe.app.catalog import ScanCatalog
from posprobe.app.layout import INDEX, build_layout

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def create_app(scans: Any, *, title: str = "posprobe explorer") -> dash.Dash:
    """A Dash app over saved scans.

    scans: a Scan, a scan directory, a scan root (a directory of scan directories), a list of those, a mapping
    name -> Scan / directory, or a ScanCatalog. Directories are loaded lazily; one that fails to load shows an error
    page when picked. The browser can open only these scans (it sends catalogue names, never paths).
    """
    catalog = ScanCatalog.build(scans)
    app = dash.Dash(__name__, title=title, update_title=None, serve_locally=True)
    app.index_string = INDEX
    app.layout = lambda: build_layout(catalog)  # evaluated per page load: scan roots are listed again
    register_callbacks(app, catalog)
    app.server.register_error_handler(500, _server_error)
    app.catalog = catalog  # for tests and notebooks: which scans this app can open
    return app


def _server_error(exc: Exception) -> tuple[str, int]:
    return ("<html><body style='font-family:sans-serif'><h2>The explorer hit an error</h2><p>The request failed "
            "inside the server. Reload the page; if it keeps failing, restart `posprobe app` and report the scan "
            "that triggers it.</p></body></html>", 500)


def serve(scan_dirs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8050, debug: bool = False) -> None:
    """Serve the explorer over scan directories (or scan roots) until interrupted: `posprobe app`."""
    app = create_app(list(scan_dirs))
    catalog: ScanCatalog = app.catalog
    if host not in LOOPBACK:
        print(f"posprobe app: warning: listening on {host}; anyone who can reach this machine can read these scans.",
              file=sys.stderr)
    shown = ", ".join(catalog.names) or "(none)"
    print(f"posprobe app: {len(catalog)} scan(s): {shown}\nposprobe app: open http://{host}:{port}/", file=sys.stderr)
    app.run(host=host, port=port, debug=debug)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def run_explorer(scans: Any, *, mode: str | None = None, host: str = "127.0.0.1", port: int = 8050,
                 **run_kwargs: Any) -> dash.Dash:
    """Open the explorer over in-memory scans (behind `Scan.explore()`); returns the Dash app.

    mode: "inline" (in the notebook output), "external" (a link), "tab" or "jupyterlab" inside Jupyter; "server"
    (blocking local server, the default outside Jupyter). Default: "inline" in Jupyter.
    """
    app = create_app(scans)
    chosen = mode or ("inline" if _in_notebook() else "server")
    if chosen == "server":
        print(f"posprobe explorer: open http://{host}:{port}/ (Ctrl-C to stop)", file=sys.stderr)
        app.run(host=host, port=port, debug=False, **run_kwargs)
    else:
        app.run(jupyter_mode=chosen, host=host, port=port, debug=False, **run_kwargs)
    return app
