"""The documentation site's sources: every probe has its page, the generated parts read the code correctly, and
nothing in the package points at design files outside the repository. (`mkdocs build --strict` itself runs in CI.)"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from posprobe.probes import get_probe, list_probes

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("posprobe_docs_hooks", DOCS / "_hooks" / "posprobe_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", [n for n in list_probes() if not n.endswith("_test_probe")])
def test_every_builtin_probe_has_a_page_with_its_columns_and_config(name):
    page = DOCS / "probes" / f"{name}.md"
    assert page.exists(), f"docs/probes/{name}.md is missing: see docs/adding-a-probe.md"
    text = page.read_text()
    assert f"posprobe.probes.{name}:{get_probe(name).Config.__name__}" in text or "Config" in text


PLANTED_CONFIG = '''
from dataclasses import dataclass
from typing import ClassVar

@dataclass(frozen=True)
class Planted:
    KNOBS: ClassVar[dict] = {}
    alpha: int = 1  # one line
    beta: float = 0.5  # starts here and
    # continues on the next line (the field below has its own end-of-line comment)
    delta: tuple[int, ...] = (1, 2)  # last of its kind
    # A comment written above the field it explains
    # (that field has no end-of-line comment), over two lines.
    gamma: bool = True
'''


def test_config_tables_attribute_each_comment_to_its_field(hooks, tmp_path, monkeypatch):
    (tmp_path / "planted_docs_config.py").write_text(PLANTED_CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    fields = hooks.config_fields("planted_docs_config", "Planted")
    assert [f[0] for f in fields] == ["alpha", "beta", "delta", "gamma"]  # the ClassVar is not a field
    comments = {name: comment for name, _, _, comment in fields}
    assert comments == {
        "alpha": "one line",
        "beta": "starts here and continues on the next line (the field below has its own end-of-line comment)",
        "delta": "last of its kind",
        "gamma": "A comment written above the field it explains (that field has no end-of-line comment), over two "
                 "lines."}
    assert fields[2][1:3] == ("tuple[int, ...]", "(1, 2)")


def test_generated_references_cover_the_code(hooks):
    import typer.main

    from posprobe.cli import app

    cli = hooks.cli_reference()
    group = typer.main.get_command(app)
    for name in group.list_commands(group.context_class(group, info_name="posprobe")):
        assert f"## posprobe {name}\n" in cli
    budget = hooks.budget_table()
    assert "`retrieval.n_trials` | `6` | `20` | `60` |" in budget


def test_no_module_points_at_design_files_outside_the_repository():
    offenders = []
    for path in sorted((ROOT / "posprobe").rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if "METRICS.md" in docstring:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, \
        f"module docstrings citing METRICS.md (not in the repository; cite the docs page): {offenders}"
