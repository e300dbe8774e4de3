"""The import rule: the pure core imports nothing from the network or compute layers,
nor asyncio, sockets or MLX; only compute/ imports MLX."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ringd"
CORE_FORBIDDEN = ("ringd.net", "ringd.compute", "ringd.daemon", "asyncio", "socket", "mlx", "numpy",
                  "time", "zeroconf", "uvloop", "aiohttp")


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


def test_only_compute_imports_mlx():
    bad = {}
    for f in PKG.rglob("*.py"):
        if "compute" in f.relative_to(PKG).parts:
            continue
        found = hits(imports_of(f), ("mlx", "mlx_lm"))
        if found:
            bad[str(f.relative_to(PKG))] = found
    assert bad == {}
