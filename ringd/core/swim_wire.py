"""SWIM's wire vocabulary: member records, the five messages and their msgpack codec.

What :mod:`ringd.core.membership` (the state machine) sends and receives, and nothing it
decides: a :class:`Member` record (node id, name, address, incarnation, state, protocol
version, and metadata as bounded opaque bytes), an :class:`Update` (a claim about a member),
the messages :class:`Ping`, :class:`Ack`, :class:`PingReq`, :class:`Broadcast` and
:class:`Sync`, and :func:`to_payload` / :func:`decode_payload`. Every length is bounded
before allocation; :func:`decode_payload` type-checks every field with the core's one field
kit (:class:`ringd.core.wire.FieldReader`) and raises :class:`RemoteProtocolError` only.

Encoding: a msgpack array ``[tag, *fields]``; a member is an array of eight fields,
``[node_id, name, host, port, incarnation, state index, protocol_version, meta]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

import msgpack

from ringd import PROTOCOL_VERSION
from ringd.core.wire import FieldReader
from ringd.errors import LocalProtocolError, RemoteProtocolError

Addr = tuple[str, int]

# Wire bounds (validated on decode).
MAX_PAYLOAD = 1 << 20
MAX_ID = 64
MAX_NAME = 64
MAX_HOST = 255
#: Default bound of one member's metadata (bytes); see
#: :attr:`ringd.core.membership.MembershipConfig.max_meta_bytes`.
MAX_META = 4096
MAX_UPDATES = 64
MAX_SYNC_MEMBERS = 1024
#: Largest sequence number (and protocol version) a message carries.
U32 = (1 << 32) - 1


class MemberState(Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_STATES = tuple(MemberState)


@dataclass(frozen=True)
class Member:
    node_id: str
    name: str
    addr: Addr
    incarnation: int
    state: MemberState
    #: The node's metadata: opaque bytes for SWIM (the ring reads them, see
    #: :mod:`ringd.core.ringmeta`), at most ``MembershipConfig.max_meta_bytes``.
    meta: bytes = b""
    #: Peer protocol version the node speaks; only members of ours are live for the ring.
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Update:
    """A claim about ``member``'s state, first made by node ``origin``."""

    member: Member
    origin: str


# ------------------------------------------------------------------------------ messages
@dataclass(frozen=True)
class Ping:
    seq: int
    source: Member
    #: The node the sender means to reach; None when probing a bare address.
    target_id: str | None
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Ack:
    seq: int
    source: Member
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True)
class PingReq:
    """Please ping ``target_id`` at ``target_addr`` and forward its ack to me as Ack(seq)."""

    seq: int
    source: Member
    target_id: str
    target_addr: Addr
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Broadcast:
    """Gossip only: updates that have not been able to piggy-back on probes."""

    source: Member
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Sync:
    """Full state push-pull (join, periodic anti-entropy, reconnect after a partition)."""

    source: Member
    members: tuple[Member, ...]
    reply: bool


Message = Union[Ping, Ack, PingReq, Broadcast, Sync]
_TAGS: dict[type, int] = {Ping: 1, Ack: 2, PingReq: 3, Broadcast: 4, Sync: 5}


def _enc_member(m: Member) -> list[Any]:
    return [
        m.node_id,
        m.name,
        m.addr[0],
        m.addr[1],
        m.incarnation,
        _STATES.index(m.state),
        m.protocol_version,
        m.meta,
    ]


def _enc_updates(updates: Iterable[Update]) -> list[Any]:
    return [[_enc_member(u.member), u.origin] for u in updates]


def pack_update(u: Update) -> bytes:
    """One update as it travels inside a message's update list (for size budgets)."""
    return msgpack.packb([_enc_member(u.member), u.origin], use_bin_type=True)


def to_payload(msg: Message) -> bytes:
    """Encode a membership message (msgpack)."""
    if isinstance(msg, Ping):
        body = [msg.seq, _enc_member(msg.source), msg.target_id, _enc_updates(msg.updates)]
    elif isinstance(msg, Ack):
        body = [msg.seq, _enc_member(msg.source), _enc_updates(msg.updates)]
    elif isinstance(msg, PingReq):
        body = [
            msg.seq,
            _enc_member(msg.source),
            msg.target_id,
            list(msg.target_addr),
            _enc_updates(msg.updates),
        ]
    elif isinstance(msg, Broadcast):
        body = [_enc_member(msg.source), _enc_updates(msg.updates)]
    elif isinstance(msg, Sync):
        body = [_enc_member(msg.source), [_enc_member(m) for m in msg.members], msg.reply]
    else:
        raise LocalProtocolError(f"not a membership message: {msg!r}")
    return msgpack.packb([_TAGS[type(msg)], *body], use_bin_type=True)


# Decoding: every value is checked with the core's one field kit (ringd.core.wire); any
# problem is a RemoteProtocolError.
def _bad(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"membership payload: {what}")


_read = FieldReader(_bad)
_list, _int, _str = _read.items, _read.integer, _read.text


def _dec_addr(host: Any, port: Any, what: str) -> Addr:
    return (_str(host, f"{what}.host", MAX_HOST, 1), _int(port, f"{what}.port", 1, 65535))


def _bytes(v: Any, what: str, max_len: int) -> bytes:
    if type(v) is not bytes or len(v) > max_len:
        raise _bad(f"{what}: expected bytes, at most {max_len}")
    return v


def _dec_member(v: Any, max_meta: int, what: str = "member") -> Member:
    f = _list(v, what, 8)
    return Member(
        node_id=_str(f[0], f"{what}.node_id", MAX_ID, 1),
        name=_str(f[1], f"{what}.name", MAX_NAME),
        addr=_dec_addr(f[2], f[3], f"{what}.addr"),
        incarnation=_int(f[4], f"{what}.incarnation"),
        state=_STATES[_int(f[5], f"{what}.state", 0, len(_STATES) - 1)],
        protocol_version=_int(f[6], f"{what}.protocol_version", 0, U32),
        meta=_bytes(f[7], f"{what}.meta", max_meta),
    )


def _dec_source(v: Any, max_meta: int) -> Member:
    m = _dec_member(v, max_meta, "source")
    if m.state not in (MemberState.ALIVE, MemberState.LEFT):
        raise _bad(f"source: a node cannot describe itself as {m.state.value}")
    return m


def _dec_updates(v: Any, max_meta: int) -> tuple[Update, ...]:
    out = []
    for u in _list(v, "updates", max_len=MAX_UPDATES):
        f = _list(u, "update", 2)
        member = _dec_member(f[0], max_meta, "update.member")
        out.append(Update(member, _str(f[1], "update.origin", MAX_ID, 1)))
    return tuple(out)


def decode_payload(data: bytes, max_meta: int = MAX_META) -> Message:
    """Decode and validate a membership payload; junk raises RemoteProtocolError only.
    A member's metadata longer than ``max_meta`` bytes is junk too."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _bad("expected bytes")
    if len(data) > MAX_PAYLOAD:
        raise _bad(f"{len(data)} bytes, at most {MAX_PAYLOAD} allowed")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_HOST,
            max_bin_len=MAX_PAYLOAD,  # each member's meta: checked against max_meta below
            max_array_len=MAX_SYNC_MEMBERS,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise _bad(f"not valid msgpack ({type(e).__name__})") from None
    f = _list(obj, "message", max_len=8)
    if not f:
        raise _bad("empty message")
    tag = f[0]
    if tag == _TAGS[Ping] and type(tag) is int:
        _list(f, "ping", 5)
        target = None if f[3] is None else _str(f[3], "ping.target_id", MAX_ID, 1)
        seq = _int(f[1], "ping.seq", 0, U32)
        return Ping(seq, _dec_source(f[2], max_meta), target, _dec_updates(f[4], max_meta))
    if tag == _TAGS[Ack] and type(tag) is int:
        _list(f, "ack", 4)
        seq = _int(f[1], "ack.seq", 0, U32)
        return Ack(seq, _dec_source(f[2], max_meta), _dec_updates(f[3], max_meta))
    if tag == _TAGS[PingReq] and type(tag) is int:
        _list(f, "ping_req", 6)
        a = _list(f[4], "ping_req.target_addr", 2)
        return PingReq(
            _int(f[1], "ping_req.seq", 0, U32),
            _dec_source(f[2], max_meta),
            _str(f[3], "ping_req.target_id", MAX_ID, 1),
            _dec_addr(a[0], a[1], "ping_req.target_addr"),
            _dec_updates(f[5], max_meta),
        )
    if tag == _TAGS[Broadcast] and type(tag) is int:
        _list(f, "broadcast", 3)
        return Broadcast(_dec_source(f[1], max_meta), _dec_updates(f[2], max_meta))
    if tag == _TAGS[Sync] and type(tag) is int:
        _list(f, "sync", 4)
        members = tuple(
            _dec_member(m, max_meta, "sync.members[]")
            for m in _list(f[2], "sync.members", max_len=MAX_SYNC_MEMBERS)
        )
        if type(f[3]) is not bool:
            raise _bad("sync.reply: expected a boolean")
        return Sync(_dec_source(f[1], max_meta), members, f[3])
    raise _bad(f"unknown message type {tag!r}")
