"""The package order of autospace_jax, checked over the source's ``ast`` (docs/DESIGN.md §13).

Each package imports only packages of lower layers; packages of one layer never
import one another; no module imports itself back through a chain (no cycle).
Function-level imports count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "autospace_jax")

# Lowest first. The modules at the top level (main, pipeline, config_checks,
# compile_check, compile_programs, __init__) form the top layer and may import anything but a cycle.
LAYERS = [
    {"runtime"},
    {"space", "data"},
    {"nn", "viz"},
    {"supernet"},
    {"latency"},
    {"evolution", "search", "final"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
TOP = len(LAYERS)


def modules() -> dict[str, str]:
    """Dotted module name -> path, for every module of the package."""
    found = {}
    for folder, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = path
    return found


def imports(path: str, known: set[str]) -> set[str]:
    """The autospace_jax modules ``path`` imports (``from x import y``: x.y if a module)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.startswith("autospace_jax"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("autospace_jax"))
    return out


def package(module: str) -> str | None:
    """The subpackage of ``module`` (None for the top-level modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else None


def rank(module: str) -> int:
    return RANK[package(module)] if package(module) is not None else TOP


GRAPH = {m: imports(p, set(modules())) for m, p in modules().items()}


def test_every_subpackage_has_a_layer():
    packages = {package(m) for m in GRAPH} - {None}
    assert packages == set(RANK), packages ^ set(RANK)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_follow_the_package_order(module):
    wrong = []
    for dep in GRAPH[module]:
        if package(dep) == package(module) or dep == "autospace_jax":
            continue  # Within one package (or among the top-level modules): the cycle test.
        if rank(dep) >= rank(module):
            wrong.append(f"{dep} (layer {rank(dep)})")
    assert not wrong, f"{module} (layer {rank(module)}) imports {wrong}"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current chain, 2: done.

    def visit(m: str, chain: list[str]) -> None:
        state[m] = 1
        for dep in sorted(GRAPH.get(m, ())):
            if dep == "autospace_jax" or dep.startswith(m + "."):
                continue  # A package's __init__ naming its own modules is not a cycle.
            if state.get(dep) == 1:
                cycle = chain[chain.index(dep) :] + [dep] if dep in chain else [m, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep in GRAPH and state.get(dep) is None:
                visit(dep, chain + [dep])
        state[m] = 2

    for m in sorted(GRAPH):
        if state.get(m) is None:
            visit(m, [m])


def test_the_check_sees_a_wrong_import(tmp_path):
    """The check can fail: a space module importing the supernet is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from autospace_jax.supernet import trainer\n")
    deps = imports(str(bad), set(GRAPH))
    assert "autospace_jax.supernet.trainer" in deps
    assert rank("autospace_jax.supernet.trainer") >= rank("autospace_jax.space.genome")
