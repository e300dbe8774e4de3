"""SWIM's gossip bookkeeping: which updates ride on the next message, and how long a
suspicion lasts. Helper state of :class:`ringd.core.membership.Membership`; pure, no clock.

- :class:`UpdateQueue` is memberlist's ``TransmitLimitedQueue``: one pending update per
  member (a newer claim replaces the older one), the least-sent and then newest first,
  each dropped after it has been sent ``limit`` times.
- :class:`Suspicion` is Lifeguard's suspicion timer (memberlist's ``suspicion``): its
  timeout starts at ``max_mult`` x the base and shrinks toward the base as independent
  members confirm it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ringd.core.swim_wire import MAX_UPDATES, Update, pack_update


@dataclass
class _Queued:
    update: Update
    packed: bytes
    transmits: int
    order: int


class UpdateQueue:
    """Updates waiting to be piggy-backed on probes and gossip, by member node id."""

    __slots__ = ("_items", "_order")

    def __init__(self) -> None:
        self._items: dict[str, _Queued] = {}
        self._order = 0

    def __bool__(self) -> bool:
        return bool(self._items)

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._items

    def put(self, u: Update) -> None:
        """Queue ``u``, replacing any update about the same member."""
        self._order += 1
        self._items[u.member.node_id] = _Queued(u, pack_update(u), 0, self._order)

    def discard(self, node_id: str) -> None:
        self._items.pop(node_id, None)

    def take(self, budget: int, limit: int) -> tuple[Update, ...]:
        """Updates whose encodings fit in ``budget`` bytes (at most ``MAX_UPDATES``); each
        one taken ``limit`` times leaves the queue."""
        picked: list[Update] = []
        for q in sorted(self._items.values(), key=lambda q: (q.transmits, -q.order)):
            if len(picked) >= MAX_UPDATES:
                break
            if len(q.packed) > budget:
                continue
            budget -= len(q.packed)
            picked.append(q.update)
            q.transmits += 1
            if q.transmits >= limit:
                del self._items[q.update.member.node_id]
        return tuple(picked)


@dataclass
class Suspicion:
    """A member suspected since ``start``; ``confirmations`` holds the node ids that claim it
    (the first suspecter included). ``k`` confirmations shrink the timeout to ``min``."""

    start: float
    k: int
    min: float
    max: float
    confirmations: set[str]

    @classmethod
    def begin(cls, now: float, origin: str, n: int, *, timeout: float, max_mult: float,
              confirmations: int) -> Suspicion:
        """A suspicion first claimed by ``origin`` in a ring of ``n`` members: the base is
        ``timeout x max(1, log10(n))``; with too few members to give ``confirmations``
        independent confirmations (``n - 2`` of them) it is just the base."""
        k = confirmations if n - 2 >= confirmations else 0
        base = timeout * max(1.0, math.log10(max(1, n)))
        return cls(now, k, base, max_mult * base, {origin})

    def deadline(self) -> float:
        n = len(self.confirmations) - 1  # the first suspecter does not count
        if self.k < 1:
            return self.start + self.min
        frac = math.log(n + 1) / math.log(self.k + 1)
        timeout = max(self.min, self.max - frac * (self.max - self.min))
        return self.start + timeout
