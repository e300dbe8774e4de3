"""The TCP channel's byte stream: record framing, the stream decoder and reused buffers.

Pure: no sockets, clocks or MLX (the decoder takes a ``clock`` callable for the replay
guard). A TCP connection carries *records*: a small clear header (see :data:`TCP_HEADER`)
and one sealed unit (:mod:`ringd.core.seal`) whose plaintext is a message encoding
(:mod:`ringd.core.wire`), or one part of a large message sent in several records.

Every length is checked against ``max_frame`` before a buffer grows; a peer's bad record
is counted by reason (:data:`ringd.core.wire.DROP_REASONS`), and a stream that cannot be
resynchronised is marked :attr:`StreamDecoder.failed` for the adapter to close.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

from ringd.core.seal import CHANNEL_TCP, TAG_SIZE, ReplayGuard, Sealer
from ringd.core.wire import WIRE_VERSION, Buffer, Dropped
from ringd.errors import LocalProtocolError

TCP_MAX_FRAME = 64 << 20  # default cap of one TCP frame (configurable per decoder)


class BufferPool:
    """Reusable buffers for large frames (4 MiB prefill activations).

    Fresh multi-megabyte allocations are returned to the OS when freed and fault their
    pages in again on the next frame; reusing a few buffers avoids that. A buffer is handed
    out again only when nothing else references it (CPython reference counts: a message
    whose tensor still views it keeps it out of the pool).
    """

    def __init__(self, *, max_buffers: int = 4, min_size: int = 256 * 1024) -> None:
        self.min_size = min_size
        self._bufs: list[bytearray] = []
        self._max = max_buffers

    def get(self, n: int) -> bytearray:
        """A buffer of at least ``n`` bytes that nobody else holds."""
        for b in self._bufs:
            # references: the list, ``b`` and getrefcount's argument
            if sys.getrefcount(b) == 3 and len(b) >= n:
                return b
        for i in range(len(self._bufs)):
            b = self._bufs[i]
            if sys.getrefcount(b) == 3:  # free but too small: replace it
                self._bufs[i] = b = bytearray(n)
                return b
        b = bytearray(n)
        if len(self._bufs) < self._max:
            self._bufs.append(b)
        return b


# ======================================================================== TCP frames
#: ``length (u32, of what follows) | magic | version | flags | reserved | cluster tag (4) |
#: session (u64) | seq (u64)`` then the sealed unit (a *record*). :data:`TCP_HEADER` leaves
#: the flags and reserved bytes as padding (it packs a whole-message record, flags 0);
#: :data:`TCP_RECORD_HEADER` names the flags byte.
#:
#: A message travels as one record (``flags`` 0) or, when large, as a run of records sealed
#: and sent one by one, so the receiver opens record i while the sender seals record i+1:
#:
#: - first record: :data:`TCP_MORE`; its plaintext is ``total (u32 LE) | first bytes``, the
#:   whole message's length, so the receiver sizes (and bounds, against ``max_frame``) the
#:   output buffer before opening the next records straight into it;
#: - middle records: :data:`TCP_CONT` | :data:`TCP_MORE`; last record: :data:`TCP_CONT`.
#:
#: The records of one message have consecutive sequence numbers and come from one sender
#: session; the message is delivered once its ``total`` bytes arrived, never in part. The
#: flags are authenticated: a record is sealed with nonce number ``seq | flags << 56``
#: (sequence numbers stay below 2**56), so a flipped flag fails the tag and a record can't be
#: passed off in another role (a last record as a message of its own, say).
TCP_HEADER = struct.Struct("<IBB2x4sQQ")
TCP_RECORD_HEADER = struct.Struct("<IBBBx4sQQ")
TCP_MAGIC = 0xD8
TCP_MORE = 0x01  # the message continues in the next record
TCP_CONT = 0x02  # this record continues the message of the previous record
TCP_SEQ_LIMIT = 1 << 56
_TCP_TOTAL = struct.Struct("<I")


def _tcp_pn(seq: int, flags: int) -> int:
    """The nonce number of a TCP record: its sequence number and flags."""
    if not 0 <= seq < TCP_SEQ_LIMIT:
        raise LocalProtocolError(f"TCP sequence number {seq} out of range")
    return seq | flags << 56


def seal_tcp_frame(sealer: Sealer, seq: int, plaintext: Buffer, *,
                   out: bytearray | memoryview | None = None, flags: int = 0) -> Buffer:
    """One TCP record: length-prefixed header plus the sealed unit (into ``out`` if given).

    ``flags`` 0: a whole message (other flags: one record of a message sent in several, see
    :func:`seal_tcp_records`)."""
    length = TCP_HEADER.size - 4 + sealer.overhead + memoryview(plaintext).nbytes
    head = TCP_RECORD_HEADER.pack(length, TCP_MAGIC, WIRE_VERSION, flags, sealer.cluster_tag,
                                  sealer.session, seq)
    return sealer.seal(CHANNEL_TCP, _tcp_pn(seq, flags), plaintext, head=head,
                       out=out)  # type: ignore[arg-type]


def _byte_view(x: Buffer) -> memoryview:
    mv = memoryview(x)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def seal_tcp_records(sealer: Sealer, next_seq: Callable[[], int], parts: tuple[Buffer, ...], *,
                     record: int, buffer: Callable[[int], bytearray]) -> Iterator[memoryview]:
    """Seal the concatenation of ``parts`` as one message in records of ``record`` bytes of
    plaintext (see :data:`TCP_HEADER`); yields sealed bytes to write as soon as they are
    sealed (a view of a buffer from ``buffer(n)``, which must not be written to until the
    transport has let go of it; ``next_seq()`` is called once per record, and the calls
    must return consecutive numbers).

    Each record is sealed straight from a slice of a part: no join of the message. The first
    record holds only the first part (the message head) when it is shorter than ``record``,
    and is written together with the second; a record that straddles two parts is joined
    (at most ``record`` bytes). A message of one record is sealed as a plain frame.

    Raises :class:`LocalProtocolError` at once (not on the first ``next``) for a message of
    4 GiB or more: the caller may consume the iterator later, from a loop callback.
    """
    views = [v for v in map(_byte_view, parts) if len(v)]
    total = sum(len(v) for v in views)
    if total >= 1 << 32:
        raise LocalProtocolError(f"a TCP message of {total} bytes (the limit is 4 GiB)")
    return _sealed_records(sealer, next_seq, views, total, record, buffer)


def _sealed_records(sealer: Sealer, next_seq: Callable[[], int], views: list[memoryview],
                    total: int, record: int,
                    buffer: Callable[[int], bytearray]) -> Iterator[memoryview]:
    if total <= record:
        whole = views[0] if len(views) == 1 else b"".join(views)
        n = TCP_HEADER.size + sealer.overhead + len(whole)
        yield memoryview(seal_tcp_frame(sealer, next_seq(), whole, out=buffer(n)))[:n]
        return
    pieces: list[list[memoryview]] = []
    cur: list[memoryview] = []
    size = 0
    for i, v in enumerate(views):
        pos = 0
        while pos < len(v):
            take = min(len(v) - pos, record - size)
            cur.append(v[pos:pos + take])
            size += take
            pos += take
            if size == record or (i == 0 and pos == len(v) and not pieces):
                pieces.append(cur)
                cur, size = [], 0
    if cur:
        pieces.append(cur)
    head = _TCP_TOTAL.pack(total)
    sizes = [sum(len(x) for x in segs) + (len(head) if k == 0 else 0)
             for k, segs in enumerate(pieces)]
    extra = TCP_HEADER.size + sealer.overhead
    last = len(pieces) - 1
    k = 0
    while k <= last:
        # a group of records written at once: a short first record rides with the next one
        group, payload = k, 0
        while group <= last and payload < record:
            payload += sizes[group]
            group += 1
        n = sum(extra + sizes[j] for j in range(k, group))
        buf = buffer(n)
        pos = 0
        for j in range(k, group):
            segs = pieces[j]
            plain: Buffer = (b"".join((head, *segs)) if j == 0 else segs[0] if len(segs) == 1
                             else b"".join(segs))
            flags = (TCP_MORE if j < last else 0) | (TCP_CONT if j else 0)
            m = extra + sizes[j]
            seal_tcp_frame(sealer, next_seq(), plain, out=memoryview(buf)[pos:pos + m], flags=flags)
            pos += m
        yield memoryview(buf)[:n]
        k = group


@dataclass(frozen=True)
class StreamFrame:
    """An authenticated TCP frame: its sender and plaintext (a message encoding)."""

    sender: str
    session: int
    data: memoryview


class _Assembly:
    """A message arriving in several records: its output buffer and what came so far."""

    __slots__ = ("buf", "got", "sender", "seq", "session", "total")

    def __init__(self, buf: bytearray, total: int, got: int, sender: str, session: int,
                 seq: int) -> None:
        self.buf, self.total, self.got = buf, total, got
        self.sender, self.session, self.seq = sender, session, seq


class StreamDecoder:
    """Sans-I/O decoder of one TCP connection's byte stream.

    Feed with :meth:`receive_data`, or with :meth:`get_buffer` + :meth:`buffer_updated` from
    a ``BufferedProtocol`` (the socket reads straight into the reused internal buffer). Both
    return the authenticated messages completed so far. A record's length is checked against
    ``max_frame`` before the buffer grows; the buffer holds at most one partial record. A
    message sent in several records (see :data:`TCP_HEADER`) is opened record by record
    into one output buffer (pooled), sized by the total its first record announces (checked
    against ``max_frame`` first), and delivered once complete. After a fatal error (bad
    magic, version or flags, wrong cluster, impossible length, a broken run of records: a
    continuation without its first record, a gap in the sequence numbers, another sender,
    more or fewer bytes than announced, or a record of it that fails authentication)
    :attr:`failed` holds the reason: the stream can't be resynchronised, close the connection.
    """

    def __init__(self, sealer: Sealer, guard: ReplayGuard, counters: dict[str, int], *,
                 max_frame: int = TCP_MAX_FRAME, clock: Callable[[], float] = lambda: 0.0,
                 pool: BufferPool | None = None) -> None:
        self._sealer = sealer
        self._guard = guard
        self._counters = counters
        self._max = max_frame
        self._clock = clock
        self._pool = pool
        self._buf = bytearray(64 * 1024)
        self._start = 0  # first unread byte
        self._end = 0  # end of data
        self._asm: _Assembly | None = None  # the message being received in records
        self.failed: str | None = None

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Free space at the end of the internal buffer (never empty)."""
        pending = self._end - self._start
        if self._start and (pending == 0 or len(self._buf) - self._end < 4096):
            self._buf[:pending] = self._buf[self._start:self._end]
            self._start, self._end = 0, pending
        need = self._needed()
        if need > len(self._buf) or self._end == len(self._buf):
            grown = bytearray(max(need, len(self._buf) + 4096))
            grown[:pending] = self._buf[self._start:self._end]
            self._buf, self._start, self._end = grown, 0, pending
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> list[StreamFrame]:
        self._end += nbytes
        return self._frames()

    def receive_data(self, data: Buffer) -> list[StreamFrame]:
        mv = memoryview(data).cast("B")
        out: list[StreamFrame] = []
        while mv and self.failed is None:
            dst = self.get_buffer()
            n = min(len(dst), len(mv))
            dst[:n] = mv[:n]
            mv = mv[n:]
            out.extend(self.buffer_updated(n))
        return out

    def _needed(self) -> int:
        """Buffer size the current record needs (its full size once its length is known)."""
        if self._end - self._start < 4:
            return 4
        length = int.from_bytes(self._buf[self._start:self._start + 4], "little")
        return 4 + min(length, self._max + TCP_HEADER.size)

    def _frames(self) -> list[StreamFrame]:
        out: list[StreamFrame] = []
        while self.failed is None and self._end - self._start >= TCP_HEADER.size:
            length, magic, version, flags, tag, session, seq = TCP_RECORD_HEADER.unpack_from(
                self._buf, self._start)
            if magic != TCP_MAGIC:
                self._fail("malformed")
            elif version != WIRE_VERSION:
                self._fail("bad_version")
            elif tag != self._sealer.cluster_tag:
                self._fail("wrong_cluster")
            elif length > self._max + TCP_HEADER.size:
                self._fail("oversize")
            elif length < TCP_HEADER.size - 4 + 2 + TAG_SIZE:
                self._fail("truncated")
            elif flags & ~(TCP_MORE | TCP_CONT) or seq >= TCP_SEQ_LIMIT:
                self._fail("malformed")
            if self.failed is not None or self._end - self._start < 4 + length:
                break
            unit = memoryview(self._buf)[self._start + TCP_HEADER.size:self._start + 4 + length]
            self._start += 4 + length
            if flags or self._asm is not None:
                frame = self._record(flags, session, seq, unit)
                if frame is not None:
                    out.append(frame)
                continue
            try:
                pool = self._pool
                dest = pool.get(len(unit)) if pool and len(unit) >= pool.min_size else None
                sender, plain, owned = self._open(0, session, seq, unit, dest)
            except Dropped as e:
                self._counters[e.reason] += 1
                continue
            out.append(StreamFrame(sender, session, plain if owned else memoryview(bytes(plain))))
        return out

    def _open(self, flags: int, session: int, seq: int, unit: memoryview,
              dest: bytearray | memoryview | None) -> tuple[str, memoryview, bool]:
        """Authenticate and open one record (replay-checked before and after); raises Dropped."""
        if not self._guard.fresh(CHANNEL_TCP, self._sealer.claimed_sender(unit), session, seq):
            raise Dropped("replay")
        opened = self._sealer.open(CHANNEL_TCP, session, seq | flags << 56, unit,
                                   dest)  # type: ignore[arg-type]
        if not self._guard.accept(CHANNEL_TCP, opened[0], session, seq, self._clock()):
            raise Dropped("replay")
        return opened

    def _record(self, flags: int, session: int, seq: int, unit: memoryview) -> StreamFrame | None:
        """One record of a message sent in several (or, mid-message, whatever came instead)."""
        asm = self._asm
        if asm is None:
            if flags != TCP_MORE:  # a continuation without its first record
                self._fail("malformed")
                return None
            dest = None
        else:
            # the plaintext's length is known before opening: check it fits what is left
            n = len(unit) - 2 - unit[1] - TAG_SIZE
            left = asm.total - asm.got
            if (not flags & TCP_CONT or session != asm.session or seq != asm.seq + 1
                    or n > left or (not flags & TCP_MORE and n != left)):
                self._fail("malformed")
                return None
            dest = memoryview(asm.buf)[asm.got:]
        try:
            sender, plain, _ = self._open(flags, session, seq, unit, dest)
        except Dropped as e:
            self._fail(e.reason)
            return None
        if asm is None:  # the first record: total length, then the message's first bytes
            if len(plain) < _TCP_TOTAL.size:
                self._fail("malformed")
                return None
            total = _TCP_TOTAL.unpack_from(plain)[0]
            first = len(plain) - _TCP_TOTAL.size
            if total > self._max:
                self._fail("oversize")
                return None
            if first >= total:  # more records were announced: the first can't hold it all
                self._fail("malformed")
                return None
            buf = (self._pool.get(total) if self._pool and total >= self._pool.min_size
                   else bytearray(total))
            buf[:first] = plain[_TCP_TOTAL.size:]
            self._asm = _Assembly(buf, total, first, sender, session, seq)
            return None
        if sender != asm.sender:
            self._fail("malformed")
            return None
        asm.got += len(plain)
        asm.seq = seq
        if flags & TCP_MORE:
            return None
        self._asm = None
        return StreamFrame(sender, session, memoryview(asm.buf)[:asm.total])

    def _fail(self, reason: str) -> None:
        self._counters[reason] += 1
        self.failed = reason
        self._asm = None
