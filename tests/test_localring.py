"""Ports for local rings."""

from __future__ import annotations

import socket
from pathlib import Path

from ringd.localring import LOCAL_PORTS, free_port


def _ephemeral() -> range:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except OSError:
        lo, hi = 49152, 65535
    return range(lo, hi + 1)


def test_free_ports_are_bindable_for_tcp_and_udp_and_never_ephemeral() -> None:
    """An ephemeral port can be handed to any outgoing connection between the check and the
    daemon's bind; the ports given to local daemons come from below that range."""
    eph = _ephemeral()
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)  # never the same twice: two nodes of a ring would collide
    ports = set(ports)
    for port in ports:
        assert port in LOCAL_PORTS and port not in eph
    port = ports.pop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        t.bind(("127.0.0.1", port))
        u.bind(("127.0.0.1", port))


def test_a_taken_port_is_not_handed_out() -> None:
    taken = []
    try:
        for port in LOCAL_PORTS[:2000]:  # occupy a slice of the range; none of it may come back
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            taken.append(s)
        occupied = {s.getsockname()[1] for s in taken}
        assert all(free_port() not in occupied for _ in range(200))
    finally:
        for s in taken:
            s.close()
