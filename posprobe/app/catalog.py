"""The explorer's catalogue of scans: the only scans the browser can open, by name.

Owns `ScanCatalog`: built from in-memory `Scan` objects and/or directories given on the command line. A directory
with a `manifest.json` is one scan; a directory without one whose sub-directories hold scans is a *scan root*, listed
again on every page load so new scans saved into it appear. The browser only ever sends a name from this catalogue;
no path from a request is ever read. Scans are loaded lazily, once, and a scan that fails to load (corrupted,
incompatible format, missing) is remembered with its error message so the app can show an error page instead of a
stack trace. Implements no metric (docs/explorer.md).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posprobe.errors import PosprobeError, ScanFormatError
from posprobe.scan import Scan

MANIFEST = "manifest.json"


class ScanUnavailable(PosprobeError):
    """A scan of the catalogue cannot be shown (unknown name, or it failed to load)."""


@dataclass
class _Entry:
    name: str
    path: Path | None = None
    scan: Scan | None = None
    error: str | None = None
    root: Path | None = None  # the scan root it was found in, if any
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _is_scan_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _child_scans(root: Path) -> list[Path]:
    try:
        return sorted(child for child in root.iterdir() if child.is_dir() and _is_scan_dir(child))
    except OSError:
        return []


class ScanCatalog:
    """Named scans the explorer may open. Build with `ScanCatalog.build(...)`."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._roots: list[Path] = []
        self._lock = threading.Lock()

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, scans: Any) -> ScanCatalog:
        """From a ScanCatalog, a Scan, a path, a list of those, or a mapping name -> Scan / path."""
        if isinstance(scans, ScanCatalog):
            return scans
        catalog = cls()
        if isinstance(scans, Mapping):
            for name, item in scans.items():
                catalog.add(item, name=str(name))
            return catalog
        if isinstance(scans, (Scan, str, Path)):
            scans = [scans]
        for item in scans if isinstance(scans, Iterable) else [scans]:
            catalog.add(item)
        return catalog

    def add(self, item: Any, name: str | None = None) -> None:
        """Add a Scan, a scan directory, or a scan root (a directory of scan directories)."""
        if isinstance(item, Scan):
            self._put(_Entry(self._unique(name or str(item.meta.get("model") or "scan")), scan=item))
            return
        if not isinstance(item, (str, Path)):
            raise TypeError(f"The explorer opens Scan objects or scan directories, not {type(item).__name__}. "
                            f"Pass posprobe.load(path) or the path itself.")
        path = Path(item).expanduser().resolve()
        if path.is_dir() and not _is_scan_dir(path) and _child_scans(path):
            with self._lock:
                self._roots.append(path)
            self.refresh()
            return
        self._put(_Entry(self._unique(name or path.name or str(path)), path=path))

    def refresh(self) -> None:
        """List every scan root again: new scan directories appear; removed ones keep their entry."""
        with self._lock:
            roots = list(self._roots)
            known = {entry.path for entry in self._entries.values() if entry.path is not None}
        for root in roots:
            prefix = f"{root.name}/" if len(roots) > 1 else ""
            for child in _child_scans(root):
                if child not in known:
                    self._put(_Entry(self._unique(prefix + child.name), path=child, root=root))

    def _unique(self, name: str) -> str:
        with self._lock:
            candidate, index = name, 2
            while candidate in self._entries:
                candidate, index = f"{name} ({index})", index + 1
            return candidate

    def _put(self, entry: _Entry) -> None:
        with self._lock:
            self._entries[entry.name] = entry

    # --- access -------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    @property
    def roots(self) -> list[Path]:
        return list(self._roots)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def path(self, name: str) -> Path | None:
        entry = self._entries.get(name)
        return entry.path if entry else None

    def get(self, name: object) -> Scan:
        """The scan called `name`, loading it on first use. Raises ScanUnavailable with a readable message."""
        if not isinstance(name, str) or name not in self._entries:
            raise ScanUnavailable(f"There is no scan called {name!r} in this explorer. It only opens the scans it "
                                  f"was started with: {', '.join(self.names) or '(none)'}.")
        entry = self._entries[name]
        with entry.lock:
            if entry.scan is None and entry.error is None and entry.path is not None:
                try:
                    entry.scan = Scan.load(entry.path)
                except ScanFormatError as exc:
                    entry.error = str(exc)
                except Exception as exc:  # an unreadable scan must become an error page, whatever the cause
                    entry.error = (f"Loading {entry.path} failed with {type(exc).__name__}: {exc}. The scan is "
                                   f"corrupted or was written by an incompatible posprobe; re-run the scan.")
            if entry.error is not None:
                raise ScanUnavailable(f"The scan {name!r} cannot be opened. {entry.error}")
            if entry.scan is None:  # an entry is built with a scan or a path; neither is a bug in the catalogue
                raise ScanUnavailable(f"The scan {name!r} has neither data nor a directory in this explorer.")
            return entry.scan

    def error(self, name: str | None) -> str | None:
        """The message explaining why `name` cannot be opened, or None if it loads."""
        try:
            self.get(name)
        except ScanUnavailable as exc:
            return str(exc)
        return None

    def label(self, name: str) -> str:
        """A dropdown label: the name, plus the model for loaded scans."""
        entry = self._entries.get(name)
        if entry is None or entry.scan is None:
            return name
        model = entry.scan.meta.get("model")
        return name if not model or str(model) in name else f"{name} ({model})"
