"""UDP adapter: one socket feeding :class:`ringd.core.reliable.Endpoint`. Loop thread only.

The core's clock is ``time.monotonic()`` (uvloop's ``loop.time()`` has millisecond steps,
too coarse for LAN round trips); the one timer is armed with ``call_later``.

Datagram size follows each peer's path (:mod:`ringd.net.pmtu`): on first contact the
route's MTU is looked up (no packet is sent) and the core is told the largest datagram for
that peer -- 64 KB on loopback, 1472 B on a 1500-byte Ethernet, 8972 B on a jumbo-frame
link -- capped by ``datagram_size`` when one is configured. A send refused with EMSGSIZE
(the kernel learned a smaller path MTU) makes it look again.

Reads drain the socket in one readiness callback (then acks go out once per batch); on
Linux, UDP GRO hands a whole packet's segments over in one read and UDP GSO sends them with
one ``sendmsg``. Where the kernel does not coalesce (macOS; links without GRO) the adapter
does it: consecutive datagrams of one size from one peer, up to the last segment of a
packet, go to the core as one GRO-style read, so a packet costs the core one whole-packet
check instead of a pass through reassembly per segment. Measured on loopback, a 32 KiB
frame cut into 1400-byte segments costs about what one 32 KiB datagram costs with GSO/GRO,
and ~2x more without (see ``bench/transport.py``). A readiness callback on a raw socket is
used instead of a ``DatagramProtocol`` because the protocol API can't pass the GSO/GRO
control messages.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import select
import socket
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from ringd.core.packet import MAX_BURST, MAX_SEGMENTS, Transmit, closes_packet
from ringd.core.reliable import Endpoint, Event
from ringd.net.pmtu import udp_payload_limit

log = logging.getLogger(__name__)

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = 103  # linux/udp.h
UDP_GRO = 104
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)  # linux/in.h
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
WARN_EVERY = 60.0  # seconds between repeated warnings about one peer
READ_SIZE = 65536
BUFFER_SIZE = 4 * READ_SIZE  # room for a gathered packet (<= MAX_BURST + headers) and one more read
MAX_READS_PER_WAKEUP = 256
ACK_EVERY_READS = 32  # within a long read batch, flush acks this often
MAX_BACKLOG = 4096  # transmits waiting for the socket to drain
UNKNOWN_PATH_DATAGRAM = 1200  # when the path MTU can't be found (QUIC's conservative size)
MAX_KNOWN_PATHS = 4096


@dataclass
class Impairment:
    """A bad network in userspace (this kernel has no netem): each datagram is dropped with
    ``loss``, sent twice with ``dup``, held back up to ``max_delay`` seconds with ``reorder``
    (so later ones overtake it). Seeded: a test run is repeatable."""

    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    max_delay: float = 0.005
    seed: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def fate(self, datagram: bytes) -> list[float]:
        """The delays to send ``datagram`` after (0: now): [] drops it, two copies dup it."""
        rng = self._rng
        if rng.random() < self.loss:
            self.dropped += 1
            return []
        copies = 2 if rng.random() < self.dup else 1
        self.duplicated += copies - 1
        out = []
        for _ in range(copies):
            if rng.random() < self.reorder:
                self.delayed += 1
                out.append(rng.random() * self.max_delay)
            else:
                out.append(0.0)
        return out


class UdpChannel:
    """Owns a bound non-blocking UDP socket, the reliability core and its one timer."""

    def __init__(self, sock: socket.socket, endpoint: Endpoint, on_event: Callable[[Event], None],
                 *, offload: bool = True, datagram_size: int = 0,
                 impair: Impairment | None = None) -> None:
        """``datagram_size``: 0 follows each peer's path MTU; otherwise the largest datagram
        (still lowered to a smaller path MTU). ``impair``: a bad network (tests: there is
        no netem here), applied to every datagram this channel sends."""
        self.sock = sock
        self.impair = impair
        self.endpoint = endpoint
        self._cap = datagram_size or MAX_BURST
        self._configured = datagram_size
        self._paths: dict[tuple[str, int], int] = {}  # peers whose datagram size is set
        self._on_event = on_event
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buf)
        # "more to read?" as a poll instead of a read failing with EAGAIN: a raised
        # BlockingIOError costs ~3 µs per wakeup, poll(0) ~0.7 µs (measured here)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._backlog: deque[Transmit] = deque()
        self._writing = False
        self._reading = False
        self._closed = False
        self._flush_soon = False
        self.gro = self.gso = False
        if sys.platform == "linux":
            try:  # never let the kernel fragment: a datagram over the path MTU fails instead
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            except OSError:
                pass
            if offload and impair is None:  # an impaired channel sends datagram by datagram
                try:
                    sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                    self.gro = self.gso = True
                except OSError:
                    pass
        self._warned: dict[tuple[str, int], float] = {}  # bounded by the peers we send to
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            except OSError:
                pass
        # reads: datagrams or GRO bursts read; gathered: datagrams the adapter handed over
        # together with others of their packet (its own GRO)
        self.totals = {"send_errors": 0, "backlog_dropped": 0, "reads": 0, "gathered": 0}

    def start(self) -> None:
        self.resume_reading()

    def pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def close(self) -> None:
        if self._closed:
            return
        self.pause_reading()
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
        if self._timer:
            self._timer.cancel()
        self._closed = True
        try:
            self._poll.unregister(self.sock.fileno())
        except (KeyError, ValueError):
            pass
        self.sock.close()

    # ---------------------------------------------------------------- path MTU
    def _learn_path(self, addr: tuple[str, int]) -> int:
        """Look up the route's MTU to ``addr`` and size its datagrams (once per peer)."""
        limit = udp_payload_limit(addr, family=self.sock.family)
        if limit is None:
            size = min(self._cap, UNKNOWN_PATH_DATAGRAM) if not self._configured else self._cap
            log.debug("path MTU to %s:%d unknown; datagrams of %d B", addr[0], addr[1], size)
        else:
            size = min(self._cap, limit)
            if self._configured and limit < self._configured:
                log.info("path to %s:%d takes UDP payloads of at most %d B: using that instead of "
                         "datagram_size %d", addr[0], addr[1], limit, self._configured)
        if len(self._paths) >= MAX_KNOWN_PATHS:
            self._paths.clear()  # looked up again on next use
        self._paths[addr] = size = self.endpoint.set_datagram_size(addr, size)
        return size

    def datagram_size(self, addr: tuple[str, int]) -> int:
        size = self._paths.get(addr)
        return self._learn_path(addr) if size is None else size

    def max_oneshot(self, addr: tuple[str, int]) -> int:
        """Largest unreliable message to ``addr`` (one packet on its path)."""
        self.datagram_size(addr)  # looks the path up on first contact
        return self.endpoint.max_oneshot_to(addr)

    # ---------------------------------------------------------------- sending
    def send_frame(self, addr: tuple[str, int], data: bytes | memoryview, *, stream: int = 0,
                   reliable: bool = True) -> bool:
        """Queue a frame. The first frame of a loop iteration leaves at once; frames sent
        later in the same iteration are packed together by one flush at its end."""
        if addr not in self._paths:
            self._learn_path(addr)
        ok = self.endpoint.send_frame(addr, data, time.monotonic(), stream=stream,
                                      reliable=reliable)
        if not self._flush_soon:
            self.flush()
            self._schedule_flush()
        return ok

    def flush(self) -> None:
        """Send what the core has ready, then re-arm the timer."""
        if self._closed:
            return
        if self.endpoint.has_data():
            for t in self.endpoint.datagrams_to_send(time.monotonic()):
                if self._backlog:
                    self._queue(t)
                else:
                    self._send(t)
        self._arm()

    def _send(self, t: Transmit) -> bool:
        """Send one transmit; False (and queued) if the socket buffer is full."""
        if self.impair is not None:
            self._send_impaired(t, self.impair)
            return True
        try:
            if self.gso and t.segments > 1:
                segment = struct.pack("=H", t.segment_size)
                self.sock.sendmsg(t.iov, [(SOL_UDP, UDP_SEGMENT, segment)], 0, t.addr)
            else:
                for i in range(0, len(t.iov), 2):
                    self.sock.sendmsg(t.iov[i:i + 2], (), 0, t.addr)
        except BlockingIOError:
            self._queue(t)
            return False
        except OSError as e:
            if e.errno == errno.EMSGSIZE:  # the kernel knows a smaller path MTU now: follow it
                self._paths.pop(t.addr, None)
                size = self._learn_path(t.addr)
                if size >= t.segment_size:
                    size = self._paths[t.addr] = self.endpoint.set_datagram_size(
                        t.addr, min(size, UNKNOWN_PATH_DATAGRAM, t.segment_size - 64))
                self._warn(t.addr, "UDP datagrams of %d B do not fit the path to %s:%d; now %d B "
                           "(the lost data is sent again)", t.segment_size, t.addr[0], t.addr[1],
                           size)
            elif self.gso and e.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP,
                                          errno.ENOPROTOOPT):
                log.info("UDP segmentation offload failed (%s); sending datagrams one by one", e)
                self.gso = False
                return self._send(t)
            else:
                self._warn(t.addr, "UDP send to %s:%d failed: %s", *t.addr, e)
            self.totals["send_errors"] += 1
        return True

    def _send_impaired(self, t: Transmit, impair: Impairment) -> None:
        """Each datagram of ``t`` dropped, sent twice, or held back (later ones overtake it),
        as ``impair`` draws; what a full socket buffer refuses is one more loss."""
        for i in range(0, len(t.iov), 2):
            datagram = b"".join(t.iov[i:i + 2])
            for delay in impair.fate(datagram):
                if delay:
                    self._loop.call_later(delay, self._raw_send, datagram, t.addr)
                else:
                    self._raw_send(datagram, t.addr)

    def _raw_send(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if self._closed:
            return
        try:
            self.sock.sendto(datagram, addr)
        except OSError:
            self.totals["send_errors"] += 1

    def _warn(self, addr: tuple[str, int], msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned.get(addr, -WARN_EVERY) >= WARN_EVERY:
            self._warned[addr] = now
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)

    def _queue(self, t: Transmit) -> None:
        if len(self._backlog) >= MAX_BACKLOG:
            self._backlog.popleft()
            self.totals["backlog_dropped"] += 1  # the reliability layer will resend
        self._backlog.append(t)
        if not self._writing:
            self._loop.add_writer(self.sock.fileno(), self._on_writable)
            self._writing = True

    def _on_writable(self) -> None:
        while self._backlog:
            t = self._backlog.popleft()
            if not self._send(t):
                # _send re-queued it at the back; restore order
                self._backlog.appendleft(self._backlog.pop())
                return
        self._loop.remove_writer(self.sock.fileno())
        self._writing = False

    # ---------------------------------------------------------------- receiving
    def _on_readable(self) -> None:
        view, sock, poll = self._view, self.sock, self._poll.poll
        start = end = seg = 0  # a run being gathered: view[start:end], datagrams of seg bytes
        run_addr: tuple[str, int] | None = None
        for i in range(1, MAX_READS_PER_WAKEUP + 1):
            # in a run the rest of its packet is most likely queued already: read on (an empty
            # socket ends the loop with EAGAIN), else ask first (cheaper than a failed read)
            if i > 1 and end == start and not poll(0):
                break
            if end + READ_SIZE > BUFFER_SIZE:  # no room to read after the run: hand it over
                self._hand_run(view[start:end], run_addr, seg)  # type: ignore[arg-type]
                start = end = 0
            try:
                if self.gro:
                    n, anc, _flags, addr = sock.recvmsg_into([view[end:end + READ_SIZE]], 64)
                    burst = 0
                    for level, kind, data in anc:
                        if level == SOL_UDP and kind == UDP_GRO:
                            burst = int.from_bytes(data[:4], sys.byteorder)
                else:
                    n, addr = sock.recvfrom_into(view[end:end + READ_SIZE])
                    burst = 0
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # e.g. ICMP errors reported on the socket
                log.debug("UDP receive error: %s", e)
                continue
            self.totals["reads"] += 1
            addr = addr[:2]
            if (end > start and addr == run_addr and not burst and n <= seg
                    and end - start < MAX_SEGMENTS * seg):  # the next datagram of the run
                end += n
                if n < seg or closes_packet(view[end - n:end]):
                    self._hand_run(view[start:end], addr, seg)
                    start = end = 0
            else:
                if end > start:
                    self._hand_run(view[start:end], run_addr, seg)  # type: ignore[arg-type]
                start, end, seg, run_addr = end, end + n, n, addr
                if burst or closes_packet(view[start:end]):
                    self._deliver(view[start:end], addr, burst)
                    start = end = 0
            if i % ACK_EVERY_READS == 0:
                self.flush()
        if end > start:
            self._hand_run(view[start:end], run_addr, seg)  # type: ignore[arg-type]
        # Acks go out in this loop iteration, after the callbacks the frames woke up: a reply
        # they send carries the ack instead of a packet of its own.
        self._schedule_flush()

    def _hand_run(self, run: memoryview, addr: tuple[str, int], seg: int) -> None:
        """Hand a gathered run of ``seg``-byte datagrams (the last may be shorter) to the core."""
        if len(run) > seg:
            self.totals["gathered"] += -(-len(run) // seg)
        self._deliver(run, addr, seg)

    def _deliver(self, data: memoryview, addr: tuple[str, int], seg: int) -> None:
        """Hand one datagram, or several ``seg`` bytes apart (GRO's or our own), to the core."""
        ep = self.endpoint
        # a fresh reading per read: handlers of earlier reads may have sent since
        ep.receive_datagram(data, addr, time.monotonic(), seg if len(data) > seg else 0)
        if addr not in self._paths and ep.has_peer(addr):
            # only once a packet from it authenticated: a flood of forged sources must
            # not cost a route lookup each
            self._learn_path(addr)
        self._dispatch()

    def _schedule_flush(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_soon = False
        self.flush()

    def _dispatch(self) -> None:
        while (ev := self.endpoint.next_event()) is not None:
            try:
                self._on_event(ev)
            except Exception:
                log.exception("UDP event handler failed on %s", type(ev).__name__)

    # ---------------------------------------------------------------- timer
    def _arm(self) -> None:
        """Keep one timer at or before the core's deadline. A deadline that moved later is
        left armed: firing early costs one no-op ``handle_timer``, re-arming costs more."""
        t = self.endpoint.get_timer()
        if t is None or (self._timer_at is not None and self._timer_at <= t):
            return
        if self._timer:
            self._timer.cancel()
        self._timer_at = t
        self._timer = self._loop.call_later(max(0.0, t - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.endpoint.handle_timer(time.monotonic())
        self._dispatch()
        self.flush()
