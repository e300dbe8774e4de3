"""The largest UDP payload that reaches a peer without IP fragmentation.

The UDP channel never relies on IP fragmentation: a fragmented datagram is lost whole when
any one fragment is, fragments are dropped by many middleboxes, and reassembly costs the
receiver. So every datagram must fit in one IP packet on the path, and the datagram size
should follow the path instead of being a fixed 1400 B: 65507 B on IPv4 loopback, 1472 B on a
1500-MTU Ethernet, 8972 B on a 9000-MTU Thunderbolt bridge. Bigger datagrams mean fewer
packets, syscalls and acks per frame.

How the MTU is found (nothing is sent; ``connect()`` on a UDP socket only picks the route):

* Linux: a UDP socket with ``IP_MTU_DISCOVER = IP_PMTUDISC_DO`` (IPv6:
  ``IPV6_MTU_DISCOVER = IPV6_PMTUDISC_DO``) is connected to the peer and ``IP_MTU``
  (``IPV6_MTU``) is read. That is the kernel's MTU for the route, including a smaller path
  MTU it has already learned from ICMP "fragmentation needed" / "packet too big".
* Elsewhere (macOS), or when that fails: the local address the route picks
  (``getsockname()`` after ``connect()``) is looked up among the interfaces' addresses
  with psutil, and that interface's MTU is used.

The payload is the MTU minus the IP header (20 B IPv4, 40 B IPv6, no options) and the UDP
header (8 B), clamped to 65507 B (the IPv4 UDP maximum). An answer under 548 B (576 B,
the datagram every IPv4 host must accept, less headers) is treated as unknown.

A path that silently drops packets bigger than some hop's MTU (an ICMP black hole, so
the kernel never learns the smaller path MTU) is not detected here: the local route's MTU
is reported. That case is handled by the reliability layer, which moves a peer to TCP after
repeated timeouts.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from typing import NamedTuple

import psutil

log = logging.getLogger(__name__)

# Linux values (linux/in.h, linux/in6.h); Python's socket module lacks most of them.
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_DO = getattr(socket, "IPV6_PMTUDISC_DO", 2)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)

UDP_HEADER = 8
IP_HEADER = {socket.AF_INET: 20, socket.AF_INET6: 40}
MAX_PAYLOAD = 65507  # 65535 - 20 - 8
MIN_PAYLOAD = 576 - 28

_ERRORS = (OSError, ValueError, OverflowError, TypeError)  # socket.gaierror is an OSError


class _Target(NamedTuple):
    family: int  # socket family to probe with
    address: tuple  # for connect()
    wire: int  # family of the packets on the wire (AF_INET for a v4-mapped IPv6 address)


def udp_payload_limit(peer: tuple[str, int], *, family: int | None = None) -> int | None:
    """Largest UDP payload to ``peer`` (ip, port) that fits the route's MTU, or None if unknown.

    ``peer`` must hold an IP literal (host names are not resolved, so this never blocks on
    DNS). ``family`` forces the socket family, as for a dual-stack ``AF_INET6`` socket
    talking to an IPv4 peer (the address is then v4-mapped; the headers stay IPv4).
    Never raises for a bad or unreachable address.
    """
    target = _target(peer, family)
    if target is None:
        return None
    mtu = _route_mtu(target) if sys.platform.startswith("linux") else None
    if mtu is None:
        mtu = _interface_mtu(target)
    return _payload(mtu, target.wire)


def _target(peer: tuple[str, int], family: int | None) -> _Target | None:
    """What to connect to for ``peer``, or None for an address that is not an IP literal."""
    try:
        host, port = peer
        port = int(port)
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        ip = ipaddress.ip_address(host)
        v4 = ip if ip.version == 4 else ip.ipv4_mapped
        if family is None:
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        if family == socket.AF_INET:
            if v4 is None:
                raise ValueError("IPv6 peer for an AF_INET socket")
            return _Target(family, (str(v4), port), socket.AF_INET)
        if family == socket.AF_INET6:
            if ip.version == 4:
                return _Target(family, (f"::ffff:{ip}", port, 0, 0), socket.AF_INET)
            addr, _, scope = host.partition("%")
            scope_id = 0
            if scope:
                scope_id = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
            return _Target(family, (addr, port, 0, scope_id),
                           socket.AF_INET if v4 is not None else socket.AF_INET6)
        raise ValueError(f"unsupported address family {family}")
    except _ERRORS as e:
        log.debug("no path MTU for %r: %s", peer, e)
        return None


def _connected(target: _Target) -> socket.socket:
    """A UDP socket connected to the target (the caller closes it); raises OSError."""
    sock = socket.socket(target.family, socket.SOCK_DGRAM)
    try:
        if sys.platform.startswith("linux"):
            if target.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
            if target.wire == socket.AF_INET:  # also allowed on a v4-mapped AF_INET6 socket
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        sock.connect(target.address)
    except BaseException:
        sock.close()
        raise
    return sock


def _route_mtu(target: _Target) -> int | None:
    """The kernel's MTU for the route to ``target`` (Linux ``IP_MTU``/``IPV6_MTU``), or None."""
    try:
        with _connected(target) as sock:
            if target.family == socket.AF_INET6:
                return sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
            return sock.getsockopt(socket.IPPROTO_IP, IP_MTU)
    except _ERRORS as e:
        log.debug("no route MTU for %s: %s", target.address, e)
        return None


def _interface_mtu(target: _Target) -> int | None:
    """The MTU of the interface holding the local address the route to ``target`` picks."""
    try:
        with _connected(target) as sock:
            local = _bare(sock.getsockname()[0])
        if local is None:
            return None
        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family in (socket.AF_INET, socket.AF_INET6) and _bare(a.address) == local
                   for a in addrs):
                stats = psutil.net_if_stats().get(name)
                if stats is not None and stats.mtu > 0:
                    return stats.mtu
                log.debug("no MTU for interface %s", name)
                return None
        log.debug("no interface holds %s (route to %s)", local, target.address)
    except _ERRORS as e:
        log.debug("no interface MTU for %s: %s", target.address, e)
    return None


def _bare(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address without its %scope, v4-mapped IPv6 unwrapped; None if it isn't one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _payload(mtu: int | None, wire: int) -> int | None:
    """UDP payload that fits ``mtu`` with ``wire``-family headers, clamped; None if implausible."""
    if mtu is None:
        return None
    payload = min(mtu - IP_HEADER[wire] - UDP_HEADER, MAX_PAYLOAD)
    return payload if payload >= MIN_PAYLOAD else None
