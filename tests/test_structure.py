"""The package's shape: no import circles, rich only in the renderer, data that never knows how
it is drawn, small modules. Checked over every module, and shown to catch a violation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import autoaccum

PACKAGE = Path(autoaccum.__file__).parent
#: the front doors that print: the command line, and fit() when asked to show progress/report
MAY_IMPORT_RENDERER = {"autoaccum.cli", "autoaccum.train.fit"}
#: modules that hold or compute data; they never import a front door or the renderer
DATA = (
    "autoaccum.results",
    "autoaccum.plan",
    "autoaccum.errors",
    "autoaccum.probing",
    "autoaccum.memory",
)
MAX_LINES = 350
#: the package's folders, top down: a folder imports only folders below it (and the bottom)
LAYERS = ("train", "render", "probing", "memory", "step")
#: the small modules at the bottom, below every folder: they import no folder
BOTTOM = (
    "plan",
    "schedule",
    "results",
    "snapshot",
    "formats",
    "distributed",
    "buckets",
    "rendezvous",
    "device",
    "errors",
    "_version",
)


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside a function (lazily)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def graph(root: Path) -> dict[str, set[str]]:
    """Module → the package's modules importing it runs: the module imported and every
    package above it (whose ``__init__`` runs first), the root and the importer's own
    packages excluded."""
    mods = modules(root)
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imported in imports(path):
            parts = imported.split(".")
            for depth in range(2, len(parts) + 1):
                target = ".".join(parts[:depth])
                if target in mods and target != name and not name.startswith(target + "."):
                    targets.add(target)
        edges[name] = targets
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def violations(root: Path) -> list[str]:
    """Every break of the package's structural rules under ``root``."""
    mods = modules(root)
    edges = graph(root)
    package = root.name
    renderer = f"{package}.render"
    problems = [f"circle: {' <-> '.join(c)}" for c in circles(edges)]
    for name, path in sorted(mods.items()):
        uses = imports(path)
        in_renderer = name == renderer or name.startswith(renderer + ".")
        if not in_renderer and any(u == "rich" or u.startswith("rich.") for u in uses):
            problems.append(f"{name} imports rich outside {renderer}")
        draws = any(u == renderer or u.startswith(renderer + ".") for u in uses)
        front_doors = {d.replace("autoaccum", package, 1) for d in MAY_IMPORT_RENDERER}
        if draws and not in_renderer and name not in front_doors:
            problems.append(f"{name} imports the renderer")
        data = tuple(d.replace("autoaccum", package, 1) for d in DATA)
        if name.startswith(data) and any(
            u.startswith((f"{package}.train.fit", f"{package}.cli")) for u in uses
        ):
            problems.append(f"{name} (data) imports a front door")
        problems.extend(_direction(name, uses, package))
        lines = path.read_text().count("\n")
        if lines > MAX_LINES:
            problems.append(f"{name} has {lines} lines (over {MAX_LINES})")
    return problems


def _layer(name: str, package: str) -> int | None:
    """The layer index of module ``name``'s folder (len(LAYERS) for the bottom modules, None
    for a front door: the top-level modules that may import anything)."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return len(LAYERS) if parts[1] in BOTTOM else None


def _direction(name: str, uses: set[str], package: str) -> list[str]:
    """A module importing a folder at or above its own (another folder) breaks the direction."""
    mine = _layer(name, package)
    if mine is None:
        return []
    found = []
    for used in sorted(uses):
        if not used.startswith(package + "."):
            continue
        theirs = _layer(used, package)
        same_folder = used.split(".")[1] == name.split(".")[1]
        both_bottom = theirs == mine == len(LAYERS)  # the small modules import each other
        if theirs is None or (theirs <= mine and not same_folder and not both_bottom):
            folder = ".".join(used.split(".")[:2])
            found.append(f"{name} imports {folder}, which is not below it")
    return sorted(set(found))


def test_the_package_keeps_its_structure() -> None:
    assert violations(PACKAGE) == []


def test_the_data_classes_do_not_know_how_they_are_drawn() -> None:
    for path in modules(PACKAGE).values():
        assert "__rich__" not in path.read_text(), path


def _write(root: Path, name: str, source: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


def test_the_check_catches_each_kind_of_violation(tmp_path: Path) -> None:
    """A package that breaks every rule once: each break is reported."""
    root = tmp_path / "autoaccum"
    _write(root, "__init__.py", "")
    _write(root, "results.py", "from autoaccum.plan import X\n")
    _write(root, "plan.py", "from autoaccum.results import Y\n")  # a circle
    # a circle through a package's __init__: importing a.x runs a/__init__ first
    _write(root, "a/__init__.py", "from autoaccum.a.x import f\n")
    _write(root, "a/x.py", "from autoaccum.b.y import g\n")
    _write(root, "b/__init__.py", "")
    _write(root, "b/y.py", "from autoaccum.a.z import h\n")
    _write(root, "a/z.py", "")
    _write(root, "memory/__init__.py", "import rich.table\n")  # rich outside the renderer
    _write(root, "render/__init__.py", "import rich\n")
    _write(root, "probing/__init__.py", "def f():\n    from autoaccum.render import draw\n")
    _write(root, "memory/explain.py", "from autoaccum.train.fit import fit\n")
    _write(root, "big.py", "x = 1\n" * (MAX_LINES + 1))
    _write(root, "step/oom.py", "from autoaccum.train.window import f\n")  # upward
    _write(root, "train/__init__.py", "")
    _write(root, "train/window.py", "")
    _write(root, "errors.py", "from autoaccum.step.oom import g\n")  # the bottom, upward
    _write(root, "step/model.py", "from autoaccum.hf import plan\n")  # a front door
    found = violations(root)
    assert sorted(found) == sorted(
        [
            "circle: autoaccum.a <-> autoaccum.a.x <-> autoaccum.b.y",
            "circle: autoaccum.plan <-> autoaccum.results",
            "autoaccum.big has 351 lines (over 350)",
            "autoaccum.memory imports rich outside autoaccum.render",
            "autoaccum.memory.explain (data) imports a front door",
            "autoaccum.probing imports the renderer",
            "autoaccum.probing imports autoaccum.render, which is not below it",
            "autoaccum.memory.explain imports autoaccum.train, which is not below it",
            "autoaccum.step.oom imports autoaccum.train, which is not below it",
            "autoaccum.errors imports autoaccum.step, which is not below it",
            "autoaccum.step.model imports autoaccum.hf, which is not below it",
        ]
    )


@pytest.mark.parametrize("name", ["autoaccum", "autoaccum.train", "autoaccum.memory"])
def test_package_inits_hold_no_logic(name: str) -> None:
    """A package's __init__ re-exports; the work lives in the modules the listing shows."""
    path = modules(PACKAGE)[name]
    tree = ast.parse(path.read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], name
