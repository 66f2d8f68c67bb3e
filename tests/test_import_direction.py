"""The floors point down: core, routing and experts import nothing from the floors above them.

Every ``import``/``from ... import`` statement of a module is read from its syntax tree, wherever
it stands (top level, function body, ``TYPE_CHECKING`` block), so a local import cannot hide an
upward dependency. Relative imports are resolved against the module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mola"
LOW = ("core", "routing", "experts", "utils")
HIGH = (
    "training",
    "inference",
    "evaluation",
    "analysis",
    "commands",
    "sweep",
    "allocators",
    "models",
    "data",
    "methods",
    "cli",
)
# utils is the ground floor: it imports nothing else of mola's.
ALLOWED = {
    "utils": ("utils",),
    "routing": ("routing", "utils"),
    "experts": ("experts", "utils", "core.cache"),
    "core": ("core", "routing", "experts", "utils"),
}


def mola_imports(source: str, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every mola name ``source`` imports, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package[: len(package) - node.level + 1]
                base = ".".join((*head, base) if base else head)
            names = [f"{base}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names]
    return [(line, name) for line, name in found if name == "mola" or name.startswith("mola.")]


def floor_imports(floor: str) -> list[tuple[str, int, str]]:
    """``(file, line, name)`` of every mola import in the floor's files."""
    out = []
    for path in sorted((SRC / floor).rglob("*.py")):
        package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
        for line, name in mola_imports(path.read_text(encoding="utf-8"), package):
            out.append((str(path.relative_to(SRC)), line, name))
    return out


def test_the_parser_sees_local_relative_and_type_checking_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import layer\n"
        "from ..routing.base import Router\n"
        "if TYPE_CHECKING:\n    from mola.training import trainer\n"
        "def f():\n    import mola.sweep.spec\n"
    )
    names = sorted(name for _, name in mola_imports(source, ("mola", "core")))
    assert names == [
        "mola.core.layer",
        "mola.routing.base.Router",
        "mola.sweep.spec",
        "mola.training.trainer",
    ]


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_low_floors_import_only_their_floor_or_below(floor):
    bad = []
    for path, line, name in floor_imports(floor):
        rest = name[len("mola.") :]
        if rest == "__version__":  # the package root's version string, defined before any import
            continue
        if not any(rest == ok or rest.startswith(ok + ".") for ok in ALLOWED[floor]):
            bad.append(f"{path}:{line} imports {name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("floor", ["core", "routing", "experts"])
def test_no_low_floor_reaches_a_high_one(floor):
    """The issue's contract, stated directly: nothing from the floors above."""
    bad = [
        f"{path}:{line} imports {name}"
        for path, line, name in floor_imports(floor)
        if name.split(".")[1] in HIGH
    ]
    assert not bad, "\n".join(bad)


def module_of(name: str) -> str | None:
    """The mola module (file) an imported dotted name lives in, or None."""
    parts = name.split(".")
    while parts:
        path = SRC.parent.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = parts[:-1]
        targets = {module_of(name) for _, name in mola_imports(path.read_text("utf-8"), package)}
        graph[module] = {t for t in targets if t and t != module and t != "mola"}
    return graph


def test_no_two_modules_of_the_low_floors_import_each_other():
    """No two-file import circle in core, routing or experts (packages' ``__init__`` aside)."""
    graph = import_graph()
    low = [
        m for m in graph if m.count(".") > 1 and m.split(".")[1] in ("core", "routing", "experts")
    ]
    circles = sorted(
        f"{a} <-> {b}"
        for a in low
        for b in graph[a]
        if a < b and a in graph.get(b, ()) and b.count(".") > 1
    )
    assert not circles, circles
