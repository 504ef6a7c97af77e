"""The import graph of the repository, read from the source with ``ast`` (nothing is imported).

Rules (issue 20; one-way flow, shared types one floor below their users):

* no cycle between the subpackages / top-level modules of ``sparse_jax``;
* ``pallas_kernels`` never imports ``sparse_jax``;
* no kernel family (a subpackage of ``pallas_kernels``) imports another; what two families
  share lives in a top-level module of ``pallas_kernels`` (``pallas_kernels/common.py``).

Every import statement counts, including those under ``if TYPE_CHECKING:`` and inside
functions: a cycle hidden that way is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sparse_jax", "pallas_kernels")


def module_name(path: Path, root: Path) -> str:
    """``root/a/b/c.py -> "a.b.c"``; a package's ``__init__.py`` is named after the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``: dotted name -> file."""
    return {module_name(f, root): f for pkg in packages for f in sorted((root / pkg).rglob("*.py"))}


def imported_names(path: Path, module: str, known: set[str]) -> set[str]:
    """Absolute dotted names imported by one file (relative imports resolved).

    ``from pkg import name`` yields ``pkg.name`` when that is a module in ``known``,
    else ``pkg``.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in known else base)
    return names


def unit(module: str) -> str:
    """The graph node of a module: its package and first subpackage or module
    (``sparse_jax.attention.kv_cache -> sparse_jax.engine``)."""
    return ".".join(module.split(".")[:2])


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Unit -> the other units of ``packages`` it imports (a bare top package is no unit)."""
    modules = package_modules(root, packages)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        if "." not in module:
            continue
        targets = graph.setdefault(unit(module), set())
        for name in imported_names(path, module, set(modules)):
            if name.split(".")[0] in packages and "." in name and unit(name) != unit(module):
                targets.add(unit(name))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def kernel_families(root: Path = ROOT) -> set[str]:
    """``pallas_kernels.X`` for every subpackage ``X`` (a folder with ``__init__.py``)."""
    return {f"pallas_kernels.{d.name}" for d in (root / "pallas_kernels").iterdir() if (d / "__init__.py").exists()}


# --------------------------------------------------------------------------- the rules


def test_no_cycles_between_sparse_jax_subpackages():
    graph = {u: {t for t in ts if t.startswith("sparse_jax.")} for u, ts in import_graph().items()
             if u.startswith("sparse_jax.")}
    assert cycles(graph) == []


def test_pallas_kernels_never_imports_sparse_jax():
    bad = {u: sorted(t for t in ts if t.startswith("sparse_jax.")) for u, ts in import_graph().items()
           if u.startswith("pallas_kernels.")}
    assert {u: ts for u, ts in bad.items() if ts} == {}


def test_no_kernel_family_imports_another():
    families = kernel_families()
    graph = import_graph()
    bad = {f: sorted(graph.get(f, set()) & (families - {f})) for f in families}
    assert {f: ts for f, ts in bad.items() if ts} == {}


# --------------------------------------------------------------------------- the checker itself


def test_graph_sees_the_repository_imports():
    graph = import_graph()
    assert {"pallas_kernels.block_sparse", "pallas_kernels.vertical_slash", "pallas_kernels.paged_decode"} <= (
        kernel_families()
    )
    assert "pallas_kernels.common" in graph["pallas_kernels.vertical_slash"]
    assert "pallas_kernels.block_sparse" in graph["sparse_jax.attention"]


def test_checker_resolves_relative_imports_and_finds_cycles(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "from . import x\nfrom ..b import y\n",
        "pkg/a/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import z\n",
        "pkg/b/__init__.py": "",
        "pkg/b/y.py": "def f():\n    import pkg.a.x\n",
        "pkg/c.py": "from pkg import b\n",
        "pkg/d.py": "import os\nfrom pkg.b.y import f\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.b"}, "pkg.d": {"pkg.b"}}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert cycles({"p.a": {"p.b"}, "p.b": set()}) == []
