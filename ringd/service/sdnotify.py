"""systemd's ``sd_notify`` protocol, without a dependency.

Datagrams of ``KEY=value`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path,
or an abstract address written with a leading ``@``). Outside systemd every call is a
no-op returning False. Sends never block: a full socket drops the message (logged).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Mapping

log = logging.getLogger(__name__)

_sock: socket.socket | None = None
_sock_lock = threading.Lock()


def _address(environ: Mapping[str, str]) -> str | bytes | None:
    addr = environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        return b"\0" + addr[1:].encode()
    if addr.startswith("/"):
        return addr
    if addr:
        log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX address; not notifying systemd", addr)
    return None


def notify(*, ready: bool = False, status: str | None = None, stopping: bool = False,
           watchdog: bool = False, extend_timeout: float | None = None,
           environ: Mapping[str, str] | None = None) -> bool:
    """Send one notification; True when a datagram was sent.

    ``status`` is one line shown by ``systemctl status``; ``extend_timeout`` (seconds) asks
    for more time to start or stop (``EXTEND_TIMEOUT_USEC``).
    """
    env = os.environ if environ is None else environ
    addr = _address(env)
    if addr is None:
        return False
    lines = []
    if ready:
        lines.append("READY=1")
    if stopping:
        lines.append("STOPPING=1")
    if status is not None:
        lines.append("STATUS=" + " ".join(status.splitlines()))
    if watchdog:
        lines.append("WATCHDOG=1")
    if extend_timeout is not None:
        lines.append(f"EXTEND_TIMEOUT_USEC={int(extend_timeout * 1e6)}")
    if not lines:
        return False
    return _send(("\n".join(lines) + "\n").encode(), addr)


def _send(payload: bytes, addr: str | bytes) -> bool:
    global _sock
    with _sock_lock:
        if _sock is None:
            _sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            _sock.setblocking(False)
        try:
            _sock.sendto(payload, addr)
        except BlockingIOError:
            log.warning("systemd notify socket is full; dropped %r", payload[:40])
            return False
        except OSError as e:
            log.warning("cannot notify systemd at %r: %s", addr, e)
            return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The systemd watchdog timeout in seconds (``WATCHDOG_USEC``), or None when there is
    none or it is meant for another process (``WATCHDOG_PID``)."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None
