"""The explorer's packaging: it installs as `posprobe.app` (no top-level `app` that a user's app.py could shadow),
`posprobe app` and `Scan.explore()` work from a directory holding an `app.py`, and only a missing Dash becomes the
"install the app extra" error."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from posprobe._explorer import INSTALL_HINT, load_explorer
from posprobe.cli import main as cli_main
from posprobe.errors import MissingDependencyError

ROOT = Path(__file__).resolve().parents[2]
USER_APP = "open('IMPORTED', 'w').write('yes')\nraise RuntimeError('the user app.py was imported')\n"
NO_SERVER = "import dash; dash.Dash.run = lambda self, **kw: print('RUN', sorted(kw))\n"


def _run_in(cwd: Path, code: str) -> subprocess.CompletedProcess:
    # `python -c` puts the current directory first on sys.path: exactly where a user's app.py shadows `import app`
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(USER_APP)
    (tmp_path / "app").mkdir()  # a package named app too
    (tmp_path / "app" / "__init__.py").write_text(USER_APP)
    return tmp_path


def test_posprobe_app_beside_a_user_app_py(user_dir, synthetic_dir):
    code = NO_SERVER + f"from posprobe.cli import main; raise SystemExit(main(['app', {str(synthetic_dir)!r}]))"
    done = _run_in(user_dir, code)
    assert done.returncode == 0, done.stderr
    assert "RUN ['debug', 'host', 'port']" in done.stdout and "1 scan(s): synthetic" in done.stderr
    assert not (user_dir / "IMPORTED").exists()


def test_scan_explore_beside_a_user_app_py(user_dir, synthetic_dir):
    code = NO_SERVER + f"import posprobe; posprobe.load({str(synthetic_dir)!r}).explore(mode='server')"
    done = _run_in(user_dir, code)
    assert done.returncode == 0, done.stderr
    assert "RUN ['debug', 'host', 'port']" in done.stdout and not (user_dir / "IMPORTED").exists()


def _fake_explorer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    package = f"h4_fake_explorer_{abs(hash(body)) % 10**8}"
    (tmp_path / f"{package}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("posprobe._explorer.EXPLORER_MODULE", package)


@pytest.mark.parametrize("missing", ["dash", "dash_ag_grid"])
def test_a_missing_dash_says_what_to_install(tmp_path, monkeypatch, capsys, synthetic_dir, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import dash` now raises ModuleNotFoundError(name="dash")
    _fake_explorer(tmp_path, monkeypatch, f"import {missing}\n")
    with pytest.raises(MissingDependencyError, match=missing) as info:
        load_explorer()
    assert INSTALL_HINT in str(info.value)
    assert cli_main(["app", str(synthetic_dir)]) == 2
    assert INSTALL_HINT in capsys.readouterr().err


@pytest.mark.parametrize("body, error", [
    ("import h4_no_such_package_anywhere\n", ModuleNotFoundError),  # a missing package that is not Dash
    ("from dash import no_such_name_in_dash\n", ImportError),  # a broken install / version mismatch
    ("raise RuntimeError('bug in the explorer')\n", RuntimeError),
])
def test_other_import_failures_propagate(tmp_path, monkeypatch, body, error):
    _fake_explorer(tmp_path, monkeypatch, body)
    with pytest.raises(error) as info:
        load_explorer()
    assert not isinstance(info.value, MissingDependencyError)


def test_wheel_has_no_top_level_app(tmp_path):
    """Build the wheel from a copy of the sources and read what it installs at the top level."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    import shutil

    shutil.copytree(ROOT / "posprobe", source / "posprobe", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("posprobe-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level).decode().split() == ["posprobe"]
    assert "posprobe/app/__init__.py" in names and "posprobe/app/pages/head.py" in names
    assert not any(n.startswith("app/") for n in names)
