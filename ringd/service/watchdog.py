"""Keeping the service manager informed that the event loop is alive.

- :func:`systemd_watchdog`: a coroutine pinging systemd (``WATCHDOG=1``) from the event loop
  at half the ``WatchdogSec=`` interval; a stalled loop stops the pings and systemd
  restarts the service.
- :class:`StallDetector`: for launchd (no watchdog there) and as a first line everywhere:
  the loop bumps a heartbeat; a separate thread logs the loop thread's stack and exits
  the process with code 70 when the heartbeat is older than ``stall_timeout``, so
  ``KeepAlive``/``Restart=on-failure`` restarts it. It cannot fire while the stuck code
  holds the GIL; the systemd watchdog covers that case.
- :class:`StallWatch`: the detector's decision alone, fed the time (``now``) by its caller:
  no clock, no thread, no loop. Tests drive it, and the detector, on a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback
from typing import Awaitable, Callable

from ringd.service.sdnotify import notify

log = logging.getLogger(__name__)

EXIT_STALLED = 70  # EX_SOFTWARE

Sleep = Callable[[float], Awaitable[object]]


async def systemd_watchdog(interval: float, *, ping: Callable[[], object] | None = None,
                           sleep: Sleep = asyncio.sleep) -> None:
    """Ping the systemd watchdog every ``interval / 2`` seconds until cancelled.

    ``sleep`` is the loop's clock (tests pass a fake one).
    """
    send = ping or (lambda: notify(watchdog=True))
    period = interval / 2
    log.debug("pinging the systemd watchdog every %.1f s", period)
    while True:
        send()
        await sleep(period)


class StallWatch:
    """When the loop counts as stalled, decided from the times its callers pass in.

    The loop calls :meth:`beat` every :attr:`period`; a watcher calls :meth:`check` every
    :attr:`period`. A check later than :attr:`period` ``+ stall_timeout / 2`` after the
    previous one means the watcher was not scheduled either (SIGSTOP, a paused VM): not the
    loop's fault, so that check counts as a beat.
    """

    def __init__(self, stall_timeout: float, now: float) -> None:
        if stall_timeout <= 0:
            raise ValueError("stall_timeout must be positive")
        self.stall_timeout = stall_timeout
        self.period = min(1.0, stall_timeout / 4)
        self.beat_at = now
        self.checked_at = now

    def start(self, now: float) -> None:
        """Begin watching at ``now``: a fresh beat and a fresh check."""
        self.beat_at = self.checked_at = now

    def beat(self, now: float) -> None:
        """The loop made progress at ``now``."""
        self.beat_at = now

    def deadline(self) -> float:
        """The time after which a check, without a beat in between, finds the loop stalled."""
        return self.beat_at + self.stall_timeout

    def check(self, now: float) -> float | None:
        """How long the loop has been stalled when that is over the limit, else None."""
        if now - self.checked_at > self.period + self.stall_timeout / 2:
            self.beat_at = now
        self.checked_at = now
        stalled = now - self.beat_at
        return stalled if stalled > self.stall_timeout else None


class StallDetector:
    """Exit the process when the event loop makes no progress for ``stall_timeout`` seconds.

    Run :meth:`run` as a task on the loop to watch; cancelling it stops the watcher thread.
    :meth:`run` is :meth:`beat_forever` on the loop plus a thread calling :meth:`check`
    every period; ``clock`` and ``sleep`` are the loop's time (tests pass fake ones and
    drive those two halves themselves).
    """

    def __init__(self, stall_timeout: float, *, exit: Callable[[int], object] = os._exit,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.watch = StallWatch(stall_timeout, clock())
        self.stall_timeout = stall_timeout
        self.period = self.watch.period
        self._exit = exit
        self._clock = clock
        self._sleep = sleep
        self._loop_thread: int | None = None
        self.fired = False

    async def run(self) -> None:
        """Bump the heartbeat from the loop; watch it from a thread. Runs until cancelled."""
        stop = threading.Event()
        self.watch.start(self._clock())
        threading.Thread(target=self._watch, args=(stop,), name="ringd-stall-detector",
                         daemon=True).start()
        try:
            await self.beat_forever()
        finally:
            stop.set()  # the watcher wakes and ends; joining it here would block the loop

    async def beat_forever(self) -> None:
        """The loop's half: a beat every period, on the loop's clock. Runs until cancelled."""
        self._loop_thread = threading.get_ident()
        while True:
            await self._sleep(self.period)
            self.watch.beat(self._clock())

    def check(self) -> bool:
        """The watcher's half, one look: exit (and return True) when the loop is stalled."""
        stalled = self.watch.check(self._clock())
        if stalled is None:
            return False
        self._fire(stalled)
        return True

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.period):
            if self.check():
                return

    def _fire(self, stalled: float) -> None:
        self.fired = True
        frame = sys._current_frames().get(self._loop_thread or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(not available)\n"
        log.critical("event loop stalled for %.1f s (limit %.1f s); exiting with code %d so the "
                     "service manager restarts ringd. The loop thread is at:\n%s",
                     stalled, self.stall_timeout, EXIT_STALLED, stack.rstrip())
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:  # a broken log stream must not keep a stuck process alive
                pass
        self._exit(EXIT_STALLED)
