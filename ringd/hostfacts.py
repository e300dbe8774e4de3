"""Facts about this machine that ``ringctl doctor`` judges (:mod:`ringd.doctor`).

The platform seam: everything here reads the machine (interfaces, ``sysctl``, MLX's view of
Metal) and nothing judges; the checks take the facts as arguments, so a Mac's facts are
tested anywhere. Each reader returns None for what it cannot read, never raises.
"""

from __future__ import annotations

import platform
import subprocess

from ringd.doctor import Interface, MacFacts


def system() -> str:
    """``Darwin``, ``Linux``, ..."""
    return platform.system()


def interfaces() -> list[Interface]:
    """This machine's interfaces with their IPv4 and IPv6 addresses (``ifaddr``)."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        addrs = []
        for ip in adapter.ips:
            addr = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            addrs.append((str(addr), int(ip.network_prefix)))
        out.append(Interface(adapter.nice_name or adapter.name, tuple(addrs)))
    return out


def _sysctl(name: str) -> int | None:
    try:
        proc = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = proc.stdout.strip()
    return int(text) if proc.returncode == 0 and text.isdigit() else None


def mac_facts() -> MacFacts | None:
    """A Mac's memory facts (None elsewhere): ``hw.memsize``, ``iogpu.wired_limit_mb`` and
    Metal's recommended working set as MLX reads it."""
    if system() != "Darwin":
        return None
    working_set = None
    try:
        from ringd.compute.memory import metal_working_set

        working_set = metal_working_set()
    except Exception:  # MLX missing or without Metal: the check says it could not read it
        working_set = None
    return MacFacts(memsize=_sysctl("hw.memsize"), wired_limit_mb=_sysctl("iogpu.wired_limit_mb"),
                    working_set=working_set)
