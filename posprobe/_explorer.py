"""How the core reaches the Dash explorer: `load_explorer()` imports `posprobe.app` by name, on demand.

The explorer sits on top of the core (it reads saved scans through `posprobe.scan`), so a static import of it from
`scan.py` or `cli.py` would be an import cycle and would make `import posprobe` depend on Dash. Like the probe
registry, the core names the explorer module as a string and imports it only when `posprobe app` or
`Scan.explore()` asks for it. A missing Dash or dash-ag-grid (the `app` extra) becomes a `MissingDependencyError`
that says what to install; any other import failure (a bug, a broken install) propagates unchanged. Implements no
metric (see the docs page "Explorer").
"""

from __future__ import annotations

import importlib
from types import ModuleType

from posprobe.errors import MissingDependencyError

EXPLORER_MODULE = "posprobe.app"
EXPLORER_PACKAGES = frozenset({"dash", "dash_ag_grid"})  # import names installed by the `app` extra
INSTALL_HINT = "pip install 'posprobe[app]'"


def load_explorer() -> ModuleType:
    """The explorer package (`create_app`, `serve`, `run_explorer`), or MissingDependencyError if Dash is absent."""
    try:
        return importlib.import_module(EXPLORER_MODULE)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in EXPLORER_PACKAGES:
            raise
        raise MissingDependencyError(f"The explorer (`posprobe app`, Scan.explore()) needs {missing!r}, which is not "
                                     f"installed; it", INSTALL_HINT) from exc
