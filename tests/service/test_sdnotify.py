"""sd_notify over a real AF_UNIX datagram socket the test creates (path and abstract)."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Iterator

import pytest

from ringd.service.sdnotify import notify, watchdog_interval


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest,
                  tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        addr = str(tmp_path / "notify")
        sock.bind(addr)
        env = {"NOTIFY_SOCKET": addr}
    else:
        name = f"ringd-test-{secrets.token_hex(6)}"
        sock.bind(b"\0" + name.encode())
        env = {"NOTIFY_SOCKET": "@" + name}
    sock.settimeout(5)
    yield sock, env
    sock.close()


def test_each_notification_arrives(notify_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = notify_socket
    assert notify(status="loading layers 0-9\nof 30", environ=env)
    assert sock.recv(4096) == b"STATUS=loading layers 0-9 of 30\n"
    assert notify(ready=True, status="serving", environ=env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving\n"
    assert notify(watchdog=True, environ=env)
    assert sock.recv(4096) == b"WATCHDOG=1\n"
    assert notify(extend_timeout=20, environ=env)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=20000000\n"
    assert notify(stopping=True, status="leaving the ring", environ=env)
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=leaving the ring\n"


def test_no_socket_means_no_op() -> None:
    assert notify(ready=True, environ={}) is False
    assert notify(ready=True, environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_missing_listener_is_reported_not_raised(tmp_path: Path) -> None:
    assert notify(ready=True, environ={"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    mine = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": mine}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
