"""Network namespaces on a Linux bridge, for tests that need separate "hosts".

    with BridgeLab(2) as lab:          # raises NetnsUnavailable(reason) where it cannot
        a, b = lab.hosts               # Host(name, address, ...)
        subprocess.run(a.exec(["ip", "addr"]))
        with DelayedLink(a, b, 0.02) as slow:   # a second, slow link between two hosts
            slow.addresses             # (a's, b's) address on it

Each host is a namespace with a veth whose other end is on a bridge in the root namespace
(no address on the bridge, so nothing is routed to the machine's real interfaces;
multicast snooping off so mDNS floods). Names carry the pid and a random suffix so
parallel tests do not collide; everything is removed on exit, also after a failure.
"""

from __future__ import annotations

import fcntl
import heapq
import os
import secrets
import selectors
import shutil
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Sequence


class NetnsUnavailable(Exception):
    """Namespaces cannot be created here; the message says why."""


@dataclass(frozen=True)
class Host:
    name: str        # namespace name
    ifname: str      # interface inside the namespace
    address: str     # its IPv4 address (no prefix length)

    def exec(self, argv: Sequence[str]) -> list[str]:
        """argv prefixed to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, ["ip", *args], proc.stdout,
                                            proc.stderr)


class BridgeLab:
    """``n`` namespaces joined by one bridge, on 10.<random>.<random>.0/24."""

    def __init__(self, n: int = 2) -> None:
        if not 1 <= n <= 200:
            raise ValueError("1..200 hosts")
        tag = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
        self.bridge = f"rbr{tag}"[:15]
        net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
        self.hosts = [Host(f"ringd-{tag}-{i}", "eth0", f"{net}.{i + 1}") for i in range(n)]
        self._veths = [f"rv{tag}{i}"[:15] for i in range(n)]
        self._created_ns: list[str] = []
        self._created_bridge = False

    def __enter__(self) -> "BridgeLab":
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        try:
            self._build()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            self.close()
            detail = getattr(e, "stderr", "") or str(e)
            raise NetnsUnavailable(f"cannot build the namespace lab: {' '.join(e.cmd)}: "
                                   f"{detail.strip()}") from None
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
        self._created_bridge = True
        _ip("link", "set", self.bridge, "up")
        for host, veth in zip(self.hosts, self._veths):
            _ip("netns", "add", host.name)
            self._created_ns.append(host.name)
            _ip("link", "add", veth, "type", "veth", "peer", "name", host.ifname, "netns",
                host.name)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.ifname)
            _ip("-n", host.name, "link", "set", host.ifname, "up")
            _ip("-n", host.name, "link", "set", "lo", "up")

    def close(self) -> None:
        """Remove what was created (deleting a namespace deletes its veth pair)."""
        for name in reversed(self._created_ns):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        self._created_ns.clear()
        if self._created_bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=10)
            self._created_bridge = False


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can (we still try to build)."""
    if not os.uname().sysname == "Linux":
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI = 0x0002, 0x1000


class DelayedLink:
    """A second link between two hosts of a lab that is slow: a TAP device in each namespace
    (``ifname``), and a thread of this process that hands every Ethernet frame from one to
    the other ``delay`` seconds later (``tc netem`` is not available here; this is the same
    effect in userspace, on every packet, UDP and TCP alike). Addresses on
    10.<random>.<random>.1 and .2/24."""

    def __init__(self, a: Host, b: Host, delay: float, ifname: str = "eth1") -> None:
        tag = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
        net = f"10.{150 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
        self.hosts, self.delay, self.ifname = (a, b), delay, ifname
        self.addresses = (f"{net}.1", f"{net}.2")
        self._taps = [f"rt{tag}{i}"[:15] for i in range(2)]
        self._fds: list[int] = []
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._relay, name="delayed-link", daemon=True)
        self.frames = 0

    def __enter__(self) -> "DelayedLink":
        try:
            for tap, host, addr in zip(self._taps, self.hosts, self.addresses):
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
                self._fds.append(fd)
                fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", tap.encode(),
                                                        _IFF_TAP | _IFF_NO_PI))
                _ip("link", "set", tap, "netns", host.name)  # the open fd stays attached
                _ip("-n", host.name, "link", "set", tap, "name", self.ifname)
                _ip("-n", host.name, "addr", "add", f"{addr}/24", "dev", self.ifname)
                _ip("-n", host.name, "link", "set", self.ifname, "up")
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            self.close()
            detail = getattr(e, "stderr", "") or str(e)
            raise NetnsUnavailable(f"cannot build a delayed link: {detail.strip()}") from None
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _relay(self) -> None:
        sel = selectors.DefaultSelector()
        a, b = self._fds
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        sel.register(self._stop_r, selectors.EVENT_READ, None)
        due: list[tuple[float, int, int, bytes]] = []  # (when, order, to fd, frame)
        order = 0
        while True:
            timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
            for key, _ in sel.select(timeout):
                if key.data is None:
                    sel.close()
                    return
                try:
                    frame = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                heapq.heappush(due, (time.monotonic() + self.delay, order, key.data, frame))
                order += 1
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, to, frame = heapq.heappop(due)
                try:
                    os.write(to, frame)
                    self.frames += 1
                except OSError:
                    pass  # the device's queue is full or gone: the frame is lost, as on a wire

    def close(self) -> None:
        """Stop the relay and close the devices (closing a TAP fd removes the device)."""
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(5)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stop_r = self._stop_w = -1
