"""The data plane: UDP (small frames) and TCP (large frames, fallback) on one port number.

``Transport(settings, node_id=..., key=..., on_message=...)``; ``await start()``;
``send(addr, message)`` from the loop thread; decoded messages arrive through
``on_message(sender_node_id, addr, message)`` on the loop thread. ``addr`` is always the
peer's ``(ip, peer port)``, whichever channel carried the message.

Channel choice per frame: reliable frames up to ``settings.tcp_threshold`` bytes go over UDP
unless the peer has been moved to TCP (after ``pto_limit`` unanswered probes; UDP is tried
again after ``udp_retry`` seconds); bigger frames always go over TCP. Unreliable sends
(membership probes) use single UDP packets; bulk frames (weight transfer) always go over
TCP. Ordering holds per (peer, stream) within a channel; a request's messages share a
stream derived from its id.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
import zlib
from typing import Any, Callable

from ringd.config import Settings
from ringd.core import wire
from ringd.core.dedup import Deduplicator
from ringd.core.reliable import Endpoint, Event, FrameReceived, PeerUnreachable, ReliableConfig
from ringd.core.seal import ReplayGuard, Sealer, new_session
from ringd.core.stream import TCP_MAX_FRAME
from ringd.core.wire import Message
from ringd.errors import ConfigError, LocalProtocolError
from ringd.net.loop import loop_name
from ringd.net.tcp import TcpChannel
from ringd.net.udp import UNKNOWN_PATH_DATAGRAM, Impairment, UdpChannel

log = logging.getLogger(__name__)

Addr = tuple[str, int]
OnMessage = Callable[[str, Addr, Message], None]


def stream_of(msg: Message) -> int:
    """Stream a message travels on: 0 for membership, one of 1..255 per request id."""
    rid = getattr(msg, "request_id", None)
    return 0 if rid is None else 1 + zlib.crc32(rid.encode()) % 255


class Transport:
    """Both channels of one node, bound to ``settings.bind_host:settings.port``."""

    def __init__(self, settings: Settings, *, node_id: str, key: bytes, on_message: OnMessage,
                 on_channel_change: Callable[[Addr, str], None] | None = None,
                 reliable: ReliableConfig | None = None, max_tcp_frame: int = TCP_MAX_FRAME,
                 udp_retry: float = 30.0, udp_offload: bool = True,
                 impair: Impairment | None = None) -> None:
        self.settings = settings
        self.node_id = node_id
        self._on_message = on_message
        self._on_channel_change = on_channel_change
        session = new_session(time.time_ns() // 1_000_000, int.from_bytes(os.urandom(2), "little"))
        self.sealer = Sealer(key, node_id, session, encrypt=settings.encrypt)
        self.counters = wire.new_counters()
        self.guard = ReplayGuard()
        # datagram_size 0: each peer's path MTU (the UDP adapter sets it); until known, a safe size
        self._reliable_cfg = reliable or ReliableConfig(
            datagram_size=settings.datagram_size or UNKNOWN_PATH_DATAGRAM)
        self._udp_limit = min(settings.tcp_threshold, self._reliable_cfg.max_frame)
        self._max_tcp_frame = max_tcp_frame
        self._udp_retry = udp_retry
        self._udp_offload = udp_offload
        self._impair = impair  # a bad network for tests (the lossy fault)
        self._tcp_until: dict[Addr, float] = {}  # peers moved to TCP, until when
        self._fallbacks: dict[Addr, int] = {}  # times a peer was moved to TCP in a row
        self._tcp_since: dict[Addr, float] = {}  # when it was moved
        self._seqs: dict[tuple[Addr, int], int] = {}  # last sequence number per (peer, stream)
        self._dedup = Deduplicator()
        self.udp: UdpChannel | None = None
        self.tcp: TcpChannel | None = None
        self.local_addr: Addr | None = None
        self.delivered = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> Addr:
        """Bind UDP and TCP to the same port (``port = 0``: a free one). Returns the address."""
        self._loop = asyncio.get_running_loop()
        udp_sock, tcp_sock = _bind_pair(self.settings.bind_host, self.settings.port)
        self.local_addr = udp_sock.getsockname()[:2]
        endpoint = Endpoint(self.sealer, self.guard, config=self._reliable_cfg,
                            counters=self.counters)
        self.udp = UdpChannel(udp_sock, endpoint, self._on_udp_event, offload=self._udp_offload,
                              impair=self._impair,
                              datagram_size=self.settings.datagram_size)
        self.tcp = TcpChannel(self.sealer, self.guard, self.counters, port=self.local_addr[1],
                              on_frame=self._on_frame, max_frame=self._max_tcp_frame)
        await self.tcp.start(tcp_sock)
        self.udp.start()
        log.info("peer transport on %s:%d (UDP+TCP, %s, datagrams %s, GSO %s, encryption %s)",
                 self.local_addr[0], self.local_addr[1], loop_name(),
                 (f"{self.settings.datagram_size} B" if self.settings.datagram_size
                  else "by path MTU"),
                 "on" if self.udp.gso else "off",
                 "on" if self.sealer.encrypt else "off")
        return self.local_addr

    async def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            await self.tcp.close()

    # ---------------------------------------------------------------- API
    def send(self, addr: Addr, msg: Message, *, reliable: bool = True,
             bulk: bool = False) -> None:
        """Queue ``msg`` for ``addr`` (``(ip, port)``). Never blocks; loop thread only.

        ``reliable=False``: one UDP packet, no retransmission (membership probes); messages
        too big for one packet go reliably. ``bulk=True``: always TCP, whatever the size
        (weight transfer): bulk bytes never share the UDP path and its per-peer reliability
        state with decode steps, and the TCP channel writes a large message one record per
        turn of the loop, so the steps' frames go on in between.
        """
        if self.udp is None or self.tcp is None:
            raise LocalProtocolError("Transport.send before start()")
        head, body = wire.encode(msg)
        if bulk:
            self.tcp.send_frame(addr, head, body)
            return
        size = len(head) + memoryview(body).nbytes
        if not reliable and size <= self.udp.max_oneshot(addr):
            self.udp.send_frame(addr, b"".join((head, body)), reliable=False)
            return
        # A reliable frame is numbered per (peer, stream): delivered at most once, by
        # whichever channel gets it there first (see _on_udp_event's resend over TCP).
        stream = stream_of(msg)
        seq = self._seqs[(addr, stream)] = self._seqs.get((addr, stream), 0) + 1
        head = wire.sequence_head(stream, self.sealer.session, seq) + head
        if size <= self._udp_limit and self._udp_ok(addr):
            self.udp.send_frame(addr, b"".join((head, body)) if body else head, stream=stream)
        else:
            self.tcp.send_frame(addr, head, body)

    def queued_bytes(self, addr: Addr) -> int:
        """Bytes of TCP messages waiting to go to ``addr`` (weight chunks, prefills)."""
        return self.tcp.queued_bytes(addr) if self.tcp is not None else 0

    async def drain(self, addr: Addr) -> None:
        """Wait until the TCP connection to ``addr`` can take more (for prefill senders)."""
        if self.tcp is not None:
            await self.tcp.drain(addr)

    def pause_reading(self) -> None:
        """Stop reading peers' frames (the daemon's queues are full)."""
        if self.udp and self.tcp:
            self.udp.pause_reading()
            self.tcp.pause_reading()

    def resume_reading(self) -> None:
        if self.udp and self.tcp:
            self.udp.resume_reading()
            self.tcp.resume_reading()

    def stats(self) -> dict[str, Any]:
        udp: dict[str, Any] = {}
        if self.udp is not None:
            udp = {**self.udp.endpoint.totals, **self.udp.totals, "gso": self.udp.gso,
                   "gro": self.udp.gro, "peers": self.udp.endpoint.peer_stats()}
        now = self._loop.time() if self._loop else 0.0
        return {
            "address": f"{self.local_addr[0]}:{self.local_addr[1]}" if self.local_addr else None,
            "encrypt": self.sealer.encrypt, "cluster_id": self.sealer.cluster_id,
            "delivered": self.delivered, "drops": dict(self.counters),
            "udp": udp, "tcp": self.tcp.stats() if self.tcp else {},
            "on_tcp": sorted(f"{a[0]}:{a[1]}" for a, t in self._tcp_until.items() if t > now),
        }

    def channel(self, addr: Addr) -> str:
        """``udp`` or ``tcp``: the channel small frames to ``addr`` take now."""
        until = self._tcp_until.get(addr)
        now = self._loop.time() if self._loop else 0.0
        return "tcp" if until is not None and until > now else "udp"

    # ---------------------------------------------------------------- internals
    def _udp_ok(self, addr: Addr) -> bool:
        until = self._tcp_until.get(addr)
        if until is None:
            return True
        if self._loop is not None and self._loop.time() < until:
            return False
        del self._tcp_until[addr]
        log.info("peer %s:%d: trying UDP again", *addr)
        if self._on_channel_change:
            self._on_channel_change(addr, "udp")
        return True

    def _on_udp_event(self, ev: Event) -> None:
        if isinstance(ev, FrameReceived):
            if ev.addr in self._tcp_until:
                self._maybe_back_to_udp(ev.addr)
            self._on_frame(ev.sender, ev.addr, ev.data)
        elif isinstance(ev, PeerUnreachable):
            assert self._loop is not None and self.tcp is not None
            # a peer that keeps failing over UDP stays on TCP longer each time (at most 8x)
            n = self._fallbacks[ev.addr] = min(self._fallbacks.get(ev.addr, 0) + 1, 4)
            self._tcp_since[ev.addr] = self._loop.time()
            self._tcp_until[ev.addr] = self._loop.time() + self._udp_retry * 2 ** (n - 1)
            log.warning("peer %s:%d does not answer over UDP; using TCP for it (%d frames resent)",
                        ev.addr[0], ev.addr[1], len(ev.frames))
            for frame in ev.frames:
                self.tcp.send_frame(ev.addr, frame)
            if self._on_channel_change:
                self._on_channel_change(ev.addr, "tcp")

    def _maybe_back_to_udp(self, addr: Addr) -> None:
        """A frame came over UDP from a peer moved to TCP: it answers again. Back to UDP,
        once it has been on TCP a while (1 s, doubling each time it fails again in a row)
        so a one-way outage does not flap."""
        assert self._loop is not None
        n = self._fallbacks.get(addr, 1)
        if self._loop.time() - self._tcp_since.get(addr, 0.0) < 2.0 ** (n - 1):
            return
        del self._tcp_until[addr]
        log.info("peer %s:%d answers over UDP again; using UDP for it", *addr)
        if self._on_channel_change:
            self._on_channel_change(addr, "udp")

    def _on_frame(self, sender: str, addr: Addr, data: wire.Buffer) -> None:
        try:
            seq = wire.split_sequenced(data)
            if seq is not None:
                stream, session, n, data = seq
                if not self._dedup.fresh(sender, stream, session, n):
                    self.counters["duplicate"] += 1
                    return
            msg = wire.decode(data)
        except wire.Dropped as e:
            self.counters[e.reason] += 1
            return
        self.delivered += 1
        self._on_message(sender, addr, msg)


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to the same port (non-blocking)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(20 if port == 0 else 1):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((host, port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(128)
        except OSError as e:
            udp.close()
            tcp.close()
            if port == 0 and e.errno == errno.EADDRINUSE:
                continue
            raise ConfigError(f"cannot bind the peer port {host}:{port} (UDP and TCP): "
                              f"{e.strerror or e}",
                              hint="another ringd may be running; choose another port with --port "
                                   "or RINGD_PORT, or check bind_host") from None
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp
    raise ConfigError(f"no free port on {host} where both UDP and TCP can bind",
                      hint="set an explicit port with --port")
