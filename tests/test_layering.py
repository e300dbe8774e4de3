"""The import rule: the pure core imports nothing from the network or compute layers,
nor asyncio, sockets or MLX; only compute/ imports MLX."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ringd"
CORE_FORBIDDEN = ("ringd.net", "ringd.compute", "ringd.daemon", "ringd.config", "asyncio", "socket",
                  "mlx", "numpy", "time", "zeroconf", "uvloop", "aiohttp")


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def hits(names: set[str], prefixes) -> list[str]:
    return sorted(n for n in names for p in prefixes if n == p or n.startswith(p + "."))


def test_core_is_pure():
    files = sorted((PKG / "core").rglob("*.py"))
    assert files, "ringd/core has no modules"
    bad = {str(f.relative_to(PKG)): hits(imports_of(f), CORE_FORBIDDEN) for f in files}
    assert {k: v for k, v in bad.items() if v} == {}


#: Modules that importing the pure core must not load, even through a helper it imports.
CORE_MUST_NOT_LOAD = ("socket", "asyncio", "selectors", "ssl", "mlx", "mlx_lm", "numpy",
                      "uvloop", "aiohttp", "zeroconf")

_LOAD_CORE = """
import importlib, json, pkgutil, sys
import ringd.core
names = sorted("ringd.core." + m.name for m in pkgutil.walk_packages(ringd.core.__path__))
for name in names:
    importlib.import_module(name)
print(json.dumps({"file": ringd.core.__file__, "imported": names, "loaded": sorted(sys.modules)}))
"""


def test_importing_core_loads_no_io_or_compute_module():
    """The static check above sees a module's own imports; this one runs a fresh interpreter,
    imports every module of ringd.core and looks at everything that got loaded on the way
    (``ringd.config`` loading ``socket`` once slipped in through ``core/plan.py``)."""
    out = subprocess.run([sys.executable, "-c", _LOAD_CORE], cwd=PKG.parent, capture_output=True,
                         text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert Path(result["file"]).resolve().parent == PKG / "core"  # this tree's, not another
    assert "ringd.core.wire" in result["imported"] and len(result["imported"]) > 5
    loaded = hits(set(result["loaded"]), CORE_MUST_NOT_LOAD)
    assert loaded == [], f"importing ringd.core loads {loaded}"


def test_only_compute_imports_mlx():
    bad = {}
    for f in PKG.rglob("*.py"):
        if "compute" in f.relative_to(PKG).parts:
            continue
        found = hits(imports_of(f), ("mlx", "mlx_lm"))
        if found:
            bad[str(f.relative_to(PKG))] = found
    assert bad == {}


# ------------------------------------------------------------------------ import circles
def module_names() -> dict[str, Path]:
    """Every module of ``ringd/`` by dotted name (a package by its own name)."""
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the ``ringd`` modules it imports, at module level or inside a function
    (a deferred import is still an edge), under ``if TYPE_CHECKING`` too.

    An edge goes to the module an import names (``from ringd.compute import store``: to
    ``ringd.compute`` and ``ringd.compute.store``; ``from ringd.x import name``: to
    ``ringd.x``). The parent package a submodule sits in is not an edge of its own: Python
    runs ``ringd/cli/__init__.py`` before ``ringd.cli.ring``, which is harmless while
    ``ringd.cli.ring`` imports nothing from ``ringd.cli`` itself -- and that import would
    be an edge.
    """

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                named = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                named = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in named:
                target = resolve(n) if n == "ringd" or n.startswith("ringd.") else None
                if target is not None and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    def path_back(start: str, group: set[str]) -> list[str]:
        seen, todo = {start: [start]}, [start]
        while todo:
            v = todo.pop(0)
            for w in sorted(graph[v] & group):
                if w == start:
                    return seen[v] + [start]
                if w not in seen:
                    seen[w] = seen[v] + [w]
                    todo.append(w)
        raise AssertionError("a strongly connected group without a cycle")

    return [path_back(min(g), g) for g in groups]


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_every_kind_of_import(tmp_path):
    files = {
        "ringd.__init__": "",
        "ringd.pkg.__init__": "from . import leaf\n",
        "ringd.pkg.leaf": "from typing import TYPE_CHECKING\n"
                          "if TYPE_CHECKING:\n    from ringd.typed import T\n",
        "ringd.typed": "import os\n",
        "ringd.top": "from ringd.pkg import leaf\nfrom ringd import typed\n"
                     "def later():\n    import ringd.deferred.x\n",
        "ringd.deferred.__init__": "",
        "ringd.deferred.x": "from ..typed import T\n",
    }
    modules = {}
    for name, text in files.items():
        path = tmp_path.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        modules[name.removesuffix(".__init__")] = path
    assert import_graph(modules) == {
        "ringd": set(),
        "ringd.pkg": {"ringd.pkg.leaf"},  # relative, from a package
        "ringd.pkg.leaf": {"ringd.typed"},  # under TYPE_CHECKING
        "ringd.typed": set(),
        # inside a function too; `import ringd.deferred.x` names only ringd.deferred.x
        "ringd.top": {"ringd", "ringd.pkg", "ringd.pkg.leaf", "ringd.typed", "ringd.deferred.x"},
        "ringd.deferred": set(),
        "ringd.deferred.x": {"ringd.typed"},  # relative, two levels up
    }


def test_no_import_circles_in_ringd():
    cycles = find_cycles(import_graph(module_names()))
    assert cycles == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)
