"""At most once per (sender, stream, sequence number): the transport's duplicate filter.

A peer's data-plane frames carry a sequence number per stream (:func:`ringd.core.wire.
sequence_head`). A frame may reach this node twice -- by UDP, and again by TCP when the
sender gave up on UDP and resent what it had no ack for -- and only the first copy counts.
Pure: no clock, bounded memory.
"""

from __future__ import annotations

from collections import OrderedDict


class _Window:
    __slots__ = ("session", "floor", "above")

    def __init__(self, session: int) -> None:
        self.session = session
        self.floor = 0  # every seq <= floor was seen (sequence numbers start at 1)
        self.above: set[int] = set()  # seen, above the floor


class Deduplicator:
    """Remembers which sequence numbers each (sender, stream) delivered.

    A sender's new session (its process restarted) starts its windows afresh. Per window at
    most ``window`` numbers above the lowest unseen one are kept (a frame further behind
    than that counts as seen: frames that late are stale anyway); at most ``max_windows``
    windows, the least recently used forgotten first.
    """

    def __init__(self, *, window: int = 4096, max_windows: int = 16384) -> None:
        self.window = window
        self.max_windows = max_windows
        self._windows: OrderedDict[tuple[str, int], _Window] = OrderedDict()

    def fresh(self, sender: str, stream: int, session: int, seq: int) -> bool:
        """True the first time (``sender``, ``stream``, ``seq``) of ``session`` is seen."""
        key = (sender, stream)
        w = self._windows.get(key)
        if w is None or w.session != session:
            w = self._windows[key] = _Window(session)
            if len(self._windows) > self.max_windows:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        if seq <= w.floor or seq in w.above:
            return False
        w.above.add(seq)
        while w.floor + 1 in w.above:
            w.floor += 1
            w.above.discard(w.floor)
        if len(w.above) > self.window:  # a hole that never fills: give up on it
            w.floor = min(w.above) - 1
            while w.floor + 1 in w.above:
                w.floor += 1
                w.above.discard(w.floor)
        return True
