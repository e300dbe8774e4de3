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

A one-shot prober (``ringctl ping``) is no member: it sends a Ping whose record says LEFT.
An unknown member that has left is never added, so the prober gets its Ack (the node's own
record, and no piggy-backed updates) and leaves no trace in the membership.

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

Around this state machine: :mod:`ringd.core.swim_wire` holds the records and messages and
their msgpack codec (:func:`~ringd.core.swim_wire.decode_payload` bounds and type-checks
every field), :mod:`ringd.core.swim_gossip` the update queue and the suspicion timer, and
:mod:`ringd.core.swim_config` the knobs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Union

from ringd import PROTOCOL_VERSION
from ringd.core.swim_config import MembershipConfig
from ringd.core.swim_gossip import Suspicion, UpdateQueue
from ringd.core.swim_wire import (
    MAX_SYNC_MEMBERS,
    U32,
    Ack,
    Addr,
    Broadcast,
    Member,
    MemberState,
    Message,
    Ping,
    PingReq,
    Sync,
    Update,
    decode_payload,
    to_payload,
)
from ringd.errors import LocalProtocolError, RemoteProtocolError

log = logging.getLogger(__name__)

_LIVE = (MemberState.ALIVE, MemberState.SUSPECT)


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


# ------------------------------------------------------------------------ state machine
@dataclass
class _Entry:
    member: Member
    since: float
    suspicion: Suspicion | None = None
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
        self._queue = UpdateQueue()
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
                # A prober that is no member (its record says LEFT, so the merge above did
                # not add it) gets a bare ack: the updates' transmissions are for members.
                self._send(from_addr, Ack(msg.seq, self._self),
                           piggyback=src.node_id in self._members)
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
        self._set(entry, new, now)
        entry.suspicion = Suspicion.begin(
            now,
            origin,
            n,
            timeout=cfg.suspicion_timeout,
            max_mult=cfg.suspicion_max_mult,
            confirmations=cfg.suspicion_confirmations,
        )
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
        self._seq = (self._seq + 1) & U32
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
            self._queue.discard(node_id)

    # ------------------------------------------------------------------------ gossip
    def _enqueue(self, u: Update) -> None:
        self._queue.put(u)

    def _retransmit_limit(self) -> int:
        n = len(self._live_ids()) + 1
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def _take_updates(self, base_size: int) -> tuple[Update, ...]:
        budget = self.config.max_payload_bytes - base_size - 5
        return self._queue.take(budget, self._retransmit_limit())

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
