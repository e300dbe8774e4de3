"""Link measurement and the path to each peer (the adapter of core/paths.py).

Every ``interval`` seconds, for every live peer and every address it advertises, one small
:class:`ringd.core.wire.LinkProbe` goes to that address over TCP; the peer echoes it
(:class:`ringd.core.wire.LinkEcho`) back over the same connection, and the round trip goes
into that path's :class:`ringd.core.paths.PathMeasure` (a probe unanswered within
``timeout`` counts as lost). Now and then (``throughput_interval``), while no request runs on
this node, a path also gets a short throughput probe: ``throughput_bytes`` of filler, whose
echo time less the path's round trip gives its throughput.

Why TCP: its sequence numbers are one counter per node, so a peer may hear this node over
any number of connections. The UDP endpoint numbers packets per destination address, and a
receiver keeps one replay window per sender: packets reaching it by a second address would
reuse numbers (and nonces) the first one used, and be dropped as replays.

After each round, :func:`ringd.core.paths.choose_path` picks each peer's path; the choice
moves only while no request runs here. :meth:`LinkProber.address_for` is where the daemon
sends its bulk traffic (weights; it rides TCP); the data plane's small frames keep the
peer's membership address until the UDP endpoint numbers packets per node. Loop thread only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import platform
import secrets
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ringd.core import wire
from ringd.core.paths import (Advertised, LocalInterface, PathChoice, PathMeasure,
                              PathOption, choose_path, interface_kind, local_interface_for,
                              parse_hardware_ports)

log = logging.getLogger(__name__)

Addr = tuple[str, int]
#: ``send(addr, message)``: over TCP (the transport's bulk path).
SendFn = Callable[[Addr, wire.Message], None]
#: ``observe(peer name, interface, seconds)``: a round trip measured (for /metrics).
ObserveFn = Callable[[str, str, float], None]


@dataclass(frozen=True)
class Peer:
    """A live peer as membership and its metadata know it."""

    node_id: str
    name: str
    addr: Addr  # its membership address
    addresses: tuple[Advertised, ...] = ()


@dataclass
class _Pending:
    peer: str
    ip: str
    sent_at: float
    size: int  # filler bytes (0: a round trip probe)


def local_interfaces() -> list[LocalInterface]:
    """This machine's IPv4 addresses, each with its interface and that interface's kind."""
    import ifaddr

    system = platform.system()
    ports: dict[str, str] = {}
    if system == "Darwin":
        try:
            out = subprocess.run(["networksetup", "-listallhardwareports"], capture_output=True,
                                 text=True, timeout=5, check=False).stdout
            ports = parse_hardware_ports(out)
        except (OSError, subprocess.SubprocessError) as e:
            log.info("networksetup -listallhardwareports failed (%s): interface kinds are "
                     "guessed from their names", e)
    out_ifaces = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4:
                name = str(adapter.nice_name or adapter.name)
                out_ifaces.append(LocalInterface(name, str(ip.ip), int(ip.network_prefix),
                                                 interface_kind(name, system, ports)))
    return out_ifaces


class LinkProber:
    """Measures every path to every peer and keeps each peer's chosen path."""

    def __init__(self, send: SendFn, peers: Callable[[], Iterable[Peer]], *,
                 local: Sequence[LocalInterface], pinned: str | None = None,
                 interval: float = 2.0, timeout: float = 1.0,
                 throughput_interval: float = 120.0, throughput_bytes: int = 4 << 20,
                 quiet: Callable[[], bool] = lambda: True,
                 observe: ObserveFn | None = None) -> None:
        if not 0 < throughput_bytes <= wire.MAX_PROBE:
            raise ValueError(f"throughput_bytes must be 1..{wire.MAX_PROBE}")
        self._send = send
        self._peers = peers
        self.local = list(local)
        self.pinned = pinned
        self.interval = interval
        self.timeout = timeout
        self.throughput_interval = throughput_interval
        self._filler = bytes(throughput_bytes)
        self._quiet = quiet
        self._observe = observe
        self.measures: dict[tuple[str, str], PathMeasure] = {}  # (peer, ip) -> measure
        self._bulk_at: dict[tuple[str, str], float] = {}  # last throughput probe sent
        self._pending: dict[int, _Pending] = {}
        self._nonces = itertools.count(secrets.randbits(40))
        self.choices: dict[str, PathChoice] = {}
        self._applied: dict[str, Addr] = {}  # what the data plane sends to, per peer
        self._known: dict[str, Peer] = {}
        self._now = 0.0
        self.counters = {"probes": 0, "echoes": 0, "lost": 0, "throughput_probes": 0,
                         "stray_echoes": 0, "switches": 0}

    # ------------------------------------------------------------------ running
    async def run(self) -> None:
        """Probe every ``interval`` seconds until cancelled."""
        while True:
            self.tick(time.monotonic())
            await asyncio.sleep(self.interval)

    def tick(self, now: float) -> None:
        """One round: expire unanswered probes, send new ones, choose the paths."""
        self._now = now
        for nonce, p in list(self._pending.items()):
            limit = self.timeout if p.size == 0 else self.timeout + 30.0
            if now - p.sent_at > limit:
                del self._pending[nonce]
                if p.size == 0:
                    self._measure(p.peer, p.ip).loss()
                    self.counters["lost"] += 1
        peers = {p.node_id: p for p in self._peers()}
        self._known = peers
        for key in [k for k in self.measures if k[0] not in peers]:
            del self.measures[key]  # a peer gone: its measurements go with it
            self._bulk_at.pop(key, None)
        for pid in [p for p in self._applied if p not in peers]:
            del self._applied[pid]
            self.choices.pop(pid, None)
        quiet = self._quiet()
        for peer in peers.values():
            for ip in self._ips(peer):
                key = (peer.node_id, ip)
                m = self.measures.get(key)
                self._probe(peer, ip, 0, now)
                # a throughput probe once the path answers (its connection is up), when due
                if (self.throughput_interval > 0 and quiet and m is not None and m.up(now)
                        and now - self._bulk_at.get(key, -1e18) >= self.throughput_interval):
                    self._bulk_at[key] = now
                    self._probe(peer, ip, len(self._filler), now)
            self._choose(peer, now, quiet)

    # ------------------------------------------------------------------ inputs
    def receive(self, msg: wire.Message, sender: str, addr: Addr, now: float) -> None:
        """A LinkProbe (echo it back where it came from) or a LinkEcho (a measurement)."""
        if isinstance(msg, wire.LinkProbe):
            self._send(addr, wire.LinkEcho(msg.nonce, memoryview(msg.data).nbytes))
            return
        if not isinstance(msg, wire.LinkEcho):
            return
        p = self._pending.get(msg.nonce)
        if p is None or p.peer != sender or msg.size != p.size:
            self.counters["stray_echoes"] += 1  # late (already counted lost), or not ours
            return
        del self._pending[msg.nonce]
        self.counters["echoes"] += 1
        elapsed = now - p.sent_at
        m = self._measure(p.peer, p.ip)
        if p.size == 0:
            m.rtt(elapsed, now)
            if self._observe is not None:
                peer = self._known.get(p.peer)
                self._observe(peer.name if peer else p.peer[:8], self._iface(p.ip), elapsed)
        else:
            transfer = elapsed - (m.min_rtt or 0.0)
            m.bandwidth(p.size / max(transfer, 1e-6), now)

    # ------------------------------------------------------------------ queries
    def address_for(self, node_id: str) -> Addr | None:
        """Where the data plane sends to ``node_id`` (None: its membership address)."""
        return self._applied.get(node_id)

    def path_status(self, node_id: str) -> dict[str, Any] | None:
        """The chosen path to ``node_id`` and every path measured to it (for status)."""
        choice = self.choices.get(node_id)
        if choice is None:
            return None
        applied = self._applied.get(node_id)
        now = self._now  # as of the last round
        peer = self._known.get(node_id)
        options = []
        for ip in self._ips(peer) if peer else ():
            m = self.measures.get((node_id, ip))
            options.append({"address": ip, "interface": self._iface(ip),
                            "kind": self._kind(ip),
                            "rtt_ms": _ms(m.srtt) if m else None,
                            "min_rtt_ms": _ms(m.min_rtt) if m else None,
                            "throughput": m.throughput if m else None,
                            "lost": m.lost if m else 0,
                            "up": bool(m and m.up(now))})
        return {"address": applied[0] if applied else choice.ip, "interface": choice.interface,
                "kind": choice.kind, "rtt_ms": _ms(choice.rtt_s),
                "throughput": choice.throughput, "pinned": choice.pinned,
                "reason": choice.reason, "options": options}

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "pending": len(self._pending), "pinned": self.pinned}

    # ------------------------------------------------------------------ internals
    def _ips(self, peer: Peer) -> list[str]:
        ips = [a.ip for a in peer.addresses if ":" not in a.ip]
        return ips or [peer.addr[0]]

    def _measure(self, peer: str, ip: str) -> PathMeasure:
        key = (peer, ip)
        m = self.measures.get(key)
        if m is None:
            m = self.measures[key] = PathMeasure()
        return m

    def _iface(self, ip: str) -> str:
        li = local_interface_for(ip, self.local)
        return li.name if li else "?"

    def _kind(self, ip: str) -> str:
        li = local_interface_for(ip, self.local)
        return li.kind if li else "other"

    def _probe(self, peer: Peer, ip: str, size: int, now: float) -> None:
        nonce = next(self._nonces) & wire.U63
        self._pending[nonce] = _Pending(peer.node_id, ip, now, size)
        addr = (ip, peer.addr[1])
        if size == 0:
            self.counters["probes"] += 1
        elif size > 1:
            self.counters["throughput_probes"] += 1
        self._send(addr, wire.LinkProbe(nonce, self._filler[:size]))

    def _choose(self, peer: Peer, now: float, quiet: bool) -> None:
        options = [PathOption(ip, self._iface(ip), self._kind(ip),
                              self.measures.get((peer.node_id, ip))) for ip in self._ips(peer)]
        current = self._applied.get(peer.node_id)
        choice = choose_path(options, default_ip=peer.addr[0],
                             current=current[0] if current else None, pinned=self.pinned,
                             now=now)
        self.choices[peer.node_id] = choice
        want = (choice.ip, peer.addr[1])
        if want == current:
            return
        if current is not None and not quiet:
            return  # requests run: their frames keep the path they have
        if current is not None or want != peer.addr:
            self.counters["switches"] += current is not None
            log.info("data path to %s: %s via %s (%s): %s", peer.name or peer.node_id[:8],
                     choice.ip, choice.interface, choice.kind, choice.reason)
        self._applied[peer.node_id] = want


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
