"""TCP adapter: one persistent connection per peer, length-prefixed sealed frames. Loop thread only.

Every connection starts with a :class:`ringd.core.wire.Handshake` each way (it names the
sender's node id and peer port, so either side can reuse the connection). When both sides
connect at once, the connection opened by the smaller node id wins; the other is closed by
its opener once its buffered frames are written. Reads go straight into the decoder's
reused buffer (``BufferedProtocol``); writes use ``TCP_NODELAY`` and respect
``pause_writing``/``drain``; reading pauses on request. Lost connections are re-opened on
demand with exponential backoff. Frames written into a connection that then breaks are
lost (the layers above time out); frames queued while connecting are kept (bounded).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from typing import Callable, Iterator

from ringd import PROTOCOL_VERSION, __version__
from ringd.core import stream, wire
from ringd.core.seal import ReplayGuard, Sealer
from ringd.core.stream import BufferPool, StreamDecoder
from ringd.core.wire import Buffer, Handshake
from ringd.errors import LocalProtocolError

log = logging.getLogger(__name__)

Addr = tuple[str, int]
WRITE_HIGH = 1 << 20
WRITE_LOW = 256 << 10
MAX_PENDING = 64 << 20  # bytes queued per peer while (re)connecting
#: Bytes of messages queued per connection behind the transport (not yet sealed). A peer
#: that stops reading fills it; past it messages are dropped (counted ``overflow``, one
#: warning a minute) rather than held without bound. Four of the largest TCP messages.
MAX_QUEUED = 4 * stream.TCP_MAX_FRAME
#: From this size a message is sent in records of ``RECORD`` bytes, each sealed and written
#: as soon as it is ready, so the peer opens one record while the next is being sealed.
LARGE_FRAME = 256 << 10
RECORD = 512 << 10  # measured best of 128 KiB-1 MiB on loopback (bench/transport.py, 4 MiB)
WARN_EVERY = 60.0  # seconds between repeated warnings about one peer


class _Conn(asyncio.BufferedProtocol):
    def __init__(self, channel: "TcpChannel", *, initiator: str | None, addr: Addr | None) -> None:
        self.ch = channel
        self.initiator = initiator  # node id of the opener (ours when outbound)
        self.addr = addr  # the peer's peer-port address, known after its handshake if inbound
        self.peer: str | None = None
        self.transport: asyncio.Transport | None = None
        self.decoder = StreamDecoder(channel.sealer, channel.guard, channel.counters,
                                     max_frame=channel.max_frame, clock=channel.loop.time,
                                     pool=channel.pool)
        self.retiring = False
        self.closed = asyncio.get_running_loop().create_future()
        self._writable = asyncio.Event()  # the transport takes more and nothing is queued
        self._writable.set()
        self._paused = False  # the transport asked us to stop writing (pause_writing)
        # messages waiting to be sealed, each an iterator of sealed chunks to write in order
        self._queue: deque[tuple[Iterator[memoryview], int]] = deque()
        self._queued = 0  # bytes of the messages in _queue
        self._pumping: asyncio.Handle | None = None
        self._sendbuf: bytearray | None = None
        self._records = BufferPool(max_buffers=4, min_size=0)  # send buffers of large messages

    # ----------------------------------------------------------- protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)  # type: ignore[union-attr]
        if self.ch.reading_paused:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.ch.conns_all.add(self)
        hs = Handshake(self.ch.node_id, self.ch.sealer.cluster_id, PROTOCOL_VERSION, __version__,
                       self.ch.port)
        self.write((wire.encode_bytes(hs),))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        for frame in self.decoder.buffer_updated(nbytes):
            if self.peer is None:
                if not self._handshake(frame):
                    return
            elif frame.sender != self.peer:
                self.ch.counters["malformed"] += 1
            else:
                self.ch.deliver(frame.sender, self.addr, frame.data)  # type: ignore[arg-type]
        if self.decoder.failed:
            peer = self.transport.get_extra_info("peername") if self.transport else None
            host = peer[0] if peer else "?"
            self.ch.warn(host, "closed a TCP connection from %s: %s%s", host, self.decoder.failed,
                         " (another cluster's key?)" if self.decoder.failed == "wrong_cluster"
                         else "")
            self.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ch.conns_all.discard(self)
        self.ch.forget(self)
        if self._queue:  # unsent messages are lost, like those in the socket buffer
            self.ch.counters["overflow"] += len(self._queue)
            self._queue.clear()
            self._queued = 0
        if self._pumping is not None:
            self._pumping.cancel()
            self._pumping = None
        self._writable.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True
        self._writable.clear()

    def resume_writing(self) -> None:
        self._paused = False
        self._schedule()
        self._update_writable()

    # ----------------------------------------------------------- helpers
    def _handshake(self, frame: stream.StreamFrame) -> bool:
        try:
            hs = wire.decode(frame.data)
        except wire.Dropped as e:
            self.ch.counters[e.reason] += 1
            hs = None
        if not isinstance(hs, Handshake) or hs.node_id != frame.sender:
            self.ch.counters["malformed"] += 1
            self.abort()
            return False
        if hs.protocol_version != PROTOCOL_VERSION:
            self.ch.counters["bad_version"] += 1
            self.ch.warn(hs.node_id, "peer %s (ringd %s) speaks protocol %d, this node %d: "
                         "not talking to it", hs.node_id, hs.software_version,
                         hs.protocol_version, PROTOCOL_VERSION)
            self.abort()
            return False
        self.peer = hs.node_id
        if self.initiator is None:  # inbound: the peer opened it
            self.initiator = hs.node_id
            host = self.transport.get_extra_info("peername")[0]  # type: ignore[union-attr]
            self.addr = (host, hs.port)
        self.ch.register(self)
        return True

    def write(self, parts: tuple[Buffer, ...]) -> None:
        """Seal and write one message (the concatenation of ``parts``), after those queued.

        A small message with nothing queued before it, while the transport takes more, is
        sealed and written at once, as one frame; the send buffer is reused once the
        transport has handed the previous frame to the kernel (uvloop keeps a reference to
        what it could not write yet). Otherwise it waits in the queue like a large one.

        From ``LARGE_FRAME`` bytes the message goes in records of ``RECORD`` bytes sealed from
        slices of the parts (no join) into pooled buffers (see
        :func:`ringd.core.stream.seal_tcp_records`), and not all at once: one record per turn
        of the event loop, and none while the transport is above its high-water mark. So a
        64 MiB prefill neither stalls the loop (decode steps on UDP, probes and timers go on
        between its records) nor lands sealed in the transport's buffer whole. Messages sent
        while one is queued wait behind it: the stream keeps their order. ``parts`` must not
        change until the message is written (the daemon never reuses a sent tensor).
        """
        t = self.transport
        if t is None or t.is_closing():
            self.ch.counters["overflow"] += 1
            return
        size = sum(memoryview(x).nbytes for x in parts)
        if size < LARGE_FRAME and not self._queue and not self._paused:
            n = stream.TCP_HEADER.size + self.ch.sealer.overhead + size
            buf = self._sendbuf
            if buf is None or len(buf) < n or t.get_write_buffer_size():
                buf = bytearray(n)
            frame = stream.seal_tcp_frame(self.ch.sealer, self.ch.next_seq(),
                                          b"".join(parts) if len(parts) > 1 else parts[0], out=buf)
            t.write(frame)
            self._sendbuf = buf
            self.ch.totals["frames_sent"] += 1
            self.ch.totals["bytes_sent"] += n
            return
        if self._queued + size > self.ch.max_queued:
            self.ch.counters["overflow"] += 1
            self.ch.warn(("queue", self.addr), "peer %s is not reading: dropped a message of %d "
                         "bytes with %d already queued for it", self.peer or self.addr, size,
                         self._queued)
            return
        # The records of one message need consecutive sequence numbers, and the counter is
        # the channel's: reserve them now, or a message to another peer sealed between two
        # of its records takes one (the receiver then closes the connection as malformed).
        seqs = iter(self.ch.reserve_seqs(2 + -(-size // RECORD)))
        chunks = stream.seal_tcp_records(self.ch.sealer, seqs.__next__, parts, record=RECORD,
                                         buffer=self._record_buffer)
        self._queue.append((chunks, size))
        self._queued += size
        self._writable.clear()
        self._schedule()

    def _schedule(self) -> None:
        if self._queue and self._pumping is None and not self._paused:
            self._pumping = self.ch.loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Write the next sealed chunk of the queue (one record, or small messages up to one
        record's worth), then give the loop back."""
        self._pumping = None
        t = self.transport
        if t is None or t.is_closing():
            return
        budget = RECORD
        while self._queue and budget > 0 and not self._paused:
            chunks, size = self._queue[0]
            try:
                chunk = next(chunks, None)
            except Exception:  # a bug, not a peer: lose this message, not the connection
                log.exception("sealing a message of %d bytes for %s failed", size,
                              self.peer or self.addr)
                self.ch.counters["overflow"] += 1
                self._queue.popleft()
                self._queued -= size
                continue
            if chunk is None:
                self._queue.popleft()
                self._queued -= size
                self.ch.totals["frames_sent"] += 1
                continue
            t.write(chunk)  # may call pause_writing
            self.ch.totals["bytes_sent"] += len(chunk)
            budget -= len(chunk)
        self._schedule()
        self._update_writable()

    def _update_writable(self) -> None:
        if self._queue or self._paused:
            self._writable.clear()
            return
        self._writable.set()
        if self.retiring:
            self._close_if_ours()

    def queued_bytes(self) -> int:
        """Plaintext bytes of the messages queued behind the transport (not yet all written)."""
        return self._queued

    def _record_buffer(self, n: int) -> bytearray:
        # one size for all (a short first record rides with a full one): free buffers fit
        return self._records.get(max(n, RECORD + 16384))

    async def drain(self) -> None:
        """Wait until everything queued is written and the transport takes more."""
        await self._writable.wait()

    def retire(self) -> None:
        """Stop sending on it; close it (after queued and buffered writes) if we opened it."""
        self.retiring = True
        if not self._queue:
            self._close_if_ours()

    def _close_if_ours(self) -> None:
        if self.initiator == self.ch.node_id and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class TcpChannel:
    """All TCP connections of one node."""

    def __init__(self, sealer: Sealer, guard: ReplayGuard, counters: dict[str, int], *,
                 port: int, on_frame: Callable[[str, Addr, memoryview], None],
                 max_frame: int = stream.TCP_MAX_FRAME, connect_timeout: float = 3.0,
                 connect_attempts: int = 6, max_queued: int = MAX_QUEUED) -> None:
        self.sealer = sealer
        self.guard = guard
        self.counters = counters
        self.node_id = sealer.node_id
        self.port = port
        self.max_frame = max_frame
        self.max_queued = max_queued
        self.loop = asyncio.get_running_loop()
        self.pool = BufferPool(min_size=LARGE_FRAME)
        self._on_frame = on_frame
        self._connect_timeout = connect_timeout
        self._attempts = connect_attempts
        self._seq = 0
        self.conns: dict[Addr, _Conn] = {}  # the connection used to send to a peer port
        self.conns_all: set[_Conn] = set()
        self._pending: dict[Addr, deque[bytes]] = {}
        self._pending_bytes: dict[Addr, int] = {}
        self._connecting: dict[Addr, asyncio.Task[None]] = {}
        self._server: asyncio.base_events.Server | None = None
        self.reading_paused = False
        self._warned: dict[object, float] = {}
        self.totals = dict.fromkeys(("frames_sent", "frames_received", "bytes_sent",
                                     "connects", "connect_failures", "dropped_unreachable"), 0)

    async def start(self, sock: socket.socket) -> None:
        self._server = await self.loop.create_server(
            lambda: _Conn(self, initiator=None, addr=None), sock=sock, backlog=128)

    async def close(self) -> None:
        for task in list(self._connecting.values()):
            task.cancel()
        if self._connecting:
            await asyncio.gather(*self._connecting.values(), return_exceptions=True)
        if self._server is not None:
            self._server.close()
        for c in list(self.conns_all):
            c.abort()
        waits = [c.closed for c in list(self.conns_all)]
        if waits:
            await asyncio.wait(waits, timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def reserve_seqs(self, n: int) -> range:
        """``n`` consecutive sequence numbers, taken now (some may go unused)."""
        first = self._seq + 1
        self._seq += n
        return range(first, first + n)

    # ---------------------------------------------------------------- sending
    def send_frame(self, addr: Addr, *parts: Buffer) -> None:
        """Send one frame, the concatenation of ``parts`` (e.g. a message's head and body).

        Raises :class:`LocalProtocolError` for a frame above ``max_frame``: the peer would
        close the connection on it (its decoder has the same limit)."""
        size = sum(memoryview(x).nbytes for x in parts)
        if size > self.max_frame:
            raise LocalProtocolError(f"a TCP message of {size} bytes exceeds the limit of "
                                     f"{self.max_frame}")
        conn = self.conns.get(addr)
        if (conn is not None and not conn.retiring and conn.transport
                and not conn.transport.is_closing()):
            conn.write(parts)
            return
        q = self._pending.setdefault(addr, deque())
        frame = b"".join(parts)
        size = self._pending_bytes.get(addr, 0) + len(frame)
        if size > MAX_PENDING:
            self.counters["overflow"] += 1
            return
        q.append(frame)
        self._pending_bytes[addr] = size
        if addr not in self._connecting:
            self._connecting[addr] = self.loop.create_task(self._connect(addr),
                                                           name=f"ringd-tcp-connect-{addr}")

    def queued_bytes(self, addr: Addr) -> int:
        """Bytes waiting to go to ``addr``: queued behind its connection (or until it is
        open) and in the socket transport's buffer."""
        conn = self.conns.get(addr)
        n = self._pending_bytes.get(addr, 0)
        if conn is not None:
            n += conn.queued_bytes()
            if conn.transport is not None:
                n += conn.transport.get_write_buffer_size()
        return n

    async def drain(self, addr: Addr) -> None:
        """Wait until the connection to ``addr`` has room (no-op if there is none)."""
        conn = self.conns.get(addr)
        if conn is not None:
            await conn.drain()

    async def _connect(self, addr: Addr) -> None:
        delay = 0.05
        try:
            for attempt in range(self._attempts):
                try:
                    _, conn = await asyncio.wait_for(self.loop.create_connection(
                        lambda: _Conn(self, initiator=self.node_id, addr=addr), addr[0], addr[1]),
                        self._connect_timeout)
                except (OSError, asyncio.TimeoutError) as e:
                    self.totals["connect_failures"] += 1
                    log.debug("TCP connect to %s failed (attempt %d): %s", addr, attempt + 1, e)
                    await asyncio.sleep(delay)  # backoff between attempts, not a synchronisation
                    delay = min(delay * 2, 2.0)
                    continue
                self.totals["connects"] += 1
                self.register(conn)
                return
            dropped = len(self._pending.pop(addr, ()))
            self._pending_bytes.pop(addr, None)
            self.totals["dropped_unreachable"] += dropped
            self.warn(addr, "cannot reach peer %s:%d over TCP after %d attempts; dropped %d frames",
                      addr[0], addr[1], self._attempts, dropped)
        finally:
            self._connecting.pop(addr, None)

    def _flush_pending(self, addr: Addr, conn: _Conn) -> None:
        q = self._pending.pop(addr, None)
        self._pending_bytes.pop(addr, None)
        while q:
            conn.write((q.popleft(),))

    # ---------------------------------------------------------------- connections
    def register(self, conn: _Conn) -> None:
        """Make ``conn`` the one used to send to its peer port, resolving duplicates.

        Of two live connections, the one opened by the smaller node id is kept (both sides
        decide the same); of two opened by the same node, the newer.
        """
        addr = conn.addr
        assert addr is not None
        keep = conn
        current = self.conns.get(addr)
        if (current is not None and current is not conn and not current.retiring
                and current.transport is not None and not current.transport.is_closing()):
            if (current.initiator != conn.initiator
                    and (current.initiator or "") < (conn.initiator or "")):
                keep = current
            (conn if keep is current else current).retire()
        self.conns[addr] = keep
        if addr in self._pending and not keep.retiring:
            self._flush_pending(addr, keep)

    def forget(self, conn: _Conn) -> None:
        if conn.addr is not None and self.conns.get(conn.addr) is conn:
            del self.conns[conn.addr]
            # another open connection to the same peer takes over
            for other in self.conns_all:
                if other.addr == conn.addr and other.peer and not other.retiring:
                    self.conns[conn.addr] = other
                    break

    def warn(self, key: object, msg: str, *args: object) -> None:
        """A warning at most once a minute per peer (then debug lines)."""
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY) >= WARN_EVERY:
            self._warned[key] = now
            if len(self._warned) > 1024:
                self._warned.clear()
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)

    def deliver(self, sender: str, addr: Addr, data: memoryview) -> None:
        self.totals["frames_received"] += 1
        try:
            self._on_frame(sender, addr, data)
        except Exception:
            log.exception("TCP frame handler failed")

    # ---------------------------------------------------------------- flow control
    def pause_reading(self) -> None:
        self.reading_paused = True
        for c in self.conns_all:
            if c.transport is not None and not c.transport.is_closing():
                c.transport.pause_reading()

    def resume_reading(self) -> None:
        self.reading_paused = False
        for c in self.conns_all:
            if c.transport is not None and not c.transport.is_closing():
                c.transport.resume_reading()

    def stats(self) -> dict[str, object]:
        return {**self.totals, "connections": len(self.conns_all),
                "peers": sorted(f"{a[0]}:{a[1]}" for a in self.conns),
                "pending_frames": sum(len(q) for q in self._pending.values()),
                "queued_bytes": sum(c.queued_bytes() for c in self.conns_all)}
