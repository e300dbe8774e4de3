"""The UDP packet format of :mod:`ringd.core.reliable`: segments, chunks and ack ranges.

Pure: no sockets or clocks. What the bytes look like and how they are cut and packed; what
to send and when is :class:`ringd.core.reliable.Endpoint`'s business.

- **Segment** (one UDP datagram, at most ``datagram_size`` bytes)::

      magic | version | index | count | cluster tag (4) | session (u64) | pn (u64) | payload

  A packet is cut into up to 64 equal segments (the last may be shorter) so a Linux
  adapter can send them with one ``sendmsg`` (UDP GSO) and receive them with one
  ``recvmsg`` (UDP GRO); elsewhere they go one by one. IP fragmentation is never used.
- **Packet**: the concatenated segment payloads form one sealed unit
  (:meth:`ringd.core.seal.Sealer.seal`, nonce = packet number). Its plaintext is a list of
  chunks, each starting with its type byte (all integers little-endian)::

      ACK      type | ack delay (µs, u32) | count (u8) | count x (largest, smallest) (u64 each)
      DATA     type | stream (u8) | seq | base (u64 each) | frame length | offset | length
               (u32 each) | length bytes of the frame
      ONESHOT  type | length (u32) | length bytes

  ACK ranges are inclusive packet-number ranges, newest first. A DATA chunk's ``base`` is
  the oldest frame of its stream the sender still holds (the receiver skips to it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ringd.core.wire import WIRE_VERSION, Buffer

Addr = tuple[str, int]

SEGMENT = struct.Struct("<BBBB4sQQ")  # magic, version, index, count, cluster tag, session, pn
SEGMENT_MAGIC = 0xD7
MAX_SEGMENTS = 64  # Linux UDP GSO limit per sendmsg
MAX_BURST = 65000  # bytes of all segments of one packet (one GSO send fits in an IP packet)

CH_ACK, CH_DATA, CH_ONESHOT = 1, 2, 3
ACK = struct.Struct("<BIB")  # type, ack delay (us), range count
ACK_RANGE = struct.Struct("<QQ")  # largest, smallest (newest range first)
ACK1 = struct.Struct("<BIBQQ")  # an ACK chunk with one range
DATA = struct.Struct("<BBQQIII")  # type, stream, seq, base, frame length, offset, length
ONESHOT = struct.Struct("<BI")  # type, length
MAX_ACK_RANGES = 64


def closes_packet(datagram: Buffer) -> bool:
    """Whether ``datagram`` is the last segment of its packet (or no segment at all). An
    adapter that gathers a packet's datagrams before handing them over (GRO done in user
    space, where the kernel has none) ends a run there."""
    return len(datagram) < SEGMENT.size or datagram[2] + 1 >= datagram[3]


@dataclass(slots=True)
class Transmit:
    """Datagrams for one ``sendmsg``: ``iov`` alternates segment headers and payloads.

    Every segment is ``segment_size`` bytes except possibly the last (UDP GSO layout).
    """

    addr: Addr
    iov: list[Buffer]
    segment_size: int

    @property
    def segments(self) -> int:
        return len(self.iov) // 2


def geometry(size: int, overhead: int) -> tuple[int, int, int]:
    """``(segment payload, segments per packet, ack ranges)`` for datagrams of ``size``
    bytes and sealed units with ``overhead`` bytes."""
    seg_payload = size - SEGMENT.size
    # an ACK chunk always fits in one segment next to the unit's overhead
    room = seg_payload - overhead - ACK.size
    return (seg_payload, max(1, min(MAX_SEGMENTS, MAX_BURST // size)),
            max(1, min(MAX_ACK_RANGES, room // ACK_RANGE.size)))


def oneshot_room(size: int, overhead: int) -> int:
    """Largest one-shot message in one packet of datagrams of ``size`` bytes, next to an
    ACK chunk of as many ranges as fit."""
    seg_payload, max_segs, ack_ranges = geometry(size, overhead)
    return (max_segs * seg_payload - overhead - ONESHOT.size - ACK.size
            - ack_ranges * ACK_RANGE.size)


def to_segments(addr: Addr, unit: Buffer, *, tag: bytes, session: int, pn: int,
                seg_payload: int, datagram_size: int) -> Transmit:
    """Sealed unit ``unit`` (packet ``pn`` of ``session``) cut into segments of at most
    ``seg_payload`` bytes of payload each."""
    size, n = SEGMENT.size, len(unit)
    if n <= seg_payload:
        return Transmit(addr, [SEGMENT.pack(SEGMENT_MAGIC, WIRE_VERSION, 0, 1, tag, session, pn),
                               unit], datagram_size)
    count = -(-n // seg_payload)
    head = SEGMENT.pack(SEGMENT_MAGIC, WIRE_VERSION, 0, count, tag, session, pn)
    heads = bytearray(head * count)
    heads[2::size] = bytes(range(count))  # segment indexes
    hv, uv = memoryview(heads), memoryview(unit)
    iov: list[Buffer] = [b""] * (2 * count)
    iov[0::2] = [hv[i:i + size] for i in range(0, count * size, size)]
    iov[1::2] = [uv[i:i + seg_payload] for i in range(0, n, seg_payload)]
    return Transmit(addr, iov, datagram_size)


def ack_chunk(ranges: list[list[int]], lag: float, max_ranges: int) -> bytes:
    """An ACK chunk for received packet-number ``ranges`` (``[largest, smallest]``, newest
    first; at most ``max_ranges`` of them are sent), the newest received ``lag`` seconds
    ago."""
    delay = (int(lag * 1e6) if lag < 4000.0 else 0xFFFFFFFF) if lag > 0 else 0
    if len(ranges) == 1:  # the usual case: everything received so far is one range
        return ACK1.pack(CH_ACK, delay, 1, ranges[0][0], ranges[0][1])
    ranges = ranges[:max_ranges]
    return ACK.pack(CH_ACK, delay, len(ranges)) + b"".join(
        [ACK_RANGE.pack(hi, lo) for hi, lo in ranges])
