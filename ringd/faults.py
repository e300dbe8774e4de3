"""Faults a test can make a node play, read from the environment once by the entry point
(:func:`ringd.daemon.run_node`) and passed in to the parts that play them.

``RINGD_TEST_FAULT="NAME:MODE[,NAME:MODE...]"`` makes the node named NAME a broken node, so
tests can show the ring refuses to serve wrong output (:class:`Fault`).
``RINGD_TEST_STALL_AFTER=SECONDS`` blocks the event loop for good that long after the ring
is ready, as a hung call would; the stall detector must end the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping

from ringd.errors import UsageError

FAULT_ENV = "RINGD_TEST_FAULT"
STALL_ENV = "RINGD_TEST_STALL_AFTER"


class Fault(Enum):
    """How a broken node misbehaves."""

    SKIP_LAYERS = "skip-layers"  # runs none of its layers, and says so
    IDENTITY_LAYERS = "identity-layers"  # runs none, but claims it ran them
    STALE_EPOCH = "stale-epoch"  # routes with the previous plan epoch
    GAP = "gap"  # loads one layer fewer than assigned
    SLOW_SERVE = "slow-serve"  # serves weights to peers slowly (0.2 s a read), as a slow disk
    LOSSY = "lossy"  # its UDP datagrams: 2% dropped, 2% sent twice, 2% reordered


@dataclass(frozen=True)
class Faults:
    """What this node plays; the default plays nothing."""

    fault: Fault | None = None
    stall_after: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], node_name: str) -> "Faults":
        fault = None
        for item in env.get(FAULT_ENV, "").split(","):
            name, _, mode = item.strip().partition(":")
            if name and name == node_name:
                try:
                    fault = Fault(mode)
                except ValueError:
                    raise UsageError(f"{FAULT_ENV}: unknown mode {mode!r} for node {name}",
                                     hint="modes: " + ", ".join(f.value for f in Fault)) from None
        stall = env.get(STALL_ENV)
        try:
            stall_after = float(stall) if stall else None
        except ValueError:
            raise UsageError(f"{STALL_ENV}: {stall!r} is not a number of seconds") from None
        return cls(fault, stall_after)
