"""Keeping the service manager informed that the event loop is alive.

- :func:`systemd_watchdog`: a coroutine pinging systemd (``WATCHDOG=1``) from the event loop
  at half the ``WatchdogSec=`` interval; a stalled loop stops the pings and systemd
  restarts the service.
- :class:`StallDetector`: for launchd (no watchdog there) and as a first line everywhere:
  the loop bumps a heartbeat; a separate thread logs the loop thread's stack and exits
  the process with code 70 when the heartbeat is older than ``stall_timeout``, so
  ``KeepAlive``/``Restart=on-failure`` restarts it. It cannot fire while the stuck code
  holds the GIL; the systemd watchdog covers that case.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback
from typing import Callable

from ringd.service.sdnotify import notify

log = logging.getLogger(__name__)

EXIT_STALLED = 70  # EX_SOFTWARE


async def systemd_watchdog(interval: float, *, ping: Callable[[], object] | None = None) -> None:
    """Ping the systemd watchdog every ``interval / 2`` seconds until cancelled."""
    send = ping or (lambda: notify(watchdog=True))
    period = interval / 2
    log.debug("pinging the systemd watchdog every %.1f s", period)
    while True:
        send()
        await asyncio.sleep(period)


class StallDetector:
    """Exit the process when the event loop makes no progress for ``stall_timeout`` seconds.

    Run :meth:`run` as a task on the loop to watch; cancelling it stops the watcher thread.
    """

    def __init__(self, stall_timeout: float, *, exit: Callable[[int], object] = os._exit,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if stall_timeout <= 0:
            raise ValueError("stall_timeout must be positive")
        self.stall_timeout = stall_timeout
        self.period = min(1.0, stall_timeout / 4)
        self._exit = exit
        self._clock = clock
        self._beat = clock()
        self._stop = threading.Event()
        self._loop_thread: int | None = None
        self.fired = False

    async def run(self) -> None:
        """Bump the heartbeat from the loop; watch it from a thread. Runs until cancelled."""
        self._loop_thread = threading.get_ident()
        self._beat = self._clock()
        self._stop.clear()
        watcher = threading.Thread(target=self._watch, name="ringd-stall-detector", daemon=True)
        watcher.start()
        try:
            while True:
                await asyncio.sleep(self.period)
                self._beat = self._clock()
        finally:
            self._stop.set()
            watcher.join()

    def _watch(self) -> None:
        last_check = self._clock()
        while not self._stop.wait(self.period):
            now = self._clock()
            if now - last_check > self.period + self.stall_timeout / 2:
                # This thread was not scheduled either (SIGSTOP, a paused VM): not the loop's fault.
                self._beat = now
            last_check = now
            stalled = now - self._beat
            if stalled > self.stall_timeout:
                self._fire(stalled)
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
