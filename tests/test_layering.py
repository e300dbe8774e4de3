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
