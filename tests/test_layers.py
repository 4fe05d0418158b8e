"""The package's layers: every import in ``src/piip`` (top level and inside functions, read from the
source, not from what happens to be imported) points to the same layer or a lower one, and no
modules import each other in a loop. The order is the README's Layout."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
README = Path(__file__).resolve().parent.parent / "README.md"

#: lowest first; a package (or top-level module) may import its own layer and those before it
LAYERS = [
    ("precision", "version", "argtypes", "ops"),
    ("config",),
    ("layers",),
    ("weights",),
    ("models",),
    ("data",),
    ("engine",),
    ("tasks",),
    ("compat",),
    ("analysis",),
    ("export",),
    ("demo",),
    ("cli", "__main__", "piip"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{"piip.tasks.base": (path, is_package)}`` for every module under src/piip."""
    modules = {}
    for path in sorted((SRC / "piip").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imports(name: str, path: Path, is_package: bool, modules) -> list[tuple[str, int]]:
    """The piip modules ``name`` imports anywhere in its source, with the line of each import."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names]  # a name or a submodule
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("piip") and target != name:
                found.append((target, node.lineno))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "piip"


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    modules = _modules()
    return {name: _imports(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def test_every_package_has_a_layer(graph):
    missing = sorted({_layer(m) for m in graph} - set(RANK))
    assert not missing, f"packages without a place in LAYERS (and the README's Layout): {missing}"


def test_no_import_points_up_a_layer(graph):
    upward = [f"{module} (line {line}) imports {target}: layer {_layer(target)!r} is above {_layer(module)!r}"
              for module, targets in graph.items() for target, line in targets
              if RANK[_layer(target)] > RANK[_layer(module)]]
    assert not upward, "\n".join(upward)


def test_no_import_cycle(graph):
    edges = {module: {target for target, _ in targets} for module, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in edges[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    assert not cycles, f"modules importing each other in a loop: {cycles}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The parser reads an import in a function body and resolves relative imports."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from ..tasks import base\n    from . import build\n")
    modules = {"piip.engine.mod": (source, False), "piip.tasks.base": (None, False), "piip.tasks": (None, True),
               "piip.engine.build": (None, False), "piip.engine": (None, True)}
    assert _imports("piip.engine.mod", source, False, modules) == [("piip.tasks.base", 2), ("piip.engine.build", 3)]


def test_readme_states_the_same_order():
    text = README.read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("Layers, lowest first:")), None)
    assert line is not None, "README's Layout states the layer order in a line 'Layers, lowest first: ...'"
    stated = [tuple(re.findall(r"`([\w_]+)`", group)) for group in line.split(":", 1)[1].split("->")]
    assert stated == LAYERS
