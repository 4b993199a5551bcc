"""The load tester's and the KV arithmetic's shape: every module imports, no import cycle
(checked on the source, function-level imports included), the load tester's layers import
downward only, no module over 400 lines, and service/kv imports nothing from vLLM."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("loadtest", "service/kv")
MAX_LINES = 400


def _modules(package: str) -> dict[str, Path]:
    """Dotted name -> file of every module under a package folder."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


ALL = {name: path for package in PACKAGES for name, path in _modules(package).items()}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it imports (anywhere in its source), plus its parent
    package, which Python imports first."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` also imports a.b and a
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        parent = name.rpartition(".")[0]
        if parent in modules:
            edges.add(parent)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle() -> None:
    graph = import_graph(ALL)
    assert graph["loadtest.kvheads.report"] >= {"loadtest.kvheads.explain", "loadtest.kvheads.plots"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    for name, text in {"a.py": "from pkg import b\n", "b.py": "def f():\n    from pkg.c import x\n",
                       "c.py": "import pkg.a\n", "__init__.py": ""}.items():
        (tmp_path / "pkg").mkdir(exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    modules = {f"pkg.{p.stem}" if p.stem != "__init__" else "pkg": p for p in (tmp_path / "pkg").glob("*.py")}
    assert find_cycle(import_graph(modules)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(ALL))
def test_modules_stay_small(name: str) -> None:
    lines = len(ALL[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{ALL[name].relative_to(ROOT)} has {lines} lines (> {MAX_LINES}): split it"


# The load tester's layers, lowest first: a module imports only from its own layer or below.
# studies and kvheads share the top layer but do not import each other; cli is above all.
LAYERS: dict[str, int] = {
    "core": 0, "server": 1, "output": 2, "local": 3, "studies": 4, "kvheads": 4, "cli": 5, "__main__": 6,
}


def layer_of(module: str) -> str | None:
    """The layer of a ``loadtest.*`` module (``None`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "loadtest" and len(parts) > 1 else None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a higher layer, or between the two top-layer siblings."""
    out = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        if here is None:
            continue
        for target in sorted(targets):
            there = layer_of(target)
            if there is None or there == here:
                continue
            if LAYERS[there] >= LAYERS[here]:
                out.append(f"{module} ({here}) imports {target} ({there})")
    return out


def test_every_loadtest_module_is_in_a_layer() -> None:
    assert {layer_of(name) for name in ALL if name.startswith("loadtest.")} - {None} <= set(LAYERS)


def test_layers_import_downward_only() -> None:
    graph = import_graph({name: path for name, path in ALL.items() if name.startswith("loadtest")})
    assert layer_violations(graph) == []


def test_the_layer_check_finds_an_upward_import() -> None:
    graph = {"loadtest.core.runner": {"loadtest.server.scrape", "loadtest.core"},
             "loadtest.studies.fleet_bench": {"loadtest.kvheads.prose"},
             "loadtest.output.report": {"loadtest.core.results"}}
    assert layer_violations(graph) == [
        "loadtest.core.runner (core) imports loadtest.server.scrape (server)",
        "loadtest.studies.fleet_bench (studies) imports loadtest.kvheads.prose (kvheads)",
    ]


def test_kv_arithmetic_imports_nothing_from_vllm() -> None:
    graph_sources = [path.read_text() for name, path in ALL.items() if name.startswith("service.kv")]
    for text in graph_sources:
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "vllm" or n.startswith("vllm.") for n in names)
