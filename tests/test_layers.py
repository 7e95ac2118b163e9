"""The layering of the packages (README "Layout"): imports only go down, and no two files import
each other, even through others. Checked on the source with ``ast``, so a function-body import
counts as much as one at the top; imports under ``if TYPE_CHECKING:`` count for the layers (a
type from a higher layer is still a dependency on it) but not for cycles (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = [
    ("disagg.common",),
    ("hip_kernels",),
    ("disagg.models",),
    ("disagg.engine",),
    ("connectors",),
    ("disagg.dp",),
    ("disagg.server",),
    ("proxy",),
    ("disagg", "bench"),
]
"""Lowest first: a module may import its own layer and the layers listed before it. ``disagg``
(the top-level modules: cli, demo, doctor, llm) and ``bench`` are the tools on top. The proxy
talks to instances over HTTP and ZMQ only, so it imports nothing of the server, engine or
connectors: only the wire types in disagg.common."""
PACKAGES = ("disagg", "connectors", "hip_kernels", "proxy", "bench")


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific prefix that names ``module``."""
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")[: -node.level] if not module.endswith("__init__") else \
        module.split(".")[: -node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, under TYPE_CHECKING) for every import in the file that names one
    of our packages (``from pkg import mod`` counts as pkg.mod when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for n in ast.walk(sub):
                    typing_only.add(id(n))
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(me, node)
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base
                     for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                out.append((name, getattr(node, "lineno", 0), id(node) in typing_only))
    return out


def _is_module(name: str) -> bool:
    p = REPO / Path(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    missing = [module_name(p) for p in source_files() if layer_of(module_name(p)) < 0]
    assert not missing


def test_imports_only_go_down() -> None:
    up = []
    for path in source_files():
        me = module_name(path)
        for name, line, _ in imports_of(path):
            if layer_of(name) > layer_of(me):
                up.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not up, "imports that go up a layer:\n" + "\n".join(up)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in source_files():
        me = module_name(path)
        deps = graph.setdefault(me, set())
        for name, _, typing_only in imports_of(path):
            while name and not _is_module(name):
                name = name.rpartition(".")[0]
            if name and name != me and not typing_only:
                deps.add(name)
    return graph


def test_no_import_cycles_between_files() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + "."):
                continue  # a package's __init__ importing its own modules is no cycle
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(("module", "layer"), [("disagg.common.config", 0), ("disagg", 8),
                                               ("disagg.engine.scheduler", 3),
                                               ("connectors.transports.tcp", 4)])
def test_layer_of_takes_the_most_specific_prefix(module: str, layer: int) -> None:
    assert layer_of(module) == layer


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """Guard against a checker that can never fail: a function-body import is found."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from disagg.server import api_server\n", encoding="utf-8")
    tree = ast.parse(src.read_text())
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found and layer_of("disagg.server.api_server") > layer_of("disagg.engine.x")
