"""What :class:`ringd.core.reliable.Endpoint` keeps per peer, and the per-peer maths.

Pure: no sockets or clocks (``now`` is passed in). A :class:`Peer` holds its datagram
geometry, the frames waiting, in flight (:class:`OutFrame` on an :class:`OutStream`,
:class:`Sent` packets) and being reassembled (:class:`InFrame` on an :class:`InStream`),
the packet numbers received (:meth:`Peer.record`, which the next ACK reports) and the
RFC 9002 state: RTT estimate (smoothed, variance, min; :meth:`Peer.update_rtt`), loss
detection by packet threshold 3 and time threshold 9/8 RTT (:meth:`Peer.detect_lost`),
probe timeout with exponential backoff (:meth:`Peer.pto`).
"""

from __future__ import annotations

from collections import deque

from ringd.core.packet import Addr
from ringd.core.wire import Buffer

K_PACKET_THRESHOLD = 3
K_TIME_THRESHOLD = 9 / 8
K_GRANULARITY = 0.001
KEEP_RANGES = 128  # received packet-number ranges kept (an ACK sends the newest)


class Ranges:
    """Disjoint sorted half-open byte ranges."""

    __slots__ = ("spans", "total")

    def __init__(self) -> None:
        self.spans: list[list[int]] = []
        self.total = 0

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        spans = self.spans
        i = 0
        while i < len(spans) and spans[i][1] < start:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] <= end:
            start, end = min(start, spans[j][0]), max(end, spans[j][1])
            j += 1
        spans[i:j] = [[start, end]]
        self.total = sum(e - s for s, e in spans)

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        out, pos = [], start
        for s, e in self.spans:
            if e <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
        if pos < end:
            out.append((pos, end))
        return out


class OutFrame:
    __slots__ = ("stream", "seq", "data", "acked", "done", "out")

    def __init__(self, stream: int, seq: int, data: bytes, out: "OutStream") -> None:
        self.stream, self.seq, self.data, self.out = stream, seq, memoryview(data), out
        self.acked = Ranges()
        self.done = False


class OutStream:
    __slots__ = ("next_seq", "unacked")

    def __init__(self) -> None:
        self.next_seq = 0
        self.unacked: dict[int, OutFrame] = {}  # insertion order == seq order

    @property
    def base(self) -> int:
        return next(iter(self.unacked)) if self.unacked else self.next_seq


class Sent:
    __slots__ = ("pn", "time", "size", "ranges", "segments")

    def __init__(self, pn: int, time: float, size: int, ranges: list, segments: int) -> None:
        self.pn, self.time, self.size, self.ranges, self.segments = pn, time, size, ranges, segments


class InFrame:
    __slots__ = ("buf", "have")

    def __init__(self, length: int) -> None:
        self.buf = bytearray(length)
        self.have = Ranges()


class InStream:
    __slots__ = ("next_seq", "partial", "ready", "blocked_since")

    def __init__(self, next_seq: int) -> None:
        self.next_seq = next_seq
        self.partial: dict[int, InFrame] = {}
        self.ready: dict[int, Buffer] = {}
        self.blocked_since: float | None = None  # whole frames wait behind a missing one


class Peer:
    """One peer's state: geometry, frames to send and in flight, the RTT estimate, packets
    and frames received."""

    def __init__(self, addr: Addr, now: float, *, datagram_size: int, initial_rtt: float,
                 max_ack_delay: float) -> None:
        self.addr = addr
        self.last_activity = now
        self.max_ack_delay = max_ack_delay
        # datagram geometry (set by Endpoint._size, per peer: it follows the path MTU)
        self.datagram_size = datagram_size
        self.seg_payload = 0
        self.max_segs = 1
        self.ack_ranges = 1
        # sending
        self.next_pn = 0
        self.sent: dict[int, Sent] = {}  # ack-eliciting packets in flight, pn order
        self.in_flight = 0
        self.queued = 0
        self.out_streams: dict[int, OutStream] = {}
        self.new: deque[tuple[OutFrame, int, int]] = deque()  # (frame, offset, length)
        self.retx: deque[tuple[OutFrame, int, int]] = deque()
        self.oneshots: deque[bytes] = deque()
        self.probes = 0
        self.seg_limit = 1
        # RFC 9002 state
        self.latest_rtt = 0.0
        self.smoothed_rtt = initial_rtt
        self.rttvar = initial_rtt / 2
        self.min_rtt = 0.0
        self.has_rtt = False
        self.largest_acked = -1
        self.loss_time: float | None = None
        self.pto_count = 0
        self.last_eliciting = 0.0
        # receiving
        self.remote_session: int | None = None
        self.remote_node = ""
        self.recv_ranges: list[list[int]] = []  # [largest, smallest], newest first
        self.largest_recv_time = now
        self.ack_pending = False
        self.in_streams: dict[int, InStream] = {}
        self.reassembly = 0  # bytes held in partial and ready frames

    # ------------------------------------------------------------ receiving: packet numbers
    def record(self, pn: int, now: float) -> None:
        """Packet ``pn`` arrived (into :attr:`recv_ranges`, which the next ACK reports)."""
        r = self.recv_ranges
        if not r or pn > r[0][0]:
            self.largest_recv_time = now
            if r and pn == r[0][0] + 1:
                r[0][0] = pn
            else:
                r.insert(0, [pn, pn])
        else:
            for i, span in enumerate(r):
                hi, lo = span
                if pn > hi + 1:
                    r.insert(i, [pn, pn])
                    break
                if pn == hi + 1:
                    span[0] = pn
                    if i and r[i - 1][1] == pn + 1:
                        r[i - 1][1] = lo
                        del r[i]
                    break
                if pn >= lo:
                    break
                if pn == lo - 1:
                    span[1] = pn
                    if i + 1 < len(r) and r[i + 1][0] == pn - 1:
                        span[1] = r[i + 1][1]
                        del r[i + 1]
                    break
            else:
                r.append([pn, pn])
        del r[KEEP_RANGES:]

    # ------------------------------------------------------------ RFC 9002 loss recovery
    def update_rtt(self, latest: float, ack_delay: float) -> None:
        # An adapter whose clock reading is older than the send it acks (one reading for a
        # batch of reads) must not make the estimate negative: a sample is at least 1 µs.
        latest = max(latest, 1e-6)
        self.latest_rtt = latest
        if not self.has_rtt:
            self.has_rtt = True
            self.min_rtt = self.smoothed_rtt = latest
            self.rttvar = latest / 2
            return
        self.min_rtt = min(self.min_rtt, latest)
        ack_delay = min(ack_delay, self.max_ack_delay)
        adjusted = latest - ack_delay if latest >= self.min_rtt + ack_delay else latest
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.smoothed_rtt - adjusted)
        self.smoothed_rtt = 0.875 * self.smoothed_rtt + 0.125 * adjusted

    def detect_lost(self, now: float) -> int:
        """Declare lost the packets past the packet or time threshold (their data goes back
        to :attr:`retx`) and set :attr:`loss_time` for the rest; returns how many were lost."""
        delay = max(K_TIME_THRESHOLD * max(self.latest_rtt, self.smoothed_rtt), K_GRANULARITY)
        self.loss_time = None
        lost: list[Sent] = []
        for pn, p in self.sent.items():
            if pn > self.largest_acked:
                break
            if p.time + delay <= now or self.largest_acked >= pn + K_PACKET_THRESHOLD:
                lost.append(p)
            elif self.loss_time is None or p.time + delay < self.loss_time:
                self.loss_time = p.time + delay
        for p in lost:
            del self.sent[p.pn]
            self.in_flight -= p.size
            self.retx.extend(r for r in p.ranges if not r[0].done)
            if p.segments > 1:
                self.seg_limit = max(1, min(self.seg_limit, p.segments // 2))
        return len(lost)

    def pto(self) -> float:
        """The probe timeout, backed off by the probe timeouts in a row."""
        base = self.smoothed_rtt + max(4 * self.rttvar, K_GRANULARITY) + self.max_ack_delay
        return base * (1 << self.pto_count)

    def timer(self) -> float | None:
        """When loss detection or the probe timeout next needs the endpoint, or None."""
        if self.loss_time is not None:
            return self.loss_time
        if not self.sent:
            return None
        return self.last_eliciting + self.pto()
