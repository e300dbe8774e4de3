"""systemd watchdog pings from the loop; the stall detector in-process and in a real process."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringd.service.watchdog import EXIT_STALLED, StallDetector, systemd_watchdog


async def test_watchdog_pings_at_half_the_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(systemd_watchdog(0.2))
    try:
        stamps = []
        for _ in range(6):
            assert await asyncio.wait_for(loop.sock_recv(sock, 100), 2) == b"WATCHDOG=1\n"
            stamps.append(time.monotonic())
    finally:
        task.cancel()
        sock.close()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert 0.08 < sum(gaps) / len(gaps) < 0.2, gaps


async def test_stall_detector_fires_on_a_blocked_loop() -> None:
    fired = asyncio.Event()
    codes: list[int] = []
    loop = asyncio.get_running_loop()

    def fake_exit(code: int) -> None:
        codes.append(code)
        loop.call_soon_threadsafe(fired.set)

    det = StallDetector(0.3, exit=fake_exit)
    task = asyncio.create_task(det.run())
    await asyncio.sleep(0)
    time.sleep(1.0)  # the stall under test: the loop is blocked
    await asyncio.wait_for(fired.wait(), 2)
    task.cancel()
    assert codes == [EXIT_STALLED] and det.fired


async def test_stall_detector_quiet_on_a_busy_but_responsive_loop() -> None:
    det = StallDetector(0.3, exit=lambda code: pytest.fail(f"exit({code}) on a healthy loop"))
    task = asyncio.create_task(det.run())
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:  # short blocking bursts, well under the limit
        time.sleep(0.02)
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not det.fired


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
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=20)
    elapsed = time.monotonic() - start
    assert proc.returncode == EXIT_STALLED, proc.stderr
    assert proc.stdout == "detector running\n"
    assert elapsed < 5, elapsed
    assert "event loop stalled" in proc.stderr and "[00000000000000cd]" in proc.stderr
    assert "in stuck_in_a_coroutine" in proc.stderr  # the stack names where the loop is stuck
