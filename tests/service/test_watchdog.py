"""systemd watchdog pings and the stall detector, on a fake clock; the detector's thread
against a really blocked loop; and a really stalled process."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ringd.service.watchdog import EXIT_STALLED, StallDetector, StallWatch, systemd_watchdog


class FakeClock:
    """The loop's time, moved only by the test.

    ``clock()`` reads it; ``await clock.sleep(d)`` returns once :meth:`advance` has moved
    time past its deadline; :meth:`stall` moves time while the loop runs nothing.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + delay, next(self._order), woken))
        await woken

    async def advance(self, delay: float) -> None:
        """Move time on by ``delay``, waking each sleeper at its deadline, in order."""
        end = self.now + delay
        while self._sleepers and self._sleepers[0][0] <= end:
            at, _, woken = heapq.heappop(self._sleepers)
            self.now = max(self.now, at)
            if not woken.done():
                woken.set_result(None)
                await asyncio.sleep(0)  # the sleeper runs up to its next sleep
        self.now = end

    def stall(self, delay: float) -> None:
        """Time passes and nothing on the loop runs (a blocked loop)."""
        self.now += delay


# --------------------------------------------------------------------------- systemd pings
async def test_systemd_watchdog_pings_every_half_interval_on_the_loop_clock() -> None:
    clock = FakeClock()
    pings: list[float] = []
    task = asyncio.create_task(systemd_watchdog(30.0, ping=lambda: pings.append(clock.now),
                                                sleep=clock.sleep))
    try:
        await asyncio.sleep(0)
        assert pings == [0.0]  # at once, not after the first period
        await clock.advance(14.9)
        assert pings == [0.0]
        await clock.advance(60.1 - 14.9)
        assert pings == [0.0, 15.0, 30.0, 45.0, 60.0]
        clock.stall(100.0)  # a blocked loop sends nothing ...
        assert pings[-1] == 60.0
        await clock.advance(0.0)  # ... and pings again the moment it runs
        assert pings[-1] == 160.1
    finally:
        task.cancel()


async def test_the_default_ping_is_watchdog_1_on_notify_socket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    task = asyncio.create_task(systemd_watchdog(3600.0))
    try:
        got = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 100), 5)
        assert got == b"WATCHDOG=1\n"
    finally:
        task.cancel()
        sock.close()


# --------------------------------------------------------------------------- the decision
def test_period_is_a_quarter_of_the_limit_at_most_one_second() -> None:
    assert StallWatch(0.4, now=0.0).period == pytest.approx(0.1)
    assert StallWatch(30.0, now=0.0).period == 1.0
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="stall_timeout must be positive"):
            StallWatch(bad, now=0.0)


def test_a_loop_that_stops_beating_is_stalled_at_the_first_check_past_its_deadline() -> None:
    w = StallWatch(4.0, now=0.0)  # period 1
    for t in range(1, 11):
        w.beat(float(t))
        assert w.check(t + 0.5) is None
    assert w.deadline() == 14.0  # the last beat was at 10
    assert [w.check(t) for t in (11.0, 12.0, 13.0, 14.0)] == [None] * 4  # 14: at, not over
    assert w.check(14.5) == 4.5


def test_bursts_under_the_limit_never_count_as_a_stall() -> None:
    w = StallWatch(4.0, now=0.0)
    beats = itertools.count(3.9, 3.9)  # a busy loop that beats only every 3.9 s
    next_beat = next(beats)
    for tenth in range(1, 1001):  # the watcher looks every period (1 s) for 100 s
        now = tenth / 10
        if now >= next_beat:
            w.beat(next_beat)
            next_beat = next(beats)
        if tenth % 10 == 0:
            assert w.check(now) is None, now
    assert w.deadline() > 100.0


def test_a_paused_watcher_does_not_blame_the_loop() -> None:
    w = StallWatch(4.0, now=0.0)
    assert w.check(1.0) is None
    # The whole process was stopped 60 s (SIGSTOP, a paused VM): the watcher's next look is
    # far later than period + limit / 2; the loop is not the one that failed to run.
    assert w.check(61.0) is None
    assert w.deadline() == 65.0
    # The loop does not come back after the pause: counted from the resume, it is a stall.
    assert [w.check(t) for t in (62.0, 63.0, 64.0, 65.0)] == [None] * 4
    assert w.check(66.0) == 5.0


def test_a_watcher_late_by_exactly_period_plus_half_the_limit_still_blames_the_loop() -> None:
    on_time = StallWatch(4.0, now=0.0)
    assert on_time.check(3.0) is None  # 3.0 = 1 + 4 / 2 late: an ordinary look
    assert on_time.check(4.5) == 4.5
    paused = StallWatch(4.0, now=0.0)
    assert paused.check(3.01) is None  # later than that: the watcher itself was paused
    assert paused.check(4.5) is None and paused.deadline() == 7.01


# --------------------------------------------------------------------------- the detector
async def test_detector_beats_on_the_loop_clock_and_exits_once_the_loop_stops(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    codes: list[int] = []
    det = StallDetector(4.0, exit=codes.append, clock=clock, sleep=clock.sleep)
    beats = asyncio.create_task(det.beat_forever())
    try:
        await asyncio.sleep(0)
        for _ in range(30):  # a responsive loop: the watcher's look every period finds no stall
            await clock.advance(det.period)
            assert not det.check()
        assert det.watch.beat_at == 30.0 and codes == [] and not det.fired
        looks = []
        with caplog.at_level(logging.CRITICAL, logger="ringd.service.watchdog"):
            for _ in range(5):  # the loop stops: time passes, no beat
                clock.stall(det.period)
                looks.append(det.check())
    finally:
        beats.cancel()
    assert looks == [False, False, False, False, True]
    assert codes == [EXIT_STALLED] and det.fired
    [record] = caplog.records
    message = record.getMessage()
    assert message.startswith("event loop stalled for 5.0 s (limit 4.0 s); exiting with code 70")
    # the stack is the loop thread's (here the test's own), recorded by beat_forever
    assert "in test_detector_beats_on_the_loop_clock_and_exits_once_the_loop_stops" in message


async def test_detector_thread_exits_the_process_while_the_loop_is_blocked() -> None:
    """Real time: the watcher thread must see a loop that is really blocked."""
    exited = threading.Event()
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    det = StallDetector(0.2, exit=fake_exit)
    task = asyncio.create_task(det.run())
    await asyncio.sleep(0)  # run() starts: first beat, watcher thread started
    # The stall under test: the loop blocks until the watcher "exits the process".
    assert exited.wait(timeout=10), "the stall detector did not fire on a blocked loop"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert codes == [EXIT_STALLED] and det.fired


async def test_cancelling_the_detector_ends_its_thread() -> None:
    det = StallDetector(30.0, exit=lambda code: pytest.fail(f"exit({code}) on a healthy loop"))
    before = set(threading.enumerate())
    task = asyncio.create_task(det.run())
    await asyncio.sleep(0)
    [watcher] = [t for t in threading.enumerate()
                 if t not in before and t.name == "ringd-stall-detector"]
    assert watcher.is_alive()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(watcher.join, 10)  # wakes at once, though its period is 1 s
    assert not watcher.is_alive() and not det.fired


CHILD = """
import asyncio, time
from ringd.logs import configure_logging
from ringd.service.watchdog import StallDetector

async def stuck_in_a_coroutine():
    time.sleep(60)

async def main():
    det = StallDetector(1.0)
    task = asyncio.create_task(det.run())
    await asyncio.sleep(0)
    print("detector running", flush=True)
    await stuck_in_a_coroutine()

configure_logging("info", False, "00000000000000cd")
asyncio.run(main())
"""


def test_stalled_process_exits_nonzero_within_bound() -> None:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=20)
    elapsed = time.monotonic() - start
    assert proc.returncode == EXIT_STALLED, proc.stderr
    assert proc.stdout == "detector running\n"
    assert elapsed < 5, elapsed
    assert "event loop stalled" in proc.stderr and "[00000000000000cd]" in proc.stderr
    assert "in stuck_in_a_coroutine" in proc.stderr  # the stack names where the loop is stuck
