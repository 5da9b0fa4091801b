"""The scan catalogue: only named scans open; broken directories become messages; scan roots are re-listed."""

from __future__ import annotations

import pytest

from posprobe.app.catalog import ScanCatalog, ScanUnavailable
from posprobe.scan import Scan
from tests.app.synthetic import synthetic_scan


def test_build_from_scans_paths_and_mapping(synthetic_dir):
    scan = synthetic_scan(name="made")
    catalog = ScanCatalog.build([scan, synthetic_dir, scan])
    assert catalog.names == ["made", "synthetic", "made (2)"]
    assert catalog.get("made") is scan
    assert catalog.get("synthetic").equals(Scan.load(synthetic_dir))
    named = ScanCatalog.build({"a": scan, "b": synthetic_dir})
    assert named.names == ["a", "b"] and named.path("b") == synthetic_dir.resolve()
    assert ScanCatalog.build(named) is named
    assert ScanCatalog.build(scan).names == ["made"]


def test_unknown_names_and_paths_from_the_browser_are_refused(synthetic_dir):
    catalog = ScanCatalog.build({"good": synthetic_dir})
    for name in ("missing", str(synthetic_dir), "../good", None, 3):
        with pytest.raises(ScanUnavailable, match="only opens the scans it was started with: good"):
            catalog.get(name)
    assert "missing" not in catalog and "good" in catalog


@pytest.mark.parametrize("kind, reason", [
    ("garbage", "not valid JSON"),
    ("version", "format version 99"),
    ("truncated", "corrupted or incomplete"),
    ("empty", "no manifest.json"),
])
def test_broken_scan_dirs_give_a_reason_not_a_traceback(broken_dirs, kind, reason):
    catalog = ScanCatalog.build({"bad": broken_dirs[kind]})
    with pytest.raises(ScanUnavailable, match=reason) as info:
        catalog.get("bad")
    assert "cannot be opened" in str(info.value) and "Traceback" not in str(info.value)
    assert catalog.error("bad") == str(info.value)


def test_missing_directory(tmp_path):
    catalog = ScanCatalog.build([tmp_path / "nope"])
    assert "does not exist" in catalog.error("nope")


def test_load_failures_are_remembered(broken_dirs, monkeypatch):
    calls = []
    original = Scan.load.__func__

    def counting(cls, directory):
        calls.append(directory)
        return original(cls, directory)

    monkeypatch.setattr(Scan, "load", classmethod(counting))
    catalog = ScanCatalog.build({"bad": broken_dirs["garbage"]})
    for _ in range(3):
        assert catalog.error("bad")
    assert len(calls) == 1


def test_unexpected_load_errors_become_messages(synthetic_dir, monkeypatch):
    def explode(cls, directory):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Scan, "load", classmethod(explode))
    catalog = ScanCatalog.build({"x": synthetic_dir})
    assert "RuntimeError: disk on fire" in catalog.error("x")


def test_scan_root_lists_children_and_refreshes(tmp_path):
    root = tmp_path / "scans"
    synthetic_scan(seed=0).save(root / "first")
    catalog = ScanCatalog.build([root])
    assert catalog.names == ["first"] and catalog.roots == [root.resolve()]
    synthetic_scan(seed=1).save(root / "second")
    assert catalog.names == ["first"]
    catalog.refresh()
    assert catalog.names == ["first", "second"]
    assert catalog.get("second").meta["seed"] == 1


def test_labels(synthetic_dir):
    catalog = ScanCatalog.build({"mine": synthetic_dir, "synthetic-copy": synthetic_dir})
    assert catalog.label("mine") == "mine"  # not loaded yet
    catalog.get("mine")
    catalog.get("synthetic-copy")
    assert catalog.label("mine") == "mine (synthetic)"
    assert catalog.label("synthetic-copy") == "synthetic-copy"


def test_rejects_other_objects():
    with pytest.raises(TypeError, match="Scan objects or scan directories"):
        ScanCatalog.build([object()])
