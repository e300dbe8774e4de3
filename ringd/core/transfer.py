"""Fetching a model's items from the peers that hold them (sans-I/O; time is passed in).

One :class:`Transfer` fetches the items (tensors, small files, the manifest: see
:mod:`ringd.core.model_manifest` for the keys) a node lacks, from the peers that gossip them.
It does no I/O: the adapter feeds it what happened (:meth:`Transfer.set_holder`,
:meth:`Transfer.chunk_received`, :meth:`Transfer.item_checked`, ...), sends what
:meth:`Transfer.requests_to_send` returns, takes :meth:`Transfer.next_event`, and re-arms one
timer at :meth:`Transfer.get_timer` that calls :meth:`Transfer.handle_timer`.

Rules:

- **Chunks.** An item is fetched in chunks on a fixed grid (``chunk_size``; the last may be
  shorter), so a reply is matched by ``(peer, key, offset)`` and its length is known.
- **One holder per item at a time**, several items (hence several holders) in parallel. All
  bytes of an item come from one holder, so a hash that fails names exactly one culprit.
  Holders are chosen per item, rarest item first, least loaded holder first; a holder gets
  at most ``max_in_flight_per_peer`` bytes requested and not yet received (and all holders
  together ``max_in_flight``), so the memory a fetch needs is bounded by these, not by the
  shard.
- **Checked before it counts.** When every chunk of an item is in, :class:`ItemReceived`
  asks the adapter to check it against the manifest (the sink hashes it) and report with
  :meth:`Transfer.item_checked`. A failed check: the holder served wrong bytes; it is no
  longer used for this model (:class:`HolderRejected`, named in :meth:`Transfer.stats`), its
  items go to other holders. An item whose every holder was rejected fails the transfer
  (:class:`TransferFailed`, with the reason).
- **Timeouts.** A chunk not received within ``request_timeout`` is asked for again from the
  same holder; after ``max_retries`` timeouts of one chunk the holder is set aside for
  ``holder_backoff`` (:class:`HolderStalled`) and its items move to other holders (from
  their first byte: an item never mixes two holders' bytes). A holder that leaves
  (:meth:`Transfer.remove_holder`) is treated the same, at once. Items no usable holder has
  wait (:class:`WaitingForHolders`): a holder may come (back), and the caller decides how
  long to wait.
- **Replies that do not fit** (an item not asked of that peer, an offset not on the grid or
  not outstanding, a wrong length) are refused (``chunk_received`` returns False: do not
  write them) and counted.

Progress (:meth:`Transfer.stats`): bytes checked / bytes to fetch, received, wasted, the
rate over the last ``rate_window`` seconds, and per-holder bytes, chunks, timeouts, state.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from ringd.errors import LocalProtocolError


@dataclass(frozen=True)
class TransferConfig:
    """Tunables of a transfer."""

    chunk_size: int = 1 << 20  # bytes per request (the grid of an item)
    max_in_flight_per_peer: int = 8 << 20  # bytes requested and not yet received, per holder
    max_in_flight: int = 64 << 20  # the same, over all holders
    request_timeout: float = 15.0  # a chunk not received by then is asked for again
    max_retries: int = 3  # timeouts of one chunk before its holder is set aside
    holder_backoff: float = 30.0  # how long a holder that kept timing out is set aside
    rate_window: float = 5.0  # seconds of history behind the reported rate

    def __post_init__(self) -> None:
        if not 0 < self.chunk_size <= self.max_in_flight_per_peer <= self.max_in_flight:
            raise LocalProtocolError("need 0 < chunk_size <= max_in_flight_per_peer "
                                     "<= max_in_flight")
        if self.request_timeout <= 0 or self.max_retries < 1 or self.rate_window <= 0:
            raise LocalProtocolError("request_timeout, max_retries and rate_window must be "
                                     "positive")


# ------------------------------------------------------------------------ effects and events
@dataclass(frozen=True)
class ChunkRequest:
    """Ask ``peer`` for bytes ``[offset, offset + length)`` of item ``key``."""

    peer: str
    key: str
    offset: int
    length: int


@dataclass(frozen=True)
class ItemReceived:
    """Every byte of ``key`` is in (from ``peer``): check it, then call ``item_checked``."""

    key: str
    peer: str


@dataclass(frozen=True)
class HolderRejected:
    """``peer`` served bytes of ``key`` that do not match the manifest: no longer used."""

    peer: str
    key: str


@dataclass(frozen=True)
class HolderStalled:
    """``peer`` kept timing out: set aside until ``until``; its items went elsewhere."""

    peer: str
    until: float


@dataclass(frozen=True)
class WaitingForHolders:
    """No usable holder has these items (yet)."""

    keys: tuple[str, ...]


@dataclass(frozen=True)
class TransferDone:
    """Every item is here and checked."""

    fetched_bytes: int
    seconds: float


@dataclass(frozen=True)
class TransferFailed:
    """The transfer cannot complete: ``reason`` says why (``keys``: the items concerned)."""

    reason: str
    keys: tuple[str, ...]


Event = Union[ItemReceived, HolderRejected, HolderStalled, WaitingForHolders, TransferDone,
              TransferFailed]


# ------------------------------------------------------------------------ stats
@dataclass(frozen=True)
class PeerStats:
    """One holder's part in the transfer."""

    peer: str
    state: str  # "ok", "stalled", "rejected"
    bytes: int  # accepted chunk bytes
    chunks: int
    items_done: int
    in_flight: int
    timeouts: int
    refused: int  # replies that did not fit, and items it said it does not hold
    rate: float  # bytes/s over the rate window
    rejected_for: str | None  # the item whose bytes did not match


@dataclass(frozen=True)
class TransferStats:
    """Progress of a transfer, for ``status``."""

    state: str  # "fetching", "waiting", "done", "failed"
    total_bytes: int  # bytes to fetch (those already here not counted)
    done_bytes: int  # fetched and checked
    received_bytes: int  # accepted chunk bytes, checked or not
    wasted_bytes: int  # received, then discarded (wrong bytes, holder changed mid-item)
    present_bytes: int  # already here when the transfer began
    items_total: int
    items_done: int
    rate: float  # bytes/s over the rate window
    elapsed: float
    eta: float | None  # seconds, at the current rate
    waiting: tuple[str, ...]  # items no usable holder has
    rejected: tuple[str, ...]  # holders that served wrong bytes
    reason: str | None  # why it failed
    peers: tuple[PeerStats, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["peers"] = [dict(p.__dict__) for p in self.peers]
        d["waiting"] = list(self.waiting[:20])
        d["waiting_count"] = len(self.waiting)
        d["rejected"] = list(self.rejected)
        return d


# ------------------------------------------------------------------------ state
class _S(enum.Enum):
    PENDING = "pending"
    ACTIVE = "active"
    RECEIVED = "received"
    DONE = "done"


class _PS(enum.Enum):
    OK = "ok"
    STALLED = "stalled"
    REJECTED = "rejected"


class _Item:
    __slots__ = ("key", "size", "order", "state", "peer", "next_offset", "outstanding",
                 "resend", "tries", "received")

    def __init__(self, key: str, size: int, order: int) -> None:
        self.key, self.size, self.order = key, size, order
        self.state = _S.PENDING
        self.peer: str | None = None  # the holder of the current attempt
        self.next_offset = 0
        self.outstanding: dict[int, float] = {}  # offset -> deadline
        self.resend: set[int] = set()  # offsets whose request timed out, to ask again
        self.tries: dict[int, int] = {}  # offset -> timeouts in this attempt
        self.received = 0  # bytes of the current attempt


class _Peer:
    __slots__ = ("id", "keys", "state", "until", "in_flight", "active", "bytes", "chunks",
                 "items_done", "timeouts", "refused", "rejected_for", "samples")

    def __init__(self, peer: str, keys: set[str]) -> None:
        self.id, self.keys = peer, keys
        self.state = _PS.OK
        self.until = 0.0
        self.in_flight = 0
        self.active: dict[str, _Item] = {}  # items being fetched from it, in assignment order
        self.bytes = self.chunks = self.items_done = self.timeouts = 0
        self.refused = 0
        self.rejected_for: str | None = None
        self.samples: deque[tuple[float, int]] = deque()


class Transfer:
    """Fetch ``items`` (key -> size) not in ``present`` from the peers that hold them."""

    def __init__(self, items: Mapping[str, int], present: Collection[str] = (), *, now: float,
                 config: TransferConfig | None = None) -> None:
        self.config = config or TransferConfig()
        have = set(present)
        self._items: dict[str, _Item] = {}
        for i, (key, size) in enumerate(items.items()):
            if not isinstance(size, int) or size < 0:
                raise LocalProtocolError(f"item {key!r}: bad size {size!r}")
            if key not in have:
                self._items[key] = _Item(key, size, i)
        self._pending: dict[str, _Item] = dict(self._items)
        self._queue: list[_Item] | None = None  # pending by (usable holders, order); lazily
        self._qstart = 0
        self._usable_holders: dict[str, int] = dict.fromkeys(self._items, 0)
        self._present_bytes = sum(s for k, s in items.items() if k in have)
        self._peers: dict[str, _Peer] = {}
        self._events: deque[Event] = deque()
        self._samples: deque[tuple[float, int]] = deque()
        self._start = now
        self._end: float | None = None
        self._in_flight = 0
        self._received = self._wasted = self._done_bytes = 0
        self._items_done = 0
        self._failed: TransferFailed | None = None
        self._waiting: tuple[str, ...] = ()
        if not self._items:
            self._finish(now)

    # ------------------------------------------------------------------ properties
    @property
    def done(self) -> bool:
        """Every item is here and checked."""
        return self._end is not None and self._failed is None

    @property
    def failed(self) -> TransferFailed | None:
        return self._failed

    @property
    def finished(self) -> bool:
        """Done or failed: nothing more will be asked."""
        return self._end is not None

    # ------------------------------------------------------------------ holders
    def set_holder(self, peer: str, keys: Collection[str], now: float) -> None:
        """``peer`` holds ``keys`` (its gossiped holdings, as item keys). Replaces what it
        held before; a holder rejected for this model stays rejected."""
        held = {k for k in keys if k in self._items}
        p = self._peers.get(peer)
        if p is None:
            p = self._peers[peer] = _Peer(peer, set())
        self._count(p, -1)
        lost = p.keys - held
        p.keys = held
        self._count(p, +1)
        for item in list(p.active.values()):
            if item.key in lost:
                self._restart(item)
        self._check_waiting(now)

    def remove_holder(self, peer: str, now: float) -> None:
        """``peer`` left: what was asked of it is moot, its items go to other holders."""
        p = self._peers.get(peer)
        if p is None:
            return
        for item in list(p.active.values()):
            self._restart(item)
        self._count(p, -1)
        del self._peers[peer]
        self._check_waiting(now)

    # ------------------------------------------------------------------ replies
    def chunk_received(self, peer: str, key: str, offset: int, length: int, now: float) -> bool:
        """A reply with ``length`` bytes of ``key`` at ``offset`` from ``peer``. True: write
        them to the sink now (before the next call). False: they do not fit; drop them."""
        p = self._peers.get(peer)
        item = p.active.get(key) if p is not None else None
        if p is None or item is None:
            if p is not None:
                p.refused += 1
            return False
        want = self._chunk_len(item, offset)
        if want is None or length != want:
            p.refused += 1
            return False
        if offset in item.outstanding:
            del item.outstanding[offset]
            p.in_flight -= length
            self._in_flight -= length
        elif offset in item.resend:  # the late reply to a request that timed out
            item.resend.discard(offset)
        else:
            p.refused += 1  # a duplicate, or never asked for
            return False
        item.received += length
        p.bytes += length
        p.chunks += 1
        self._received += length
        self._sample(p.samples, now, length)
        self._sample(self._samples, now, length)
        if item.received == item.size:
            self._received_whole(p, item)
        return True

    def chunk_refused(self, peer: str, key: str, now: float) -> None:
        """``peer`` says it does not hold ``key`` (our view of its holdings was stale)."""
        p = self._peers.get(peer)
        if p is None:
            return
        p.refused += 1
        if key in p.keys:
            p.keys.discard(key)
            if p.state is _PS.OK:
                self._usable_holders[key] -= 1
                self._queue = None
        item = p.active.get(key)
        if item is not None:
            self._restart(item)
        self._check_waiting(now)

    def item_checked(self, key: str, ok: bool, now: float) -> None:
        """The sink's verdict on an item announced by :class:`ItemReceived`."""
        item = self._items.get(key)
        if item is None or item.state is not _S.RECEIVED:
            raise LocalProtocolError(f"item_checked({key!r}) for an item not received")
        p = self._peers.get(item.peer) if item.peer is not None else None
        if ok:
            item.state, item.peer = _S.DONE, None
            self._done_bytes += item.size
            self._items_done += 1
            if p is not None:
                p.items_done += 1
            if self._items_done == len(self._items):
                self._finish(now)
            return
        self._wasted += item.size
        self._restart(item)
        if p is not None and p.state is not _PS.REJECTED:
            self._set_aside(p, _PS.REJECTED)
            p.rejected_for = key
            self._events.append(HolderRejected(p.id, key))
        self._check_failed(now)
        self._check_waiting(now)

    # ------------------------------------------------------------------ requests
    def requests_to_send(self, now: float) -> list[ChunkRequest]:
        """Chunk requests to send now (within the in-flight bounds)."""
        if self._end is not None:
            return []
        self._wake_stalled(now)
        cfg = self.config
        out: list[ChunkRequest] = []
        usable = [p for p in self._peers.values() if p.state is _PS.OK]
        while usable:
            usable.sort(key=lambda p: (p.in_flight, p.id))
            room = []
            for p in usable:
                if (p.in_flight + cfg.chunk_size > cfg.max_in_flight_per_peer
                        or self._in_flight + cfg.chunk_size > cfg.max_in_flight):
                    continue
                req = self._next_request(p)
                if req is None:
                    continue
                self._items[req.key].outstanding[req.offset] = now + cfg.request_timeout
                p.in_flight += req.length
                self._in_flight += req.length
                out.append(req)
                room.append(p)
            usable = room
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------ time
    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next (None: nothing pending)."""
        if self._end is not None:
            return None
        times = [d for p in self._peers.values() for item in p.active.values()
                 for d in item.outstanding.values()]
        times += [p.until for p in self._peers.values() if p.state is _PS.STALLED]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self._end is not None:
            return
        cfg = self.config
        for p in list(self._peers.values()):
            given_up = False
            for item in list(p.active.values()):
                expired = [o for o, d in item.outstanding.items() if d <= now]
                for o in expired:
                    del item.outstanding[o]
                    length = self._chunk_len(item, o) or 0
                    p.in_flight -= length
                    self._in_flight -= length
                    item.resend.add(o)
                    item.tries[o] = item.tries.get(o, 0) + 1
                    given_up = given_up or item.tries[o] >= cfg.max_retries
                    p.timeouts += 1
            if given_up and p.state is _PS.OK:
                self._set_aside(p, _PS.STALLED)
                p.until = now + cfg.holder_backoff
                self._events.append(HolderStalled(p.id, p.until))
        self._wake_stalled(now)
        self._check_waiting(now)

    # ------------------------------------------------------------------ stats
    def stats(self, now: float) -> TransferStats:
        total = sum(i.size for i in self._items.values())
        rate = self._rate(self._samples, now)
        left = total - self._done_bytes
        peers = tuple(PeerStats(p.id, p.state.value, p.bytes, p.chunks, p.items_done,
                                p.in_flight, p.timeouts, p.refused, self._rate(p.samples, now),
                                p.rejected_for)
                      for p in sorted(self._peers.values(), key=lambda p: p.id))
        if self._failed is not None:
            state = "failed"
        elif self._end is not None:
            state = "done"
        elif self._waiting and not any(p.active for p in self._peers.values()):
            state = "waiting"
        else:
            state = "fetching"
        end = self._end if self._end is not None else now
        return TransferStats(
            state=state, total_bytes=total, done_bytes=self._done_bytes,
            received_bytes=self._received, wasted_bytes=self._wasted,
            present_bytes=self._present_bytes, items_total=len(self._items),
            items_done=self._items_done, rate=rate, elapsed=max(0.0, end - self._start),
            eta=0.0 if self._end is not None else (left / rate if rate > 0 else None),
            waiting=self._waiting,
            rejected=tuple(sorted(p.id for p in self._peers.values()
                                  if p.state is _PS.REJECTED)),
            reason=self._failed.reason if self._failed else None, peers=peers)

    # ------------------------------------------------------------------ internals
    def _chunk_len(self, item: _Item, offset: int) -> int | None:
        cs = self.config.chunk_size
        if not isinstance(offset, int) or offset < 0 or offset % cs or offset >= item.size:
            return None
        return min(cs, item.size - offset)

    def _count(self, p: _Peer, sign: int) -> None:
        """Add (or take away) ``p``'s keys from the usable-holder counts."""
        if p.state is _PS.OK:
            for k in p.keys:
                self._usable_holders[k] += sign
            self._queue = None

    def _set_aside(self, p: _Peer, state: _PS) -> None:
        """Stop using ``p`` (rejected or stalled): its items go back to pending."""
        for item in list(p.active.values()):
            self._restart(item)
        self._count(p, -1)
        p.state = state

    def _wake_stalled(self, now: float) -> None:
        for p in self._peers.values():
            if p.state is _PS.STALLED and p.until <= now:
                p.state = _PS.OK
                self._count(p, +1)

    def _next_request(self, p: _Peer) -> ChunkRequest | None:
        """The next chunk to ask ``p`` for: a retry, the next of its items, or a new item."""
        for item in p.active.values():
            if item.resend:
                o = min(item.resend)
                item.resend.discard(o)
                return ChunkRequest(p.id, item.key, o, self._chunk_len(item, o) or 0)
        for item in p.active.values():
            if item.next_offset < item.size:
                return self._advance(p, item)
        while True:
            best = self._pick(p)
            if best is None:
                return None
            del self._pending[best.key]
            best.state, best.peer = _S.ACTIVE, p.id
            p.active[best.key] = best
            if best.size:
                return self._advance(p, best)
            self._received_whole(p, best)  # an empty item: nothing to ask for

    def _pick(self, p: _Peer) -> _Item | None:
        """The pending item ``p`` holds that fewest usable holders have (then item order)."""
        if self._queue is None:
            self._queue = sorted(self._pending.values(),
                                 key=lambda i: (self._usable_holders[i.key], i.order))
            self._qstart = 0
        q = self._queue
        while self._qstart < len(q) and q[self._qstart].state is not _S.PENDING:
            self._qstart += 1
        for i in range(self._qstart, len(q)):
            item = q[i]
            if item.state is _S.PENDING and item.key in p.keys:
                return item
        return None

    def _advance(self, p: _Peer, item: _Item) -> ChunkRequest:
        o = item.next_offset
        length = min(self.config.chunk_size, item.size - o)
        item.next_offset = o + length
        return ChunkRequest(p.id, item.key, o, length)

    def _received_whole(self, p: _Peer, item: _Item) -> None:
        item.state = _S.RECEIVED
        p.active.pop(item.key, None)
        self._events.append(ItemReceived(item.key, p.id))

    def _restart(self, item: _Item) -> None:
        """Back to pending: its next holder sends it again from the first byte."""
        p = self._peers.get(item.peer) if item.peer is not None else None
        if p is not None and item.state is _S.ACTIVE:
            for o in item.outstanding:
                length = self._chunk_len(item, o) or 0
                p.in_flight -= length
                self._in_flight -= length
            p.active.pop(item.key, None)
            self._wasted += item.received
        item.state, item.peer = _S.PENDING, None
        item.next_offset = item.received = 0
        item.outstanding.clear()
        item.resend.clear()
        item.tries.clear()
        self._pending[item.key] = item
        self._queue = None

    def _check_failed(self, now: float) -> None:
        if self._failed is not None:
            return
        dead = []
        for item in self._pending.values():
            knowers = [p for p in self._peers.values() if item.key in p.keys]
            if knowers and all(p.state is _PS.REJECTED for p in knowers):
                dead.append((item, knowers))
        if not dead:
            return
        dead.sort(key=lambda d: d[0].order)
        item, knowers = dead[0]
        names = ", ".join(p.id for p in knowers)
        more = f" (and {len(dead) - 1} more items)" if len(dead) > 1 else ""
        reason = (f"{item.key}: holder {names} served bytes that do not match the model's "
                  f"manifest, and no other node holds it{more}")
        self._failed = TransferFailed(reason, tuple(i.key for i, _ in dead))
        self._events.append(self._failed)
        self._end = now

    def _check_waiting(self, now: float) -> None:
        if self._end is not None:
            self._waiting = ()
            return
        waiting = tuple(sorted((i for i in self._pending.values() if not any(
            p.state is not _PS.REJECTED and i.key in p.keys for p in self._peers.values())),
            key=lambda i: i.order))
        keys = tuple(i.key for i in waiting)
        if keys and set(keys) - set(self._waiting):
            self._events.append(WaitingForHolders(keys))
        self._waiting = keys

    def _finish(self, now: float) -> None:
        self._end = now
        self._events.append(TransferDone(self._done_bytes, now - self._start))

    def _sample(self, samples: deque[tuple[float, int]], now: float, n: int) -> None:
        samples.append((now, n))
        while samples and samples[0][0] < now - self.config.rate_window:
            samples.popleft()

    def _rate(self, samples: deque[tuple[float, int]], now: float) -> float:
        w = self.config.rate_window
        while samples and samples[0][0] < now - w:
            samples.popleft()
        span = min(w, now - self._start)
        return sum(n for _, n in samples) / span if span > 0 else 0.0
