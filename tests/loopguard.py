"""Catch blocking calls made on an event loop's thread while the loop runs.

:func:`forbid_blocking_in_loop` patches the calls that block a thread (``time.sleep``, I/O
on a blocking socket, name resolution, waiting on a thread, an event or a child process)
so that, made from a thread whose event loop is running, each one is recorded and raises
:class:`BlockingCallInLoop` instead of blocking. The same calls from any other thread (an
executor, the MLX thread, the test before its loop starts) go through untouched.

The ``no_blocking_in_loop`` fixture (tests/conftest.py) fails a test in teardown when any
call was recorded, so a blocking call that the code under test swallowed still fails it.
It is on for every test under tests/net/ (tests/net/conftest.py).

python-zeroconf's suite does this with the ``blockbuster`` package; this is the same idea
without the dependency, and it catches only what it patches: a CPU-bound callback or a
blocking call of a C extension is not seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class BlockingCallInLoop(RuntimeError):
    """A blocking call was made on the thread of a running event loop."""


@dataclass(frozen=True)
class BlockingCall:
    name: str
    stack: str  # where it was called from, innermost last

    def __str__(self) -> str:
        return f"{self.name}, called at\n{self.stack}"


def _always(*args: Any, **kwargs: Any) -> bool:
    return True


def _positive_delay(secs: float = 0.0) -> bool:
    return secs > 0


def _socket_blocks(sock: socket.socket, *args: Any, **kwargs: Any) -> bool:
    return sock.gettimeout() != 0.0  # None (blocking) or a timeout: it may wait


def _connect_blocks(sock: socket.socket, *args: Any, **kwargs: Any) -> bool:
    # A datagram socket's connect only records the peer (and finds the route): no wait.
    return sock.type != socket.SOCK_DGRAM and _socket_blocks(sock)


def _resolves_a_name(host: Any, *args: Any, **kwargs: Any) -> bool:
    if host is None or host in ("", b""):
        return False
    name = host.decode() if isinstance(host, bytes) else str(host)
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return True  # a name: the resolver may ask the network
    return False


def _event_waits(event: threading.Event, timeout: float | None = None) -> bool:
    return not event.is_set() and timeout != 0


def _join_waits(thread: threading.Thread, timeout: float | None = None) -> bool:
    return thread.is_alive() and timeout != 0


def _child_waits(proc: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> bool:
    return proc.returncode is None


_SOCKET_IO = ("accept", "recv", "recv_into", "recvfrom", "recvfrom_into", "recvmsg",
              "send", "sendall", "sendto", "sendmsg")

# (owner, attribute, "would this call block?") for every patched call.
BLOCKING: list[tuple[Any, str, Callable[..., bool]]] = [
    (time, "sleep", _positive_delay),
    *((socket.socket, name, _socket_blocks) for name in _SOCKET_IO),
    (socket.socket, "connect", _connect_blocks),
    (socket, "getaddrinfo", _resolves_a_name),
    (socket, "gethostbyname", _resolves_a_name),
    (socket, "gethostbyname_ex", _resolves_a_name),
    (socket, "gethostbyaddr", _always),
    (socket, "create_connection", _always),
    (threading.Event, "wait", _event_waits),
    (threading.Thread, "join", _join_waits),
    (subprocess.Popen, "wait", _child_waits),
    (subprocess.Popen, "communicate", _child_waits),
    (subprocess, "run", _always),
]


# Waits that end at once by construction: (module file, function). Thread.start waits for
# the new thread to signal that it runs; the loop's shutdown_default_executor joins its
# helper thread after that thread has reported the executor shut down.
ALLOWED_CALLERS = {(threading.__file__, "start"),
                   (asyncio.base_events.__file__, "shutdown_default_executor")}


def _loop_is_running_here() -> bool:
    return asyncio._get_running_loop() is not None


def _allowed_caller() -> bool:
    caller = sys._getframe(2).f_code  # 0: here, 1: the guard, 2: who called the patched call
    return (caller.co_filename, caller.co_name) in ALLOWED_CALLERS


def _guarded(original: Callable[..., Any], name: str, blocks: Callable[..., bool],
             calls: list[BlockingCall]) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if _loop_is_running_here() and blocks(*args, **kwargs) and not _allowed_caller():
            stack = "".join(traceback.format_stack(limit=10)[:-1])
            calls.append(BlockingCall(name, stack))
            raise BlockingCallInLoop(f"{name} would block the event loop")
        return original(*args, **kwargs)

    guarded.__name__ = getattr(original, "__name__", name)
    guarded.__qualname__ = getattr(original, "__qualname__", name)
    guarded.__doc__ = original.__doc__
    return guarded


@contextlib.contextmanager
def forbid_blocking_in_loop() -> Iterator[list[BlockingCall]]:
    """While active, blocking calls on a running loop's thread raise; yields their record."""
    calls: list[BlockingCall] = []
    undo: list[Callable[[], None]] = []
    try:
        for owner, attr, blocks in BLOCKING:
            original = getattr(owner, attr)
            if attr in vars(owner):
                undo.append(lambda owner=owner, attr=attr, original=original:
                            setattr(owner, attr, original))
            else:  # inherited (socket.socket's I/O comes from _socket.socket)
                undo.append(lambda owner=owner, attr=attr: delattr(owner, attr))
            where = (f"{owner.__module__}.{owner.__qualname__}" if isinstance(owner, type)
                     else owner.__name__)
            name = f"{where}.{attr}"
            setattr(owner, attr, _guarded(original, name, blocks, calls))
        yield calls
    finally:
        for restore in reversed(undo):
            restore()
