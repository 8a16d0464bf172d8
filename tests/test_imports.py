"""The import graph of components, app and eval: no cycle (function-level imports included) and the layering rule.

Parsed with `ast`, not imported: a function-level import that closes a cycle is a cycle hidden, not removed.
An edge goes to the module an import names (`from a.b import c` -> `a.b.c` when that is a module, else `a.b`);
the parent packages Python initialises on the way are not edges, so a package `__init__` re-exporting its
modules is not a cycle by itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "app", "eval")
FORBIDDEN_IN_COMPONENTS = ("lightning", "pytorch_lightning", "mlflow", "lm_eval", "kubernetes", "app", "eval")


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module of PACKAGES (a package is its __init__.py)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(module named, name taken from it or None) for every import statement anywhere in the file (module or
    function level); relative imports resolved against `module`."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.extend((base, alias.name) for alias in node.names)
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of PACKAGES it imports (`from pkg import name` goes to pkg.name when that is a
    module, else to pkg)."""
    graph = {}
    for module, path in modules.items():
        edges = set()
        for base, name in imports(module, path):
            target = f"{base}.{name}" if f"{base}.{name}" in modules else base
            if target in modules:
                edges.add(target)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search, modules in sorted order)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_cycle_finder_names_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "components"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from components.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from components import a\n    return a\n")
    (pkg / "c.py").write_text("from . import a\n")
    modules = {"components": pkg / "__init__.py", **{f"components.{m}": pkg / f"{m}.py" for m in "abc"}}
    graph = import_graph(modules)
    assert graph["components.c"] == {"components.a"}  # relative import resolved
    assert find_cycle(graph) == ["components.a", "components.b", "components.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_no_import_cycle_in_components_app_and_eval():
    cycle = find_cycle(import_graph(module_files()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(m for m in module_files() if m.startswith("components")))
def test_components_never_import_the_application_layers(module):
    path = module_files()[module]
    bad = sorted({base for base, _ in imports(module, path) if base.split(".")[0] in FORBIDDEN_IN_COMPONENTS})
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; components may not import {FORBIDDEN_IN_COMPONENTS}"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_bench_scripts_run_as_modules_without_editing_sys_path(script):
    """`python -m bench.NAME` from the repository root finds components/app by itself."""
    tree = ast.parse((ROOT / "bench" / script).read_text())
    edits = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
             and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert not edits, f"bench/{script} touches sys.path on line(s) {edits}; run it as python -m bench.{script[:-3]}"
