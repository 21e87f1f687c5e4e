"""The package's shape: small modules, and floors that import only downwards.

Floors, lowest first: core <- model <- formats <- costs, runtime, stages.<stage> <- pipeline <- commands (cli).
The import graph is read from module-level `import` / `from` statements (those under `if TYPE_CHECKING:` do not
run and are left out; imports inside functions are the lazy ones that keep the CLI fast).
"""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "puzzle"
MAX_LINES = 400
SHIPPED = PACKAGE / "formats" / "remote_code"  # copied beside exported checkpoints; imports only transformers
# Each floor may import its own floor and those below it (stages.<stage> may import other stages).
FLOOR = {"core": 0, "model": 1, "formats": 2, "costs": 3, "runtime": 3, "stages": 3, "demo": 4, "pipeline": 4,
         "commands": 5}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if SHIPPED in path.parents:
            continue
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def group(module: str) -> str:
    """The package a module belongs to: core, model, formats, costs, runtime, stages.<stage>, pipeline, commands."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ("cli", "__main__"):
        return "commands"
    if parts[0] == "stages":
        return "stages." + parts[1] if len(parts) > 1 else "stages"
    return parts[0]


def _floor(g: str) -> int:
    return FLOOR[g.split(".")[0]]


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: the module body, and the bodies of module-level
    `if`/`try` blocks other than `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                test = node.test
                name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
                if name != "TYPE_CHECKING":
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                    walk(block)

    walk(tree.body)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules of this package that an import statement loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            is_package = MODULES[module].name == "__init__.py"
            package = package[: len(package) - node.level + (1 if is_package else 0)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith("puzzle"):
            out.append(name)
    return out


def import_graph() -> dict[str, dict[str, list[str]]]:
    """group -> imported group -> the import sites ('module:line') that make the edge."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in _runtime_imports(tree):
            for target in _targets(module, node):
                a, b = group(module), group(target)
                if a != b:
                    edges[a][b].append(f"{module}:{node.lineno}")
    return edges


def test_no_module_exceeds_the_line_limit():
    too_long = {str(p.relative_to(SRC)): n for p in MODULES.values()
                if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_the_graph_sees_the_known_edges():
    edges = import_graph()
    assert "core" in edges["model"] and "model" in edges["formats"]
    assert "stages.search" in edges["pipeline"] and "pipeline" in edges["commands"]


def test_no_import_cycle_between_packages():
    edges = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            sites = [f"{a} -> {b} ({', '.join(edges[a][b][:2])})" for a, b in itertools.pairwise(cycle)]
            pytest.fail("import cycle between packages: " + "; ".join(sites))


def test_core_imports_nothing_above_it():
    edges = import_graph()
    assert not edges.get("core"), f"core imports {dict(edges['core'])}"


def test_floors_import_only_downwards():
    edges = import_graph()
    upward = [f"{a} -> {b} ({', '.join(sites[:2])})" for a, targets in edges.items() for b, sites in targets.items()
              if _floor(b) > _floor(a)]
    assert not upward, "imports that run up the floors: " + "; ".join(upward)
