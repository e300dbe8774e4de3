"""This node's memory bandwidth (bytes/s), for the honest decode ceiling.

macOS on Apple silicon: the chip's published unified-memory bandwidth, looked up by the
name ``sysctl machdep.cpu.brand_string`` gives. Elsewhere: measured, copying buffers larger
than any cache on every core at once (bytes read plus bytes written per second, the best of
a few rounds). The setting ``memory_bandwidth`` overrides both.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import threading
import time

import numpy as np

log = logging.getLogger(__name__)

GB = 1e9

#: Published memory bandwidth of Apple silicon chips, GB/s (the full-bandwidth variant).
APPLE_CHIPS = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 546,
    "M5": 153,
}


def apple_chip_bandwidth(brand: str) -> float | None:
    """Bandwidth in bytes/s for a brand string like ``"Apple M2 Ultra"``; None if unknown."""
    name = brand.strip().removeprefix("Apple").strip()
    gbs = APPLE_CHIPS.get(name)
    return gbs * GB if gbs is not None else None


def measure_bandwidth(buffer_bytes: int = 64 << 20, rounds: int = 3,
                      threads: int | None = None) -> float:
    """Bytes moved per second by parallel buffer copies (read + write), best of ``rounds``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    n = max(1, min(threads or cores, 8))
    src = [np.ones(buffer_bytes // 8, dtype=np.float64) for _ in range(n)]
    dst = [np.empty_like(s) for s in src]
    best = 0.0
    for _ in range(rounds):
        workers = [threading.Thread(target=np.copyto, args=(d, s)) for d, s in zip(dst, src)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
        best = max(best, 2 * n * src[0].nbytes / elapsed)
    return best


def detect_bandwidth() -> tuple[float, str]:
    """(bytes/s, how it was found) for this machine."""
    if platform.system() == "Darwin":
        try:
            brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                   capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            brand = ""
        bw = apple_chip_bandwidth(brand)
        if bw is not None:
            return bw, f"published figure for {brand.strip()}"
        log.info("unknown chip %r: measuring the memory bandwidth", brand.strip())
    return measure_bandwidth(), "measured (parallel buffer copies)"
