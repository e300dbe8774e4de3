"""The entry's waiting room: requests that wait for a slot, or for the ring to re-plan.

First come, first served, at most ``max_queued`` waiting, each for at most ``queue_timeout``
seconds; a request woken that still finds no slot keeps its place at the head. Loop thread
only (asyncio futures).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, TypeVar

from ringd.errors import RequestError

T = TypeVar("T")


class AdmissionQueue:
    def __init__(self, max_queued: int = 32, queue_timeout: float = 60.0) -> None:
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.replanning = False  # the ring stopped serving to re-plan: new requests wait
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._waiters)

    async def admit(self, check: Callable[[], T]) -> T:
        """``check()``'s answer, at once or after waiting in the queue while it refuses with
        ``busy`` (or ``not_ready`` during a re-plan); beyond the queue's bounds, or any other
        refusal, the :class:`RequestError`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout
        woken = False  # it waited already: it keeps its place at the head of the queue
        while True:
            if woken or not self._waiters:
                try:
                    return check()
                except RequestError as e:
                    if not (e.code == "busy" or (e.code == "not_ready" and self.replanning)):
                        raise
                    if not woken and len(self._waiters) >= self.max_queued:
                        raise self._full(e) from None
            elif len(self._waiters) >= self.max_queued:
                raise self._full(RequestError("busy", "every slot is taken")) from None
            fut: asyncio.Future[None] = loop.create_future()
            if woken:
                self._waiters.appendleft(fut)
            else:
                self._waiters.append(fut)
            woken = True
            try:
                await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise RequestError("busy", f"waited {self.queue_timeout:g} s (queue_timeout) "
                                   "for a place on the ring", hint="retry later") from None
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    def wake(self, free: int | None = None) -> None:
        """Let the first ``free`` waiters try again (None: all of them)."""
        n = len(self._waiters) if free is None else free
        for fut in list(self._waiters)[:max(0, n)]:
            if not fut.done():
                fut.set_result(None)

    def _full(self, e: RequestError) -> RequestError:
        return RequestError("busy", f"{e.message}; {len(self._waiters)} more requests wait "
                            f"(max_queued = {self.max_queued})",
                            hint="retry later, or raise max_concurrent / max_queued")
