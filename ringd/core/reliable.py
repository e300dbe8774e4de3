"""Reliable, ordered frames over UDP datagrams (sans-I/O; time is passed in, aioquic style).

Feed it with :meth:`Endpoint.receive_datagram`, ask it what to send with
:meth:`Endpoint.datagrams_to_send`, take :meth:`Endpoint.next_event`, and re-arm one timer
at :meth:`Endpoint.get_timer` that calls :meth:`Endpoint.handle_timer`.

Layers, bottom up (the bytes of the first two: :mod:`ringd.core.packet`):

- **Segment**: one UDP datagram, at most ``datagram_size`` bytes. A packet is cut into up
  to 64 equal segments so a Linux adapter can send them with one ``sendmsg`` (UDP GSO) and
  receive them with one ``recvmsg`` (UDP GRO); elsewhere they go one by one. IP
  fragmentation is never used.
- **Packet**: the concatenated segment payloads form one sealed unit
  (:meth:`ringd.core.seal.Sealer.seal`): one AEAD tag per packet, nonce = packet number.
  The sender's key is one per session, whatever the destination, so packet numbers are
  unique per session: each peer state (a new one after an eviction too) numbers its packets
  in a range of its own (:meth:`Sealer.udp_pn_range`), and a retransmission is a new packet.
  Nothing is parsed before the tag checks out, and a forged segment can at most make its
  packet fail (and be sent again). Replays of captured packets are turned away before the
  AEAD, by the replay window of the node the unit claims to be from (of the node known at
  that address, for segments before reassembly). The plaintext is a list of chunks: ACK
  (selective, newest ranges first), DATA (a byte range of a frame on a stream), ONESHOT (an
  unreliable message).
- **Frames** are byte strings delivered exactly once, in order per ``(peer, stream)``.

Loss recovery follows RFC 9002: RTT estimate (smoothed, variance, min), packet threshold 3
and time threshold 9/8 RTT, probe timeout with exponential backoff (each peer's state and
its maths live in :mod:`ringd.core.reliable_peer`). A packet's segment budget halves when
it is lost and grows back by one per acknowledged packet, so a lossy path degrades to one
segment per packet. After ``pto_limit`` probe timeouts in a row the
peer is reported with :class:`PeerUnreachable` (carrying the frames not yet acknowledged)
so the adapter can move it to TCP.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Union

from ringd.core.packet import (
    ACK,
    ACK_RANGE,
    CH_ACK,
    CH_DATA,
    CH_ONESHOT,
    DATA,
    MAX_ACK_RANGES,
    MAX_BURST,
    MAX_SEGMENTS,
    ONESHOT,
    SEGMENT,
    SEGMENT_MAGIC,
    Addr,
    Transmit,
    ack_chunk,
    geometry,
    oneshot_room,
    to_segments,
)
from ringd.core.reliable_peer import InFrame, InStream, OutFrame, OutStream, Peer, Sent
from ringd.core.seal import CHANNEL_UDP, PN_RANGE_MASK, ReplayGuard, Sealer
from ringd.core.wire import WIRE_VERSION, Buffer, Dropped, new_counters
from ringd.errors import LocalProtocolError

STREAM_WINDOW = 1024  # frames a stream may run ahead of the next one to deliver


@dataclass(frozen=True)
class ReliableConfig:
    """Tunables of the UDP reliability layer."""

    datagram_size: int = 1400  # largest UDP payload sent; keep under the path MTU
    max_frame: int = 1 << 20  # largest frame accepted over UDP (bigger ones go over TCP)
    max_in_flight: int = 1 << 20  # bytes sent and not yet acknowledged, per peer
    max_queued: int = 16 << 20  # bytes of frames waiting for acknowledgement, per peer
    initial_rtt: float = 0.05
    max_ack_delay: float = 0.005
    pto_limit: int = 5  # probe timeouts in a row before PeerUnreachable
    assembly_timeout: float = 1.0  # incomplete packets (segments waiting for the rest)
    max_assemblies: int = 256
    max_assembly_bytes: int = 16 << 20
    reassembly_budget: int = 32 << 20  # bytes of incomplete or out-of-order frames, per peer
    gap_timeout: float = 10.0  # whole frames wait this long behind a missing one, then skip it
    idle_timeout: float = 60.0  # a silent peer's state is dropped after this
    max_peers: int = 1024

    def __post_init__(self) -> None:
        if not SEGMENT.size + 64 <= self.datagram_size <= MAX_BURST:
            raise LocalProtocolError(f"datagram_size must be {SEGMENT.size + 64}..{MAX_BURST}")


# ------------------------------------------------------------------------ events
@dataclass(slots=True)
class FrameReceived:
    """A whole frame from ``sender`` (authenticated node id). ``stream`` is None for one-shots."""

    addr: Addr
    sender: str
    data: Buffer
    stream: int | None


@dataclass(slots=True)
class PeerUnreachable:
    """``pto_limit`` probes went unanswered; ``frames`` were not acknowledged (in order)."""

    addr: Addr
    frames: tuple[bytes, ...]


Event = Union[FrameReceived, PeerUnreachable]


# ------------------------------------------------------------------------ state
class _Assembly:
    """The segments of one packet received so far (before reassembly)."""

    __slots__ = ("parts", "got", "size", "first_seen")

    def __init__(self, count: int, now: float) -> None:
        self.parts: list[bytes | None] = [None] * count
        self.got = 0
        self.size = 0
        self.first_seen = now


# ------------------------------------------------------------------------ endpoint
class Endpoint:
    """All UDP peers of one node. Addresses are ``(ip, port)`` tuples as the socket reports."""

    def __init__(self, sealer: Sealer, guard: ReplayGuard, *, config: ReliableConfig | None = None,
                 counters: dict[str, int] | None = None) -> None:
        self.config = config or ReliableConfig()
        self._sealer = sealer
        self._guard = guard
        self.counters = counters if counters is not None else new_counters()
        self._sizes: OrderedDict[Addr, int] = OrderedDict()  # datagram sizes set per peer
        self._peers: OrderedDict[Addr, Peer] = OrderedDict()
        self._dirty: dict[Addr, Peer] = {}
        self._assemblies: OrderedDict[tuple[Addr, int, int], _Assembly] = OrderedDict()
        self._assembly_bytes = 0
        self._events: deque[Event] = deque()
        self.totals = dict.fromkeys((
            "frames_sent", "frames_received", "oneshots_sent", "oneshots_received",
            "packets_sent", "packets_received", "segments_sent", "segments_received",
            "packets_lost", "probes", "unreachable", "acks_sent"), 0)

    # ---------------------------------------------------------------- API
    @property
    def max_oneshot(self) -> int:
        """Largest unreliable message to a peer with the default datagram size (it must fit
        in one packet); :meth:`max_oneshot_to` knows each peer's own size."""
        return oneshot_room(self.config.datagram_size, self._sealer.overhead)

    def max_oneshot_to(self, addr: Addr) -> int:
        size = self._sizes.get(addr, self.config.datagram_size)
        return oneshot_room(size, self._sealer.overhead)

    def set_datagram_size(self, addr: Addr, size: int) -> int:
        """Send datagrams of at most ``size`` bytes to ``addr`` from now on (the adapter
        learns it from the path MTU). Clamped to what the format allows; returns the size."""
        size = max(SEGMENT.size + 64, min(MAX_BURST, size))
        sizes = self._sizes
        sizes[addr] = size
        sizes.move_to_end(addr)
        if len(sizes) > 2 * self.config.max_peers:
            sizes.popitem(last=False)
        peer = self._peers.get(addr)
        if peer is not None and peer.datagram_size != size:
            self._size(peer, size)
        return size

    def datagram_size(self, addr: Addr) -> int:
        return self._sizes.get(addr, self.config.datagram_size)

    def send_frame(self, addr: Addr, data: Buffer, now: float, *, stream: int = 0,
                   reliable: bool = True) -> bool:
        """Queue a frame. False (and counted as ``overflow``) if the peer's queue is full."""
        n = memoryview(data).nbytes
        if reliable and n > self.config.max_frame:
            raise LocalProtocolError(
                f"frame of {n} bytes exceeds the UDP limit {self.config.max_frame}")
        if not reliable and n > self.max_oneshot_to(addr):
            raise LocalProtocolError(
                f"unreliable message of {n} bytes exceeds {self.max_oneshot_to(addr)}")
        if not 0 <= stream <= 255:
            raise LocalProtocolError(f"stream must be 0..255, got {stream}")
        peer = self._peer(addr, now)
        if peer is None or peer.queued + n > self.config.max_queued:
            self.counters["overflow"] += 1
            return False
        if reliable:
            s = peer.out_streams.get(stream)
            if s is None:
                s = peer.out_streams[stream] = OutStream()
            f = OutFrame(stream, s.next_seq, data if type(data) is bytes else bytes(data), s)
            s.unacked[s.next_seq] = f
            s.next_seq += 1
            peer.new.append((f, 0, n))
            peer.queued += n
            self.totals["frames_sent"] += 1
        else:
            peer.oneshots.append(data if type(data) is bytes else bytes(data))
            self.totals["oneshots_sent"] += 1
        self._dirty[addr] = peer
        return True

    def receive_datagram(self, data: Buffer, addr: Addr, now: float, segment_size: int = 0) -> None:
        """One UDP read: a datagram, or several coalesced by GRO (``segment_size`` apart).

        ``data`` is only read during the call (the adapter may reuse its buffer).
        """
        mv = memoryview(data)
        n = len(mv)
        if segment_size and n > segment_size:
            if self._receive_burst(mv, segment_size, addr, now):
                return
            for off in range(0, n, segment_size):
                self._receive_segment(mv[off:off + segment_size], addr, now)
        else:
            self._receive_segment(mv, addr, now)

    def has_peer(self, addr: Addr) -> bool:
        """Whether ``addr`` is a peer: it was sent to, or sent a packet that authenticated."""
        return addr in self._peers

    def has_data(self) -> bool:
        """Whether :meth:`datagrams_to_send` may have something (a cheap check)."""
        return bool(self._dirty)

    def datagrams_to_send(self, now: float) -> list[Transmit]:
        out: list[Transmit] = []
        if self._dirty:
            for addr, peer in list(self._dirty.items()):
                self._build(peer, now, out)
                if not ((peer.retx or peer.new) and self._window_open(peer, 0)
                        and self._stream_open(peer)):
                    del self._dirty[addr]
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        t: float | None = None
        for peer in self._peers.values():
            pt = peer.timer()
            if pt is not None and (t is None or pt < t):
                t = pt
            if self._evictable(peer):
                idle = peer.last_activity + self.config.idle_timeout
                if t is None or idle < t:
                    t = idle
            for s in peer.in_streams.values():
                if s.blocked_since is not None:
                    gap = s.blocked_since + self.config.gap_timeout
                    if t is None or gap < t:
                        t = gap
        if self._assemblies:
            a = next(iter(self._assemblies.values()))
            at = a.first_seen + self.config.assembly_timeout
            if t is None or at < t:
                t = at
        return t

    def handle_timer(self, now: float) -> None:
        for addr, peer in list(self._peers.items()):
            if peer.loss_time is not None:
                if peer.loss_time <= now:
                    self._detect_lost(peer, now)
            elif peer.sent and peer.last_eliciting + peer.pto() <= now:
                peer.pto_count += 1
                if peer.pto_count >= self.config.pto_limit:
                    self._unreachable(peer)
                else:
                    self.totals["probes"] += 1
                    peer.seg_limit = max(1, peer.seg_limit // 2)
                    oldest = next(iter(peer.sent.values()))
                    for r in reversed(oldest.ranges):
                        peer.retx.appendleft(r)
                    peer.probes = 1
                    self._dirty[addr] = peer
            for stream, s in peer.in_streams.items():
                if s.blocked_since is not None and s.blocked_since + self.config.gap_timeout <= now:
                    self._skip_to(peer, stream, s, min(s.ready), now)
            if now - peer.last_activity >= self.config.idle_timeout and self._evictable(peer):
                del self._peers[addr]
        while self._assemblies:
            key, a = next(iter(self._assemblies.items()))
            if a.first_seen + self.config.assembly_timeout > now:
                break
            self._drop_assembly(key, "expired")

    def peer_stats(self) -> dict[str, dict[str, float | int | str | None]]:
        return {f"{a[0]}:{a[1]}": {
            "node": p.remote_node or None, "smoothed_rtt": p.smoothed_rtt if p.has_rtt else None,
            "rttvar": p.rttvar, "min_rtt": p.min_rtt if p.has_rtt else None,
            "in_flight": p.in_flight, "queued": p.queued, "datagram_size": p.datagram_size,
            "segments_per_packet": p.seg_limit,
            "pto_count": p.pto_count} for a, p in self._peers.items()}

    # ---------------------------------------------------------------- sending
    def _peer(self, addr: Addr, now: float) -> Peer | None:
        peer = self._peers.get(addr)
        if peer is None:
            if len(self._peers) >= self.config.max_peers and not self._evict_idle():
                return None
            cfg = self.config
            peer = self._peers[addr] = Peer(addr, now, datagram_size=cfg.datagram_size,
                                            initial_rtt=cfg.initial_rtt,
                                            max_ack_delay=cfg.max_ack_delay)
            peer.next_pn = self._sealer.udp_pn_range()
            self._size(peer, self._sizes.get(addr, self.config.datagram_size))
        else:
            self._peers.move_to_end(addr)
        peer.last_activity = now
        return peer

    def _size(self, peer: Peer, size: int) -> None:
        peer.datagram_size = size
        peer.seg_payload, peer.max_segs, peer.ack_ranges = geometry(size, self._sealer.overhead)
        peer.seg_limit = peer.max_segs

    def _evictable(self, peer: Peer) -> bool:
        return not (peer.sent or peer.queued or peer.oneshots or peer.addr in self._dirty)

    def _evict_idle(self) -> bool:
        for addr, peer in self._peers.items():
            if self._evictable(peer):
                del self._peers[addr]
                return True
        return False

    def _stream_open(self, peer: Peer) -> bool:
        """False when the only data left is new frames too far ahead of their stream's oldest."""
        if peer.retx or not peer.new:
            return True
        f = peer.new[0][0]
        return f.done or f.seq < f.out.base + STREAM_WINDOW

    def _window_open(self, peer: Peer, extra: int) -> bool:
        return peer.probes > 0 or peer.in_flight + extra < self.config.max_in_flight

    def _build(self, peer: Peer, now: float, out: list[Transmit]) -> None:
        """Packets for ``peer``: its ACK, then one-shots, retransmissions and new frames."""
        overhead = self._sealer.overhead
        sp = peer.seg_payload
        cap_oneshot = peer.max_segs * sp - overhead
        max_flight = self.config.max_in_flight
        retx, new, oneshots = peer.retx, peer.new, peer.oneshots
        totals = self.totals
        while True:
            cap = min(peer.seg_limit, peer.max_segs) * sp - overhead
            parts: list[Buffer] = []
            ranges: list[tuple[OutFrame, int, int]] = []
            size = 0
            if peer.ack_pending:
                ack = ack_chunk(peer.recv_ranges, now - peer.largest_recv_time, peer.ack_ranges)
                parts.append(ack)
                size = len(ack)
                peer.ack_pending = False
                totals["acks_sent"] += 1
            while oneshots and size + ONESHOT.size + len(oneshots[0]) <= cap_oneshot:
                msg = oneshots.popleft()
                parts += (ONESHOT.pack(CH_ONESHOT, len(msg)), msg)
                size += ONESHOT.size + len(msg)
            while ((retx or new) and size + DATA.size < cap
                   and (peer.probes or peer.in_flight + size < max_flight)):
                q = retx or new
                f, off, ln = q[0]
                if f.done:
                    q.popleft()
                    continue
                base = f.out.base
                if q is retx:
                    missing = f.acked.missing(off, off + ln)
                    q.popleft()
                    for a, b in reversed(missing):
                        q.appendleft((f, a, b - a))
                    if not missing:
                        continue
                    f, off, ln = q[0]
                elif f.seq >= base + STREAM_WINDOW:
                    break  # the receiver would refuse it: wait for the stream's oldest frame
                take = min(ln, cap - size - DATA.size)
                parts += (DATA.pack(CH_DATA, f.stream, f.seq, base, len(f.data), off, take),
                          f.data[off:off + take] if take != len(f.data) else f.data)
                size += DATA.size + take
                ranges.append((f, off, take))
                if take == ln:
                    q.popleft()
                else:
                    q[0] = (f, off + take, ln - take)
            if not parts:
                return
            pn = peer.next_pn
            # the end of its range (2**40 packets): a fresh range; the receiver's replay
            # window moves on, older packets in flight are declared lost and sent again
            peer.next_pn = pn + 1 if (pn + 1) & PN_RANGE_MASK else self._sealer.udp_pn_range()
            unit = self._sealer.seal(CHANNEL_UDP, pn, b"".join(parts))
            t = to_segments(peer.addr, unit, tag=self._sealer.cluster_tag,
                            session=self._sealer.session, pn=pn, seg_payload=peer.seg_payload,
                            datagram_size=peer.datagram_size)
            out.append(t)
            segments = len(t.iov) >> 1
            totals["packets_sent"] += 1
            totals["segments_sent"] += segments
            if ranges:
                n = len(unit)
                peer.sent[pn] = Sent(pn, now, n, ranges, segments)
                peer.in_flight += n
                peer.last_eliciting = now
                if peer.probes:
                    peer.probes -= 1
            if not (retx or new or oneshots):
                return

    # ---------------------------------------------------------------- receiving
    def _receive_burst(self, mv: memoryview, ss: int, addr: Addr, now: float) -> bool:
        """GRO fast path: the read holds exactly one whole packet, in order. True if handled."""
        n = -(-len(mv) // ss)
        if len(mv) < (n - 1) * ss + SEGMENT.size + 1:
            return False
        first = SEGMENT.unpack_from(mv, 0)
        last = SEGMENT.unpack_from(mv, (n - 1) * ss)
        if (first[3] != n or first[2] != 0 or last[2] != n - 1 or first[6] != last[6]
                or first[5] != last[5] or not self._segment_ok(first, addr)):
            return False
        self.totals["segments_received"] += n
        unit = b"".join([mv[off + SEGMENT.size:off + ss] for off in range(0, len(mv), ss)])
        self._receive_packet(unit, addr, first[5], first[6], now, owned=True)
        return True

    def _segment_ok(self, h: tuple, addr: Addr) -> bool:
        """The header checks of a segment of a packet in several (before reassembly)."""
        magic, version, index, count, tag, session, pn = h
        reason = None
        peer = self._peers.get(addr)
        if magic != SEGMENT_MAGIC:
            reason = "malformed"
        elif version != WIRE_VERSION:
            reason = "bad_version"
        elif tag != self._sealer.cluster_tag:
            reason = "wrong_cluster"
        elif not 0 < count <= MAX_SEGMENTS or index >= count:
            reason = "malformed"
        elif (peer is not None and peer.remote_session == session  # its node is known: pre-check
              and not self._guard.fresh(CHANNEL_UDP, peer.remote_node, session, pn)):
            reason = "replay"
        if reason:
            self.counters[reason] += 1
            return False
        return True

    def _receive_segment(self, mv: memoryview, addr: Addr, now: float) -> None:
        if len(mv) <= SEGMENT.size:
            self.counters["truncated"] += 1
            return
        h = SEGMENT.unpack_from(mv, 0)
        magic, version, index, count, tag, session, pn = h
        if count == 1 and magic == SEGMENT_MAGIC and version == WIRE_VERSION and index == 0 \
                and tag == self._sealer.cluster_tag:  # the common case, checked in one go
            self.totals["segments_received"] += 1
            self._receive_packet(mv[SEGMENT.size:], addr, session, pn, now, owned=False)
            return
        if not self._segment_ok(h, addr):
            return
        self.totals["segments_received"] += 1
        key = (addr, session, pn)
        a = self._assemblies.get(key)
        if a is None:
            while (len(self._assemblies) >= self.config.max_assemblies
                   or self._assembly_bytes + len(mv) > self.config.max_assembly_bytes):
                self._drop_assembly(next(iter(self._assemblies)), "overflow")
            a = self._assemblies[key] = _Assembly(count, now)
        if len(a.parts) != count or a.size + len(mv) > MAX_BURST:
            self._drop_assembly(key, "malformed")
            return
        if a.parts[index] is not None:
            self.counters["replay"] += 1
            return
        a.parts[index] = bytes(mv[SEGMENT.size:])
        a.got += 1
        a.size += len(mv)
        self._assembly_bytes += len(mv)
        if a.got == count:
            del self._assemblies[key]
            self._assembly_bytes -= a.size
            self._receive_packet(b"".join(a.parts), addr, session, pn, now, owned=True)  # type: ignore[arg-type]

    def _drop_assembly(self, key: tuple[Addr, int, int], reason: str) -> None:
        a = self._assemblies.pop(key)
        self._assembly_bytes -= a.size
        self.counters[reason] += 1

    def _receive_packet(self, unit: Buffer, addr: Addr, session: int, pn: int, now: float,
                        *, owned: bool) -> None:
        try:
            # replays of captured packets are turned away before the AEAD (after reassembly:
            # only the first segment carries the sender's id)
            if not self._guard.fresh(CHANNEL_UDP, self._sealer.claimed_sender(unit), session, pn):
                self.counters["replay"] += 1
                return
            sender, plain, plain_owned = self._sealer.open(CHANNEL_UDP, session, pn, unit)
        except Dropped as e:
            self.counters[e.reason] += 1
            return
        if not self._guard.accept(CHANNEL_UDP, sender, session, pn, now):
            self.counters["replay"] += 1
            return
        peer = self._peers.get(addr)
        if peer is not None:
            self._peers.move_to_end(addr)
            peer.last_activity = now
        else:
            peer = self._peer(addr, now)
            if peer is None:
                self.counters["overflow"] += 1
                return
        self.totals["packets_received"] += 1
        if peer.remote_session != session:
            peer.in_streams.clear()
            peer.recv_ranges.clear()
            peer.reassembly = 0
            peer.remote_session, peer.remote_node = session, sender
        try:
            eliciting, refused = self._chunks(peer, sender, plain, owned or plain_owned, now)
        except (struct.error, ValueError):
            self.counters["malformed"] += 1
            return
        if not refused:  # every packet is acked (keeps ranges whole); only data asks for it
            peer.record(pn, now)
            if eliciting:
                peer.ack_pending = True
                self._dirty[addr] = peer

    def _chunks(self, peer: Peer, sender: str, plain: memoryview, owned: bool,
                now: float) -> tuple[bool, bool]:
        pos, end = 0, len(plain)
        eliciting = refused = False
        while pos < end:
            kind = plain[pos]
            if kind == CH_DATA:
                _, stream, seq, base, flen, off, ln = DATA.unpack_from(plain, pos)
                pos += DATA.size
                if off + ln > flen or pos + ln > end:
                    raise ValueError("data chunk runs past its frame or packet")
                if flen > self.config.max_frame:
                    self.counters["oversize"] += 1
                    raise ValueError("frame too large")
                eliciting = True
                piece = plain[pos:pos + ln]
                pos += ln
                if not self._data(peer, stream, seq, base, flen, off, piece, owned, now):
                    refused = True
            elif kind == CH_ACK:
                _, delay_us, count = ACK.unpack_from(plain, pos)
                pos += ACK.size
                if not 0 < count <= MAX_ACK_RANGES or pos + count * ACK_RANGE.size > end:
                    raise ValueError("bad ack chunk")
                if count == 1:
                    hi, lo = ACK_RANGE.unpack_from(plain, pos)
                    ranges = [(hi, lo)]
                    bad = lo > hi
                else:
                    ranges = [ACK_RANGE.unpack_from(plain, pos + i * ACK_RANGE.size)
                              for i in range(count)]
                    bad = any(lo > hi for hi, lo in ranges)
                if bad:
                    raise ValueError("bad ack range")
                pos += count * ACK_RANGE.size
                self._on_ack(peer, ranges, delay_us / 1e6, now)
            elif kind == CH_ONESHOT:
                _, ln = ONESHOT.unpack_from(plain, pos)
                pos += ONESHOT.size
                if pos + ln > end:
                    raise ValueError("one-shot runs past the packet")
                piece = plain[pos:pos + ln]
                pos += ln
                self.totals["oneshots_received"] += 1
                self._events.append(
                    FrameReceived(peer.addr, sender, piece if owned else bytes(piece), None))
            else:
                raise ValueError(f"unknown chunk {kind}")
        return eliciting, refused

    def _data(self, peer: Peer, stream: int, seq: int, base: int, flen: int,
              off: int, piece: memoryview, owned: bool, now: float) -> bool:
        """Store a frame piece. False if refused for lack of room (then it is not acked)."""
        s = peer.in_streams.get(stream)
        if s is None:
            s = peer.in_streams[stream] = InStream(base)
        if base > s.next_seq:
            self._skip_to(peer, stream, s, base, now)
        if seq < s.next_seq or seq in s.ready:
            return True  # a duplicate: already delivered or complete
        if seq >= s.next_seq + STREAM_WINDOW:
            self.counters["overflow"] += 1
            return False
        f = s.partial.get(seq)
        if f is None:
            # The next frame to deliver is always let in, so a full budget can't deadlock.
            if seq != s.next_seq and peer.reassembly + flen > self.config.reassembly_budget:
                self.counters["overflow"] += 1
                return False
            if off == 0 and len(piece) == flen:
                self._complete(peer, stream, s, seq, piece if owned else bytes(piece), now)
                return True
            f = s.partial[seq] = InFrame(flen)
            peer.reassembly += flen
        elif len(f.buf) != flen:
            raise ValueError("frame length changed")
        for a, b in f.have.missing(off, off + len(piece)):
            f.buf[a:b] = piece[a - off:b - off]
        f.have.add(off, off + len(piece))
        if f.have.total == flen:
            del s.partial[seq]
            peer.reassembly -= flen
            self._complete(peer, stream, s, seq, f.buf, now)
        return True

    def _complete(self, peer: Peer, stream: int, s: InStream, seq: int, data: Buffer,
                  now: float) -> None:
        if seq != s.next_seq:
            s.ready[seq] = data
            peer.reassembly += len(data)
            if s.blocked_since is None:
                s.blocked_since = now
            return
        self._deliver(peer, stream, data)
        s.next_seq += 1
        self._drain(peer, stream, s, now)

    def _skip_to(self, peer: Peer, stream: int, s: InStream, base: int, now: float) -> None:
        """Frames below ``base`` were given up (by the sender, or by the gap timeout):
        deliver those that are whole, drop the rest."""
        for seq in sorted(q for q in s.partial if q < base):
            peer.reassembly -= len(s.partial.pop(seq).buf)
            self.counters["abandoned"] += 1
        for seq in sorted(q for q in s.ready if q < base):
            data = s.ready.pop(seq)
            peer.reassembly -= len(data)
            self._deliver(peer, stream, data)
        s.next_seq = base
        self._drain(peer, stream, s, now)

    def _drain(self, peer: Peer, stream: int, s: InStream, now: float) -> None:
        while s.next_seq in s.ready:
            data = s.ready.pop(s.next_seq)
            peer.reassembly -= len(data)
            self._deliver(peer, stream, data)
            s.next_seq += 1
        s.blocked_since = now if s.ready else None

    def _deliver(self, peer: Peer, stream: int, data: Buffer) -> None:
        self.totals["frames_received"] += 1
        self._events.append(FrameReceived(peer.addr, peer.remote_node, data, stream))

    # ---------------------------------------------------------------- loss recovery
    def _on_ack(self, peer: Peer, ranges: list[tuple[int, int]], ack_delay: float,
                now: float) -> None:
        sent = peer.sent
        if not sent:
            return
        smallest = next(iter(sent))
        top = peer.next_pn - 1
        hi, lo = ranges[0]
        if lo <= smallest and hi >= top:  # the usual case: everything in flight is acked
            newly = list(sent.values())
            sent.clear()
        else:
            newly = []
            for hi, lo in ranges:
                for pn in range(max(lo, smallest), min(hi, top) + 1):
                    p = sent.pop(pn, None)
                    if p is not None:
                        newly.append(p)
        if not newly:
            return
        top_sent = newly[0]
        for p in newly:
            if p.pn > top_sent.pn:
                top_sent = p
            peer.in_flight -= p.size
            for f, off, ln in p.ranges:
                if f.done:
                    continue
                n = len(f.data)
                if ln != n:
                    f.acked.add(off, off + ln)
                if ln == n or f.acked.total == n:
                    f.done = True
                    f.out.unacked.pop(f.seq, None)
                    peer.queued -= n
            if p.segments >= peer.seg_limit < peer.max_segs:
                peer.seg_limit += 1
        if top_sent.pn > peer.largest_acked:
            peer.largest_acked = top_sent.pn
            if top_sent.pn == ranges[0][0]:
                peer.update_rtt(now - top_sent.time, ack_delay)
        peer.pto_count = 0
        if sent:
            self._detect_lost(peer, now)
        else:
            peer.loss_time = None
        if peer.retx or peer.new or peer.oneshots:
            self._dirty[peer.addr] = peer

    def _detect_lost(self, peer: Peer, now: float) -> None:
        lost = peer.detect_lost(now)
        if lost:
            self.totals["packets_lost"] += lost
            self._dirty[peer.addr] = peer

    def _unreachable(self, peer: Peer) -> None:
        frames = []
        for stream in sorted(peer.out_streams):
            s = peer.out_streams[stream]
            for f in s.unacked.values():
                f.done = True
                frames.append(bytes(f.data))
            s.unacked.clear()
        peer.sent.clear()
        peer.retx.clear()
        peer.new.clear()
        peer.in_flight = peer.queued = 0
        peer.pto_count = 0
        peer.probes = 0
        peer.loss_time = None
        self.totals["unreachable"] += 1
        self._events.append(PeerUnreachable(peer.addr, tuple(frames)))
