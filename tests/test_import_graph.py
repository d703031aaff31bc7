"""The package reads like the pipeline: data flows one way, so imports do too.

Every import of an `nnssl` module inside `src/nnssl` (also imports inside functions; only
`if TYPE_CHECKING:` blocks are exempt, they never run) must point to the same layer or a lower
one, and no two modules may import each other, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# lower index = earlier in the pipeline; a module may import its own layer and the ones before it
LAYERS = [
    {"nnssl", "nnssl.errors", "nnssl.log", "nnssl.io_utils", "nnssl.paths", "nnssl.settings", "nnssl.workers",
     "nnssl.registry"},
    {"nnssl.data"},
    {"nnssl.planning"},
    {"nnssl.preprocessing"},
    {"nnssl.dataloading"},
    {"nnssl.models"},
    {"nnssl.methods"},
    {"nnssl.checkpoints"},
    {"nnssl.training"},
    {"nnssl.export"},
    {"nnssl.evaluation"},
    {"nnssl.demo", "nnssl.api"},
    {"nnssl.cli"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "nnssl").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("nnssl"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("nnssl"):
                for alias in child.names:  # `from nnssl.data import collection` imports a module
                    sub = f"{child.module}.{alias.name}"
                    found.add(sub if sub in modules else child.module)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules}


def _layer(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if module in layer or any(module.startswith(prefix + ".") for prefix in layer if prefix != "nnssl"):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_no_module_imports_a_later_stage_of_the_pipeline():
    upward = [f"{m} -> {d}" for m, deps in sorted(_graph().items()) for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not upward, "imports against the data flow:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
