"""How much memory this node can offer the ring.

Linux: what the kernel reports available, minus the reserve. macOS (Apple silicon): the
same, but never more than Metal's recommended working set — the most the GPU keeps wired
for MLX, about 70-75% of RAM by default. That limit can be raised, e.g. to 28 GiB on a
32 GiB Mac with ``sudo sysctl iogpu.wired_limit_mb=28672`` (resets at reboot).
"""

from __future__ import annotations

import platform

import psutil


def combine(available: int, total: int, reserve: int,
            metal_working_set: int | None) -> tuple[int, int]:
    """(usable, total) from measured numbers; the seam the tests exercise."""
    usable = max(0, available - reserve)
    if metal_working_set:
        usable = min(usable, metal_working_set)
    return usable, total


def metal_working_set() -> int | None:
    """Metal's recommended working set in bytes, or None off Apple silicon."""
    if platform.system() != "Darwin":
        return None
    import mlx.core as mx

    if not mx.metal.is_available():
        return None
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    value = info.get("max_recommended_working_set_size")
    return int(value) if value else None


def usable_memory(reserve: int) -> tuple[int, int]:
    """(usable, total) bytes: available memory minus ``reserve``, capped by Metal's limit."""
    vm = psutil.virtual_memory()
    return combine(vm.available, vm.total, reserve, metal_working_set())
