"""No import cycle anywhere in ``ncutfast/``: every module imports only modules below it.

The imports are read from the source (``ast``), so imports inside functions, relative imports and
``from package import submodule`` all count, whether or not they would run at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ncutfast

ROOT = Path(ncutfast.__file__).parent


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (packages by their __init__)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("ncutfast", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _defined(path: Path) -> set[str]:
    """Names bound at the top level of a module (assignments, defs, classes, imports)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from stem import x``: x is a submodule of stem (a compiled one if stem does not define x), or
            # a name defined in stem. (A package's __init__ runs before its submodules; like any parent
            # package it is not counted as their import.)
            targets = []
            for a in node.names:
                sub = f"{stem}.{a.name}"
                if sub in modules:
                    targets.append(sub)
                elif stem in modules and a.name in _defined(modules[stem]):
                    targets.append(stem)
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(graph):
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
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_import_graph_is_read_completely() -> None:
    """The parser sees relative, nested and ``from . import module`` imports (else the next test is void)."""
    graph = _graph()
    assert "ncutfast.backends.contract" in graph["ncutfast.backends.torch_backend"]  # from .contract import
    assert "ncutfast.backends" in graph["ncutfast.api"]  # from . import backends
    assert "ncutfast.backends.ext" in graph["ncutfast.backends"]  # from . import ext, inside a function
    assert "ncutfast.kernels.affinity" in graph["ncutfast.backends.triton_backend"]  # from ..kernels.affinity


def test_no_import_cycle_in_the_package() -> None:
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
