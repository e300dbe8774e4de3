"""SWIM membership with Lifeguard-style suspicion, as a sans-I/O state machine.

Follows hashicorp/memberlist's semantics: each probe interval a node pings one member
(round robin over a shuffled list); with no ack after ``probe_timeout`` it asks
``indirect_probes`` others to ping it (PingReq); with no ack by the end of the interval
the member becomes SUSPECT. A suspect that does not refute within the suspicion timeout
is DEAD. The timeout starts at ``suspicion_max_mult`` x the base and shrinks toward the
base as independent members confirm the suspicion (``remainingSuspicionTime``); when the
ring is too small to give ``suspicion_confirmations`` confirmations it is just the base:
``suspicion_timeout x max(1, log10(n))``. A live node that hears it is suspected, dead or
left bumps its incarnation and gossips ALIVE (refutation). State changes travel as
updates piggy-backed on every message and on periodic gossip; joins and partition heals
use a full-state push-pull (Sync). A graceful leave is gossiped as LEFT, never DEAD.

Update precedence for a member at incarnation ``i``: ALIVE needs ``> i``; SUSPECT, DEAD
and LEFT need ``>= i``. The local node changes its metadata by bumping its own
incarnation, so newer metadata always wins. Every message carries the sender's
own record, so one exchange is enough to learn a peer.

A member's record is what SWIM needs (node id, name, address, incarnation, state, the
protocol version it speaks) plus its metadata as bounded opaque bytes, as memberlist's
``Node.Meta``: SWIM carries them and never reads them. The ring gives them their meaning
(:mod:`ringd.core.ringmeta`) and builds its view from :meth:`Membership.live_members`.

Usage (the adapter's loop)::

    m = Membership(node_id, name, addr, meta, rng=random.Random(seed))
    m.join(seeds, now)
    ... m.receive(payload, from_addr, now)  # may raise RemoteProtocolError: count, drop
    ... if now >= m.get_timer(): m.handle_timer(now)
    for addr, payload in m.outbox(): send(addr, payload)
    while (ev := m.next_event()) is not None: ...

Payloads are msgpack; :func:`decode_payload` bounds and type-checks every field.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

import msgpack

from ringd import PROTOCOL_VERSION
from ringd.core.wire import FieldReader
from ringd.errors import LocalProtocolError, RemoteProtocolError

log = logging.getLogger(__name__)

Addr = tuple[str, int]

# Wire bounds (validated on decode).
MAX_PAYLOAD = 1 << 20
MAX_ID = 64
MAX_NAME = 64
MAX_HOST = 255
#: Default bound of one member's metadata (bytes); see MembershipConfig.max_meta_bytes.
MAX_META = 2048
MAX_UPDATES = 64
MAX_SYNC_MEMBERS = 1024
_U32 = (1 << 32) - 1


class MemberState(Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_LIVE = (MemberState.ALIVE, MemberState.SUSPECT)
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
        protocol_version=_int(f[6], f"{what}.protocol_version", 0, _U32),
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
        seq = _int(f[1], "ping.seq", 0, _U32)
        return Ping(seq, _dec_source(f[2], max_meta), target, _dec_updates(f[4], max_meta))
    if tag == _TAGS[Ack] and type(tag) is int:
        _list(f, "ack", 4)
        seq = _int(f[1], "ack.seq", 0, _U32)
        return Ack(seq, _dec_source(f[2], max_meta), _dec_updates(f[3], max_meta))
    if tag == _TAGS[PingReq] and type(tag) is int:
        _list(f, "ping_req", 6)
        a = _list(f[4], "ping_req.target_addr", 2)
        return PingReq(
            _int(f[1], "ping_req.seq", 0, _U32),
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


# ------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class MemberJoined:
    member: Member


@dataclass(frozen=True)
class MemberUpdated:
    member: Member


@dataclass(frozen=True)
class MemberSuspected:
    member: Member


@dataclass(frozen=True)
class MemberFailed:
    member: Member


@dataclass(frozen=True)
class MemberLeft:
    member: Member


Event = Union[MemberJoined, MemberUpdated, MemberSuspected, MemberFailed, MemberLeft]


# ------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MembershipConfig:
    """Timing and size knobs; LAN defaults after memberlist's DefaultLANConfig."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    #: Base (minimum) suspicion timeout for rings of up to 10 nodes.
    suspicion_timeout: float = 4.0
    #: Without confirmations the timeout is this multiple of the base.
    suspicion_max_mult: float = 3.0
    #: Independent confirmations that shrink the timeout to the base (needs n - 2 >= this).
    suspicion_confirmations: int = 2
    indirect_probes: int = 3
    gossip_interval: float = 0.2
    gossip_fanout: int = 3
    #: Each update is sent retransmit_mult x ceil(log10(n + 1)) times.
    retransmit_mult: int = 4
    #: Budget for piggy-backed updates on pings, acks and gossip (fits one datagram).
    max_payload_bytes: int = 1200
    #: Push-pull full state with one random member this often.
    sync_interval: float = 10.0
    #: Retry known addresses without a live member, and dead members, this often.
    reconnect_interval: float = 2.0
    #: Forget dead and left members after this long.
    reap_after: float = 300.0
    max_members: int = 256
    #: Longest metadata a member may carry, in bytes: the local node's is refused above it,
    #: a peer's payload holding a longer one is junk, so every node of a ring needs the same
    #: value. memberlist allows 512 bytes; the ring's metadata (:mod:`ringd.core.ringmeta`)
    #: takes ~300 bytes serving, but its bounds (three plan hashes, a fingerprint, a
    #: 240-character refusal, model names) reach ~1.0 KB in ASCII and ~1.7 KB with a
    #: multi-byte refusal: 2 KiB holds them with room for fields to come. A record too big to
    #: ride next to a probe within ``max_payload_bytes`` (metadata over ~700 bytes) spreads
    #: only by push-pull and its owner's own messages.
    max_meta_bytes: int = MAX_META

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout < self.probe_interval:
            raise LocalProtocolError(
                f"membership: need 0 < probe_timeout ({self.probe_timeout}) "
                f"< probe_interval ({self.probe_interval})"
            )
        if min(self.suspicion_timeout, self.gossip_interval, self.reconnect_interval) <= 0:
            raise LocalProtocolError("membership: timeouts and intervals must be positive")
        if not 0 <= self.max_meta_bytes <= MAX_PAYLOAD // 16:
            raise LocalProtocolError(
                f"membership: max_meta_bytes ({self.max_meta_bytes}) must be in "
                f"0..{MAX_PAYLOAD // 16}"
            )

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> MembershipConfig:
        """Take the timing fields a :class:`ringd.config.Settings` carries."""
        values = {
            k: getattr(settings, k)
            for k in ("probe_interval", "probe_timeout", "suspicion_timeout", "indirect_probes")
        }
        if getattr(settings, "datagram_size", 0):  # 0: path MTU; gossip keeps to 1400-byte datagrams
            values["max_payload_bytes"] = max(512, min(1400, settings.datagram_size) - 200)
        values.update(overrides)
        return cls(**values)


# ------------------------------------------------------------------------ state machine
@dataclass
class _Suspicion:
    start: float
    k: int
    min: float
    max: float
    confirmations: set[str]

    def deadline(self) -> float:
        n = len(self.confirmations) - 1  # the first suspecter does not count
        if self.k < 1:
            return self.start + self.min
        frac = math.log(n + 1) / math.log(self.k + 1)
        timeout = max(self.min, self.max - frac * (self.max - self.min))
        return self.start + timeout


@dataclass
class _Entry:
    member: Member
    since: float
    suspicion: _Suspicion | None = None
    rtt: float | None = None
    last_rtt: float | None = None
    dead_notice_at: float = -math.inf


@dataclass
class _Probe:
    seq: int
    target: str
    sent: float
    indirect_at: float
    acked: bool = False
    indirect_sent: bool = False


@dataclass
class _Queued:
    update: Update
    packed: bytes
    transmits: int
    order: int


@dataclass
class _Relay:
    requester: Addr
    seq: int
    expires: float


class Membership:
    """One node's membership state machine. See the module docstring for the loop."""

    def __init__(
        self,
        node_id: str,
        name: str,
        addr: Addr,
        meta: bytes,
        *,
        rng: random.Random,
        config: MembershipConfig = MembershipConfig(),
        incarnation: int = 0,
        protocol_version: int = PROTOCOL_VERSION,
    ) -> None:
        self.config = config
        self._rng = rng
        self._check_meta(meta)
        self._self = Member(
            node_id, name, addr, incarnation, MemberState.ALIVE, meta, protocol_version
        )
        self._members: dict[str, _Entry] = {}
        self._events: deque[Event] = deque()
        self._out: list[tuple[Addr, bytes]] = []
        self._queue: dict[str, _Queued] = {}
        self._queue_order = 0
        self._seq = 0
        self._probe: _Probe | None = None
        self._probe_list: list[str] = []
        self._relays: dict[int, _Relay] = {}
        self._addrs: dict[Addr, str | None] = {}  # known peer addresses -> node id seen there
        self._self_addrs: set[Addr] = {addr}
        self._started = False
        self._next_probe = math.inf
        self._next_gossip = math.inf
        self._next_reconnect = math.inf
        self._next_sync = math.inf
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "pings_sent",
                "acks_received",
                "indirect_probes",
                "suspicions",
                "failures",
                "refutations",
                "rejected_payloads",
                "ignored_messages",
                "syncs_sent",
            ),
            0,
        )

    # ---------------------------------------------------------------------- public API
    @property
    def node_id(self) -> str:
        return self._self.node_id

    @property
    def local(self) -> Member:
        return self._self

    @property
    def leaving(self) -> bool:
        return self._self.state is MemberState.LEFT

    @property
    def leave_complete(self) -> bool:
        """After :meth:`leave`: the LEFT update has been sent as often as gossip asks
        (at once when no live member is left to tell)."""
        return self.leaving and (self.node_id not in self._queue or not self._live_ids())

    def join(self, seeds: Iterable[Addr], now: float) -> None:
        """Start the timers (call once, with [] if there are no static peers) and push our
        state to each seed address."""
        if not self._started:
            self._started = True
            self._next_probe = now + self.config.probe_interval
            self._next_gossip = now
            self._next_reconnect = now + self.config.reconnect_interval
            self._next_sync = now + self.config.sync_interval
        for addr in seeds:
            self.add_peer_address(addr, now)

    def add_peer_address(self, addr: Addr, now: float) -> None:
        """A peer address (static or discovered, an IP, not a name): push our state there
        unless a live member already answers at it."""
        addr = (addr[0], int(addr[1]))
        if addr in self._self_addrs or self.leaving:
            return
        if addr not in self._addrs and len(self._addrs) >= self.config.max_members:
            return
        owner = self._addrs.setdefault(addr, None)
        if not self._is_live_at(owner, addr):
            self._send_sync(addr, reply=True)

    def receive(self, payload: bytes, from_addr: Addr, now: float) -> None:
        """Handle one payload from ``from_addr``. Junk raises RemoteProtocolError (counted)."""
        try:
            msg = decode_payload(payload, self.config.max_meta_bytes)
        except RemoteProtocolError:
            self.counters["rejected_payloads"] += 1
            raise
        src = msg.source
        if src.node_id == self.node_id:
            self._self_addrs.add(from_addr)
            self._addrs.pop(from_addr, None)
            self.counters["ignored_messages"] += 1
            return
        if from_addr in self._addrs:
            self._addrs[from_addr] = src.node_id
        self._merge(Update(src, src.node_id), now, direct_from=from_addr)
        if isinstance(msg, Sync):
            for m in msg.members:
                self._merge_synced(m, src.node_id, now)
        else:
            for u in msg.updates:
                self._merge(u, now)

        if isinstance(msg, Ping):
            if msg.target_id is not None and msg.target_id != self.node_id:
                self.counters["ignored_messages"] += 1
            else:
                self._send(from_addr, Ack(msg.seq, self._self), piggyback=True)
        elif isinstance(msg, Ack):
            self._on_ack(msg, now)
        elif isinstance(msg, PingReq):
            self._gc_relays(now)
            if len(self._relays) < 4 * self.config.max_members:
                seq = self._next_seq()
                self._relays[seq] = _Relay(from_addr, msg.seq, now + self.config.probe_interval)
                self._send(msg.target_addr, Ping(seq, self._self, msg.target_id), piggyback=True)
        elif isinstance(msg, Sync) and msg.reply:
            self._send_sync(from_addr, reply=False)

    def handle_timer(self, now: float) -> None:
        if not self._started:
            return
        cfg = self.config
        for entry in list(self._members.values()):
            s = entry.suspicion
            if s is not None and now >= s.deadline():
                m = entry.member
                self._set(entry, dataclasses.replace(m, state=MemberState.DEAD), now)
                self._enqueue(Update(entry.member, self.node_id))
                self.counters["failures"] += 1
                log.info(
                    "member %s (%s) failed: no refutation within %.1f s",
                    m.name,
                    m.node_id,
                    now - s.start,
                )
        p = self._probe
        if p is not None and not p.acked and not p.indirect_sent and now >= p.indirect_at:
            self._send_indirect(p)
        if now >= self._next_probe:
            self._probe_tick(now)
            self._next_probe = max(
                self._next_probe + cfg.probe_interval, now + cfg.probe_interval / 2
            )
        if now >= self._next_gossip:
            if self._queue:
                self._gossip_tick()
            self._next_gossip = now + cfg.gossip_interval
        if now >= self._next_reconnect:
            self._reconnect_tick(now)
            self._next_reconnect = now + cfg.reconnect_interval
        if now >= self._next_sync:
            live = self._live_ids()
            if live and not self.leaving:
                target = self._members[self._rng.choice(sorted(live))].member
                self._send_sync(target.addr, reply=True)
            self._next_sync = now + cfg.sync_interval

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next needs to run, or None."""
        if not self._started:
            return None
        times = [self._next_probe, self._next_reconnect, self._next_sync]
        if self._queue:
            times.append(self._next_gossip)
        p = self._probe
        if p is not None and not p.acked and not p.indirect_sent:
            times.append(p.indirect_at)
        times.extend(e.suspicion.deadline() for e in self._members.values() if e.suspicion)
        t = min(times)
        return None if t == math.inf else t

    def outbox(self) -> list[tuple[Addr, bytes]]:
        """Drain the payloads to send: ``[(addr, payload), ...]``."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        out = list(self._events)
        self._events.clear()
        return out

    def leave(self, now: float) -> None:
        """Graceful leave: gossip LEFT (peers record it as left, not failed) and stop probing."""
        if self.leaving:
            return
        self._self = dataclasses.replace(
            self._self, state=MemberState.LEFT, incarnation=self._self.incarnation + 1
        )
        self._probe = None
        self._next_probe = math.inf
        self._next_reconnect = math.inf
        self._next_sync = math.inf
        update = Update(self._self, self.node_id)
        self._enqueue(update)
        for node_id in sorted(self._live_ids()):
            self._send(self._members[node_id].member.addr, Broadcast(self._self, (update,)))

    def update_meta(self, meta: bytes) -> bool:
        """Replace the local node's metadata; gossips it with a new incarnation if the bytes
        changed (True), else does nothing (False)."""
        self._check_meta(meta)
        if meta == self._self.meta:
            return False
        self._set_self(meta=meta)
        return True

    def members(self) -> list[Member]:
        """Every known member including the local node, by node id."""
        return sorted(
            [self._self] + [e.member for e in self._members.values()], key=lambda m: m.node_id
        )

    def member(self, node_id: str) -> Member | None:
        if node_id == self.node_id:
            return self._self
        e = self._members.get(node_id)
        return e.member if e else None

    def live_members(self) -> list[Member]:
        """The members a ring may hold, by node id: the local node unless it is leaving, and
        every ALIVE or SUSPECT member that speaks our protocol version."""
        me = self._self
        live = [] if self.leaving else [me]
        live += [
            e.member
            for e in self._members.values()
            if e.member.state in _LIVE and e.member.protocol_version == me.protocol_version
        ]
        return sorted(live, key=lambda m: m.node_id)

    def rtt(self, node_id: str) -> float | None:
        """Smoothed round trip (seconds) of direct probes to ``node_id``."""
        e = self._members.get(node_id)
        return e.rtt if e else None

    def stats(self) -> dict[str, Any]:
        def row(m: Member, e: _Entry | None) -> dict[str, Any]:
            return {
                "node_id": m.node_id,
                "name": m.name,
                "addr": f"{m.addr[0]}:{m.addr[1]}",
                "state": m.state.value,
                "incarnation": m.incarnation,
                "protocol_version": m.protocol_version,
                "meta_bytes": len(m.meta),
                "rtt_ms": None if e is None or e.rtt is None else round(e.rtt * 1000, 3),
                "last_rtt_ms": None
                if e is None or e.last_rtt is None
                else round(e.last_rtt * 1000, 3),
                "local": e is None,
            }

        return {
            "node_id": self.node_id,
            "members": [row(m, self._members.get(m.node_id)) for m in self.members()],
            "counters": dict(self.counters),
        }

    # --------------------------------------------------------------------- merging state
    def _merge(self, u: Update, now: float, direct_from: Addr | None = None) -> None:
        m = u.member
        if m.node_id == self.node_id:
            self._about_self(m)
            return
        entry = self._members.get(m.node_id)
        if entry is None:
            if m.state is not MemberState.ALIVE:
                return
            if len(self._members) >= self.config.max_members:
                self.counters["ignored_messages"] += 1
                return
            entry = _Entry(m, now)
            self._members[m.node_id] = entry
            self._emit_transition(None, m)
            self._enqueue(u)
            return
        cur = entry.member
        if m.state is MemberState.ALIVE:
            if m.incarnation > cur.incarnation:
                self._set(entry, m, now)
                self._enqueue(u)
            elif (
                direct_from is not None
                and cur.state in (MemberState.DEAD, MemberState.LEFT)
                and cur.incarnation >= m.incarnation
            ):
                self._notify_dead(entry, direct_from, now)
        elif m.state is MemberState.SUSPECT:
            if m.incarnation < cur.incarnation or cur.state not in _LIVE:
                return
            if cur.state is MemberState.SUSPECT and m.incarnation == cur.incarnation:
                s = entry.suspicion
                if (
                    s is not None
                    and u.origin not in s.confirmations
                    and len(s.confirmations) <= s.k
                ):
                    s.confirmations.add(u.origin)
                    self._enqueue(u)
                return
            new = (
                m
                if m.incarnation > cur.incarnation
                else dataclasses.replace(cur, state=MemberState.SUSPECT)
            )
            self._suspect(entry, new, u.origin, now)
        elif m.state is MemberState.DEAD:
            if m.incarnation < cur.incarnation or cur.state not in _LIVE:
                return
            self._set(
                entry,
                dataclasses.replace(cur, state=MemberState.DEAD, incarnation=m.incarnation),
                now,
            )
            self._enqueue(u)
        else:  # LEFT
            if m.incarnation < cur.incarnation or cur.state is MemberState.LEFT:
                return
            self._set(
                entry,
                dataclasses.replace(
                    m, meta=m.meta if m.incarnation > cur.incarnation else cur.meta
                ),
                now,
            )
            self._enqueue(u)

    def _merge_synced(self, m: Member, sender: str, now: float) -> None:
        # As memberlist's mergeState: a remote DEAD claim only makes us suspect the member.
        if m.state is MemberState.DEAD and m.node_id != self.node_id:
            m = dataclasses.replace(m, state=MemberState.SUSPECT)
        self._merge(
            Update(m, m.node_id if m.state in (MemberState.ALIVE, MemberState.LEFT) else sender),
            now,
        )

    def _about_self(self, m: Member) -> None:
        if self.leaving:
            return
        me = self._self
        stale = m.incarnation > me.incarnation or (
            m.incarnation == me.incarnation and m.state is not MemberState.ALIVE
        )
        if m.state is MemberState.ALIVE and m.incarnation == me.incarnation and m != me:
            stale = True  # an earlier life of ours at the same incarnation
        if stale:
            self.counters["refutations"] += 1
            log.info("refuting a %s claim about us at incarnation %d", m.state.value, m.incarnation)
            self._set_self(incarnation=max(m.incarnation, me.incarnation) + 1)

    def _suspect(self, entry: _Entry, new: Member, origin: str, now: float) -> None:
        cfg = self.config
        n = len(self._live_ids()) + 1
        k = cfg.suspicion_confirmations if n - 2 >= cfg.suspicion_confirmations else 0
        base = cfg.suspicion_timeout * max(1.0, math.log10(max(1, n)))
        self._set(entry, new, now)
        entry.suspicion = _Suspicion(now, k, base, cfg.suspicion_max_mult * base, {origin})
        self._enqueue(Update(new, origin))
        self.counters["suspicions"] += 1

    def _set(self, entry: _Entry, new: Member, now: float) -> None:
        old = entry.member
        entry.member = new
        if new.state is not old.state or new.incarnation != old.incarnation:
            entry.since = now
        if new.state is not MemberState.SUSPECT:
            entry.suspicion = None
        self._emit_transition(old, new)

    def _emit_transition(self, old: Member | None, new: Member) -> None:
        was = old.state if old else None
        st = new.state
        if st is MemberState.ALIVE:
            if was in (None, MemberState.DEAD, MemberState.LEFT):
                self._events.append(MemberJoined(new))
            elif was is MemberState.SUSPECT or old != new:
                self._events.append(MemberUpdated(new))
        elif st is MemberState.SUSPECT:
            if was is MemberState.ALIVE:
                self._events.append(MemberSuspected(new))
        elif st is MemberState.DEAD:
            if was is not MemberState.DEAD:
                self._events.append(MemberFailed(new))
        elif was is not MemberState.LEFT:
            self._events.append(MemberLeft(new))

    def _check_meta(self, meta: bytes) -> None:
        if type(meta) is not bytes or len(meta) > self.config.max_meta_bytes:
            raise LocalProtocolError(
                f"membership: metadata must be bytes of at most {self.config.max_meta_bytes}, "
                f"got {type(meta).__name__}"
                + (f" of {len(meta)}" if isinstance(meta, bytes) else "")
            )

    def _set_self(self, **changes: Any) -> None:
        inc = changes.pop("incarnation", self._self.incarnation + 1)
        self._self = dataclasses.replace(self._self, incarnation=inc, **changes)
        self._enqueue(Update(self._self, self.node_id))

    def _notify_dead(self, entry: _Entry, addr: Addr, now: float) -> None:
        """A member we hold as dead/left talks to us: tell it, so it refutes and rejoins."""
        if now - entry.dead_notice_at < self.config.probe_interval:
            return
        entry.dead_notice_at = now
        m = entry.member
        self._send(addr, Broadcast(self._self, (Update(m, self.node_id),)))

    def _live_ids(self) -> list[str]:
        return [i for i, e in self._members.items() if e.member.state in _LIVE]

    def _is_live_at(self, node_id: str | None, addr: Addr) -> bool:
        if node_id is not None:
            e = self._members.get(node_id)
            if e is not None and e.member.state in _LIVE:
                return True
        return any(
            e.member.addr == addr and e.member.state in _LIVE for e in self._members.values()
        )

    # ------------------------------------------------------------------------ probing
    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _U32
        return self._seq

    def _probe_tick(self, now: float) -> None:
        p = self._probe
        if p is not None and not p.acked:
            entry = self._members.get(p.target)
            if entry is not None and entry.member.state is MemberState.ALIVE:
                log.info(
                    "member %s (%s) suspected: no ack to probe %d",
                    entry.member.name,
                    p.target,
                    p.seq,
                )
                self._suspect(
                    entry,
                    dataclasses.replace(entry.member, state=MemberState.SUSPECT),
                    self.node_id,
                    now,
                )
            elif (
                entry is not None and entry.member.state is MemberState.SUSPECT and entry.suspicion
            ):
                self._merge(Update(entry.member, self.node_id), now)  # our own confirmation
        self._probe = None
        self._reap(now)
        self._gc_relays(now)
        target = self._pick_probe_target()
        if target is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(seq, target.node_id, now, now + self.config.probe_timeout)
        self._send(target.addr, Ping(seq, self._self, target.node_id), piggyback=True)
        self.counters["pings_sent"] += 1

    def _pick_probe_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_list:
                node_id = self._probe_list.pop()
                e = self._members.get(node_id)
                if e is not None and e.member.state in _LIVE:
                    return e.member
            self._probe_list = sorted(self._live_ids())
            self._rng.shuffle(self._probe_list)
        return None

    def _send_indirect(self, p: _Probe) -> None:
        p.indirect_sent = True
        target = self._members.get(p.target)
        if target is None:
            return
        helpers = sorted(
            i
            for i in self._live_ids()
            if i != p.target and self._members[i].member.state is MemberState.ALIVE
        )
        for node_id in self._rng.sample(helpers, min(self.config.indirect_probes, len(helpers))):
            req = PingReq(p.seq, self._self, p.target, target.member.addr)
            self._send(self._members[node_id].member.addr, req, piggyback=True)
            self.counters["indirect_probes"] += 1

    def _on_ack(self, msg: Ack, now: float) -> None:
        self.counters["acks_received"] += 1
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self._send(relay.requester, Ack(relay.seq, self._self), piggyback=True)
            return
        p = self._probe
        if p is None or p.seq != msg.seq or p.acked:
            return
        p.acked = True
        entry = self._members.get(p.target)
        if entry is not None and msg.source.node_id == p.target and not p.indirect_sent:
            sample = now - p.sent
            entry.last_rtt = sample
            entry.rtt = sample if entry.rtt is None else entry.rtt + (sample - entry.rtt) / 8

    def _gc_relays(self, now: float) -> None:
        for seq in [s for s, r in self._relays.items() if r.expires <= now]:
            del self._relays[seq]

    def _reap(self, now: float) -> None:
        for node_id in [
            i
            for i, e in self._members.items()
            if e.member.state not in _LIVE and now - e.since >= self.config.reap_after
        ]:
            del self._members[node_id]
            self._queue.pop(node_id, None)

    # ------------------------------------------------------------------------ gossip
    def _enqueue(self, u: Update) -> None:
        self._queue_order += 1
        packed = msgpack.packb(_enc_updates([u])[0], use_bin_type=True)
        self._queue[u.member.node_id] = _Queued(u, packed, 0, self._queue_order)

    def _retransmit_limit(self) -> int:
        n = len(self._live_ids()) + 1
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def _take_updates(self, base_size: int) -> tuple[Update, ...]:
        budget = self.config.max_payload_bytes - base_size - 5
        picked: list[Update] = []
        limit = self._retransmit_limit()
        for q in sorted(self._queue.values(), key=lambda q: (q.transmits, -q.order)):
            if len(picked) >= MAX_UPDATES:
                break
            if len(q.packed) > budget:
                continue
            budget -= len(q.packed)
            picked.append(q.update)
            q.transmits += 1
            if q.transmits >= limit:
                del self._queue[q.update.member.node_id]
        return tuple(picked)

    def _send(self, addr: Addr, msg: Message, piggyback: bool = False) -> None:
        if piggyback and self._queue and not isinstance(msg, Sync):
            updates = self._take_updates(len(to_payload(msg)))
            if updates:
                msg = dataclasses.replace(msg, updates=updates)
        self._out.append((addr, to_payload(msg)))

    def _gossip_tick(self) -> None:
        live = sorted(self._live_ids())
        targets = self._rng.sample(live, min(self.config.gossip_fanout, len(live)))
        if not targets:
            return
        for node_id in targets:
            if not self._queue:
                break
            self._send(self._members[node_id].member.addr, Broadcast(self._self), piggyback=True)

    def _send_sync(self, addr: Addr, reply: bool) -> None:
        members = [e.member for _, e in sorted(self._members.items())][: MAX_SYNC_MEMBERS - 1]
        self._send(addr, Sync(self._self, tuple(members), reply))
        self.counters["syncs_sent"] += 1

    def _reconnect_tick(self, now: float) -> None:
        if self.leaving:
            return
        candidates = {
            addr for addr, owner in self._addrs.items() if not self._is_live_at(owner, addr)
        }
        candidates |= {
            e.member.addr for e in self._members.values() if e.member.state is MemberState.DEAD
        }
        candidates -= self._self_addrs
        for addr in self._rng.sample(sorted(candidates), min(8, len(candidates))):
            self._send_sync(addr, reply=True)
