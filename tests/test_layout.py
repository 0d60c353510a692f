"""The package layout of the README's Architecture section: no import cycles between
rankcut's modules (function-level imports included) and no private name used across them."""

import ast
from pathlib import Path

import rankcut

SRC = Path(rankcut.__file__).parent
#: The layers of the README's Architecture section, in order: each imports only from the
#: ones before it (a package's own modules aside).
LAYERS = ["_version", "errors", "core", "methods", "nn", "architecture", "io", "offline",
          "loading", "calibration", "measure", "compression", "recipes", "runner", "report",
          "cli",
          "__init__"]


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for path in SRC.rglob("*.py"):
        parts = ("rankcut", *path.relative_to(SRC).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        trees[name] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return trees


def _imports(name: str, path: Path, tree: ast.Module, known: set[str]):
    """Yields (module imported, names taken from it) for every import in ``tree``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                yield (child if child in known else source), alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules():
    trees = _modules()
    graph = {name: {source for source, _ in _imports(name, path, tree, set(trees))
                    if source in trees and source != name}
             for name, (path, tree) in trees.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_from_another_module():
    trees = _modules()
    private = [(name, source, taken)
               for name, (path, tree) in trees.items()
               for source, taken in _imports(name, path, tree, set(trees))
               if source.startswith("rankcut") and taken and taken.startswith("_")
               and not taken.startswith("__")]
    assert private == []


def test_every_package_imports_only_from_earlier_layers():
    trees = _modules()
    layer = {name: name.split(".")[1] if "." in name else "__init__" for name in trees}
    wrong = sorted({(layer[name], layer[source])
                    for name, (path, tree) in trees.items()
                    for source, _ in _imports(name, path, tree, set(trees))
                    if source in trees and layer[source] != layer[name]
                    and LAYERS.index(layer[source]) > LAYERS.index(layer[name])})
    assert set(layer.values()) <= set(LAYERS)
    assert wrong == []
