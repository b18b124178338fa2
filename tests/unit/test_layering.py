"""The layering rule of the code base, enforced: who may import whom, and no cycles.

Layers, from the bottom: `errors` <- `xmpp` <- `config`, `storage` <- `net` <- `core` <- `app`
(with `logsetup` and `supervision` used by `net`, `core` and `app` only). `gateway/xmpp/`
is pure: it imports no trio, structlog or any other layer. An import inside
`if TYPE_CHECKING:` counts too: a cycle of types is still a cycle to read.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"

#: The layer of each top-level part of `gateway`, and the layers it may import.
LAYER = {
    "__init__": 0,
    "__main__": 10,
    "errors": 0,
    "xmpp": 1,
    "yaml_reader": 1,
    "redis_url": 2,
    "config": 3,
    "storage": 3,
    "logsetup": 4,
    "cli": 4,
    "supervision": 5,
    "net": 6,
    "core": 7,
    "workers": 7,
    "app": 8,
}
#: Third-party packages `gateway.xmpp` must not import (it is sans-I/O).
IMPURE = {"trio", "trio_websocket", "structlog", "asyncio", "socket", "ssl", "time"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(GATEWAY.rglob("*.py")):
        parts = path.relative_to(GATEWAY.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports (absolute names), including TYPE_CHECKING imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@functools.cache
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {
        name: {imported for imported in imports_of(path, name) if imported in mods} - {name}
        for name, path in mods.items()
    }


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def test_gateway_xmpp_is_pure() -> None:
    for name, path in modules().items():
        if not name.startswith("gateway.xmpp"):
            continue
        roots = {imported.split(".")[0] for imported in imports_of(path, name)}
        assert not roots & IMPURE, (name, roots & IMPURE)
        layers = {part(m) for m in imports_of(path, name) if m.startswith("gateway.")}
        assert layers <= {"xmpp", "errors"}, (name, layers)


@pytest.mark.parametrize("name", sorted(graph()))
def test_a_module_imports_only_its_own_or_lower_layers(name: str) -> None:
    mine = LAYER[part(name)]
    for imported in graph()[name]:
        theirs = LAYER[part(imported)]
        same = part(imported) == part(name)
        assert same or theirs < mine, f"{name} imports {imported} (a higher layer)"


def test_there_are_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
