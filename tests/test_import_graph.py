"""No circle in tpcli's imports: none among module-level imports (what runs at import time), by an `ast` walk of
every module; the same walk with function-level imports included finds exactly the groups grimp (import-linter's
graph) finds, so the two tools agree. Function-level cycles are allowed (the lazy imports that keep `tpcli --help`
torch-free); pyproject's `acyclic_siblings` contract lists the three that exist and refuses any new one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1] / "tpcli"
MODULE, FUNCTION = "module", "function"


def _name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(root: Path) -> tuple[set[str], dict[tuple[str, str], str]]:
    """(modules, {(importer, imported): MODULE or FUNCTION}) for the package at `root`; an import inside a def or
    under `if TYPE_CHECKING:` is not run at import time, so it counts as FUNCTION. `from a import b` is an edge to
    a.b when that is a module, else to a (grimp's convention)."""
    paths = {_name(root, p): p for p in root.rglob("*.py")}
    edges: dict[tuple[str, str], str] = {}

    def add(importer: str, target: str, kind: str) -> None:
        while target and target not in paths:
            target = target.rpartition(".")[0]
        if target and target != importer and edges.get((importer, target)) != MODULE:
            edges[(importer, target)] = kind

    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]

        def walk(node, kind: str, module=module, package=package) -> None:
            for child in ast.iter_child_nodes(node):
                inner = kind
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or \
                        isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    inner = FUNCTION
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        add(module, alias.name, inner)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")
                        base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
                    for alias in child.names:
                        add(module, f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base, inner)
                walk(child, inner)

        walk(ast.parse(path.read_text()), MODULE)
    return set(paths), edges


def cycles(modules: set[str], edges) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan, iterative), each sorted, sorted."""
    adjacent: dict[str, list[str]] = {}
    for a, b in edges:
        adjacent.setdefault(a, []).append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, iter(sorted(adjacent.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        m = stack.pop()
                        group.append(m)
                        if m == node:
                            break
                    if len(group) > 1:
                        out.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                work.append((child, iter(sorted(adjacent.get(child, ())))))
            elif child in stack:
                low[node] = min(low[node], index[child])
    return sorted(out)


def test_no_module_level_cycle():
    modules, edges = import_edges(ROOT)
    assert cycles(modules, {e for e, kind in edges.items() if kind == MODULE}) == []


def test_with_function_level_imports_the_cycles_are_grimps():
    grimp = __import__("grimp")
    graph = grimp.build_graph("tpcli")
    theirs = {(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)}
    modules, edges = import_edges(ROOT)
    assert set(edges) == theirs
    assert cycles(modules, edges) == cycles(set(graph.modules), theirs) != []  # three lazy ones today


def test_a_planted_module_level_cycle_is_found_and_a_lazy_one_is_not(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from .. import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from pkg import a\n\n\ndef f():\n    from pkg import d2\n")
    (package / "d2.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n")
    modules, edges = import_edges(package)
    assert cycles(modules, {e for e, kind in edges.items() if kind == MODULE}) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert cycles(modules, edges) == [["pkg.a", "pkg.c", "pkg.sub.b"], ["pkg.d", "pkg.d2"]]


MAX_LINES = 500  # the core issue's bound: a module past it does more than one job


def oversized(root: Path) -> dict[str, int]:
    """{module: lines} for every module of the package at `root` longer than MAX_LINES."""
    sizes = {_name(root, p): len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    return {m: n for m, n in sizes.items() if n > MAX_LINES}


def private_imports(root: Path) -> list[str]:
    """`module: name` for every `from <package>... import _name` (a private name taken from another module of the
    package); `import x as _x` (a private alias of a public name) and dunders (`__version__`) are fine."""
    top = root.name
    out = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == top):
                out += [f"{_name(root, path)}: {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.endswith("__")]
    return sorted(out)


def test_no_module_over_500_lines_and_no_private_name_across_modules():
    assert oversized(ROOT) == {}
    assert private_imports(ROOT) == []


def test_the_size_and_private_checks_find_planted_ones(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("_hidden = 1\n" + "x = 1\n" * MAX_LINES)
    (package / "b.py").write_text("from pkg.a import _hidden\nfrom .a import x as _x\n")
    assert oversized(package) == {"pkg.a": MAX_LINES + 1}
    assert private_imports(package) == ["pkg.b: _hidden"]
