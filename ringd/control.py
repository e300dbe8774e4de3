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
from ringd.compute.tokenizer import Tokenizer
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
from ringd.core.paths import Advertised
from ringd.core.plan import Plan, model_shape
from ringd.core.proof import (
    StageClaim,
    fingerprint_problem,
    not_ready_reason,
    refusal_text,
    ring_fingerprint,
)
from ringd.core.ringmeta import (Holding, MetaDecoder, NodeMeta, NodePhase, View,
                                  adopt_active_model, make_view, set_active_model)
from ringd.core.route import Route, Stage
from ringd.core.swim_config import MembershipConfig
from ringd.core.swim_wire import Member
from ringd.core.timing import TIMINGS_INTERVAL, StageTimings
from ringd.errors import ModelError, RemoteProtocolError, RingdError, UsageError
from ringd.faults import Fault
from ringd.models import LocalModel, ModelLibrary
from ringd.net.transport import Transport
from ringd.provision import Provisioner
from ringd.runner import Runner, served_model
from ringd.service.sdnotify import notify
from ringd.shard import ShardLoader

log = logging.getLogger(__name__)

Addr = tuple[str, int]
#: Seconds a starting node waits to hear from a ring (is it busy?) before it plans alone.
LONE_NODE_WAIT = 1.0


def route_of(plan: Plan) -> Route:
    return Route(plan.epoch, tuple(Stage(a.node_id, a.start, a.end) for a in plan.order),
                 plan.num_layers)


class RingControl:
    """Membership + agreement for one node, and what follows from their decisions."""

    def __init__(self, settings: Settings, node_id: str, addr: Addr, *, usable: int,
                 total: int, http_port: int, state: Any, transport: Transport,
                 library: ModelLibrary, provisioner: Provisioner, loader: ShardLoader,
                 runner: Runner, spawn: Callable[[Any], asyncio.Task[Any]],
                 fault: Fault | None = None, addresses: tuple[Advertised, ...] = ()) -> None:
        self.settings = settings
        self.node_id = node_id
        self.state = state  # ringd.state.NodeState: the plan epoch survives restarts
        self.transport = transport
        self.library = library
        self.provisioner = provisioner
        self.loader = loader
        self.runner = runner
        self.fault = fault
        self._spawn = spawn
        self._load_task: asyncio.Task[Any] | None = None
        self._loaded: tuple[str, LocalModel, Tokenizer] | None = None  # plan hash -> model
        self._standby_since: float | None = None  # joined a busy ring at
        self._committed_epoch = state.plan_epoch  # of the last plan this node committed to
        self.view: View | None = None
        self.ring_fingerprint: str | None = None  # while serving
        self.started = time.monotonic()
        self.timeline: dict[str, float] = {}
        self.ready = asyncio.Event()  # set while the ring serves (sd_notify READY, test hooks)
        self.wake = asyncio.Event()  # set when a timer may have moved earlier
        # it starts on standby, out of views, until it knows whether the ring it joins is
        # busy (a busy ring should not re-plan for it at once): see _standby
        self.meta = NodeMeta(usable_memory=usable, total_memory=total,
                             holdings=library.holdings(), phase=NodePhase.JOINING,
                             software_version=__version__, http_port=http_port,
                             model=settings.model, model_version=0, standby=True,
                             addresses=addresses)
        self._decoder = MetaDecoder()  # the members' metadata as the ring reads it
        self.membership = Membership(node_id, settings.node_name, addr, self.meta.encode(),
                                     rng=random.Random(),
                                     config=MembershipConfig.from_settings(settings))
        self.agreement = Agreement(node_id, last_epoch=state.plan_epoch)
        self._timings_at = float("-inf")  # when the gossiped step timings were last read

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
        if self._standby_since is not None:
            timers.append(self._standby_since + self.settings.replan_drain)
        return min(timers) if timers else None

    def leave(self, now: float) -> None:
        self._publish(phase=NodePhase.LEAVING)  # the LEFT record carries it
        self.membership.leave(now)
        self.pump(now)

    def use_model(self, name: str, now: float) -> int:
        """Make ``name`` the ring's model (``ringctl model use``); the new setting's version.
        Refused (UsageError) when no live node holds a model of that name."""
        metas = self.metas()
        live = {m.node_id for m in self.membership.live_members()} | {self.node_id}
        if not any(h.name == name for i, m in metas.items() if i in live for h in m.holdings):
            held = sorted({h.name for i, m in metas.items() if i in live for h in m.holdings})
            raise UsageError(f"no node of the ring holds a model named {name!r} (held: "
                             f"{', '.join(held) or 'none'})",
                             hint="put it on one node first: `ringctl model pull` or "
                                  "`ringctl model import`")
        everyone = self._decoder.decode(self.membership.members())
        self.meta = set_active_model(self.meta, everyone, name)
        log.info("the ring's model is now %s (setting version %d)", name,
                 self.meta.model_version)
        self.pump(now)
        return self.meta.model_version

    # ---------------------------------------------------------------- the pump
    def pump(self, now: float) -> None:
        """After any input: membership events -> agreement -> published meta -> outbox."""
        for ev in self.membership.events():
            log.debug("membership: %s", ev)
        metas = self._decoder.decode(self.membership.members())
        if not self.membership.leaving:  # the ring-wide model setting outlives its writer
            self.meta = adopt_active_model(self.node_id, self.meta, metas)
        holdings = self.library.holdings()
        if holdings != self.meta.holdings:
            self.meta = dataclasses.replace(self.meta, holdings=holdings)
            self.provisioner.fetcher.holders_changed()
        standby = self._standby(metas, now)
        busy = self.runner.pipeline.active_entries > 0
        if (standby, busy) != (self.meta.standby, self.meta.busy):
            self.meta = dataclasses.replace(self.meta, standby=standby, busy=busy)
        metas[self.node_id] = self.meta
        view = make_view(self.membership.live_members(), metas)
        if self.view is None or view.hash != self.view.hash:
            self.provisioner.retry()  # holders may have come
            self.provisioner.fetcher.holders_changed()
        self.view = view
        model = self.library.by_id(view.model_id) if view.model_id else None
        missing = (self.provisioner.need_model(view.model, view.model_id)
                   if view.model_id and model is None else None)
        shape = model_shape(model.info, self.settings) if model is not None else None
        if not standby:  # on standby it takes no part in the agreement (it is not in views)
            self.agreement.update(now, view, metas, shape, missing)
        for ev in self.agreement.events():
            self._on_agreement(ev, now)
        pub = self.agreement.published()
        progress = self.provisioner.fetch_progress()
        if self.membership.leaving:
            pub["phase"] = NodePhase.LEAVING
        elif self.provisioner.fetching is not None:
            pub["phase"] = NodePhase.FETCHING
        self._publish(**pub, fetch=progress, timings=self._timings(now))
        for addr, payload in self.membership.outbox():
            # SWIM does its own retries: probes must not be masked by retransmission
            self.transport.send(addr, wire.Gossip(payload), reliable=False)
        self.wake.set()

    def _standby(self, metas: dict[str, NodeMeta], now: float) -> bool:
        """Whether this node, joining a ring that serves a plan without it while requests
        run, waits (``replan_drain`` at most) before the ring re-plans with it: running
        requests then need no replay, or they get one only after the drain."""
        if (not any(i != self.node_id for i in metas)
                and now - self.started < LONE_NODE_WAIT):
            return True  # not heard from the ring yet: it may be busy
        # a ring serving a plan newer than any this node took part in: it joins (or comes
        # back after the ring went on without it)
        moved_on = [m for i, m in metas.items() if i != self.node_id
                    and m.phase is NodePhase.SERVING and m.epoch > self._committed_epoch]
        joining = self.agreement.plan is None and not self.membership.leaving
        if not (joining and any(m.busy for m in moved_on)):
            self._standby_since = None
            return False
        if self._standby_since is None:
            self._standby_since = now
            log.info("the ring serves requests: waiting (at most %g s, replan_drain) before "
                     "it re-plans with this node", self.settings.replan_drain)
        return now - self._standby_since < self.settings.replan_drain

    def _timings(self, now: float) -> StageTimings | None:
        """This node's step timings to gossip (read at most every TIMINGS_INTERVAL): the
        runner's rolling statistics and the round trip to the next stage of the plan."""
        if now - self._timings_at < TIMINGS_INTERVAL:
            return self.meta.timings
        self._timings_at = now
        read = getattr(self.runner, "timings", None)  # Runner.timings() (issue 17)
        raw = read() if callable(read) else None
        plan, rtt = self.agreement.plan, None
        if plan is not None and len(plan.order) > 1 and plan.assignment(self.node_id):
            seconds = self.membership.rtt(plan.next_after(self.node_id))
            # two significant digits: a link's jitter should not make a new gossip each time
            rtt = None if seconds is None else float(f"{seconds * 1000:.2g}")
        if raw is None and rtt is None:
            return None
        return StageTimings.read(raw if isinstance(raw, dict) else {}, next_rtt_ms=rtt)

    def _publish(self, **changes: Any) -> None:
        """Change this node's metadata; membership gossips it if the bytes changed."""
        self.meta = dataclasses.replace(self.meta, **changes)
        self.membership.update_meta(self.meta.encode())

    def _on_agreement(self, ev: Any, now: float) -> None:
        if isinstance(ev, StopServing):
            log.warning("ring stops serving plan epoch %d: %s", ev.plan.epoch, ev.reason)
            # running requests pause, to go on by replay once the ring serves again
            self.runner.stop_serving(ev.reason, pause=not self.membership.leaving)
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
            self._committed_epoch = ev.plan.epoch
            assert self.view is not None
            self._load_task = self._spawn(self._load(ev, self.view.model_id))
        elif isinstance(ev, RingReady):
            self._ring_ready(ev.plan, now)
        elif isinstance(ev, PlanUnfit):
            log.error("the ring cannot hold its model: %s", ev.error)
            self.runner.fail_paused(f"the ring cannot hold its model any more: "
                                    f"{ev.error.message}")
            notify(status=f"cannot fit the model: {ev.error.message}")

    async def _load(self, ev: LoadShard, model_id: str) -> None:
        plan, a = ev.plan, ev.assignment
        try:
            model = self.library.by_id(model_id)
            if model is None:
                raise ModelError(f"model {model_id[:12]} left the store while its plan loaded")
            bandwidth, _ = await self.loader.memory_bandwidth()
            self._publish(memory_bandwidth=int(bandwidth))
            if a is not None:
                model = await self.provisioner.ensure_layers(model, a.start, a.end)
            tokenizer = await asyncio.to_thread(Tokenizer.load, model.path)
            fingerprint = await self.loader.load(plan, a, model,
                                                 status=lambda text: notify(status=text))
        except RingdError as e:
            log.error("cannot serve plan %s: %s", plan.hash[:8], e)
            self.agreement.load_failed(plan.hash,
                                       e.message + (f" (hint: {e.hint})" if e.hint else ""))
            self._publish(refusal=refusal_text(e.message))
            self.runner.fail_paused(f"node {self.settings.node_name} cannot load its layers: "
                                    f"{e.message}")
        else:
            self._loaded = (plan.hash, model, tokenizer)
            self._publish(fingerprint=fingerprint)
            self.agreement.loaded(plan.hash, time.monotonic())
        self.pump(time.monotonic())

    def _ring_ready(self, plan: Plan, now: float) -> None:
        loaded = self._loaded
        if loaded is None or loaded[0] != plan.hash:
            log.error("ring ready on plan %s, but this node did not load it", plan.hash[:8])
            self.agreement.load_failed(plan.hash, "this node did not load the plan")
            return
        _, model, tokenizer = loaded
        # Every node checks the others' gossiped fingerprints against the model's manifest.
        members = {m.node_id: m for m in self.membership.members()}
        metas = self.metas()
        claims = [StageClaim(a.node_id, m.name if m else a.node_id[:8], a.start, a.end,
                             meta.fingerprint if meta else None)
                  for a in plan.order
                  for m, meta in [(members.get(a.node_id), metas.get(a.node_id))]]
        problems = self.loader.check_ring(claims, self.node_id, model)
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
        self.runner.serve(route, self.loader.compute_for(plan, self.node_id, model), names,
                          served_model(self.settings, model.info), tokenizer)
        mine = plan.assignment(self.node_id)
        where = f"layers {mine.start}-{mine.end - 1}" if mine else "no layers (entry only)"
        log.info("ring ready: %s, plan %s epoch %d, %d nodes, %s here", model.name,
                 plan.hash[:8], plan.epoch, len(plan.order), where)
        self.ready.set()
        notify(ready=True, status=f"serving {model.name}: ring of {len(plan.order)} nodes, "
                                  f"{where}")

    # ---------------------------------------------------------------- queries
    def address_of(self, node_id: str) -> Addr | None:
        """A member's membership address (the daemon may send bulk traffic elsewhere: see
        :meth:`ringd.daemon.Daemon.data_address`)."""
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

    def holders(self, model_id: str) -> dict[str, Holding]:
        """Live peers holding (part of) ``model_id``: node id -> what they hold of it."""
        metas = self._decoder.decode(self.membership.live_members())
        return {i: h for i, m in metas.items() if i != self.node_id
                for h in m.holdings if h.model_id == model_id}

    def names(self) -> dict[str, str]:
        return {m.node_id: m.name for m in self.membership.members() if m.name}

    def served_model(self) -> LocalModel | None:
        """The model of the plan this node loaded, if any."""
        return self._loaded[1] if self._loaded is not None else None

    def not_ready_reason(self) -> str:
        """Why the ring is not serving: the agreement's reason, or the nodes that refuse."""
        metas = self.metas()
        return not_ready_reason(self.agreement.reason, [
            (m.name or m.node_id[:8], meta.refusal) for m in self.membership.members()
            if (meta := metas.get(m.node_id)) and meta.refusal and m.node_id != self.node_id])
