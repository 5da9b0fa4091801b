"""The browser tier's policy (tests/app/conftest.py): skipped with the reason locally, a failure under CI."""

from __future__ import annotations

import pytest

from tests.app.conftest import browser_policy, in_ci


@pytest.mark.parametrize("value", ["true", "True", "1", "yes"])
def test_ci_values(value):
    assert in_ci({"CI": value})


@pytest.mark.parametrize("env", [{}, {"CI": ""}, {"CI": "false"}, {"CI": "0"}])
def test_not_ci(env):
    assert not in_ci(env)


def test_missing_browser_fails_in_ci():
    action, message = browser_policy("no chromium binary", {"CI": "true"})
    assert action == "fail" and "no chromium binary" in message and "CI" in message


def test_missing_browser_skips_locally_with_the_reason():
    assert browser_policy("no chromedriver on PATH", {}) == ("skip", "browser test skipped: no chromedriver on PATH")


def test_available_browser_runs_everywhere():
    assert browser_policy(None, {"CI": "true"}) == ("run", "")
    assert browser_policy(None, {}) == ("run", "")


def test_ci_without_browser_fails_a_browser_test(pytester):
    """End to end: a browser-marked test under CI=true with no chromium on PATH fails (not skipped)."""
    pytester.makeconftest(
        "import sys\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parents[2])!r})\n"
        "from tests.app.conftest import pytest_collection_modifyitems, pytest_runtest_setup  # noqa: F401\n"
        "def pytest_configure(config):\n"
        "    config.addinivalue_line('markers', 'browser: needs chromium')\n"
    )
    pytester.makepyfile("import pytest\n@pytest.mark.browser\ndef test_page():\n    pass\n")
    env = {"PATH": str(pytester.path), "CI": "true", "DASH_TEST_CHROMEPATH": ""}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)  # failed in setup: the run is red, with the reason
    assert result.ret != 0 and "cannot run in CI" in result.stdout.str()
    mp2 = pytest.MonkeyPatch()
    try:
        mp2.setenv("PATH", str(pytester.path))
        mp2.setenv("CI", "false")
        mp2.setenv("DASH_TEST_CHROMEPATH", "")
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    finally:
        mp2.undo()
    result.assert_outcomes(skipped=1)
    assert result.ret == 0
