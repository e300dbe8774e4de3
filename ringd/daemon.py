"""``ringd``: the composition root. Settings -> cores + adapters, in one task group.

Order of a node's life:
  logging -> state dir (node id, boot epoch, lock) -> cluster key -> model files -> ports
  (peer UDP+TCP, HTTP API) -> membership + agreement -> discovery -> serve ->
  on SIGTERM: refuse new requests, announce leave, drain, close. A second signal forces exit.

The cores (membership, agreement, pipeline) are pure; this module feeds them what arrives
and the clock, does what they say, and re-arms one timer.
"""

from __future__ import annotations

import asyncio
import faulthandler
import importlib
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import click

from ringd import PROTOCOL_VERSION, __version__
from ringd.config import Settings, format_size
from ringd.core import wire
from ringd.core.agreement import (Agreement, LoadShard, PlanDropped, PlanUnfit, RingReady,
                                  StopServing)
from ringd.core.membership import (Member, MemberState, Membership, MembershipConfig, NodeMeta,
                                   NodePhase)
from ringd.core.pipeline import Route, Stage
from ringd.core.plan import ModelShape, Plan
from ringd.core.requests import FinishEvent, GenerationRequest, TokenEvent
from ringd.daemon_cli import build_settings, settings_options
from ringd.errors import ConfigError, ModelError, RemoteProtocolError, RingdError, UsageError
from ringd.status import ModelStatus, Status, ring_status

log = logging.getLogger("ringd.daemon")

Addr = tuple[str, int]


def model_shape(info: Any, settings: Settings) -> ModelShape:
    """What the plan needs to know of the model: bytes per layer, ends, KV cache per layer."""
    kv = info.kv_bytes_per_token_per_layer * settings.max_context * settings.max_concurrent
    return ModelShape(info.name, tuple(info.layer_bytes), info.embed_bytes,
                      info.head_bytes + info.norm_bytes, kv)


def route_of(plan: Plan) -> Route:
    return Route(plan.epoch, tuple(Stage(a.node_id, a.start, a.end) for a in plan.order), plan.num_layers)


class Node:
    """One ringd node: owns the subsystems and glues them together on the event loop."""

    def __init__(self, settings: Settings, state: Any) -> None:
        self.settings = settings
        self.state = state  # ringd.state.NodeState
        self.node_id: str = state.node_id
        self.started = time.monotonic()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._load_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.compute: Any = None  # StageCompute of the committed plan, once loaded
        self.loaded_for: str | None = None
        self.ready_event = asyncio.Event()
        self.load_seconds: float | None = None
        self.timeline: dict[str, float] = {}
        self._accepting = False  # peer messages are handled once setup is complete
        self.manifest: Any = None  # ringd.compute.manifest.Manifest of the model files, once read
        self.bandwidth: tuple[float, str] | None = None  # memory bandwidth (bytes/s) and its source
        self.ring_fingerprint: str | None = None  # while serving

    # ------------------------------------------------------------------ start-up
    async def setup(self) -> None:
        from ringd.compute import store
        from ringd.compute.memory import usable_memory
        from ringd.compute.model_info import inspect_model
        from ringd.compute.tokenizer import Tokenizer
        from ringd.keys import load_or_create_key
        from ringd.net.api import ApiServer
        from ringd.net.transport import Transport
        from ringd.runner import RingRunner

        s = self.settings
        self.key, created = load_or_create_key(s.key_path)
        if created:
            log.warning("created a new cluster key in %s: copy it (mode 0600) to every node of this ring",
                        s.key_path)
        self.cluster_id = wire.cluster_id(self.key)
        self.model_dir = store.resolve_model(s.model_store, s.model)
        self.info = inspect_model(self.model_dir)
        self.shape = model_shape(self.info, s)
        usable, total = usable_memory(s.memory_reserve)
        if s.memory_budget is not None:
            usable = s.memory_budget
        self.usable, self.total = usable, total
        self.tokenizer = await asyncio.to_thread(Tokenizer.load, self.model_dir)

        self.transport = Transport(s, node_id=self.node_id, key=self.key, on_message=self._on_message,
                                   on_stale=self._on_stale)
        self.port = (await self.transport.start())[1]
        host = s.advertise_host or _default_advertise(s)
        self.addr: Addr = (host, self.port)

        self.runner = RingRunner(s, self.node_id, self.tokenizer, self.info.name, self.info.eos_token_ids,
                                 self._send, not_ready_reason=self.not_ready_reason)
        self.api = ApiServer(NodeBackend(self), host=s.http_host, port=s.http_port, api_key=s.api_key,
                             on_shutdown=self.request_stop)
        self.http_port = await self.api.start()

        meta = NodeMeta(usable_memory=usable, total_memory=total, models=(self.info.name,),
                        phase=NodePhase.JOINING, software_version=__version__,
                        protocol_version=PROTOCOL_VERSION, http_port=self.http_port,
                        model=s.model, model_version=0)
        self.membership = Membership(self.node_id, s.node_name, self.addr, meta,
                                     rng=random.Random(), config=MembershipConfig.from_settings(s))
        self.agreement = Agreement(self.node_id, last_epoch=self.state.plan_epoch)
        self.discovery = None
        if s.mdns:
            from ringd.net.discovery import Discovery

            self.discovery = Discovery(self.node_id, self.cluster_id, self.port, self.http_port,
                                       list(s.mdns_interfaces) or None, on_peer=self._on_peer,
                                       advertise=[s.advertise_host] if s.advertise_host else None)
        self._accepting = True
        log.info("node %s (%s) on %s:%d, HTTP API on %s:%d, offering %s of %s for %s",
                 self.node_id, s.node_name, host, self.port, s.http_host, self.http_port,
                 format_size(usable), format_size(total), self.info.name)

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        from ringd.service.sdnotify import notify, watchdog_interval
        from ringd.service.watchdog import StallDetector, systemd_watchdog

        async def stall_loop(after: float) -> None:
            """Test hook (RINGD_TEST_STALL_AFTER=seconds): block the event loop for good that
            long after the ring is ready, as a hung call would; the stall detector must end it."""
            await self.ready_event.wait()
            await asyncio.sleep(after)
            log.warning("RINGD_TEST_STALL_AFTER is set: blocking the event loop (test hook)")
            while True:
                time.sleep(1.0)

        # MLX, mlx-lm and transformers take seconds to import: do it off the loop (the watchdog
        # keeps pinging, the stall detector stays quiet) and in a daemon thread, so a SIGTERM
        # meanwhile ends the process at once instead of after the imports.
        loop = asyncio.get_running_loop()
        imported: asyncio.Future[None] = loop.create_future()

        def import_modules() -> None:
            error: BaseException | None = None
            try:
                for module in ("ringd.runner", "ringd.net.api", "ringd.net.transport"):
                    importlib.import_module(module)
            except BaseException as e:  # raised on the loop
                error = e

            def deliver() -> None:
                if imported.done():
                    return
                if error is not None:
                    imported.set_exception(error)
                else:
                    imported.set_result(None)

            try:
                loop.call_soon_threadsafe(deliver)
            except RuntimeError:
                pass  # the loop is closed: we stopped while importing

        threading.Thread(target=import_modules, name="ringd-import", daemon=True).start()

        s = self.settings
        async with asyncio.TaskGroup() as tg:
            if s.stall_timeout > 0:
                self._keep(tg.create_task(StallDetector(s.stall_timeout).run()))
            interval = watchdog_interval()
            if interval is not None:
                self._keep(tg.create_task(systemd_watchdog(interval)))
            notify(status="starting")
            stop_wait = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait((imported, stop_wait), return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            if not imported.done():
                log.info("stopped while starting")
                notify(stopping=True, status="stopped while starting")
                for t in list(self._tasks):
                    t.cancel()
                return
            imported.result()
            await self.setup()
            if self.discovery is not None:
                await self.discovery.start()
            self.timeline["started"] = time.monotonic() - self.started
            seeds = await asyncio.gather(*(asyncio.to_thread(_resolve_peer, p) for p in s.peers))
            self.membership.join([a for a in seeds if a is not None], time.monotonic())
            self._pump(time.monotonic())
            notify(status="waiting for peers")
            main = tg.create_task(self._timer_loop())
            stall_after = os.environ.get("RINGD_TEST_STALL_AFTER")
            if stall_after:
                self._keep(tg.create_task(stall_loop(float(stall_after))))
            await self._stopping.wait()
            await self._shutdown()
            main.cancel()
            for t in list(self._tasks):
                t.cancel()

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _timer_loop(self) -> None:
        while True:
            timers = [t for t in (self.membership.get_timer(), self.agreement.get_timer(),
                                  self.runner.table.next_deadline()) if t is not None]
            delay = max(0.0, min(timers) - time.monotonic()) if timers else 1.0
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(delay, 1.0))
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            self.membership.handle_timer(now)
            self.agreement.handle_timer(now)
            self.runner.expire(now)
            self._pump(now)

    def _pump(self, now: float) -> None:
        """After any input: membership events -> agreement -> published meta -> outbox."""
        for ev in self.membership.events():
            log.debug("membership: %s", ev)
        view = self.membership.view()
        metas = {m.node_id: m.meta for m in self.membership.members()}
        self.agreement.update(now, view, metas, self.shape if view.model == self.info.name else None)
        for ev in self.agreement.events():
            self._on_agreement(ev, now)
        pub = self.agreement.published()
        if self.membership.leaving:
            pub["phase"] = NodePhase.LEAVING
        self.membership.update_meta(**pub)
        self.transport.set_epoch(self.agreement.epoch)
        for addr, payload in self.membership.outbox():
            # SWIM does its own retries: probes must not be masked by retransmission
            self.transport.send(addr, wire.Gossip(payload), reliable=False)
        self._wake.set()

    def _on_agreement(self, ev: Any, now: float) -> None:
        from ringd.service.sdnotify import notify

        if isinstance(ev, StopServing):
            log.warning("ring stops serving plan epoch %d: %s", ev.plan.epoch, ev.reason)
            self.runner.stop_serving(ev.reason)
            self.ring_fingerprint = None
            self.ready_event.clear()
            notify(status=f"re-forming: {ev.reason}")
        elif isinstance(ev, PlanDropped):
            if self._load_task is not None:
                self._load_task.cancel()
        elif isinstance(ev, LoadShard):
            self.timeline.setdefault("committed", now - self.started)
            self.membership.update_meta(refusal=None)
            self.state.save_plan_epoch(ev.plan.epoch)
            self._load_task = asyncio.get_running_loop().create_task(self._load(ev.plan, ev.assignment))
            self._keep(self._load_task)
        elif isinstance(ev, RingReady):
            from ringd.core.proof import (StageClaim, check_fingerprints, fingerprint_problem,
                                          refusal_text, ring_fingerprint)

            # Every node checks the others' gossiped fingerprints against its own model files.
            members = {m.node_id: m for m in self.membership.members()}
            claims = [StageClaim(a.node_id, m.name if m else a.node_id[:8], a.start, a.end,
                                 m.meta.fingerprint if m else None)
                      for a in ev.plan.order for m in [members.get(a.node_id)]]
            manifest = self.manifest
            problems = (check_fingerprints(claims, lambda a, b: manifest.expected(self.info, a, b),
                                           self.node_id)
                        if manifest is not None else ["this node could not read its model files"])
            if problems:
                reason = fingerprint_problem(problems)
                log.error("refusing to serve plan epoch %d: %s", ev.plan.epoch, reason)
                self.agreement.load_failed(ev.plan.hash, reason)
                self.membership.update_meta(refusal=refusal_text(reason))
                notify(status=f"refusing to serve: {reason}")
                return
            self.ring_fingerprint = ring_fingerprint(ev.plan.hash,
                                                     [c.fingerprint or "" for c in claims])
            self.timeline.setdefault("ready", now - self.started)
            if self.compute is not None and self.loaded_for == ev.plan.layout_hash:
                self.runner.serve(route_of(ev.plan), self.compute,
                                  {m.node_id: m.name for m in members.values() if m.name})
            mine = ev.plan.assignment(self.node_id)
            where = f"layers {mine.start}-{mine.end - 1}" if mine else "no layers (entry only)"
            log.info("ring ready: plan %s epoch %d, %d nodes, %s here", ev.plan.hash[:8], ev.plan.epoch,
                     len(ev.plan.order), where)
            self.ready_event.set()
            notify(ready=True, status=f"serving: ring of {len(ev.plan.order)} nodes, {where}")
        elif isinstance(ev, PlanUnfit):
            log.error("the ring cannot hold %s: %s", self.info.name, ev.error)
            notify(status=f"cannot fit the model: {ev.error.message}")

    async def _load(self, plan: Plan, assignment: Any) -> None:
        from ringd.compute.bandwidth import detect_bandwidth
        from ringd.compute.manifest import expected_tensors, load_manifest
        from ringd.compute.stage import StageCompute, injected_fault
        from ringd.core.proof import check_loaded, refusal_text
        from ringd.service.sdnotify import notify

        s = self.settings
        if self.bandwidth is None:
            self.bandwidth = ((float(s.memory_bandwidth), "configured") if s.memory_bandwidth
                              else await asyncio.to_thread(detect_bandwidth))
            log.info("memory bandwidth %.1f GB/s (%s)", self.bandwidth[0] / 1e9, self.bandwidth[1])
            self.membership.update_meta(memory_bandwidth=int(self.bandwidth[0]))
        try:
            # Per-tensor hashes of the local files: built once, then read (and kept) in memory.
            self.manifest = manifest = await asyncio.to_thread(load_manifest, self.model_dir)
            if assignment is None:
                self.membership.update_meta(fingerprint=None)
                self.agreement.loaded(plan.hash, time.monotonic())
                self._pump(time.monotonic())
                return
            start, end = assignment.start, assignment.end
            if self.compute is not None and self.loaded_for == plan.layout_hash:
                log.info("layers %d-%d already loaded", start, end - 1)
            else:
                notify(status=f"loading layers {start}-{end - 1} of {plan.num_layers}")
                log.info("loading layers [%d, %d) of %s", start, end, self.info.name)
                old, self.compute, self.loaded_for = self.compute, None, None
                self.membership.update_meta(fingerprint=None)
                t0 = time.monotonic()
                if old is not None:
                    await self.runner.run_compute(old.free_all)
                    del old
                compute = await self.runner.run_compute(StageCompute.load, self.model_dir, start,
                                                        end, injected_fault(s.node_name))
                # Refuse to serve unless the shard holds exactly the tensors of its assignment.
                problem = check_loaded(start, end, expected_tensors(self.info, start, end),
                                       compute.tensor_names)
                if problem:
                    raise ModelError(problem, hint="the model files or this node's loader are "
                                                   "broken; re-copy the model directory")
                fingerprint = manifest.fingerprint(start, end, compute.tensor_names)
                self.load_seconds = time.monotonic() - t0
                self.compute, self.loaded_for = compute, plan.layout_hash
                self.membership.update_meta(fingerprint=fingerprint)
                log.info("loaded layers [%d, %d): %s in %.2f s, fingerprint %s", start, end,
                         format_size(compute.loaded_bytes), self.load_seconds, fingerprint)
        except RingdError as e:
            log.error("cannot serve plan %s: %s", plan.hash[:8], e)
            self.agreement.load_failed(plan.hash,
                                       e.message + (f" (hint: {e.hint})" if e.hint else ""))
            self.membership.update_meta(refusal=refusal_text(e.message))
            self._pump(time.monotonic())
            return
        self.agreement.loaded(plan.hash, time.monotonic())
        self._pump(time.monotonic())

    # ------------------------------------------------------------------ inputs
    def _on_message(self, sender: str, addr: Addr, msg: wire.Message) -> None:
        if not self._accepting:
            return  # a fast peer's first gossip can arrive while this node is still starting
        now = time.monotonic()
        if isinstance(msg, wire.Gossip):
            try:
                self.membership.receive(msg.payload, addr, now)
            except RemoteProtocolError as e:  # counted by membership; one rate-limited line here
                log.warning("dropped a membership message from %s:%d: %s", addr[0], addr[1], e.message)
                return
            self._pump(now)
        else:
            self.runner.on_message(msg, sender)

    def _on_stale(self, sender: str, addr: Addr, msg: wire.Message) -> None:
        if self._accepting:
            self.runner.on_stale(msg, sender, self.agreement.epoch)

    def _on_peer(self, peer: Any) -> None:
        if not self._accepting:
            return
        now = time.monotonic()
        for a in peer.addresses:
            self.membership.add_peer_address((a, peer.port), now)
        self._pump(now)

    def _send(self, node_id: str, msg: wire.Message) -> None:
        """Data plane out: to ourselves without a socket, to a member by its address."""
        if node_id == self.node_id:
            asyncio.get_running_loop().call_soon(self.runner.on_message, msg, self.node_id)
            return
        m = self.membership.member(node_id)
        if m is None:
            log.warning("no address for node %s; dropping %s", node_id[:8], type(msg).__name__)
            return
        self.transport.send(m.addr, msg)

    def request_stop(self) -> None:
        self._stopping.set()

    # ------------------------------------------------------------------ shutdown
    async def _shutdown(self) -> None:
        from ringd.service.sdnotify import notify

        s = self.settings
        notify(stopping=True, status="leaving the ring")
        log.info("leaving the ring")
        self.runner.leaving = True
        try:
            await asyncio.wait_for(self.runner.idle.wait(), s.shutdown_timeout)
        except asyncio.TimeoutError:
            log.warning("requests still running after %g s (shutdown_timeout): failing them",
                        s.shutdown_timeout)
            self.runner.stop_serving(f"node {s.node_name} is shutting down and ended the requests "
                                     f"still running after shutdown_timeout ({s.shutdown_timeout:g} s)",
                                     code="leaving")
        self.membership.leave(time.monotonic())
        self._pump(time.monotonic())
        self._accepting = False  # from here on only the leave gossip goes out
        t_end = time.monotonic() + min(2.0, s.shutdown_timeout)
        while not self.membership.leave_complete and time.monotonic() < t_end:
            timer = self.membership.get_timer()  # gossip rounds carry the leave
            await asyncio.sleep(max(0.0, min(t_end, timer or t_end) - time.monotonic()))
            self.membership.handle_timer(time.monotonic())
            self._pump(time.monotonic())
        await self.runner.close()
        await self.api.close()
        if self.discovery is not None:
            await self.discovery.close()
        await self.transport.close()
        log.info("stopped")

    # ------------------------------------------------------------------ status
    def not_ready_reason(self) -> str:
        """Why the ring is not serving: the agreement's reason, or the nodes that refuse."""
        from ringd.core.proof import not_ready_reason

        return not_ready_reason(self.agreement.reason, [
            (m.name or m.node_id[:8], m.meta.refusal) for m in self.membership.members()
            if m.meta.refusal and m.node_id != self.node_id])

    def status(self) -> Status:
        serving = self.runner.route is not None
        rate = self.runner.last_rate
        return ring_status(
            node_id=self.node_id, node_name=self.settings.node_name, addr=self.addr,
            http_port=self.http_port, members=self.membership.members(),
            plan=self.agreement.plan, rtt=self.membership.rtt,
            model=ModelStatus(self.info.name, self.info.num_layers, self.info.total_bytes),
            shard_bytes=self.info.shard_bytes, serving=serving,
            reason=None if serving else self.not_ready_reason(),
            fingerprint=self.ring_fingerprint,
            measured_tps=rate["tokens_per_second"] if rate else None,
            agreement=self.agreement.status(), timeline=self.timeline,
            stats={"runner": self.runner.status(), "membership": self.membership.stats(),
                   "transport": self.transport.stats(),
                   "discovery": self.discovery.stats().__dict__ if self.discovery else None,
                   "compute": self.compute.stats() if self.compute else None})


class NodeBackend:
    """The Backend the HTTP API sees: generation from the ring runner, status from the node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def trace(self, prompt: str, steps: int) -> dict[str, Any]:
        """Greedy tokens with their logits and the route taken (``POST /ringd/verify``)."""
        return await self.node.runner.trace(prompt, steps)

    def served_models(self) -> list[str]:
        return self.node.runner.served_models()

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        return self.node.runner.generate(request)

    def status(self) -> Status:
        return self.node.status()


def parse_peer(text: str) -> Addr:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"static peer {text!r} is not host:port", hint="write e.g. 192.168.1.20:7411")
    return host.strip("[]"), int(port)


def _resolve_peer(text: str) -> Addr | None:
    """A static peer as an IP address (membership keys peers by address); None if unresolvable."""
    host, port = parse_peer(text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        log.warning("static peer %s: cannot resolve %s (%s); skipping it", text, host, e.strerror)
        return None
    ipv4 = [i for i in infos if i[0] == socket.AF_INET]
    return (ipv4 or infos)[0][4][0], port


def _default_advertise(s: Settings) -> str:
    if s.bind_host not in ("0.0.0.0", "::", ""):
        return s.bind_host
    from ringd.net.discovery import local_addresses

    addrs = local_addresses()
    return addrs[0] if addrs else "127.0.0.1"


# ---------------------------------------------------------------------- entry point
async def _amain(settings: Settings, state: Any) -> None:
    node = Node(settings, state)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second %s: exiting now", signame)
            os._exit(1)
        log.info("%s received: stopping", signame)
        node.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    await node.run()


def _ringd_errors(exc: BaseException) -> list[RingdError]:
    """The RingdErrors in ``exc`` (the task group wraps them); [] if anything else is in it."""
    if isinstance(exc, RingdError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        found = [_ringd_errors(e) for e in exc.exceptions]
        return [e for sub in found for e in sub] if all(found) else []
    return []


def run_node(settings: Settings) -> int:
    """Run a node until it is stopped; returns the exit code."""
    from ringd.logs import configure_logging, set_node_id
    from ringd.state import NodeState

    configure_logging(settings.log_level, settings.log_json, None)
    if settings.log_level.lower() != "debug":  # ringctl status polls; one line per call is noise
        logging.getLogger("ringd.net.api.access").setLevel(logging.WARNING)
    faulthandler.enable()
    try:
        state = NodeState.open(settings.state_dir)
    except RingdError as e:
        click.echo(f"ringd: {e}", err=True)
        return 2
    set_node_id(state.node_id)
    try:
        from ringd.net.loop import run as run_loop

        for peer in settings.peers:
            parse_peer(peer)
        run_loop(_amain(settings, state))
    except (RingdError, ExceptionGroup) as exc:
        errors = _ringd_errors(exc)
        if not errors:
            raise
        for e in errors:
            log.error("%s", e)
            click.echo(f"ringd: {e}", err=True)
        return 2 if all(isinstance(e, (ConfigError, UsageError, ModelError)) for e in errors) else 1
    finally:
        state.close()
    return 0


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ringd")
def cli() -> None:
    """ringd: one node of a ring that runs a language model too large for any one machine."""


@cli.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None, envvar="RINGD_CONFIG",
              help="TOML config file (also RINGD_CONFIG).")
@settings_options
def run(config: str | None, **flags: Any) -> None:
    """Run this node: find peers, agree on a plan, load this node's layers, serve."""
    try:
        settings = build_settings(config, flags)
    except RingdError as e:
        click.echo(f"ringd: {e}", err=True)
        sys.exit(2)
    code = run_node(settings)
    # Everything is closed and saved. Leave without running C++ static destructors: MLX's
    # per-thread CPU streams can abort the process there ("terminate called without an
    # active exception"), which would turn a clean stop into a crash for systemd/launchd.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:  # plain `ringd` / `python -m ringd` runs the node
        args = ["run"]
    cli.main(args=args, prog_name="ringd")


if __name__ == "__main__":  # pragma: no cover
    main()
