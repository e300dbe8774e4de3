"""The ring's control plane on one node: the membership <-> agreement pump.

SWIM (:mod:`ringd.core.membership`) and the leaderless plan agreement
(:mod:`ringd.core.agreement`) are pure; this feeds them what arrives and the clock, gossips
what they publish, and carries out what the agreement decides: load this node's layers
(:class:`ringd.shard.ShardLoader`), check every member's fingerprint, and turn serving on
or off in the request path (:class:`ringd.runner.Runner`) -- the agreement is the one
authority on whether the ring serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import Any, Callable

from ringd import __version__
from ringd.config import Settings
from ringd.core import wire
from ringd.core.agreement import (
    Agreement,
    LoadShard,
    PlanDropped,
    PlanUnfit,
    RingReady,
    StopServing,
)
from ringd.core.membership import Membership
from ringd.core.plan import Plan, model_shape
from ringd.core.proof import (
    StageClaim,
    fingerprint_problem,
    not_ready_reason,
    refusal_text,
    ring_fingerprint,
)
from ringd.core.ringmeta import MetaDecoder, NodeMeta, NodePhase, adopt_active_model, make_view
from ringd.core.route import Route, Stage
from ringd.core.swim_config import MembershipConfig
from ringd.core.swim_wire import Member
from ringd.errors import RemoteProtocolError, RingdError
from ringd.faults import Fault
from ringd.net.transport import Transport
from ringd.runner import Runner
from ringd.service.sdnotify import notify
from ringd.shard import ShardLoader

log = logging.getLogger(__name__)

Addr = tuple[str, int]


def route_of(plan: Plan) -> Route:
    return Route(plan.epoch, tuple(Stage(a.node_id, a.start, a.end) for a in plan.order),
                 plan.num_layers)


class RingControl:
    """Membership + agreement for one node, and what follows from their decisions."""

    def __init__(self, settings: Settings, node_id: str, addr: Addr, *, info: Any,
                 usable: int, total: int, http_port: int, state: Any, transport: Transport,
                 loader: ShardLoader, runner: Runner, spawn: Callable[[Any], asyncio.Task[Any]],
                 served: tuple[Any, Any], fault: Fault | None = None) -> None:
        self.settings = settings
        self.node_id = node_id
        self.info = info
        self.shape = model_shape(info, settings)
        self.state = state  # ringd.state.NodeState: the plan epoch survives restarts
        self.transport = transport
        self.loader = loader
        self.runner = runner
        self.fault = fault
        self.served = served  # (ServedModel, Tokenizer) of the model this node serves
        self._spawn = spawn
        self._load_task: asyncio.Task[Any] | None = None
        self.ring_fingerprint: str | None = None  # while serving
        self.started = time.monotonic()
        self.timeline: dict[str, float] = {}
        self.ready = asyncio.Event()  # set while the ring serves (sd_notify READY, test hooks)
        self.wake = asyncio.Event()  # set when a timer may have moved earlier
        self.meta = NodeMeta(usable_memory=usable, total_memory=total, models=(info.name,),
                             phase=NodePhase.JOINING, software_version=__version__,
                             http_port=http_port, model=settings.model, model_version=0)
        self._decoder = MetaDecoder()  # the members' metadata as the ring reads it
        self.membership = Membership(node_id, settings.node_name, addr, self.meta.encode(),
                                     rng=random.Random(),
                                     config=MembershipConfig.from_settings(settings))
        self.agreement = Agreement(node_id, last_epoch=state.plan_epoch)

    # ---------------------------------------------------------------- inputs
    def join(self, seeds: list[Addr], now: float) -> None:
        self.membership.join(seeds, now)
        self.pump(now)

    def receive_gossip(self, payload: bytes, addr: Addr, now: float) -> None:
        try:
            self.membership.receive(payload, addr, now)
        except RemoteProtocolError as e:  # counted by membership; one line here
            log.warning("dropped a membership message from %s:%d: %s", addr[0], addr[1],
                        e.message)
            return
        self.pump(now)

    def add_peer_address(self, addr: Addr, now: float) -> None:
        self.membership.add_peer_address(addr, now)
        self.pump(now)

    def handle_timer(self, now: float) -> None:
        self.membership.handle_timer(now)
        self.agreement.handle_timer(now)
        self.pump(now)

    def get_timer(self) -> float | None:
        timers = [t for t in (self.membership.get_timer(), self.agreement.get_timer())
                  if t is not None]
        return min(timers) if timers else None

    def leave(self, now: float) -> None:
        self._publish(phase=NodePhase.LEAVING)  # the LEFT record carries it
        self.membership.leave(now)
        self.pump(now)

    # ---------------------------------------------------------------- the pump
    def pump(self, now: float) -> None:
        """After any input: membership events -> agreement -> published meta -> outbox."""
        for ev in self.membership.events():
            log.debug("membership: %s", ev)
        metas = self._decoder.decode(self.membership.members())
        if not self.membership.leaving:  # the ring-wide model setting outlives its writer
            self.meta = adopt_active_model(self.node_id, self.meta, metas)
        metas[self.node_id] = self.meta
        view = make_view(self.membership.live_members(), metas)
        self.agreement.update(now, view, metas,
                              self.shape if view.model == self.info.name else None)
        for ev in self.agreement.events():
            self._on_agreement(ev, now)
        pub = self.agreement.published()
        if self.membership.leaving:
            pub["phase"] = NodePhase.LEAVING
        self._publish(**pub)
        for addr, payload in self.membership.outbox():
            # SWIM does its own retries: probes must not be masked by retransmission
            self.transport.send(addr, wire.Gossip(payload), reliable=False)
        self.wake.set()

    def _publish(self, **changes: Any) -> None:
        """Change this node's metadata; membership gossips it if the bytes changed."""
        self.meta = dataclasses.replace(self.meta, **changes)
        self.membership.update_meta(self.meta.encode())

    def _on_agreement(self, ev: Any, now: float) -> None:
        if isinstance(ev, StopServing):
            log.warning("ring stops serving plan epoch %d: %s", ev.plan.epoch, ev.reason)
            self.runner.stop_serving(ev.reason)
            self.ring_fingerprint = None
            self.ready.clear()
            notify(status=f"re-forming: {ev.reason}")
        elif isinstance(ev, PlanDropped):
            if self._load_task is not None:
                self._load_task.cancel()
        elif isinstance(ev, LoadShard):
            self.timeline.setdefault("committed", now - self.started)
            self._publish(refusal=None, fingerprint=None)
            self.state.save_plan_epoch(ev.plan.epoch)
            self._load_task = self._spawn(self._load(ev))
        elif isinstance(ev, RingReady):
            self._ring_ready(ev.plan, now)
        elif isinstance(ev, PlanUnfit):
            log.error("the ring cannot hold %s: %s", self.info.name, ev.error)
            notify(status=f"cannot fit the model: {ev.error.message}")

    async def _load(self, ev: LoadShard) -> None:
        plan = ev.plan
        try:
            bandwidth, _ = await self.loader.memory_bandwidth()
            self._publish(memory_bandwidth=int(bandwidth))
            fingerprint = await self.loader.load(plan, ev.assignment,
                                                 status=lambda text: notify(status=text))
        except RingdError as e:
            log.error("cannot serve plan %s: %s", plan.hash[:8], e)
            self.agreement.load_failed(plan.hash,
                                       e.message + (f" (hint: {e.hint})" if e.hint else ""))
            self._publish(refusal=refusal_text(e.message))
        else:
            self._publish(fingerprint=fingerprint)
            self.agreement.loaded(plan.hash, time.monotonic())
        self.pump(time.monotonic())

    def _ring_ready(self, plan: Plan, now: float) -> None:
        # Every node checks the others' gossiped fingerprints against its own model files.
        members = {m.node_id: m for m in self.membership.members()}
        metas = self.metas()
        claims = [StageClaim(a.node_id, m.name if m else a.node_id[:8], a.start, a.end,
                             meta.fingerprint if meta else None)
                  for a in plan.order
                  for m, meta in [(members.get(a.node_id), metas.get(a.node_id))]]
        problems = self.loader.check_ring(claims, self.node_id)
        if problems:
            reason = fingerprint_problem(problems)
            log.error("refusing to serve plan epoch %d: %s", plan.epoch, reason)
            self.agreement.load_failed(plan.hash, reason)
            self._publish(refusal=refusal_text(reason))
            notify(status=f"refusing to serve: {reason}")
            return
        self.ring_fingerprint = ring_fingerprint(plan.hash, [c.fingerprint or "" for c in claims])
        self.timeline.setdefault("ready", now - self.started)
        route = route_of(plan)
        if self.fault is Fault.STALE_EPOCH:  # test hook: route with the previous epoch
            route = Route(max(0, route.epoch - 1), route.stages, route.num_layers)
        names = {m.node_id: m.name for m in members.values() if m.name}
        self.runner.serve(route, self.loader.compute_for(plan, self.node_id), names,
                          *self.served)
        mine = plan.assignment(self.node_id)
        where = f"layers {mine.start}-{mine.end - 1}" if mine else "no layers (entry only)"
        log.info("ring ready: plan %s epoch %d, %d nodes, %s here", plan.hash[:8], plan.epoch,
                 len(plan.order), where)
        self.ready.set()
        notify(ready=True, status=f"serving: ring of {len(plan.order)} nodes, {where}")

    # ---------------------------------------------------------------- queries
    def address_of(self, node_id: str) -> Addr | None:
        m = self.membership.member(node_id)
        return m.addr if m is not None else None

    def members(self) -> list[Member]:
        return self.membership.members()

    def metas(self) -> dict[str, NodeMeta]:
        """Every member's metadata as this node reads it (a member whose metadata cannot be
        read is missing), this node's own included."""
        metas = self._decoder.decode(self.membership.members())
        metas[self.node_id] = self.meta
        return metas

    def not_ready_reason(self) -> str:
        """Why the ring is not serving: the agreement's reason, or the nodes that refuse."""
        metas = self.metas()
        return not_ready_reason(self.agreement.reason, [
            (m.name or m.node_id[:8], meta.refusal) for m in self.membership.members()
            if (meta := metas.get(m.node_id)) and meta.refusal and m.node_id != self.node_id])
