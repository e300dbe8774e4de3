"""Wire format: messages, the tensor codec, limits, drop reasons and the field rules.

Pure: no sockets, clocks or MLX.

A *message* encodes as ``type (u8) | meta_len (u32 LE) | msgpack meta | raw body``; the body
is a tensor's bytes or a gossip payload, never element-wise encoded, never pickled. Messages
travel inside sealed units (:mod:`ringd.core.seal`): UDP packets (:mod:`ringd.core.reliable`)
or TCP records (:mod:`ringd.core.stream`). Nothing is msgpack-parsed before a unit's tag has
been checked; every length is bounded before anything is allocated.

The field rules (:class:`Rule`, :func:`check`, :class:`FieldReader`) are the one kit every
decoder of peer input in the core validates values with: these messages, the membership
payload (:mod:`ringd.core.swim_wire`), the ring's metadata (:mod:`ringd.core.ringmeta`).

Peers' bad input raises :class:`Dropped` (a :class:`ringd.errors.RemoteProtocolError`) with
a ``reason`` that the network layer counts; it never crashes anything.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, Callable, Union

import msgpack

from ringd.core.requests import SamplingParams
from ringd.errors import LocalProtocolError, RemoteProtocolError, RequestError

#: Version of the wire: UDP segment headers (:mod:`ringd.core.packet`), sealed units
#: (:mod:`ringd.core.seal`), TCP records (:mod:`ringd.core.stream`), message encoding.
#: 2: AES-128-OCB3 for encrypted units (1 used AES-256-GCM); TCP records with a flags byte
#: (large messages in several records, see :data:`ringd.core.stream.TCP_HEADER`).
WIRE_VERSION = 2

# --- limits (every length is checked against one of these before allocation) ----------
MAX_NODE_ID = 64  # bytes of UTF-8
MAX_META = 64 * 1024
MAX_ID = 128  # request ids
MAX_TEXT = 4096  # error messages, reasons, versions
MAX_GOSSIP = 1 << 20
MAX_RANK = 4
MAX_DIM = 1 << 24
MAX_ARRAY = 16  # longest msgpack array in any message's metadata
U63 = (1 << 63) - 1
I31 = (1 << 31) - 1

#: Counted drop reasons (``stats()["drops"]`` always shows every key):
#: ``bad_mac`` tag check failed (wrong key or tampered); ``replay`` a sequence number seen
#: before, or from an older session of the node (network duplicates land here too);
#: ``wrong_cluster`` another cluster's key; ``bad_version`` another wire/protocol version;
#: ``truncated``, ``oversize``, ``unknown_type``, ``malformed`` bad lengths, types or
#: fields; ``overflow`` a bounded
#: queue or buffer was full (the sender retransmits); ``expired`` a packet's segments did
#: not all arrive in time; ``abandoned`` a frame the sender gave up on (moved to TCP) or
#: that the gap timeout skipped.
DROP_REASONS = (
    "bad_mac", "replay", "wrong_cluster", "bad_version", "truncated",
    "oversize", "unknown_type", "malformed", "overflow", "expired", "abandoned", "duplicate",
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


# ======================================================================== field rules
# One kit for every decoder of peer input in the core. A built message checks its fields
# with :func:`check` (a bad value is our misuse: LocalProtocolError, which :func:`decode`
# turns into a ``malformed`` drop); a decoder of plain msgpack (the membership payload)
# takes each value through a :class:`FieldReader`, which raises that decoder's own error; a
# schema of named fields (the ring's metadata) keeps a rule per field and tests with it.
@dataclass(frozen=True, slots=True)
class Rule:
    """What one field accepts: ``test(value)`` is True for a good value; ``expected`` says
    what a good value is, for error messages ("an integer in 0..65535")."""

    test: Callable[[Any], bool]
    expected: str


def integer(lo: int = 0, hi: int = U63) -> Rule:
    """An ``int`` (not a bool) in ``lo..hi``."""
    return Rule(lambda v: type(v) is int and lo <= v <= hi, f"an integer in {lo}..{hi}")


def number(lo: float, hi: float) -> Rule:
    """A ``float`` or ``int`` (not a bool) in ``lo..hi``."""
    return Rule(lambda v: type(v) in (float, int) and lo <= v <= hi, f"a number in {lo}..{hi}")


def text(max_len: int, *, min_len: int = 0, printable: bool = False) -> Rule:
    """A ``str`` of ``min_len..max_len`` characters (all printable if ``printable``)."""
    if printable:
        return Rule(lambda v: type(v) is str and min_len <= len(v) <= max_len and v.isprintable(),
                    f"printable text of {min_len}..{max_len} characters")
    return Rule(lambda v: type(v) is str and min_len <= len(v) <= max_len,
                f"text of {min_len}..{max_len} characters")


def optional(rule: Rule) -> Rule:
    """None, or what ``rule`` accepts."""
    test = rule.test
    return Rule(lambda v: v is None or test(v), f"None or {rule.expected}")


def list_of(rule: Rule, max_len: int) -> Rule:
    """A ``list`` (msgpack array decoded with ``use_list``) of at most ``max_len`` items,
    each accepted by ``rule``."""
    test = rule.test
    return Rule(lambda v: type(v) is list and len(v) <= max_len and all(test(x) for x in v),
                f"a list of at most {max_len} items, each {rule.expected}")


def exactly(cls: type) -> Rule:
    """An instance of ``cls`` itself (not of a subclass: ``exactly(int)`` refuses a bool)."""
    return Rule(lambda v: type(v) is cls, f"a {cls.__name__}")


def check(obj: object, rules: tuple[tuple[str, Rule], ...]) -> None:
    """Field invariants of a built message: raises :class:`LocalProtocolError` (our misuse;
    :func:`decode` turns it into a ``malformed`` drop) naming the first bad field."""
    for name, rule in rules:
        if not rule.test(getattr(obj, name)):
            raise LocalProtocolError(
                f"{type(obj).__name__}.{name}: bad value {getattr(obj, name)!r:.80}")


class FieldReader:
    """Takes decoded values through the rules above; a bad one raises ``error(detail)``,
    where ``detail`` is ``"WHAT: expected ..."`` (``what`` names the field for the log)."""

    __slots__ = ("error",)

    def __init__(self, error: Callable[[str], Exception]) -> None:
        self.error = error

    def take(self, value: Any, rule: Rule, what: str) -> Any:
        """``value`` if ``rule`` accepts it."""
        if not rule.test(value):
            raise self.error(f"{what}: expected {rule.expected}")
        return value

    def items(self, value: Any, what: str, n: int | None = None,
              max_len: int | None = None) -> list[Any]:
        """A list (msgpack array decoded with ``use_list``) of exactly ``n`` or at most
        ``max_len`` items."""
        if type(value) is not list:
            raise self.error(f"{what}: expected a list")
        if n is not None and len(value) != n:
            raise self.error(f"{what}: expected {n} fields, got {len(value)}")
        if max_len is not None and len(value) > max_len:
            raise self.error(f"{what}: {len(value)} items, at most {max_len} allowed")
        return value

    # integer() and text() test inline what their rule tests and build the rule only to say
    # why not: through the rules, a Sync of 64 members (~1,500 values) took ~1.7x as long
    def integer(self, value: Any, what: str, lo: int = 0, hi: int = U63) -> int:
        if type(value) is int and lo <= value <= hi:
            return value
        return self.take(value, integer(lo, hi), what)

    def text(self, value: Any, what: str, max_len: int, min_len: int = 0) -> str:
        """Printable text (names, ids, versions shown to people and logs)."""
        if type(value) is str and min_len <= len(value) <= max_len and value.isprintable():
            return value
        return self.take(value, text(max_len, min_len=min_len, printable=True), what)

    def opt_text(self, value: Any, what: str, max_len: int) -> str | None:
        """None, or printable non-empty text."""
        return None if value is None else self.text(value, what, max_len, 1)


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
    FETCH_REQUEST = 7
    FETCH_REPLY = 8
    SEQUENCED = 9  # not a message: the head of a sequenced frame (see sequence_head)
    LINK_PROBE = 10
    LINK_ECHO = 11
    PROGRESS = 12


_u63, _i31, _rid = integer(0, U63), integer(0, I31), text(MAX_ID, min_len=1)
_bool = exactly(bool)


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
        check(self, _HANDSHAKE_CHECKS)


_HANDSHAKE_CHECKS = (("node_id", text(MAX_NODE_ID, min_len=1)),
                     ("cluster_id", text(64, min_len=1)), ("protocol_version", integer(0, 1 << 16)),
                     ("software_version", text(64, min_len=1)), ("port", integer(0, 65535)))


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
        if not (type(r) is str and 0 < len(r) <= MAX_ID
                and type(e) is str and 0 < len(e) <= MAX_NODE_ID
                and type(self.step) is int and 0 <= self.step <= U63
                and type(self.position) is int and 0 <= self.position <= U63
                and type(self.epoch) is int and 0 <= self.epoch <= U63
                and type(self.layer_lo) is int and 0 <= self.layer_lo <= I31
                and type(self.layer_hi) is int and 0 <= self.layer_hi <= I31
                and type(self.sampling) is SamplingParams and type(self.final) is bool
                and type(self.tensor) is Tensor):
            check(self, _ACTIVATION_CHECKS)


_ACTIVATION_CHECKS = (
    ("request_id", _rid), ("step", _u63), ("position", _u63), ("epoch", _u63),
    ("layer_lo", _i31), ("layer_hi", _i31), ("entry", text(MAX_NODE_ID, min_len=1)),
    ("sampling", exactly(SamplingParams)), ("final", _bool), ("tensor", exactly(Tensor)))


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
            check(self, _TOKEN_CHECKS)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


_TOKEN_CHECKS = (("request_id", _rid), ("step", _u63), ("epoch", _u63), ("token_id", _i31),
                 ("layer_lo", _i31), ("layer_hi", _i31),
                 ("finish_reason", optional(text(32, min_len=1))),
                 ("logits", optional(Rule(lambda v: _is_logits(v), "float32 logits [vocab]"))))


def _is_logits(v: Any) -> bool:
    return type(v) is Tensor and v.dtype == "float32" and len(v.shape) == 1


@dataclass(slots=True)
class Cancel:
    request_id: str
    reason: str

    def __post_init__(self) -> None:
        check(self, _CANCEL_CHECKS)


_CANCEL_CHECKS = (("request_id", _rid), ("reason", text(MAX_TEXT)))


@dataclass(slots=True)
class Error:
    """A stage cannot go on with a request: tells its entry why. ``epoch``: the plan epoch
    the stage served (0: none), so an entry that moved its request to another plan can tell
    an old plan's error from one about the request as it runs now."""

    request_id: str
    code: str
    message: str
    epoch: int = 0

    def __post_init__(self) -> None:
        check(self, _ERROR_CHECKS)


_ERROR_CHECKS = (("request_id", _rid), ("code", text(64, min_len=1)), ("message", text(MAX_TEXT)),
                 ("epoch", _u63))


@dataclass(slots=True)
class Progress:
    """The last stage to a request's entry: the ring computed the prompt up to ``position``
    (a prefill slice or chunk that samples nothing), so a long prompt is not taken for a
    stuck ring."""

    request_id: str
    epoch: int
    position: int

    def __post_init__(self) -> None:
        check(self, _PROGRESS_CHECKS)


_PROGRESS_CHECKS = (("request_id", _rid), ("epoch", _u63), ("position", _u63))


# --- weight transfer (ringd.weights): a holder serves an item's bytes by key, in chunks --
MAX_MODEL_ID = 64  # model ids are 32 hex digits
#: An item key (:mod:`ringd.core.model_manifest`: a tensor name of at most 300 characters,
#: ``file:NAME`` or ``manifest``). The holder looks it up in its manifest, never as a path.
MAX_KEY = 320
MAX_FETCH = 16 << 20  # bytes one request may ask for (and one reply carry)
#: ``ok``: the bytes are the body; ``not_held``: the holder does not hold (or cannot read)
#: that item of that model now; ``bad_request``: no such item, or a range outside it;
#: ``busy``: too many requests queued at the holder, ask again later.
FETCH_STATUSES = ("ok", "not_held", "bad_request", "busy")


@dataclass(slots=True)
class FetchRequest:
    """Ask a holder for bytes ``[offset, offset + length)`` of item ``key`` of a model."""

    model_id: str
    key: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        check(self, _FETCH_REQUEST_CHECKS)


_model_id = text(MAX_MODEL_ID, min_len=1, printable=True)
_key = text(MAX_KEY, min_len=1, printable=True)
_FETCH_REQUEST_CHECKS = (("model_id", _model_id), ("key", _key), ("offset", _u63),
                         ("length", integer(1, MAX_FETCH)))


@dataclass(eq=False, slots=True)
class FetchReply:
    """A holder's answer to a :class:`FetchRequest`: ``status`` (one of
    :data:`FETCH_STATUSES`); with ``ok``, ``data`` is the bytes asked for (the message body,
    never copied here: a received reply's data views the receive buffer), else empty."""

    model_id: str
    key: str
    offset: int
    status: str
    data: Buffer = b""

    def __post_init__(self) -> None:
        check(self, _FETCH_REPLY_CHECKS)
        n = memoryview(self.data).nbytes
        if not (1 <= n <= MAX_FETCH if self.status == "ok" else n == 0):
            raise LocalProtocolError(f"FetchReply: {n} bytes of data with status "
                                     f"{self.status!r} (ok: 1..{MAX_FETCH}, else none)")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FetchReply):
            return NotImplemented
        return ((self.model_id, self.key, self.offset, self.status)
                == (other.model_id, other.key, other.offset, other.status)
                and bytes(self.data) == bytes(other.data))

    def __repr__(self) -> str:
        return (f"FetchReply({self.model_id[:12]}, {self.key!r}, {self.offset}, {self.status}, "
                f"{memoryview(self.data).nbytes} bytes)")


_FETCH_REPLY_CHECKS = (("model_id", _model_id), ("key", _key), ("offset", _u63),
                       ("status", Rule(lambda v: v in FETCH_STATUSES,
                                       f"one of {FETCH_STATUSES}")),
                       ("data", Rule(lambda v: isinstance(v, (bytes, bytearray, memoryview)),
                                     "bytes")))


#: Largest filler of a link probe (a throughput probe).
MAX_PROBE = 8 << 20


@dataclass(eq=False, slots=True)
class LinkProbe:
    """A link measurement: the receiver echoes ``nonce`` (a :class:`LinkEcho`) to the address
    it came from. ``data``: filler for a throughput probe (empty for a round trip)."""

    nonce: int
    data: Buffer = b""

    def __post_init__(self) -> None:
        if not (type(self.nonce) is int and 0 <= self.nonce <= U63):
            raise LocalProtocolError(f"LinkProbe.nonce: bad value {self.nonce!r:.40}")
        if (not isinstance(self.data, (bytes, bytearray, memoryview))
                or memoryview(self.data).nbytes > MAX_PROBE):
            raise LocalProtocolError(f"LinkProbe.data must be at most {MAX_PROBE} bytes")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LinkProbe):
            return NotImplemented
        return self.nonce == other.nonce and bytes(self.data) == bytes(other.data)


@dataclass(slots=True)
class LinkEcho:
    """The answer to a :class:`LinkProbe`: its nonce and how many filler bytes came."""

    nonce: int
    size: int

    def __post_init__(self) -> None:
        check(self, _LINK_ECHO_CHECKS)


_LINK_ECHO_CHECKS = (("nonce", _u63), ("size", integer(0, MAX_PROBE)))


Message = Union[Handshake, Gossip, Activation, Token, Cancel, Error, Progress, FetchRequest,
                FetchReply, LinkProbe, LinkEcho]
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
        meta: tuple = (msg.request_id, msg.step, msg.position,  # type: ignore[union-attr]
                       msg.epoch, msg.layer_lo, msg.layer_hi, msg.entry,  # type: ignore[union-attr]
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
    elif cls is FetchReply:
        meta = (msg.model_id, msg.key, msg.offset, msg.status)  # type: ignore[union-attr]
        body = msg.data  # type: ignore[union-attr]
    elif cls is LinkProbe:
        meta = (msg.nonce,)  # type: ignore[union-attr]
        body = msg.data  # type: ignore[union-attr]
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


def decode(data: Buffer) -> Message:
    """Decode one message; raises :class:`Dropped`. Tensor data is a view into ``data``.

    Which plan epoch a message belongs to is the request path's business
    (:class:`ringd.core.pipeline.Pipeline` checks it once, on arrival).
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
            return Token(*meta[:7], Tensor(meta[7], meta[8], body) if len(meta) == 9 else None)
        if cls is FetchReply:
            if len(meta) != 4 or len(body) > MAX_FETCH:
                raise LocalProtocolError("FetchReply needs 4 fields and at most "
                                         f"{MAX_FETCH} bytes of data")
            return FetchReply(*meta, body)
        if cls is LinkProbe:
            if len(meta) != 1 or len(body) > MAX_PROBE:
                raise LocalProtocolError(f"LinkProbe needs 1 field and at most {MAX_PROBE} "
                                         "bytes of filler")
            return LinkProbe(meta[0], body)
        if len(meta) != len(_FIELDS[cls]) or len(body):
            raise LocalProtocolError(f"{cls.__name__} needs {len(_FIELDS[cls])} fields and no body")
        return cls(*meta)
    except (LocalProtocolError, RequestError) as e:
        raise Dropped("malformed", e.message) from None


_TYPES: dict[type, MsgType] = {Handshake: MsgType.HANDSHAKE, Gossip: MsgType.GOSSIP,
                               Activation: MsgType.ACTIVATION, Token: MsgType.TOKEN,
                               Cancel: MsgType.CANCEL, Error: MsgType.ERROR,
                               Progress: MsgType.PROGRESS,
                               FetchRequest: MsgType.FETCH_REQUEST,
                               FetchReply: MsgType.FETCH_REPLY, LinkProbe: MsgType.LINK_PROBE,
                               LinkEcho: MsgType.LINK_ECHO}
_CLASSES = {int(v): k for k, v in _TYPES.items()}
_FIELDS = {cls: tuple(f.name for f in fields(cls))
           for cls in (Handshake, Token, Cancel, Error, Progress, FetchRequest, LinkEcho)}


# ======================================================================== sequenced frames
#: A data-plane frame the transport numbers per (sender, stream), so that it is delivered
#: at most once whichever channel carried it (a frame resent over TCP after UDP timeouts
#: may have arrived by UDP too): ``type 9 | stream (u8) | sender session (u64) | seq (u64)``
#: before the message.
SEQ_HEAD = struct.Struct("<BBQQ")


def sequence_head(stream: int, session: int, seq: int) -> bytes:
    return SEQ_HEAD.pack(MsgType.SEQUENCED, stream, session, seq)


def split_sequenced(data: Buffer) -> tuple[int, int, int, memoryview] | None:
    """``(stream, session, seq, message)`` of a sequenced frame; None for a plain message.
    Raises :class:`Dropped` (``truncated``) for a sequenced head cut short."""
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if not len(mv) or mv[0] != MsgType.SEQUENCED:
        return None
    if len(mv) < SEQ_HEAD.size:
        raise Dropped("truncated", "sequenced frame shorter than its head")
    _, stream, session, seq = SEQ_HEAD.unpack_from(mv, 0)
    return stream, session, seq, mv[SEQ_HEAD.size:]
