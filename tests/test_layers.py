"""The package's modules import only downward through its layers, and never in a cycle. Every
import statement counts, at module level, inside functions or under ``if TYPE_CHECKING``."""

from __future__ import annotations

import ast
from importlib.util import resolve_name
from pathlib import Path

import xstars_models

PACKAGE = "xstars_models"
ROOT = Path(xstars_models.__file__).resolve().parent

# Lowest first. A module belongs to the layer of its first name below the package (``scenes``
# for ``scenes.embed``); "" is the package's own __init__, the facade over everything.
LAYERS: list[tuple[str, ...]] = [
    # what describes sensors, imagery and a saved model's configuration
    ("errors", "units", "sensors", "config", "inputs", "precision", "distributed", "visualize", "io", "samples",
     "whitening", "devices"),
    ("encoder",),  # the network
    ("serialization", "lora", "manifest", "hub", "calibration", "stac_item"),  # weight files, the registry, the Hub, their STAC item
    ("model",),  # XStarsBase
    # what uses a model
    ("training", "adapters", "scenes", "archive", "publish", "evaluation", "data", "losses", "integrations", "export",
     "search"),
    ("xstars",),  # XStars: the model plus the methods that call into the layer above
    ("convert", "demo", "cli", ""),  # what hands users an XStars, and the entry points
]

# Imports that break the rules today, each with why and who fixes it; the test fails when one of
# them disappears, so that this list only ever shrinks.
KNOWN: dict[tuple[str, str], str] = {}


def module_files() -> dict[str, Path]:
    """Dotted names below the package ("" for its __init__) -> file."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (by the names in ``modules``), its own ancestors
    left out (Python runs them before the module anyway)."""
    package = ".".join(filter(None, [PACKAGE, name if path.name == "__init__.py" else name.rpartition(".")[0]]))
    found: set[str] = set()

    def add(dotted: str) -> None:
        if dotted != PACKAGE and not dotted.startswith(PACKAGE + "."):
            return
        local = dotted[len(PACKAGE) + 1:]
        while local and local not in modules:  # an attribute of a module, not a module
            local = local.rpartition(".")[0]
        if local != name and not (name + ".").startswith(local + "." if local else ""):
            found.add(local)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module or ""
            add(base)
            for alias in node.names:  # ``from . import submodule``
                add(f"{base}.{alias.name}")
    return found


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"Module {PACKAGE}.{name} is in no layer of tests/test_layers.py; add {top!r} to one.")


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other through imports (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walker_sees_every_kind_of_import():
    graph = import_graph()
    assert "config" in graph["encoder"]  # from .config import StemConfig
    assert {"scenes.reading", "scenes.tiling"} <= graph["scenes.embed"]  # relative, one level
    assert "xstars" in graph["cli.models"]  # inside a function, two levels up
    assert "scenes" not in graph["scenes.embed"]  # its own package is not an import of it
    assert {"training", "scenes", "adapters", "publish", "model"} <= graph["xstars"]


def test_imports_go_only_downward():
    graph = import_graph()
    upward = sorted(
        (source, target)
        for source, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(source) and (source, target) not in KNOWN
    )
    assert upward == [], "imports into a higher layer (module -> what it imports): " + ", ".join(
        f"{PACKAGE}.{s} -> {PACKAGE}.{t}" for s, t in upward
    )


def test_no_import_cycles():
    graph = import_graph()
    for source, target in KNOWN:
        assert target in graph[source], f"{source} no longer imports {target}: remove it from KNOWN"
        graph[source] = graph[source] - {target}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
