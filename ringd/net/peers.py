"""Peer addresses from configuration: static peers (``host:port``) and the address this node
advertises."""

from __future__ import annotations

import logging
import socket

from ringd.errors import ConfigError

log = logging.getLogger(__name__)

Addr = tuple[str, int]


def parse_peer(text: str) -> Addr:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"static peer {text!r} is not host:port",
                          hint="write e.g. 192.168.1.20:7411")
    return host.strip("[]"), int(port)


def resolve_peer(text: str) -> Addr | None:
    """A static peer as an IP address (membership keys peers by address); None if unresolvable."""
    host, port = parse_peer(text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        log.warning("static peer %s: cannot resolve %s (%s); skipping it", text, host, e.strerror)
        return None
    ipv4 = [i for i in infos if i[0] == socket.AF_INET]
    return (ipv4 or infos)[0][4][0], port


def default_advertise(bind_host: str) -> str:
    """The address peers should use when none is configured: the bound one, or for a
    wildcard bind the first address of this machine's interfaces."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    from ringd.net.discovery import local_addresses

    addrs = local_addresses()
    return addrs[0] if addrs else "127.0.0.1"
