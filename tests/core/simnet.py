"""An in-memory datagram network with a fake clock, for sans-I/O cores.

Deterministic for a given seed: per-message delay (base + uniform jitter), random loss,
partitions, crashed nodes, and a filter to drop chosen messages. Endpoints are any
object with ``addr``, ``receive(payload, src, now)``, ``handle_timer(now)``,
``get_timer()`` and ``outbox()``; :class:`MemberNode` wraps a Membership,
:class:`RingNode` wires Membership + the ring's metadata + Agreement + a fake shard loader
the way the daemon does.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ringd.core.agreement import Agreement, AgreementConfig, LoadShard, PlanDropped
from ringd.core.membership import Membership
from ringd.core.plan import ModelShape
from ringd.core.ringmeta import (
    Holding,
    MetaDecoder,
    NodeMeta,
    NodePhase,
    View,
    adopt_active_model,
    make_view,
    set_active_model,
)
from ringd.core.swim_config import MembershipConfig
from ringd.core.swim_wire import Addr
from ringd.errors import RemoteProtocolError


class Endpoint(Protocol):
    addr: Addr

    def receive(self, payload: bytes, src: Addr, now: float) -> None: ...

    def handle_timer(self, now: float) -> None: ...

    def get_timer(self) -> float | None: ...

    def outbox(self) -> list[tuple[Addr, bytes]]: ...


@dataclass(order=True)
class _Packet:
    at: float
    seq: int
    src: Addr = field(compare=False)
    dst: Addr = field(compare=False)
    payload: bytes = field(compare=False)


class SimNet:
    def __init__(
        self, seed: int = 0, delay: float = 0.001, jitter: float = 0.0005, loss: float = 0.0
    ) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.delay = delay
        self.jitter = jitter
        self.loss = loss
        #: Drop a message when this returns True: ``drop(src, dst, payload)``.
        self.drop: Callable[[Addr, Addr, bytes], bool] | None = None
        self.nodes: dict[Addr, Endpoint] = {}
        self.down: set[Addr] = set()
        self.groups: list[set[Addr]] | None = None
        self.sent = self.delivered = self.dropped = self.rejected = 0
        self._queue: list[_Packet] = []
        self._seq = 0

    # -------------------------------------------------------------------- topology
    def add(self, node: Endpoint) -> Endpoint:
        self.nodes[node.addr] = node
        self.down.discard(node.addr)
        self._flush(node)
        return node

    def crash(self, addr: Addr) -> None:
        """The node stops: no timers, nothing sent or received."""
        self.down.add(addr)

    def partition(self, *groups: set[Addr]) -> None:
        """Only nodes in the same group can talk (nodes in no group talk to no one)."""
        self.groups = [set(g) for g in groups]

    def heal(self) -> None:
        self.groups = None

    def connected(self, a: Addr, b: Addr) -> bool:
        if a in self.down or b in self.down:
            return False
        return self.groups is None or any(a in g and b in g for g in self.groups)

    # ------------------------------------------------------------------------- I/O
    def inject(self, src: Addr, dst: Addr, payload: bytes) -> None:
        """Deliver raw bytes to ``dst`` as if from ``src`` (after the usual delay)."""
        self._push(src, dst, payload)

    def _push(self, src: Addr, dst: Addr, payload: bytes) -> None:
        self.sent += 1
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        if self.drop is not None and self.drop(src, dst, payload):
            self.dropped += 1
            return
        self._seq += 1
        at = self.now + self.delay + self.jitter * self.rng.random()
        heapq.heappush(self._queue, _Packet(at, self._seq, src, dst, payload))

    def _flush(self, node: Endpoint) -> None:
        for dst, payload in node.outbox():
            if node.addr in self.down:
                continue
            self._push(node.addr, dst, payload)

    # ------------------------------------------------------------------------ time
    def _next_timer(self) -> tuple[float, Endpoint | None]:
        best, who = math.inf, None
        for addr, node in self.nodes.items():
            if addr in self.down:
                continue
            t = node.get_timer()
            if t is not None and t < best:
                best, who = t, node
        return best, who

    def step(self, until: float) -> bool:
        """Run the next packet or timer due at or before ``until``. False if none."""
        for node in list(self.nodes.values()):
            self._flush(node)  # what calls made outside the loop (join, leave...) queued
        t_timer, node = self._next_timer()
        t_packet = self._queue[0].at if self._queue else math.inf
        t = min(t_timer, t_packet)
        if t > until:
            return False
        self.now = max(self.now, t)
        if t_packet <= t_timer:
            p = heapq.heappop(self._queue)
            dst = self.nodes.get(p.dst)
            if dst is None or not self.connected(p.src, p.dst):
                self.dropped += 1
                return True
            self.delivered += 1
            try:
                dst.receive(p.payload, p.src, self.now)
            except RemoteProtocolError:
                self.rejected += 1
            self._flush(dst)
        else:
            assert node is not None
            node.handle_timer(self.now)
            self._flush(node)
        return True

    def run_until(self, t: float, max_steps: int = 2_000_000) -> None:
        for _ in range(max_steps):
            if not self.step(t):
                self.now = max(self.now, t)
                return
        raise AssertionError(
            f"simulation did not reach t={t} in {max_steps} steps (stuck at {self.now})"
        )

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_true(
        self, pred: Callable[[], bool], timeout: float, max_steps: int = 2_000_000
    ) -> float:
        """Advance until ``pred()`` holds; return the time. Fails after ``timeout`` (simulated)."""
        deadline = self.now + timeout
        for _ in range(max_steps):
            if pred():
                return self.now
            if not self.step(deadline):
                self.now = deadline
                if pred():
                    return self.now
                raise AssertionError(f"condition not met by t={deadline:.3f}")
        raise AssertionError("too many steps")


# -------------------------------------------------------------------------- endpoints
def meta_for(usable: int = 10 * 2**30, model: str = "tiny", **kw: Any) -> NodeMeta:
    return NodeMeta(
        usable_memory=usable, total_memory=2 * usable, model=model,
        holdings=(Holding(model, f"id-of-{model}", ((0, 1),), 100),), **kw
    )


class MemberNode:
    """A Membership on the simulated network; keeps every event it emitted with its time."""

    def __init__(
        self,
        node_id: str,
        port: int,
        *,
        seed: int,
        meta: bytes | None = None,
        config: MembershipConfig = MembershipConfig(),
        incarnation: int = 0,
        protocol_version: int | None = None,
    ) -> None:
        self.addr: Addr = ("10.0.0.1", port)
        extra = {} if protocol_version is None else {"protocol_version": protocol_version}
        self.m = Membership(
            node_id,
            node_id,
            self.addr,
            meta_for().encode() if meta is None else meta,
            rng=random.Random(seed),
            config=config,
            incarnation=incarnation,
            **extra,
        )
        self.log: list[tuple[float, Any]] = []

    def receive(self, payload: bytes, src: Addr, now: float) -> None:
        try:
            self.m.receive(payload, src, now)
        finally:
            self._drain(now)

    def handle_timer(self, now: float) -> None:
        self.m.handle_timer(now)
        self._drain(now)

    def get_timer(self) -> float | None:
        return self.m.get_timer()

    def outbox(self) -> list[tuple[Addr, bytes]]:
        return self.m.outbox()

    def _drain(self, now: float) -> int:
        n = 0
        while (ev := self.m.next_event()) is not None:
            self.log.append((now, ev))
            n += 1
        return n

    def state_of(self, node_id: str) -> str | None:
        m = self.m.member(node_id)
        return m.state.value if m else None


class RingNode(MemberNode):
    """Membership + Agreement + a loader that takes ``load_time`` seconds, wired as the daemon does:
    after every input, read the members' metadata, adopt the ring-wide model setting, feed the
    agreement with the view and metadata, publish its fields."""

    def __init__(
        self,
        node_id: str,
        port: int,
        *,
        seed: int,
        usable: int,
        shape: ModelShape,
        load_time: float = 0.3,
        config: MembershipConfig = MembershipConfig(),
        agreement: AgreementConfig = AgreementConfig(),
        last_epoch: int = 0,
    ) -> None:
        self.meta = meta_for(usable, shape.name)
        super().__init__(node_id, port, seed=seed, meta=self.meta.encode(), config=config)
        self.metas = MetaDecoder()
        self.view: View = make_view([], {})
        self.shape = shape
        self.load_time = load_time
        self.a = Agreement(node_id, config=agreement, last_epoch=last_epoch)
        self.loading: tuple[str, float] | None = None
        #: (time, agreement event) in order
        self.alog: list[tuple[float, Any]] = []
        #: (time, plan hash or None) each time the serving plan changed
        self.serving: list[tuple[float, str | None]] = []
        #: every plan hash this node finished loading its range of
        self.loaded: set[str] = set()

    def handle_timer(self, now: float) -> None:
        t = self.m.get_timer()
        if t is not None and now >= t:
            self.m.handle_timer(now)
        t = self.a.get_timer()
        if t is not None and now >= t:
            self.a.handle_timer(now)
        if self.loading is not None and now >= self.loading[1]:
            plan_hash, _ = self.loading
            self.loading = None
            if self.a.loaded(plan_hash, now):
                self.loaded.add(plan_hash)
        self._drain(now)

    def get_timer(self) -> float | None:
        times = [
            t
            for t in (
                self.m.get_timer(),
                self.a.get_timer(),
                self.loading[1] if self.loading else None,
            )
            if t is not None
        ]
        return min(times) if times else None

    def _drain(self, now: float) -> int:
        for _ in range(100):
            n = super()._drain(now)
            metas = self.metas.decode(self.m.members())
            if not self.m.leaving:
                self.meta = adopt_active_model(self.m.node_id, self.meta, metas)
            metas[self.m.node_id] = self.meta
            self.view = view = make_view(self.m.live_members(), metas)
            shape = self.shape if view.model == self.shape.name else None
            self.a.update(now, view, metas, shape)
            events = self.a.events()
            for ev in events:
                self.alog.append((now, ev))
                if isinstance(ev, LoadShard):
                    self.loading = (ev.plan.hash, now + self.load_time) if ev.assignment else None
                elif isinstance(ev, PlanDropped):
                    self.loading = None
            sp = self.a.serving_plan
            current = sp.hash if sp else None
            if not self.serving or self.serving[-1][1] != current:
                self.serving.append((now, current))
            pub = self.a.published()
            if self.m.leaving:
                pub["phase"] = NodePhase.LEAVING
            changed = self.publish(**pub)
            if not n and not events and not changed:
                return 0
        raise AssertionError("agreement and membership did not settle")

    def publish(self, **changes: Any) -> bool:
        """Change this node's metadata; True if membership gossips new bytes."""
        self.meta = dataclasses.replace(self.meta, **changes)
        return self.m.update_meta(self.meta.encode())

    def use_model(self, model: str, now: float) -> None:
        """``ringctl model use``: make ``model`` the ring-wide active model."""
        self.meta = set_active_model(self.meta, self.metas.decode(self.m.members()), model)
        self.m.update_meta(self.meta.encode())
        self._drain(now)

    def meta_of(self, node_id: str) -> NodeMeta | None:
        """``node_id``'s metadata as this node reads it."""
        return self.metas.decode(self.m.members()).get(node_id)
