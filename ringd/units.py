"""Sizes in bytes, read from and written for people: ``"6GiB"`` <-> 6442450944.

Pure (no I/O, nothing but ``re``), so the pure core can format sizes in its messages
without importing :mod:`ringd.config` (which loads ``socket`` for the default node name).
"""

from __future__ import annotations

import re

from ringd.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Parse ``"6GiB"``, ``"512 MB"``, ``"1.5g"`` or a plain byte count into bytes."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a size like 6GiB, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise ConfigError(
                f"{what}: cannot read {text!r} as a size",
                hint="write a number with an optional unit: 6GiB, 512MiB, 8GB, 1073741824",
            )
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value < 0:
        raise ConfigError(f"{what}: a size cannot be negative ({text!r})")
    return value


def format_size(n: int | float) -> str:
    """Human size with binary units: ``format_size(3 * 2**30) == '3.0 GiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable
