"""The import graph of posprobe: no cycles, and the layers import only downwards.

Reads every module's import statements with `ast` (module level and inside functions alike: a lazy import is still
a dependency), resolves them to posprobe modules and checks: no strongly connected component (no cycle); the core
never imports the Dash explorer `posprobe.app` (it is reached by name through `posprobe._explorer`); the model
libraries (transformers, tokenizers, TransformerLens, nnsight) are imported only in `posprobe/adapters/`; Dash only
in `posprobe/app/`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "posprobe"


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _resolve(name: str, modules: dict) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """posprobe module -> the posprobe modules it imports anywhere in its source."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {_resolve(a.name, modules) for a in node.names if a.name.split(".")[0] == "posprobe"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                if base.split(".")[0] != "posprobe":
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else _resolve(base, modules))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "posprobe.scan" in graph and "posprobe.probes.base" in graph["posprobe.scan"]
    assert "posprobe.scan" in graph["posprobe.app.catalog"]  # the explorer reads saved scans


def test_cycle_finder_finds_a_planted_cycle():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert sorted(cycles(planted)) == [["a", "b", "c"], ["e", "e2"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles among posprobe modules: {found}"


@pytest.mark.parametrize("module", ["posprobe.scan", "posprobe.cli", "posprobe", "posprobe.render"])
def test_core_never_imports_the_explorer(module):
    graph = import_graph()
    seen, todo = set(), [module]
    while todo:  # everything reachable from the module
        current = todo.pop()
        if current in seen or current.startswith("posprobe.app"):
            continue
        seen.add(current)
        todo.extend(graph[current])
    assert not any(target.startswith("posprobe.app") for m in seen for target in graph[m])


BACKENDS = {"transformers", "tokenizers", "transformer_lens", "nnsight"}
ONLY_IN = {**{name: "posprobe/adapters/" for name in BACKENDS},
           "dash": "posprobe/app/", "dash_ag_grid": "posprobe/app/"}


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of every package a module imports (anywhere in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_model_libraries_only_in_adapters_and_dash_only_in_the_app():
    misplaced = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        for name in third_party_imports(path) & set(ONLY_IN):
            if not rel.startswith(ONLY_IN[name]):
                misplaced.append(f"{rel} imports {name} (only {ONLY_IN[name]} may)")
    assert not misplaced, misplaced
