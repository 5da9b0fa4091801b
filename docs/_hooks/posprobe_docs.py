"""mkdocs hooks of posprobe's documentation site (configured in mkdocs.yml; not part of the package).

Owns the generated parts of the site, so they cannot drift from the code:
- the "Probes and metrics" section of the navigation lists every page in docs/probes/, the ones named in mkdocs.yml
  first, then any other page in alphabetical order (adding a probe page is adding a file); any other page missing
  from mkdocs.yml's nav is appended at its end;
- `<!-- cli-reference -->` in a page is replaced by the reference of every `posprobe` subcommand, read from the
  typer application itself (arguments, options, types, defaults and help texts);
- `<!-- config: module:ClassName -->` is replaced by a table of that config dataclass's fields: name, type, default
  and the comment written beside the field in the source (the "why" of each default);
- `<!-- interventions -->` is replaced by the registered interventions with their settings, from the registry;
- `<!-- budget-knobs -->` is replaced by every registered probe's budget knobs at each budget level;
- `<!-- support-matrix -->` is replaced by the generated support matrix between the README's support-matrix markers.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import Any

PROBE_SECTION = "Probes and metrics"
CLI_MARKER = "<!-- cli-reference -->"
INTERVENTIONS_MARKER = "<!-- interventions -->"
BUDGET_MARKER = "<!-- budget-knobs -->"
MATRIX_MARKER = "<!-- support-matrix -->"
README = Path(__file__).resolve().parents[2] / "README.md"
CONFIG_MARKER = re.compile(r"<!-- config: ([\w.]+):(\w+) -->")


def _listed(nav: Any) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_listed(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_listed(v) for v in nav)) if nav else set()
    return set()


def on_config(config: Any) -> Any:
    docs = Path(config["docs_dir"])
    nav = config["nav"] or []
    for entry in nav:
        if isinstance(entry, dict) and PROBE_SECTION in entry:
            listed = _listed(entry[PROBE_SECTION])
            for page in sorted((docs / "probes").glob("*.md")):
                rel = page.relative_to(docs).as_posix()
                if rel not in listed:
                    entry[PROBE_SECTION].append({page.stem: rel})
    # any other page someone added without a nav entry goes at the end, titled by its file name
    listed = _listed(nav)
    for page in sorted(docs.rglob("*.md")):
        rel = page.relative_to(docs).as_posix()
        if rel not in listed and not rel.startswith("_"):
            nav.append({page.stem.replace("-", " ").replace("_", " ").capitalize(): rel})
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Expand the markers that stand alone on a line outside fenced code blocks (examples in code stay as written)."""
    out, fenced = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append(line if fenced else _expand(line))
    return "\n".join(out)


def _expand(line: str) -> str:
    marker = line.strip()
    if marker == CLI_MARKER:
        return cli_reference()
    if marker == INTERVENTIONS_MARKER:
        return intervention_table()
    if marker == BUDGET_MARKER:
        return budget_table()
    if marker == MATRIX_MARKER:
        return support_matrix()
    match = CONFIG_MARKER.fullmatch(marker)
    return config_table(match.group(1), match.group(2)) if match else line


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def cli_reference() -> str:
    """Markdown: one section per `posprobe` subcommand, from the typer app's own (click) command objects."""
    import typer.main

    from posprobe.cli import app

    group = typer.main.get_command(app)
    root = group.context_class(group, info_name="posprobe")
    parts = []
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        ctx = command.context_class(command, info_name=f"posprobe {name}", parent=root)
        usage = " ".join(command.collect_usage_pieces(ctx))
        rows = []
        for param in command.params:
            if param.param_type_name == "argument":
                repeat = ", one or more" if param.nargs == -1 else ""
                required = "" if param.required else ", optional"
                rows.append(f"| `{param.name.upper()}` (argument{repeat}{required}) | {_cell(param.help or '')} |")
            elif param.name != "help" and (record := param.get_help_record(ctx)):
                rows.append(f"| `{_cell(record[0])}` | {_cell(record[1])} |")
        table = "| argument / option | meaning |\n|---|---|\n" + "\n".join(rows) if rows else "No options."
        parts.append(f"## posprobe {name}\n\n{(command.help or '').strip()}\n\n```text\nposprobe {name} {usage}\n```"
                     f"\n\n{table}\n")
    return "\n".join(parts)


def config_fields(module: str, class_name: str) -> list[tuple[str, str, str, str]]:
    """(name, annotation, default, comment) of each field of a dataclass, read from its module's source."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"config marker: no module {module!r}")
    source = Path(spec.origin).read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    cls = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        raise ValueError(f"config marker: {module} has no class {class_name!r}")
    statements = [n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                  and "ClassVar" not in ast.get_source_segment(source, n.annotation)]

    def trailing(node: ast.AnnAssign) -> str:
        last = lines[node.end_lineno - 1]
        return last.split("#", 1)[1].strip() if "#" in last.split("=", 1)[-1] else ""

    def block(first: int, stop: int) -> list[str]:  # comment-only lines in lines[first:stop]
        return [ln.strip()[1:].strip() for ln in lines[first:stop] if ln.strip().startswith("#")]

    # A comment block between two fields belongs to the field below when that one has no comment of its own at the
    # end of its line (a comment written above the field), else it continues the end-of-line comment of the one above.
    comments = {node.target.id: [trailing(node)] if trailing(node) else [] for node in statements}
    previous = None
    for node in statements:
        above = block(previous.end_lineno if previous else cls.lineno, node.lineno - 1)
        owner = node if (previous is None or not trailing(node)) else previous
        comments[owner.target.id] = (above + comments[owner.target.id]) if owner is node else \
            comments[owner.target.id] + above
        previous = node
    if previous is not None:
        comments[previous.target.id] += block(previous.end_lineno, cls.end_lineno)
    fields = []
    for node in statements:
        default = ast.get_source_segment(source, node.value) if node.value is not None else "(required)"
        fields.append((node.target.id, ast.get_source_segment(source, node.annotation), default,
                       " ".join(comments[node.target.id])))
    return fields


def config_table(module: str, class_name: str) -> str:
    rows = [f"| `{name}` | `{_cell(annotation)}` | `{_cell(default)}` | {_cell(comment)} |"
            for name, annotation, default, comment in config_fields(module, class_name)]
    return f"`{class_name}` fields (`{module}`):\n\n| field | type | default | why |\n|---|---|---|---|\n" + "\n".join(rows)


def intervention_table() -> str:
    """Markdown: each registered intervention, its one-line summary and its settings (default, help)."""
    from posprobe.interventions import get_class, list_interventions, parameters

    rows = []
    for name in list_interventions():
        settings = "<br>".join(f"`{p['name']}` = `{_cell(p['default'])}`{': ' + _cell(p['help']) if p['help'] else ''}"
                               for p in parameters(name))
        rows.append(f"| `{name}` | {_cell(getattr(get_class(name), 'summary', ''))} | {settings} |")
    return "| name | what it does | settings (default) |\n|---|---|---|\n" + "\n".join(rows)


def budget_table() -> str:
    """Markdown: the shared budget fields per level, then each probe's own budget knobs per level."""
    from posprobe.probes import get_probe, list_probes
    from posprobe.probes.base import BUDGET_LEVELS, BUDGETS, budget_knobs

    shared = ["context_lengths", "n_texts", "max_queries"]
    head = "| | " + " | ".join(f"`{level}`" for level in BUDGET_LEVELS) + " |\n|---|" + "---|" * len(BUDGET_LEVELS)
    rows = [f"| `{field}` (scan) | " + " | ".join(f"`{getattr(BUDGETS[level], field)}`" for level in BUDGET_LEVELS)
            + " |" for field in shared]
    for name in list_probes():
        for knob, values in budget_knobs(get_probe(name).Config).items():
            rows.append(f"| `{name}.{knob}` | " + " | ".join(f"`{_cell(values[level])}`" for level in BUDGET_LEVELS)
                        + " |")
    return head + "\n" + "\n".join(rows)


def support_matrix() -> str:
    """The README's generated support-matrix section (between its begin / end marker comments)."""
    text = README.read_text()
    begin, end = text.find("<!-- support-matrix:begin"), text.find("<!-- support-matrix:end -->")
    if begin < 0 or end < begin:
        raise ValueError("README.md has no support-matrix:begin / support-matrix:end markers to include")
    body = text[text.index("\n", begin) + 1:end].strip()
    lines = body.splitlines()
    if lines and lines[0].startswith("#"):  # the section's own heading: this page has its title already
        lines = lines[1:]
    return "\n".join(lines).strip()
