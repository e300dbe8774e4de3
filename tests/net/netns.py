"""Network namespaces on a Linux bridge, for tests that need separate "hosts".

    with BridgeLab(2) as lab:          # raises NetnsUnavailable(reason) where it cannot
        a, b = lab.hosts               # Host(name, address, ...)
        subprocess.run(a.exec(["ip", "addr"]))

Each host is a namespace with a veth whose other end is on a bridge in the root namespace
(no address on the bridge, so nothing is routed to the machine's real interfaces;
multicast snooping off so mDNS floods). Names carry the pid and a random suffix so
parallel tests do not collide; everything is removed on exit, also after a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
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
