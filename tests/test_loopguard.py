"""The loop guard (tests/loopguard.py): it fails a coroutine's blocking calls, whichever
patched call it is, and lets the same calls through off the loop, or when they cannot wait."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from tests.loopguard import BlockingCallInLoop, forbid_blocking_in_loop


def _listener(stack: contextlib.ExitStack) -> tuple[str, int]:
    server = stack.enter_context(socket.socket())
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server.getsockname()


def _blocking_call(kind: str, stack: contextlib.ExitStack) -> Callable[[], object]:
    """One call that would block, with what it needs made beforehand (off any loop)."""
    if kind == "sleep":
        return lambda: time.sleep(30)
    if kind in ("recv", "sendall with a timeout"):
        client = stack.enter_context(socket.create_connection(_listener(stack)))
        if kind == "recv":
            return lambda: client.recv(1)  # the peer never sends
        client.settimeout(5)
        return lambda: client.sendall(b"x")
    if kind == "tcp connect":
        sock = stack.enter_context(socket.socket())
        address = _listener(stack)
        return lambda: sock.connect(address)
    if kind == "create_connection":
        address = _listener(stack)
        return lambda: socket.create_connection(address)
    if kind == "name lookup":
        return lambda: socket.getaddrinfo("localhost", 80)
    if kind == "event wait":
        return lambda: threading.Event().wait()
    if kind == "thread join":
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        stack.callback(thread.join)
        stack.callback(stop.set)
        return lambda: thread.join()
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    if kind == "subprocess run":
        return lambda: subprocess.run(sleeper)
    if kind == "child wait":
        proc = stack.enter_context(subprocess.Popen(sleeper))
        stack.callback(proc.kill)
        return lambda: proc.wait()
    raise AssertionError(kind)


KINDS = ["sleep", "recv", "sendall with a timeout", "tcp connect", "create_connection",
         "name lookup", "event wait", "thread join", "subprocess run", "child wait"]


async def on_the_loop(call: Callable[[], object]) -> None:
    call()


@pytest.mark.parametrize("kind", KINDS)
def test_a_blocking_call_in_a_coroutine_raises_at_once_and_is_recorded(kind: str) -> None:
    with contextlib.ExitStack() as stack:
        call = _blocking_call(kind, stack)
        start = time.monotonic()
        with forbid_blocking_in_loop() as calls:
            with pytest.raises(BlockingCallInLoop, match="would block the event loop"):
                asyncio.run(on_the_loop(call))
        assert time.monotonic() - start < 5  # it did not wait
    [record] = calls
    assert "in on_the_loop" in record.stack  # the record says where the call was made


def test_the_record_names_the_call() -> None:
    with contextlib.ExitStack() as stack:
        calls_made = [_blocking_call(kind, stack) for kind in ("sleep", "recv", "thread join")]
        with forbid_blocking_in_loop() as calls:
            for call in calls_made:
                with pytest.raises(BlockingCallInLoop):
                    asyncio.run(on_the_loop(call))
    assert [c.name for c in calls] == ["time.sleep", "socket.socket.recv",
                                       "threading.Thread.join"]


async def _calls_that_cannot_block_the_loop() -> None:
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(time.sleep, 0.01)  # on an executor thread
    time.sleep(0)
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        b.setblocking(False)
        await loop.sock_sendall(a, b"ping")
        assert await loop.sock_recv(b, 4) == b"ping"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect(("127.0.0.1", 9))  # records the peer; nothing to wait for
    assert socket.getaddrinfo("127.0.0.1", 80)  # numeric: no resolver
    done = threading.Event()
    done.set()
    assert done.wait()
    t = threading.Thread(target=lambda: None)  # Thread.start waits for its thread to run
    t.start()
    await asyncio.to_thread(t.join)


def test_what_cannot_block_the_loop_goes_through() -> None:
    with forbid_blocking_in_loop() as calls:
        asyncio.run(_calls_that_cannot_block_the_loop())
        time.sleep(0.01)  # no loop runs on this thread now
    assert calls == []


def test_the_patches_are_undone() -> None:
    originals = (time.sleep, socket.getaddrinfo, threading.Event.wait, subprocess.run)
    with forbid_blocking_in_loop():
        assert time.sleep is not originals[0]
        assert "sendto" in vars(socket.socket)
    assert (time.sleep, socket.getaddrinfo, threading.Event.wait, subprocess.run) == originals
    assert "sendto" not in vars(socket.socket)  # inherited again from _socket.socket


INNER = '''
import asyncio, time
import pytest

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("no_blocking_in_loop")]

async def test_blocks():
    time.sleep(0.01)

async def test_blocks_and_swallows_the_error():
    try:
        time.sleep(0.01)
    except Exception:
        pass

async def test_stays_off_the_loop():
    await asyncio.sleep(0.01)
    await asyncio.to_thread(time.sleep, 0.01)
'''


def test_the_fixture_fails_each_test_whose_loop_blocked(pytester: pytest.Pytester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # summary lines in full
    pytester.makeconftest("from tests.conftest import no_blocking_in_loop  # noqa: F401\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rA",
                                          "-o", "asyncio_default_fixture_loop_scope=function")
    # test_blocks fails in its call and again in teardown; test_blocks_and_swallows_the_error
    # passes its call (the error was swallowed) and fails in teardown; the test that stays
    # off the loop passes.
    result.assert_outcomes(passed=2, failed=1, errors=2)
    result.stdout.fnmatch_lines_random([
        "FAILED test_inner.py::test_blocks - tests.loopguard.BlockingCallInLoop: time.sleep *",
        "ERROR test_inner.py::test_blocks - Failed: 1 blocking call(s) on the event loop*",
        "ERROR test_inner.py::test_blocks_and_swallows_the_error - Failed: 1 blocking call(s)*",
        "PASSED test_inner.py::test_stays_off_the_loop",
    ])
    out = result.stdout.str()
    assert "in test_blocks_and_swallows_the_error" in out and "time.sleep, called at" in out
