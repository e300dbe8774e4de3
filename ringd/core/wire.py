"""Wire format: messages, the tensor codec, frame sealing and the TCP stream decoder.

Pure: no sockets, clocks or MLX. ``now`` is passed in where time matters.

A *message* encodes as ``type (u8) | meta_len (u32 LE) | msgpack meta | raw body``; the body
is a tensor's bytes or a gossip payload, never element-wise encoded, never pickled.

Messages travel inside *sealed* units (a UDP packet, see :mod:`ringd.core.reliable`, or a
TCP frame, see :class:`StreamDecoder`). A sealed unit is::

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

Peers' bad input raises :class:`Dropped` (a :class:`ringd.errors.RemoteProtocolError`) with
a ``reason`` that the network layer counts; it never crashes anything.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, Callable, Iterator, Union

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3

from ringd.core.requests import SamplingParams
from ringd.errors import LocalProtocolError, RemoteProtocolError, RequestError

#: Version of the framing below (segment headers, sealed units, message encoding).
#: 2: AES-128-OCB3 for encrypted units (1 used AES-256-GCM); TCP records with a flags byte
#: (large messages in several records, see :data:`TCP_HEADER`).
WIRE_VERSION = 2

KEY_SIZE = 32
FRAME_KEY_SIZE = 16  # AES-128 per (sender session, channel, mode)
TAG_SIZE = 16
FLAG_ENCRYPTED = 0x01
CHANNEL_UDP = 1
CHANNEL_TCP = 2

# --- limits (every length is checked against one of these before allocation) ----------
MAX_NODE_ID = 64  # bytes of UTF-8
MAX_META = 64 * 1024
MAX_ID = 128  # request ids
MAX_TEXT = 4096  # error messages, reasons, versions
MAX_GOSSIP = 1 << 20
MAX_RANK = 4
MAX_DIM = 1 << 24
MAX_ARRAY = 16  # longest msgpack array in any message's metadata
TCP_MAX_FRAME = 64 << 20  # default cap of one TCP frame (configurable per decoder)

#: Counted drop reasons (``stats()["drops"]`` always shows every key):
#: ``bad_mac`` tag check failed (wrong key or tampered); ``replay`` a sequence number seen
#: before, or from an older session of the node (network duplicates land here too);
#: ``wrong_cluster`` another cluster's key; ``bad_version`` another wire/protocol version;
#: ``stale_epoch`` an Activation/Token of another plan epoch; ``truncated``, ``oversize``,
#: ``unknown_type``, ``malformed`` bad lengths, types or fields; ``overflow`` a bounded
#: queue or buffer was full (the sender retransmits); ``expired`` a packet's segments did
#: not all arrive in time; ``abandoned`` a frame the sender gave up on (moved to TCP) or
#: that the gap timeout skipped.
DROP_REASONS = (
    "bad_mac", "replay", "wrong_cluster", "bad_version", "stale_epoch", "truncated",
    "oversize", "unknown_type", "malformed", "overflow", "expired", "abandoned",
)

DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "uint32": 4}

Buffer = Union[bytes, bytearray, memoryview]


class Dropped(RemoteProtocolError):
    """A peer's unit or message was rejected; ``reason`` is one of :data:`DROP_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"dropped ({reason}){': ' + detail if detail else ''}")
        self.reason = reason


def new_counters() -> dict[str, int]:
    """A drop counter with every reason present."""
    return dict.fromkeys(DROP_REASONS, 0)


# ======================================================================== messages
# Messages are slotted dataclasses that validate on construction. They are not frozen
# (treat them as immutable all the same): a frozen dataclass's __init__ sets each field
# through object.__setattr__, ~6x slower (1.7 vs 0.26 µs for ten fields here), and every
# frame received builds three of them.
class MsgType(IntEnum):
    HANDSHAKE = 1
    GOSSIP = 2
    ACTIVATION = 3
    TOKEN = 4
    CANCEL = 5
    ERROR = 6


U63 = (1 << 63) - 1
I31 = (1 << 31) - 1


def _int(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and lo <= v <= hi


def _str(limit: int, *, empty: bool = False) -> Callable[[Any], bool]:
    return lambda v: type(v) is str and (empty or v != "") and len(v) <= limit


def _num(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: type(v) in (float, int) and lo <= v <= hi


_u63, _i31, _rid = _int(0, U63), _int(0, I31), _str(MAX_ID)


def _check(obj: object, checks: tuple[tuple[str, Callable[[Any], bool]], ...]) -> None:
    """Field invariants of a message; a violation is our misuse (decode turns it into a drop)."""
    for name, ok in checks:
        if not ok(getattr(obj, name)):
            raise LocalProtocolError(f"{type(obj).__name__}.{name}: bad value {getattr(obj, name)!r:.80}")


@dataclass(eq=False, slots=True)
class Tensor:
    """A tensor on the wire: dtype name, shape and its raw C-order bytes (never copied here)."""

    dtype: str
    shape: tuple[int, ...]
    data: Buffer

    def __post_init__(self) -> None:
        problem = tensor_problem(self.dtype, self.shape, memoryview(self.data).nbytes)
        if problem:
            raise LocalProtocolError(f"bad tensor: {problem}")

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return (self.dtype == other.dtype and self.shape == other.shape
                and bytes(self.data) == bytes(other.data))

    def __repr__(self) -> str:
        return f"Tensor({self.dtype}, {self.shape}, {self.nbytes} bytes)"


def tensor_problem(dtype: Any, shape: Any, nbytes: int) -> str | None:
    """Why (dtype, shape, nbytes) is not an acceptable tensor, or None."""
    size = DTYPE_SIZES.get(dtype) if type(dtype) is str else None
    if size is None:
        return f"dtype {dtype!r} not in {sorted(DTYPE_SIZES)}"
    if type(shape) is not tuple or len(shape) > MAX_RANK:
        return f"shape must be a tuple of at most {MAX_RANK} dims"
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_DIM:
            return f"dim {d!r} out of range 0..{MAX_DIM}"
    if math.prod(shape) * size != nbytes:
        return f"shape {shape} x {dtype} needs {math.prod(shape) * size} bytes, got {nbytes}"
    return None


@dataclass(slots=True)
class Handshake:
    """First frame on every TCP connection, both ways. ``port``: the sender's peer port."""

    node_id: str
    cluster_id: str
    protocol_version: int
    software_version: str
    port: int

    def __post_init__(self) -> None:
        _check(self, (("node_id", _str(MAX_NODE_ID)), ("cluster_id", _str(64)),
                      ("protocol_version", _int(0, 1 << 16)), ("software_version", _str(64)),
                      ("port", _int(0, 65535))))


@dataclass(slots=True)
class Gossip:
    """Membership payload: msgpack produced and validated by the membership core."""

    payload: bytes

    def __post_init__(self) -> None:
        if type(self.payload) is not bytes or len(self.payload) > MAX_GOSSIP:
            raise LocalProtocolError(f"Gossip.payload must be bytes of at most {MAX_GOSSIP}")


@dataclass(slots=True)
class Activation:
    """Hidden states of one step. ``[layer_lo, layer_hi)`` is the span already applied;
    ``final``: the last prefill chunk or a decode step (the last shard must sample)."""

    request_id: str
    step: int
    position: int
    epoch: int
    layer_lo: int
    layer_hi: int
    entry: str
    sampling: SamplingParams  # without stop strings: only the entry applies them
    final: bool
    tensor: Tensor

    def __post_init__(self) -> None:
        r, e = self.request_id, self.entry
        if not (type(r) is str and 0 < len(r) <= MAX_ID and type(e) is str and 0 < len(e) <= MAX_NODE_ID
                and type(self.step) is int and 0 <= self.step <= U63
                and type(self.position) is int and 0 <= self.position <= U63
                and type(self.epoch) is int and 0 <= self.epoch <= U63
                and type(self.layer_lo) is int and 0 <= self.layer_lo <= I31
                and type(self.layer_hi) is int and 0 <= self.layer_hi <= I31
                and type(self.sampling) is SamplingParams and type(self.final) is bool
                and type(self.tensor) is Tensor):
            _check(self, _ACTIVATION_CHECKS)


_ACTIVATION_CHECKS = (
    ("request_id", _rid), ("step", _u63), ("position", _u63), ("epoch", _u63),
    ("layer_lo", _i31), ("layer_hi", _i31), ("entry", _str(MAX_NODE_ID)),
    ("sampling", lambda v: type(v) is SamplingParams), ("final", lambda v: type(v) is bool),
    ("tensor", lambda v: type(v) is Tensor))


@dataclass(slots=True)
class Token:
    """A sampled token. ``finish_reason`` (``stop``/``length``) is set on the last one.

    ``logits``: the float32 logits ``[vocab]`` the token was sampled from, only when the
    request asked for them (``SamplingParams.want_logits``); they travel as the message body.
    """

    request_id: str
    step: int
    epoch: int
    token_id: int
    layer_lo: int
    layer_hi: int
    finish_reason: str | None = None
    logits: Tensor | None = None

    def __post_init__(self) -> None:
        r, f, g = self.request_id, self.finish_reason, self.logits
        if not (type(r) is str and 0 < len(r) <= MAX_ID
                and type(self.step) is int and 0 <= self.step <= U63
                and type(self.epoch) is int and 0 <= self.epoch <= U63
                and type(self.token_id) is int and 0 <= self.token_id <= I31
                and type(self.layer_lo) is int and 0 <= self.layer_lo <= I31
                and type(self.layer_hi) is int and 0 <= self.layer_hi <= I31
                and (f is None or (type(f) is str and 0 < len(f) <= 32))
                and (g is None or _is_logits(g))):
            _check(self, _TOKEN_CHECKS)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


_TOKEN_CHECKS = (("request_id", _rid), ("step", _u63), ("epoch", _u63), ("token_id", _i31),
                 ("layer_lo", _i31), ("layer_hi", _i31),
                 ("finish_reason", lambda v: v is None or _str(32)(v)),
                 ("logits", lambda v: v is None or _is_logits(v)))


def _is_logits(v: Any) -> bool:
    return type(v) is Tensor and v.dtype == "float32" and len(v.shape) == 1


@dataclass(slots=True)
class Cancel:
    request_id: str
    reason: str

    def __post_init__(self) -> None:
        _check(self, (("request_id", _rid), ("reason", _str(MAX_TEXT, empty=True))))


@dataclass(slots=True)
class Error:
    request_id: str
    code: str
    message: str

    def __post_init__(self) -> None:
        _check(self, (("request_id", _rid), ("code", _str(64)), ("message", _str(MAX_TEXT, empty=True))))


Message = Union[Handshake, Gossip, Activation, Token, Cancel, Error]
_HEAD = struct.Struct("<BI")
_packb = msgpack.Packer(use_bin_type=True).pack


def encode(msg: Message) -> tuple[bytes, Buffer]:
    """``(head, body)``: head = type, meta length and msgpack meta; body = raw bytes (no copy).

    Messages validate their fields when built, so encoding never fails on a built message.
    """
    cls = type(msg)
    body: Buffer = b""
    if cls is Activation:
        t, s = msg.tensor, msg.sampling  # type: ignore[union-attr]
        meta: tuple = (msg.request_id, msg.step, msg.position, msg.epoch,  # type: ignore[union-attr]
                       msg.layer_lo, msg.layer_hi, msg.entry,  # type: ignore[union-attr]
                       (s.temperature, s.top_p, s.top_k, s.seed, s.max_tokens, s.want_logits),
                       msg.final, t.dtype, t.shape)  # type: ignore[union-attr]
        body = t.data
    elif cls is Token:
        g = msg.logits  # type: ignore[union-attr]
        meta = tuple(getattr(msg, f) for f in _FIELDS[Token][:-1])
        if g is not None:
            meta += (g.dtype, g.shape)
            body = g.data
    elif cls is Gossip:
        meta = ()
        body = msg.payload  # type: ignore[union-attr]
    elif cls in _FIELDS:
        meta = tuple(getattr(msg, f) for f in _FIELDS[cls])
    else:
        raise LocalProtocolError(f"not a wire message: {cls.__name__}")
    packed = _packb(meta)
    return _HEAD.pack(_TYPES[cls], len(packed)) + packed, body


def encode_bytes(msg: Message) -> bytes:
    """The whole encoding in one buffer."""
    head, body = encode(msg)
    return b"".join((head, body))


def decode(data: Buffer, *, epoch: int | None = None) -> Message:
    """Decode one message; raises :class:`Dropped`. Tensor data is a view into ``data``.

    ``epoch``: when set, Activation and Token messages of any other plan epoch are dropped
    (``stale_epoch``).
    """
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if len(mv) < _HEAD.size:
        raise Dropped("truncated", "message shorter than its header")
    mtype, meta_len = _HEAD.unpack_from(mv, 0)
    if meta_len > MAX_META:
        raise Dropped("oversize", f"metadata of {meta_len} bytes")
    end = _HEAD.size + meta_len
    if end > len(mv):
        raise Dropped("truncated", "metadata runs past the end")
    cls = _CLASSES.get(mtype)
    if cls is None:
        raise Dropped("unknown_type", f"message type {mtype}")
    # unpackb with explicit limits: the input is already bounded by MAX_META above (what
    # an Unpacker's max_buffer_size would do); unpackb is ~3x cheaper than an Unpacker.
    try:
        meta = msgpack.unpackb(mv[_HEAD.size:end], use_list=False, raw=False, strict_map_key=True,
                               max_str_len=MAX_TEXT, max_bin_len=MAX_META, max_array_len=MAX_ARRAY,
                               max_map_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises many types on bad input; all mean "malformed"
        raise Dropped("malformed", f"metadata: {type(e).__name__}") from None
    body = mv[end:]
    try:
        if type(meta) is not tuple:
            raise LocalProtocolError("metadata is not an array")
        if cls is Activation:
            if len(meta) != 11 or type(meta[7]) is not tuple or len(meta[7]) != 6:
                raise LocalProtocolError("Activation needs 11 fields")
            if epoch is not None and meta[3] != epoch:
                raise Dropped("stale_epoch", f"epoch {meta[3]!r}, current {epoch}")
            t, p, k, seed, m, logits = meta[7]
            sampling = SamplingParams(t, p, k, seed, m, (), logits)
            return Activation(*meta[:7], sampling, meta[8], Tensor(meta[9], meta[10], body))
        if cls is Gossip:
            if meta or len(body) > MAX_GOSSIP:
                raise LocalProtocolError("Gossip carries only its payload")
            return Gossip(bytes(body))
        if cls is Token:
            # 7 fields and no body, or 9 (logits dtype and shape) with the logits as the body
            if len(meta) not in (7, 9) or (len(meta) == 7 and len(body)):
                raise LocalProtocolError("Token needs 7 fields and no body, or 9 and its logits")
            if epoch is not None and meta[2] != epoch:
                raise Dropped("stale_epoch", f"epoch {meta[2]!r}, current {epoch}")
            return Token(*meta[:7], Tensor(meta[7], meta[8], body) if len(meta) == 9 else None)
        if len(meta) != len(_FIELDS[cls]) or len(body):
            raise LocalProtocolError(f"{cls.__name__} needs {len(_FIELDS[cls])} fields and no body")
        return cls(*meta)
    except (LocalProtocolError, RequestError) as e:
        raise Dropped("malformed", e.message) from None


_TYPES: dict[type, MsgType] = {Handshake: MsgType.HANDSHAKE, Gossip: MsgType.GOSSIP,
                               Activation: MsgType.ACTIVATION, Token: MsgType.TOKEN,
                               Cancel: MsgType.CANCEL, Error: MsgType.ERROR}
_CLASSES = {int(v): k for k, v in _TYPES.items()}
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in (Handshake, Token, Cancel, Error)}


# ======================================================================== sealing
def cluster_id(key: bytes) -> str:
    """A public name of the cluster key (hex of a keyed-hash digest); safe to advertise."""
    return hashlib.blake2b(key, digest_size=8, person=b"ringd-cluster").hexdigest()


def new_session(time_ms: int, random16: int) -> int:
    """A sender session number: later starts give larger numbers (used against replays)."""
    return ((time_ms & ((1 << 48) - 1)) << 16) | (random16 & 0xFFFF)


def _derive(key: bytes, session: int, channel: int, encrypted: bool) -> bytes:
    return hashlib.blake2b(session.to_bytes(8, "little") + bytes([channel, WIRE_VERSION, encrypted]),
                           key=key, digest_size=FRAME_KEY_SIZE, person=b"ringd-frame-key").digest()


def _aead(key: bytes, session: int, channel: int, encrypted: bool) -> AESOCB3 | AESGCM:
    """Encrypted units: AES-128-OCB3; clear units: AES-128-GCM used as GMAC (one key each)."""
    k = _derive(key, session, channel, encrypted)
    return AESOCB3(k) if encrypted else AESGCM(k)


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
            self.bits = 1 if shift >= self.size else ((self.bits << shift) | 1) & ((1 << self.size) - 1)
            self.top = pn
        else:
            self.bits |= 1 << (self.top - pn)


@dataclass
class _SenderState:
    node: str
    session: int
    last_seen: float
    windows: dict[int, ReplayWindow] = field(default_factory=dict)


class ReplayGuard:
    """Per-sender replay windows (one per channel) and the newest session of every node.

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
        w = st.windows.get(channel) if st is not None and st.session == session else None
        return w is None or w.fresh(pn)

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
        w = st.windows.get(channel)
        if w is None:
            w = st.windows[channel] = ReplayWindow(self._window)
        if not w.fresh(pn):
            return False
        w.mark(pn)
        return True


# ======================================================================== buffers
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
    return sealer.seal(CHANNEL_TCP, _tcp_pn(seq, flags), plaintext, head=head, out=out)  # type: ignore[arg-type]


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


def _sealed_records(sealer: Sealer, next_seq: Callable[[], int], views: list[memoryview], total: int,
                    record: int, buffer: Callable[[int], bytearray]) -> Iterator[memoryview]:
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
    sizes = [sum(len(x) for x in segs) + (len(head) if k == 0 else 0) for k, segs in enumerate(pieces)]
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

    def __init__(self, buf: bytearray, total: int, got: int, sender: str, session: int, seq: int) -> None:
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
                dest = self._pool.get(len(unit)) if self._pool and len(unit) >= self._pool.min_size else None
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
        opened = self._sealer.open(CHANNEL_TCP, session, seq | flags << 56, unit, dest)  # type: ignore[arg-type]
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
