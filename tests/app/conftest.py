"""Fixtures for explorer tests: saved scans (tiny model, synthetic, broken) and a headless Chromium for dash_duo.

Browser tests (`@pytest.mark.browser`) run in Debian's Chromium through chromedriver, always headless and offline
(--no-sandbox --disable-background-networking --disable-component-update --no-first-run), and are skipped with the
reason when chromium, chromedriver or dash[testing] is missing, except under CI (`CI=true`), where a missing browser
fails them (`browser_policy`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.app.synthetic import synthetic_scan

CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                "--disable-sync", "--disable-extensions", "--window-size=1440,1000")


def _chromium() -> str | None:
    return os.environ.get("DASH_TEST_CHROMEPATH") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")


def browser_unavailable() -> str | None:
    """Why browser tests cannot run here, or None."""
    try:
        import dash_testing_stub  # noqa: F401  (installed by dash[testing])
        import selenium  # noqa: F401
    except ImportError:
        return "dash[testing] is not installed (pip install 'dash[testing]')"
    if _chromium() is None:
        return "no chromium binary (apt-get install chromium chromium-driver)"
    if shutil.which("chromedriver") is None:
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    # headless by default: the dash_duo fixture reads this option (it also enables downloads in headless mode)
    if hasattr(config.option, "headless"):
        config.option.headless = True


def in_ci(environ: dict[str, str] | None = None) -> bool:
    """True under CI (`CI=true`, as GitHub Actions, GitLab and `.ci/run` set it)."""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() in {"1", "true", "yes"}


def browser_policy(reason: str | None, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """What to do with browser tests: ("run", ""), ("skip", why) locally, ("fail", why) in CI.

    In CI a missing browser is a failure: the browser tier must not vanish silently from a green run.
    """
    if reason is None:
        return "run", ""
    if in_ci(environ):
        return "fail", (f"browser tests cannot run in CI: {reason}. CI must install Debian's chromium and "
                        f"chromium-driver (see .ci/run); they are not optional there.")
    return "skip", f"browser test skipped: {reason}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    action, message = browser_policy(browser_unavailable())
    if action != "skip":
        return
    skip = pytest.mark.skip(reason=message)
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "browser" not in item.keywords:
        return
    action, message = browser_policy(browser_unavailable())
    if action == "fail":
        pytest.fail(message, pytrace=False)


def pytest_setup_options():
    """Chrome options for dash_duo: Debian's chromium, headless, no network side traffic."""
    from selenium.webdriver.chrome.options import Options

    options = Options()
    binary = _chromium()
    if binary:
        options.binary_location = binary
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    return options  # pluggy collects hook results into a list; dash uses the first


@pytest.fixture(scope="session")
def tiny_scan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick scan of the tiny RoPE model with every probe that applies, saved to disk."""
    import posprobe

    scan = posprobe.scan("tiny-rope", budget="quick", progress=False)
    return scan.save(tmp_path_factory.mktemp("scans") / "tiny-rope")


@pytest.fixture(scope="session")
def tiny_scan(tiny_scan_dir: Path):
    import posprobe

    return posprobe.load(tiny_scan_dir)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic scan with model-level curves, an intervention series and a position-sweep table."""
    return synthetic_scan(3, 4, seed=1, name="synthetic").save(tmp_path_factory.mktemp("scans") / "synthetic")


@pytest.fixture(scope="session")
def large_scan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic scan of 48 layers x 32 heads = 1,536 heads and 12 metrics."""
    return synthetic_scan(48, 32, 12, name="large-synthetic").save(tmp_path_factory.mktemp("scans") / "large")


@pytest.fixture(scope="session")
def broken_dirs(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> dict[str, Path]:
    """Scan directories that must not open: garbage manifest, wrong format version, truncated Parquet, no manifest."""
    root = tmp_path_factory.mktemp("broken")
    garbage = root / "garbage-manifest"
    shutil.copytree(synthetic_dir, garbage)
    (garbage / "manifest.json").write_text("{not json")
    version = root / "future-version"
    shutil.copytree(synthetic_dir, version)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["format_version"] = 99
    (version / "manifest.json").write_text(json.dumps(manifest))
    truncated = root / "truncated-parquet"
    shutil.copytree(synthetic_dir, truncated)
    (truncated / "heads.parquet").write_bytes((truncated / "heads.parquet").read_bytes()[:40])
    empty = root / "not-a-scan"
    empty.mkdir()
    return {"garbage": garbage, "version": version, "truncated": truncated, "empty": empty}
