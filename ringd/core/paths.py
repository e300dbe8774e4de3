"""Which path the data plane takes to each peer: interfaces, link measurements, the choice.
Pure: no sockets, no clock (``now`` is passed in).

A node may reach a peer over several interfaces (a Thunderbolt bridge, Ethernet, Wi-Fi):
each node advertises its addresses with the interface and its kind (:class:`Advertised`,
gossiped in its metadata); this node measures every path to every peer -- round trips of
small probes and now and then a short throughput probe -- into a :class:`PathMeasure` each,
and :func:`choose_path` picks the one the data plane uses: the lowest round trip among the
paths that answer, unless the user pinned a local interface. A chosen path is kept until
another is clearly better (:data:`SWITCH_RATIO`, :data:`SWITCH_MIN_S`), so a noisy
measurement does not make the data plane flap between two links.

Kinds: on macOS a device's kind comes from its hardware port name (``networksetup
-listallhardwareports``: "Thunderbolt Bridge", "Ethernet", "Wi-Fi", ...); on Linux from the
interface name (``eth*``/``en*`` Ethernet, ``wl*`` Wi-Fi, ``thunderbolt*`` Thunderbolt).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ringd.core.wire import Rule

THUNDERBOLT, ETHERNET, WIFI, LOOPBACK, VIRTUAL, OTHER = (
    "thunderbolt", "ethernet", "wifi", "loopback", "virtual", "other")
KINDS = (THUNDERBOLT, ETHERNET, WIFI, LOOPBACK, VIRTUAL, OTHER)
#: Among paths of the same round trip, the one of the earlier kind wins.
_KIND_ORDER = {k: i for i, k in enumerate((LOOPBACK, THUNDERBOLT, ETHERNET, OTHER, VIRTUAL,
                                           WIFI))}
#: A chosen path gives way only to one whose round trip is below this share of its own...
SWITCH_RATIO = 0.8
#: ...and at least this much shorter (seconds).
SWITCH_MIN_S = 50e-6
#: A path with no answer for this long, or this many probes lost in a row, is down.
STALE_AFTER_S = 10.0
MAX_LOST = 3
#: Smoothing of the round trip (as TCP's SRTT).
ALPHA = 0.125

MAX_ADVERTISED = 8
MAX_IFNAME = 32


# ----------------------------------------------------------------------------- interfaces
_LINUX = ((re.compile(r"lo\d*"), LOOPBACK),
          (re.compile(r"(thunderbolt|tb)\d*"), THUNDERBOLT),
          (re.compile(r"(eth|en[opsx]|eno|em|enp)\w*"), ETHERNET),
          (re.compile(r"(wl|wlan|wlp|wifi)\w*"), WIFI),
          (re.compile(r"(veth|docker|br-|virbr|tun|tap|wg|vmnet|vboxnet|zt|tailscale)\w*"),
           VIRTUAL))
_MAC_PORTS = ((re.compile(r"thunderbolt", re.I), THUNDERBOLT),
              (re.compile(r"wi-?fi|airport", re.I), WIFI),
              (re.compile(r"ethernet|lan\b|10/100|gigabit|10gbe", re.I), ETHERNET))
_MAC_NAMES = ((re.compile(r"lo\d+"), LOOPBACK),
              (re.compile(r"bridge\d+"), THUNDERBOLT),  # the Thunderbolt Bridge, by default
              (re.compile(r"(utun|awdl|llw|gif|stf|anpi|ap)\d+"), VIRTUAL))


def parse_hardware_ports(text: str) -> dict[str, str]:
    """``networksetup -listallhardwareports`` output -> {device: hardware port name}."""
    out: dict[str, str] = {}
    port = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "Hardware Port":
            port = value
        elif key == "Device" and port is not None and value:
            out[value] = port
            port = None
    return out


def interface_kind(name: str, system: str, hardware_ports: Mapping[str, str] | None = None
                   ) -> str:
    """The kind of interface ``name`` on ``system`` (``platform.system()``: "Darwin",
    "Linux", ...); on macOS ``hardware_ports`` (from :func:`parse_hardware_ports`) says
    what each device is."""
    if system == "Darwin":
        port = (hardware_ports or {}).get(name)
        if port is not None:
            for pattern, kind in _MAC_PORTS:
                if pattern.search(port):
                    return kind
        for pattern, kind in _MAC_NAMES:
            if pattern.fullmatch(name):
                return kind
        return OTHER
    for pattern, kind in _LINUX:
        if pattern.fullmatch(name):
            return kind
    return OTHER


@dataclass(frozen=True)
class LocalInterface:
    """An address of this machine: interface name, IPv4 address, prefix length, kind."""

    name: str
    ip: str
    prefix: int
    kind: str


def local_interface_for(ip: str, local: Sequence[LocalInterface]) -> LocalInterface | None:
    """The interface of this machine on the same network as ``ip`` (None: only by routing:
    the default route's, which this does not know). Loopback reaches loopback."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    best: LocalInterface | None = None
    for li in local:
        try:
            net = ipaddress.ip_network(f"{li.ip}/{li.prefix}", strict=False)
        except ValueError:
            continue
        if addr.version != net.version:
            continue
        if addr in net or (addr.is_loopback and li.kind == LOOPBACK):
            if best is None or li.prefix > best.prefix:  # the most specific network
                best = li
    return best


@dataclass(frozen=True)
class Advertised:
    """An address a node advertises: its IP, the interface it is on, that interface's kind."""

    ip: str
    interface: str
    kind: str

    def dump(self) -> list[str]:
        return [self.ip, self.interface, self.kind]

    @classmethod
    def load(cls, v: list[str]) -> "Advertised":
        return cls(v[0], v[1], v[2])


def _is_ip(v: Any) -> bool:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return False
    return True


ADVERTISED_RULE = Rule(
    lambda v: type(v) is list and len(v) <= MAX_ADVERTISED and all(
        type(a) is list and len(a) == 3 and all(type(x) is str for x in a)
        and len(a[0]) <= 45 and _is_ip(a[0]) and 0 < len(a[1]) <= MAX_IFNAME
        and a[1].isprintable() and a[2] in KINDS for a in v),
    f"a list of at most {MAX_ADVERTISED} [ip, interface, kind]")


def advertised_addresses(local: Iterable[LocalInterface], *, bind_host: str,
                         advertise_host: str | None) -> tuple[Advertised, ...]:
    """What a node advertises: the address it binds, or for a wildcard bind every address
    of its interfaces (loopback only when it has nothing else or advertises loopback),
    the advertised host first; at most MAX_ADVERTISED."""
    local = [li for li in local if ":" not in li.ip]  # the peer port is IPv4 here
    wildcard = bind_host in ("0.0.0.0", "", "::")
    first = advertise_host or (None if wildcard else bind_host)
    chosen: list[LocalInterface] = []
    if wildcard:
        loop = first is not None and _loopback(first)
        outside = [li for li in local if li.kind != LOOPBACK]
        chosen = [li for li in local if li.kind == LOOPBACK] if loop or not outside else outside
    out: list[Advertised] = []
    if first is not None:
        li = next((x for x in local if x.ip == first), None) or local_interface_for(first, local)
        out.append(Advertised(first, li.name if li else "?", li.kind if li else OTHER))
    for li in chosen:
        if all(a.ip != li.ip for a in out):
            out.append(Advertised(li.ip, li.name[:MAX_IFNAME], li.kind))
    return tuple(out[:MAX_ADVERTISED])


def _loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------- measuring
class PathMeasure:
    """What this node measured of one path to one peer."""

    __slots__ = ("srtt", "min_rtt", "last_rtt", "samples", "lost", "last_ok",
                 "throughput", "throughput_at")

    def __init__(self) -> None:
        self.srtt: float | None = None  # seconds, smoothed
        self.min_rtt: float | None = None
        self.last_rtt: float | None = None
        self.samples = 0
        self.lost = 0  # probes lost in a row
        self.last_ok: float | None = None
        self.throughput: float | None = None  # bytes/s of the last throughput probe
        self.throughput_at: float | None = None

    def rtt(self, rtt: float, now: float) -> None:
        self.srtt = rtt if self.srtt is None else (1 - ALPHA) * self.srtt + ALPHA * rtt
        self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)
        self.last_rtt = rtt
        self.samples += 1
        self.lost = 0
        self.last_ok = now

    def loss(self) -> None:
        self.lost += 1

    def bandwidth(self, bytes_per_s: float, now: float) -> None:
        self.throughput, self.throughput_at = bytes_per_s, now

    def up(self, now: float) -> bool:
        return (self.last_ok is not None and now - self.last_ok < STALE_AFTER_S
                and self.lost < MAX_LOST)


@dataclass(frozen=True)
class PathOption:
    """One way to a peer: its address, the local interface that reaches it (name and kind),
    and what was measured of it (None: not yet)."""

    ip: str
    interface: str
    kind: str
    measure: PathMeasure | None = None


@dataclass(frozen=True)
class PathChoice:
    """The path the data plane takes to a peer, and why."""

    ip: str
    interface: str
    kind: str
    rtt_s: float | None
    throughput: float | None
    pinned: bool
    reason: str


def choose_path(options: Sequence[PathOption], *, default_ip: str, current: str | None,
                pinned: str | None, now: float) -> PathChoice:
    """The path to a peer among ``options``.

    ``pinned`` (a local interface name): the path over it, whether or not it answers (the
    user asked for it), unless no option goes over it. Else the lowest smoothed round trip
    among the paths that answer, ties broken by throughput, then kind (wired first);
    ``current`` (the ip in use) stays until another is better by SWITCH_RATIO and
    SWITCH_MIN_S. With nothing measured, ``default_ip`` (the peer's membership address).
    """
    def pick(o: PathOption, pin: bool, reason: str) -> PathChoice:
        m = o.measure
        return PathChoice(o.ip, o.interface, o.kind, m.srtt if m else None,
                          m.throughput if m else None, pin, reason)

    if pinned is not None:
        over = [o for o in options if o.interface == pinned]
        if over:
            live = [o for o in over if o.measure is not None and o.measure.up(now)]
            best = min(live, key=_rank) if live else over[0]
            return pick(best, True, f"pinned to {pinned}")
    up = [o for o in options if o.measure is not None and o.measure.up(now)]
    fallback = (f"interface {pinned} reaches no address of this peer; " if pinned is not None
                else "")
    if not up:
        default = next((o for o in options if o.ip == default_ip), None)
        if default is None:
            return PathChoice(default_ip, "?", OTHER, None, None, False,
                              fallback + "not measured yet: its membership address")
        return pick(default, False, fallback + "not measured yet: its membership address")
    best = min(up, key=_rank)
    cur = next((o for o in up if o.ip == current), None)
    if cur is not None and cur is not best:
        c, b = cur.measure.srtt, best.measure.srtt  # type: ignore[union-attr]
        if c is not None and b is not None and not (
                b < c * SWITCH_RATIO and c - b >= SWITCH_MIN_S):
            return pick(cur, False, fallback + "lowest round trip (kept: no path clearly "
                        "better)")
    if len(up) == 1:
        return pick(best, False, fallback + "the only path that answers")
    return pick(best, False, fallback + f"lowest round trip of {len(up)} paths")


def _rank(o: PathOption) -> tuple[float, float, int]:
    m = o.measure
    assert m is not None and m.srtt is not None
    return (m.srtt, -(m.throughput or 0.0), _KIND_ORDER.get(o.kind, 9))
