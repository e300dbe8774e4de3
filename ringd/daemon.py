"""``ringd``: the composition root. Wires config, cores and adapters together."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from ringd.cli import fail

    fail("ringd run is not implemented yet")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
