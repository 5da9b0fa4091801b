"""The README's support matrix is the one `posprobe models --families` generates from the conformance registry."""

from __future__ import annotations

from pathlib import Path

BEGIN = "<!-- support-matrix:begin"
END = "<!-- support-matrix:end -->"


def readme_matrix(text: str) -> str:
    start = text.index(BEGIN)
    start = text.index("\n", start) + 1
    return text[start: text.index(END)].strip()


def test_readme_support_matrix_is_generated_from_the_registry():
    from typer.testing import CliRunner

    from posprobe.cli import app

    result = CliRunner().invoke(app, ["models", "--families"])
    assert result.exit_code == 0, result.output
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert readme_matrix(readme) == result.stdout.strip(), (
        "README support matrix is stale: regenerate it with `posprobe models --families` (between the "
        "support-matrix markers)")
    rows = result.stdout.strip().splitlines()[2:]
    assert len(rows) >= 29
