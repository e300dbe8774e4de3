"""Sealing: the cluster key, per-sender frame keys, sealed units and replay windows.

Pure: no sockets, clocks or MLX. ``now`` is passed in where time matters.

Messages (:mod:`ringd.core.wire`) travel inside *sealed* units (a UDP packet, see
:mod:`ringd.core.reliable`, or a TCP record, see :mod:`ringd.core.stream`). A sealed unit
is::

    flags (u8) | id_len (u8) | sender node id | AEAD(plaintext) + 16-byte tag

encrypted and authenticated with AES-128-OCB3 (RFC 7253) under a key derived from the
32-byte cluster key, the sender's session, the channel and the mode; the nonce is the unit's
packet/sequence number, which also feeds a per-sender replay window. With ``encrypt=False``
the plaintext travels in clear and the tag is a GMAC (AES-GCM over no plaintext) of the
whole unit (authentication only). Why OCB3: on the CPUs measured (``bench/transport.py``)
it encrypts *and* authenticates 32 KiB in about the time GMAC only authenticates it, and
~1.5-2x faster than AES-GCM (whose CTR half is the slow part of OpenSSL's AVX2 path), so
encryption costs nothing over authentication and stays on by default. Nothing is
msgpack-parsed before the tag has been checked; every length is bounded before anything is
allocated.

A peer's bad unit raises :class:`ringd.core.wire.Dropped` with a ``reason`` that the
network layer counts; it never crashes anything.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3

from ringd.core.wire import MAX_NODE_ID, WIRE_VERSION, Buffer, Dropped
from ringd.errors import LocalProtocolError

KEY_SIZE = 32
FRAME_KEY_SIZE = 16  # AES-128 per (sender session, channel, mode)
TAG_SIZE = 16
FLAG_ENCRYPTED = 0x01
CHANNEL_UDP = 1
CHANNEL_TCP = 2


def cluster_id(key: bytes) -> str:
    """A public name of the cluster key (hex of a keyed-hash digest); safe to advertise."""
    return hashlib.blake2b(key, digest_size=8, person=b"ringd-cluster").hexdigest()


def new_session(time_ms: int, random16: int) -> int:
    """A sender session number: later starts give larger numbers (used against replays)."""
    return ((time_ms & ((1 << 48) - 1)) << 16) | (random16 & 0xFFFF)


def _derive(key: bytes, session: int, channel: int, encrypted: bool) -> bytes:
    data = session.to_bytes(8, "little") + bytes([channel, WIRE_VERSION, encrypted])
    return hashlib.blake2b(data, key=key, digest_size=FRAME_KEY_SIZE,
                           person=b"ringd-frame-key").digest()


def _aead(key: bytes, session: int, channel: int, encrypted: bool) -> AESOCB3 | AESGCM:
    """Encrypted units: AES-128-OCB3; clear units: AES-128-GCM used as GMAC (one key each)."""
    k = _derive(key, session, channel, encrypted)
    return AESOCB3(k) if encrypted else AESGCM(k)


#: UDP packet numbers come in ranges of 2**PN_RANGE_BITS, one per peer state: the nonce is
#: the packet number and the key is the sender's (session, channel), whatever the
#: destination, so no two peer states (nor one peer's before and after an eviction, nor two
#: endpoints on one sealer) may number a packet alike.
PN_RANGE_BITS = 40
PN_RANGE_MASK = (1 << PN_RANGE_BITS) - 1


def _nonce(pn: int) -> bytes:
    return b"\0\0\0\0" + pn.to_bytes(8, "little")


class Sealer:
    """Seals and opens units with the cluster key. One per node; shared by both channels."""

    def __init__(self, key: bytes, node_id: str, session: int, *, encrypt: bool = True,
                 max_peer_keys: int = 256) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise LocalProtocolError(f"cluster key must be {KEY_SIZE} bytes")
        nid = node_id.encode()
        if not 0 < len(nid) <= MAX_NODE_ID:
            raise LocalProtocolError(f"node id must be 1..{MAX_NODE_ID} bytes of UTF-8")
        self.key = key
        self.node_id = node_id
        self.session = session
        self.encrypt = encrypt
        self.cluster_id = cluster_id(key)
        self.cluster_tag = bytes.fromhex(self.cluster_id)[:4]
        self.prefix = bytes([FLAG_ENCRYPTED if encrypt else 0, len(nid)]) + nid
        self._own = {ch: _aead(key, session, ch, encrypt) for ch in (CHANNEL_UDP, CHANNEL_TCP)}
        self._peer_keys: OrderedDict[tuple[int, int, bool], AESOCB3 | AESGCM] = OrderedDict()
        self._max_peer_keys = max_peer_keys
        self._pn_ranges = 0

    def udp_pn_range(self) -> int:
        """The first UDP packet number of a range nobody else sealing with this session's
        key gets (see :data:`PN_RANGE_BITS`)."""
        self._pn_ranges += 1
        if self._pn_ranges >> (63 - PN_RANGE_BITS):
            raise LocalProtocolError("UDP packet numbers of this session are used up")
        return self._pn_ranges << PN_RANGE_BITS

    @property
    def overhead(self) -> int:
        """Bytes a sealed unit adds to its plaintext."""
        return len(self.prefix) + TAG_SIZE

    def seal(self, channel: int, pn: int, plaintext: Buffer, *, head: bytes = b"",
             out: bytearray | None = None) -> Buffer:
        """``head | prefix | ciphertext | tag`` (clear mode: ``head | prefix | plaintext | GMAC``).

        ``head`` (e.g. a TCP length header) is outside the authenticated unit. With ``out``
        (a reused buffer, large enough) the result is a view of its start.
        """
        aead = self._own[channel]
        if out is None and not head:  # small units: two short-lived copies beat buffer juggling
            if self.encrypt:
                return self.prefix + aead.encrypt(_nonce(pn), plaintext, self.prefix)
            unit = self.prefix + plaintext
            return unit + aead.encrypt(_nonce(pn), b"", unit)
        h, p, n = len(head), len(self.prefix), memoryview(plaintext).nbytes
        total = h + p + n + TAG_SIZE
        if out is None:
            out = bytearray(total)
        mv = memoryview(out)[:total]
        mv[:h] = head
        mv[h:h + p] = self.prefix
        if self.encrypt:
            aead.encrypt_into(_nonce(pn), plaintext, self.prefix, mv[h + p:])
        else:
            mv[h + p:h + p + n] = memoryview(plaintext).cast("B")
            mv[h + p + n:] = aead.encrypt(_nonce(pn), b"", mv[h:h + p + n])
        return out if len(out) == total else mv

    @staticmethod
    def claimed_sender(unit: Buffer) -> str:
        """The node id a unit's clear prefix claims (authenticated only by :meth:`open`), for
        the replay pre-check. Raises :class:`Dropped` (``truncated``, ``malformed``)."""
        mv = memoryview(unit)
        if len(mv) < 2 + TAG_SIZE:
            raise Dropped("truncated", "sealed unit too short")
        id_len = mv[1]
        if not 0 < id_len <= MAX_NODE_ID or 2 + id_len + TAG_SIZE > len(mv):
            raise Dropped("malformed", "bad unit prefix")
        try:
            return str(mv[2:2 + id_len], "utf-8")
        except UnicodeDecodeError:
            raise Dropped("malformed", "node id is not UTF-8") from None

    def open(self, channel: int, session: int, pn: int, unit: Buffer,
             out: bytearray | None = None) -> tuple[str, memoryview, bool]:
        """Check the tag; return ``(sender node id, plaintext, owned)``.

        ``owned`` is False when the plaintext is a view into ``unit`` (clear units): copy it
        before ``unit``'s buffer is reused. With ``out`` (large enough) the plaintext is
        written there and owned. Raises :class:`Dropped` (``truncated``, ``malformed``,
        ``bad_mac``).
        """
        mv = memoryview(unit)
        if len(mv) < 2 + TAG_SIZE:
            raise Dropped("truncated", "sealed unit too short")
        flags, id_len = mv[0], mv[1]
        start = 2 + id_len
        if flags & ~FLAG_ENCRYPTED or not 0 < id_len <= MAX_NODE_ID or start + TAG_SIZE > len(mv):
            raise Dropped("malformed", "bad unit prefix")
        encrypted = bool(flags & FLAG_ENCRYPTED)
        k = (channel, session, encrypted)
        aead = self._peer_keys.get(k)
        if aead is None:
            aead = (self._own[channel] if session == self.session and encrypted == self.encrypt
                    else _aead(self.key, session, channel, encrypted))
        try:
            if encrypted:
                if out is None:
                    plain = memoryview(aead.decrypt(_nonce(pn), mv[start:], mv[:start]))
                else:
                    plain = memoryview(out)[:len(mv) - start - TAG_SIZE]
                    aead.decrypt_into(_nonce(pn), mv[start:], mv[:start], plain)
                owned = True
            else:
                aead.decrypt(_nonce(pn), mv[-TAG_SIZE:], mv[:-TAG_SIZE])
                plain, owned = mv[start:-TAG_SIZE], False
                if out is not None:
                    view = memoryview(out)[:len(plain)]
                    view[:] = plain
                    plain, owned = view, True
        except InvalidTag:
            raise Dropped("bad_mac") from None
        if k not in self._peer_keys:  # cached only once a unit verified: forgeries can't evict
            self._peer_keys[k] = aead
            if len(self._peer_keys) > self._max_peer_keys:
                self._peer_keys.popitem(last=False)
        try:
            sender = str(mv[2:start], "utf-8")
        except UnicodeDecodeError:
            raise Dropped("malformed", "node id is not UTF-8") from None
        return sender, plain, owned


# ======================================================================== replay
class ReplayWindow:
    """Sliding bitmap of the last ``size`` sequence numbers seen from one sender session."""

    __slots__ = ("top", "bits", "size")

    def __init__(self, size: int = 4096) -> None:
        self.top = -1
        self.bits = 0
        self.size = size

    def fresh(self, pn: int) -> bool:
        if pn > self.top:
            return True
        d = self.top - pn
        return d < self.size and not (self.bits >> d) & 1

    def mark(self, pn: int) -> None:
        if pn > self.top:
            shift = pn - self.top
            self.bits = (1 if shift >= self.size
                         else ((self.bits << shift) | 1) & ((1 << self.size) - 1))
            self.top = pn
        else:
            self.bits |= 1 << (self.top - pn)


@dataclass
class _SenderState:
    node: str
    session: int
    last_seen: float
    channels: dict[int, "_ChannelState"] = field(default_factory=dict)


#: Windows kept per sender and channel: one per packet-number range in use (a UDP peer state
#: of the sender per address of ours; TCP numbers stay in range 0).
MAX_RANGES = 16
#: How far below the newest range a range never heard before may still open (its first
#: packet overtaken by a newer range's).
RANGE_LOOKBACK = 64


class _ChannelState:
    """One sender's windows on one channel, one per packet-number range (least recently
    used forgotten first). Ranges grow within a session, so a range without a window is
    accepted only if it is newer than any seen, or among the last ``RANGE_LOOKBACK`` and
    never opened: a range whose window was forgotten cannot be replayed."""

    __slots__ = ("windows", "newest", "opened")

    def __init__(self) -> None:
        self.windows: OrderedDict[int, ReplayWindow] = OrderedDict()
        self.newest = -1
        self.opened = 0  # bit d: range newest - d has had a window

    def may_open(self, r: int) -> bool:
        d = self.newest - r
        return d < 0 or (d < RANGE_LOOKBACK and not (self.opened >> d) & 1)

    def open(self, r: int, size: int) -> ReplayWindow:
        if r > self.newest:
            shift = r - self.newest
            self.opened = ((self.opened << shift) | 1) & ((1 << RANGE_LOOKBACK) - 1) \
                if shift < RANGE_LOOKBACK else 1
            self.newest = r
        else:
            self.opened |= 1 << (self.newest - r)
        w = self.windows[r] = ReplayWindow(size)
        if len(self.windows) > MAX_RANGES:
            self.windows.popitem(last=False)
        return w


class ReplayGuard:
    """Per-sender replay windows (per channel, one per packet-number range in use) and the
    newest session of every node.

    A unit from an older session of a node that spoke within ``session_timeout`` is a replay
    (sessions grow with start time); after that long a node may come back with any session
    (its clock may have moved back). Bounded: the least recently heard senders are forgotten.
    """

    def __init__(self, *, window: int = 4096, max_senders: int = 4096,
                 session_timeout: float = 30.0) -> None:
        self._by_node: OrderedDict[str, _SenderState] = OrderedDict()
        self._window = window
        self._max = max_senders
        self._timeout = session_timeout

    def fresh(self, channel: int, sender: str, session: int, pn: int) -> bool:
        """Cheap pre-check before authentication (never updates state), of the sender the
        unit claims (:meth:`Sealer.claimed_sender`). Keyed by node, not by session: two nodes
        may draw the same session (started in the same millisecond, 1 in 65,536), and one's
        window must not turn the other's packets away."""
        st = self._by_node.get(sender)
        ch = st.channels.get(channel) if st is not None and st.session == session else None
        if ch is None:
            return True
        r = pn >> PN_RANGE_BITS
        w = ch.windows.get(r)
        return w.fresh(pn) if w is not None else ch.may_open(r)

    def accept(self, channel: int, sender: str, session: int, pn: int, now: float) -> bool:
        """After authentication: True (and recorded) if the unit is new, else False."""
        st = self._by_node.get(sender)
        if st is None or (session != st.session
                          and (session > st.session or now - st.last_seen > self._timeout)):
            st = _SenderState(sender, session, now)
            self._by_node[sender] = st
            if len(self._by_node) > self._max:
                self._by_node.popitem(last=False)
        elif session != st.session:
            return False
        self._by_node.move_to_end(sender)
        st.last_seen = now
        ch = st.channels.get(channel)
        if ch is None:
            ch = st.channels[channel] = _ChannelState()
        r = pn >> PN_RANGE_BITS
        w = ch.windows.get(r)
        if w is None:
            if not ch.may_open(r):
                return False
            w = ch.open(r, self._window)
        else:
            ch.windows.move_to_end(r)
        if not w.fresh(pn):
            return False
        w.mark(pn)
        return True
