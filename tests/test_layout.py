"""The package layout keeps its rules: no import circle between modules, each package imports only
packages on lower floors, no module above 700 lines, no private name imported across packages, and
no face that binds a name over one of its own submodules."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "layercrit"
MAX_LINES = 700
# Floors, bottom up: a package may import its own floor's top-level modules and anything lower.
FLOORS = [
    {"_version", "errors", "seeding"},
    {"_utils", "units"},
    {"models", "results"},
    {"data"},
    {"engine"},
    {"training"},
    {"analyses"},
    {"zoo"},
    {"viz"},
    {"cli", "testing"},
    {"__main__"},
]
FACE = ""  # the package `layercrit` itself (its __init__ re-exports from every floor)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def import_graph() -> dict[str, set[tuple[str, tuple[str, ...], int]]]:
    """Module → the (module, names, line) it imports from inside layercrit, at any depth (lazy imports too)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set] = {}
    for name, path in modules.items():
        base = name.split(".") if name else []
        if not _is_package(path):
            base = base[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                parent = base[: len(base) - (node.level - 1)]
                target = ".".join(parent + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    if sub in modules:
                        edges.add((sub, (), node.lineno))
                    else:
                        edges.add((target, (alias.name,), node.lineno))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "layercrit":
                raise AssertionError(f"{path}: import layercrit modules relatively, not as {node.module}")
        graph[name] = edges
    return graph


def _top(module: str) -> str:
    return module.split(".")[0] if module else FACE


def _floor(module: str) -> int:
    top = _top(module)
    return next(i for i, floor in enumerate(FLOORS) if top in floor)


def test_no_import_circle():
    graph = {m: {t for t, _, _ in edges if t != m} for m, edges in import_graph().items()}
    # a package face importing its own submodules is how faces work; a circle through the face is not
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t == FACE or (m and t and m.startswith(t + ".") and _is_face(t)):
                continue  # a submodule importing its package face is checked by test_floors
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if not state.get(t):
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)


def _is_face(module: str) -> bool:
    return (SRC.joinpath(*module.split(".")) / "__init__.py").exists()


def test_packages_import_only_lower_floors():
    upward = []
    for m, edges in import_graph().items():
        if m == FACE:
            continue
        for t, _, line in edges:
            if t == FACE:
                upward.append(f"{m}:{line} imports the package face")
            elif _top(t) != _top(m) and _floor(t) >= _floor(m):
                upward.append(f"{m}:{line} -> {t}")
    assert not upward, "imports that do not point to a lower floor:\n" + "\n".join(sorted(upward))


def test_no_private_name_across_packages():
    crossing = []
    for m, edges in import_graph().items():
        for t, names, line in edges:
            for n in names:
                if n.startswith("_") and not n.startswith("__") and _top(t) != _top(m) and not _top(t).startswith("_"):
                    crossing.append(f"{m}:{line} imports {t}.{n}")
    assert not crossing, "private names imported across packages:\n" + "\n".join(sorted(crossing))


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_module_size(path: Path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines (at most {MAX_LINES})"


def test_faces_do_not_shadow_submodules():
    shadowed = []
    for init in SRC.rglob("__init__.py"):
        package = _module_name(init)
        mod = importlib.import_module("layercrit" + (f".{package}" if package else ""))
        for child in init.parent.iterdir():
            name = child.stem if child.suffix == ".py" else child.name
            if name.startswith("__") or not (child.suffix == ".py" or (child / "__init__.py").exists()):
                continue
            full = f"{mod.__name__}.{name}"
            importlib.import_module(full)
            if getattr(mod, name) is not importlib.import_module(full):
                shadowed.append(f"{full} is {getattr(mod, name)!r}")
    assert not shadowed, "package faces binding a name over a submodule:\n" + "\n".join(shadowed)
